"""Evaluation and prediction with trained classifiers.

* :func:`evaluate` — loss, top-1/top-5 and throughput of a model over a loader (all ranks).
* :func:`evaluate_checkpoint` — the same for a checkpoint file (the project's training files and
  safetensors, the authors' releases, any timm model's state dict) on a built-in dataset or an
  ImageNet-layout folder, with the checkpoint's own preprocessing unless overridden.
* :func:`predict` — top-k classes of image files, named by the checkpoint's classes (ImageNet
  names for 1000-class weights).

Both take ``int8=True`` for the opt-in int8 CPU inference of :func:`cyclemlp.quantize_int8`.

Models are rebuilt from their files by :func:`cyclemlp.models.factory.model_from_checkpoint`: a
project checkpoint records how it was made, so ``--checkpoint`` alone suffices for it; other files
need ``--model``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.data import ImageNetInfo
from torch import nn

from ..models.factory import data_config, model_from_checkpoint
from . import engine

logger = logging.getLogger(__name__)

__all__ = [
    "EvalResult",
    "Prediction",
    "evaluate",
    "evaluate_checkpoint",
    "predict",
]


@dataclass
class EvalResult:
    """Accuracies in percent; ``loss`` is the mean cross-entropy per image."""

    loss: float
    top1: float
    top5: float
    count: int
    skipped: int
    img_per_s: float
    seconds: float

    def __str__(self) -> str:
        skipped = f", {self.skipped} unreadable image(s) skipped" if self.skipped else ""
        return (
            f"top-1 {self.top1:.2f}%  top-5 {self.top5:.2f}%  loss {self.loss:.4f}  "
            f"({self.count} images, {self.img_per_s:.1f} img/s{skipped})"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    dist: engine.DistInfo | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    desc: str = "eval",
    progress: bool = True,
    channels_last: bool = False,
) -> EvalResult:
    """Cross-entropy, top-1 and top-5 of ``model`` over ``loader`` (batches ``(images, targets,
    n_skipped)``), summed over all ranks."""
    dist = dist or engine.DistInfo(device=next(model.parameters()).device)
    device = dist.device
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    skipped = 0
    bar = engine.progress_bar(len(loader.dataset), desc, progress and dist.is_main)
    start = time.perf_counter()
    for images, targets, n_skipped in loader:
        skipped += n_skipped
        if images is not None:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = model(images)
            logits = logits.float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hits = top == targets[:, None]
            sums += torch.stack([
                F.cross_entropy(logits, targets, reduction="sum").double(),
                hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                torch.tensor(float(len(targets)), dtype=torch.float64, device=device),
            ])
        bar.update((0 if images is None else len(images)) * dist.world_size + n_skipped)
    bar.close()
    seconds = time.perf_counter() - start
    model.train(was_training)
    sums = engine.reduce_sum(sums, dist)
    skipped = int(engine.reduce_sum(torch.tensor(float(skipped), device=device), dist).item())
    count = int(sums[3].item())
    if count == 0:
        raise ValueError("no image could be evaluated (the evaluation set is empty or unreadable)")
    return EvalResult(
        loss=sums[0].item() / count, top1=100 * sums[1].item() / count, top5=100 * sums[2].item() / count,
        count=count, skipped=skipped, img_per_s=count / max(seconds, 1e-9), seconds=seconds,
    )


def _eval_classes(model_classes: int, run: Mapping[str, Any] | None, dataset: str | None,
                  data: str | os.PathLike | None, split: str) -> list[str] | None:
    """Class names fixing the data's index mapping, checked against the model's class count."""
    from ..data import BUILTIN_DATASETS, builtin_name, find_classes

    if dataset:
        found = list(BUILTIN_DATASETS[builtin_name(dataset)].classes)
    else:
        found = find_classes(Path(data) / split)
    if run and run.get("classes"):
        known = list(run["classes"])
        extra = sorted(set(found) - set(known))
        if extra:
            raise ValueError(f"the data has classes the checkpoint was not trained on: {extra[:10]}")
        return known
    if model_classes == 1000 and not dataset:
        synsets = list(ImageNetInfo().label_names())
        if set(found) <= set(synsets):
            return synsets  # ImageNet synset folders (possibly a subset): ImageNet's indices
    if len(found) != model_classes:
        raise ValueError(
            f"the checkpoint's classifier has {model_classes} classes but the data ({data or dataset}, split "
            f"{split!r}) has {len(found)}; evaluate on matching data or pass a checkpoint for these classes"
        )
    return None


def _int8_device(device: str | torch.device, amp: bool = False) -> str:
    """The device of int8 inference: the CPU, which ``"auto"`` then means. Another device, mixed
    precision or a PyTorch without the int8 kernels is a ValueError."""
    from ..layers.kernels import check_int8

    if str(device) != "auto" and str(device).split(":")[0] != "cpu":
        raise ValueError(f"int8 inference runs on the CPU only; got device {str(device)!r}")
    if amp:
        raise ValueError("int8 inference runs in float32; it does not combine with mixed precision (amp)")
    try:
        check_int8()
    except RuntimeError as err:
        raise ValueError(str(err)) from None
    return "cpu" if str(device) == "auto" else str(device)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike | None,
    dataset: str | None = None,
    data: str | os.PathLike | None = None,
    split: str | None = None,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    pretrained: bool = False,
    use_ema: bool = False,
    img_size: int | tuple[int, int] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    batch_size: int = 128,
    workers: int = 2,
    device: str = "auto",
    subset: int | None = None,
    strict: bool = False,
    amp: bool = False,
    progress: bool = True,
    int8: bool = False,
) -> EvalResult:
    """Top-1/top-5, loss and img/s of a checkpoint on a dataset split (default: the evaluation
    split, ``test`` for built-in datasets and ``val`` for folders). Runs under torchrun too.
    ``int8``: with the int8 products of :func:`cyclemlp.quantize_int8`, on the CPU."""
    from ..data import build_dataset, build_loader, build_transform, default_splits
    from ..models.int8 import quantize_int8

    if int8:
        device = _int8_device(device, amp)
    if dataset is None and data is None:
        raise ValueError("no dataset given: pass --dataset NAME (built-in) or --data DIR (image folder)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    split = split or default_splits(dataset)[1]
    joined = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    dist = engine.setup_distributed(device)
    try:
        net, run, report = model_from_checkpoint(checkpoint, model, model_kwargs, pretrained=pretrained,
                                                 use_ema=use_ema)
        num_classes = net.num_classes if hasattr(net, "num_classes") else net.get_classifier().out_features
        classes = _eval_classes(num_classes, run, dataset, data, split)
        cfg = data_config(net, run, img_size, crop_pct, interpolation)
        in_chans = cfg["input_size"][0]
        ds = build_dataset(dataset, data, split, build_transform(cfg, False), classes=classes, in_chans=in_chans,
                           strict=strict, subset=subset)
        loader = build_loader(ds, batch_size, False, dist.rank, dist.world_size, workers=workers,
                              pin_memory=dist.device.type == "cuda")
        net.to(dist.device)
        if int8:
            quantize_int8(net)
        autocast = (lambda: torch.autocast(dist.device.type, dtype=torch.bfloat16 if dist.device.type == "cpu"
                                           else torch.float16)) if amp else contextlib.nullcontext
        engine.print0(f"evaluating on {data or dataset} ({split}, {len(ds)} images), input {cfg['input_size']}, "
                      f"crop {cfg['crop_pct']}, {cfg['interpolation']}{', int8' if int8 else ''}", dist=dist)
        return evaluate(net, loader, dist, autocast=autocast, progress=progress)
    finally:
        if joined:
            engine.cleanup_distributed()


# --- prediction -----------------------------------------------------------------------------------


@dataclass
class Prediction:
    """The top classes of one image, or why it has none."""

    path: str
    classes: list[tuple[int, str, float]]  # (index, name, probability), most likely first
    error: str | None = None  # the image could not be read


def class_names(num_classes: int, run: Mapping[str, Any] | None) -> list[str]:
    """Names for a classifier's outputs: the checkpoint's classes, ImageNet's for 1000, else indices."""
    if run and run.get("classes") and len(run["classes"]) == num_classes:
        return list(run["classes"])
    if num_classes == 1000:
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    return [f"class {i}" for i in range(num_classes)]


@torch.no_grad()
def predict(
    images: Sequence[str | os.PathLike],
    checkpoint: str | os.PathLike | None,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    pretrained: bool = False,
    topk: int = 5,
    img_size: int | tuple[int, int] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    device: str = "auto",
    use_ema: bool = False,
    int8: bool = False,
) -> list[Prediction]:
    """Top-``topk`` classes of image files (folders stand for the images inside), with names and
    probabilities. An input that is missing or unreadable gets a :class:`Prediction` with
    ``error`` set (those come first); the others are predicted all the same. ``int8``: with the
    int8 products of :func:`cyclemlp.quantize_int8`, on the CPU."""
    from PIL import Image, UnidentifiedImageError

    from ..data import build_transform
    from ..data.folder import image_inputs
    from ..models.int8 import quantize_int8

    if int8:
        device = _int8_device(device)
    if not images:
        raise ValueError("no images given")
    if topk < 1:
        raise ValueError(f"topk must be positive; got {topk}")
    files, problems = image_inputs(images)
    dev = engine.resolve_device(device)
    net, run, _ = model_from_checkpoint(checkpoint, model, model_kwargs, pretrained=pretrained, use_ema=use_ema)
    net.to(dev)
    if int8:
        quantize_int8(net)
    cfg = data_config(net, run, img_size, crop_pct, interpolation)
    transform = build_transform(cfg, False)
    mode = "L" if cfg["input_size"][0] == 1 else "RGB"
    names: list[str] | None = None
    out = [Prediction(item, [], problem) for item, problem in problems]
    for path in files:
        try:
            with Image.open(path) as img:
                tensor = transform(img.convert(mode))
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
            out.append(Prediction(str(path), [], f"cannot read the image ({err})"))
            continue
        probs = net(tensor[None].to(dev))[0].float().cpu().softmax(dim=0)
        names = names or class_names(len(probs), run)
        top = probs.topk(min(topk, len(probs)))
        out.append(Prediction(str(path), [(int(i), names[int(i)], float(p)) for p, i in zip(top.values, top.indices)]))
    return out
