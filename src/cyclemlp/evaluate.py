"""Evaluation and prediction with trained classifiers.

* :func:`evaluate` — loss, top-1/top-5 and throughput of a model over a loader (all ranks).
* :func:`evaluate_checkpoint` — the same for a checkpoint file (the project's training files and
  safetensors, the authors' releases, any timm model's state dict) on a built-in dataset or an
  ImageNet-layout folder, with the checkpoint's own preprocessing unless overridden.
* :func:`predict` — top-k classes of image files, named by the checkpoint's classes (ImageNet
  names for 1000-class weights).
* :func:`model_from_checkpoint`, :func:`load_weights` — rebuild a model from a file.

A project checkpoint records how it was made (model name and kwargs, classes, input channels and
preprocessing) under ``run`` (``.pth``) or in its safetensors metadata, so ``--checkpoint`` alone
suffices for it; other files need ``--model``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.data import ImageNetInfo, resolve_data_config
from torch import nn

logger = logging.getLogger(__name__)

from . import engine
from .checkpoint import CheckpointError, CheckpointMismatchError, read_checkpoint, read_state_dict

__all__ = [
    "EvalResult",
    "Prediction",
    "evaluate",
    "evaluate_checkpoint",
    "load_weights",
    "model_from_checkpoint",
    "predict",
    "read_run_info",
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


# --- rebuilding models from files -----------------------------------------------------------------


def read_run_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``run`` record of a project checkpoint (``.pth`` or safetensors), or None."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: read only the header
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
        except Exception as err:  # noqa: BLE001  (safetensors raises its own error types)
            raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
        return json.loads(meta["run"]) if "run" in meta else None
    state = read_checkpoint(path)
    return dict(state["run"]) if isinstance(state, Mapping) and isinstance(state.get("run"), Mapping) else None


def _classifier_outputs(model_name: str, state: Mapping[str, torch.Tensor]) -> int | None:
    """Class count of a state dict, from the classifier named by the model's pretrained config."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    names = cfg.classifier if cfg is not None and cfg.classifier else "head"
    for name in [names] if isinstance(names, str) else list(names):
        for prefix in ("", "module."):
            weight = state.get(f"{prefix}{name}.weight")
            if weight is not None and weight.dim() >= 1:
                return int(weight.shape[0])
    return None


def load_weights(model: nn.Module, path: str | os.PathLike, reset_head: bool = False, use_ema: bool = False) -> str:
    """Load a file's weights into ``model`` and return a one-paragraph report.

    CycleMLP models go through :func:`cyclemlp.load_checkpoint` (authors' layout, offset checks);
    other models need a state dict in their own layout. ``reset_head`` keeps the model's classifier
    when the file's has another class count.
    """
    from .model import CycleMLP

    target = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    if isinstance(target, CycleMLP):
        from .checkpoint import load_checkpoint

        return str(load_checkpoint(target, path, strict=not reset_head, reset_head=reset_head, use_ema=use_ema))
    state, container = read_state_dict(path, use_ema=use_ema)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    expected = target.state_dict()
    shape_bad = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    notes = []
    if reset_head and shape_bad:
        notes.append(f"classifier re-initialised ({', '.join(shape_bad)}: another class count)")
        for key in shape_bad:
            del state[key]
        shape_bad = []
    missing = [k for k in expected if k not in state and not (reset_head and k in shape_bad)]
    unexpected = [k for k in state if k not in expected]
    if shape_bad or missing or unexpected:
        problems = []
        if shape_bad:
            problems.append("shape mismatch (file vs model): " + "; ".join(
                f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in shape_bad[:8]))
        if missing:
            problems.append(f"missing in the file ({len(missing)}): {', '.join(missing[:8])}")
        if unexpected:
            problems.append(f"not in the model ({len(unexpected)}): {', '.join(unexpected[:8])}")
        raise CheckpointMismatchError(f"{path} does not fit {type(target).__name__}:\n  " + "\n  ".join(problems))
    target.load_state_dict(state)
    where = f"['{container}']" if container else "(bare state dict)"
    report = "\n".join([f"loaded {len(state)}/{len(expected)} tensors from {path} {where}"] + [f"  {n}" for n in notes])
    logger.info("%s", report)
    return report


def model_from_checkpoint(
    checkpoint: str | os.PathLike | None,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    pretrained: bool = False,
    use_ema: bool = False,
) -> tuple[nn.Module, dict[str, Any] | None, str]:
    """Build the model a checkpoint was trained as, and load it: ``(model, run info, report)``.

    ``model``/``model_kwargs`` override (or, for files without a run record, provide) the
    architecture; the class count comes from the file's classifier unless given.
    """
    import cyclemlp  # noqa: F401  (registers CycleMLP with timm)

    if checkpoint is None and not pretrained:
        raise ValueError("no weights given: pass --checkpoint PATH (or --pretrained to let timm fetch them)")
    run = read_run_info(checkpoint) if checkpoint else None
    if run and run.get("custom_model") and model is None:
        raise ValueError(
            f"{checkpoint} was trained with a custom model factory ({run.get('model')}); build that model "
            "and call cyclemlp.evaluate.load_weights, or pass --model"
        )
    name = model or (run or {}).get("model")
    if name is None:
        raise ValueError(f"{checkpoint} does not record its architecture; pass --model NAME")
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; see timm.list_models() (CycleMLP: cyclemlp_b1 ...)")
    kwargs = dict((run or {}).get("model_kwargs", {}) if model is None or model == (run or {}).get("model") else {})
    kwargs.update(model_kwargs or {})
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if run:
        kwargs.setdefault("in_chans", run.get("in_chans", 3))
        num_classes = num_classes or run.get("num_classes")
    if checkpoint and num_classes is None:
        state, _ = read_state_dict(checkpoint, use_ema=use_ema)
        num_classes = _classifier_outputs(name, state)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        net = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    except TypeError as err:
        raise ValueError(f"model {name!r} does not accept {kwargs}: {err}") from err
    report = load_weights(net, checkpoint, use_ema=use_ema) if checkpoint else f"{name}: timm's pretrained weights"
    return net.eval(), run, report


def _data_config(model: nn.Module, run: Mapping[str, Any] | None, img_size: int | None,
                 crop_pct: float | None, interpolation: str | None) -> dict[str, Any]:
    if run and run.get("data_config"):
        cfg = dict(run["data_config"])
        cfg["input_size"] = tuple(cfg["input_size"])
    else:
        cfg = resolve_data_config({}, model=model)
    if img_size:
        cfg["input_size"] = (cfg["input_size"][0], img_size, img_size)
    if crop_pct is not None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be within (0, 1]; got {crop_pct}")
        cfg["crop_pct"] = crop_pct
    if interpolation:
        cfg["interpolation"] = interpolation
    cfg["mean"], cfg["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
    return cfg


def _eval_classes(model_classes: int, run: Mapping[str, Any] | None, dataset: str | None,
                  data: str | os.PathLike | None, split: str) -> list[str] | None:
    """Class names fixing the data's index mapping, checked against the model's class count."""
    from .data import BUILTIN_DATASETS, builtin_name, find_classes

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


def evaluate_checkpoint(
    checkpoint: str | os.PathLike | None,
    dataset: str | None = None,
    data: str | os.PathLike | None = None,
    split: str | None = None,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    pretrained: bool = False,
    use_ema: bool = False,
    img_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    batch_size: int = 128,
    workers: int = 2,
    device: str = "auto",
    subset: int | None = None,
    strict: bool = False,
    amp: bool = False,
    progress: bool = True,
) -> EvalResult:
    """Top-1/top-5, loss and img/s of a checkpoint on a dataset split (default: the evaluation
    split, ``test`` for built-in datasets and ``val`` for folders). Runs under torchrun too."""
    from .data import build_dataset, build_loader, build_transform, default_splits

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
        cfg = _data_config(net, run, img_size, crop_pct, interpolation)
        in_chans = cfg["input_size"][0]
        ds = build_dataset(dataset, data, split, build_transform(cfg, False), classes=classes, in_chans=in_chans,
                           strict=strict, subset=subset)
        loader = build_loader(ds, batch_size, False, dist.rank, dist.world_size, workers=workers,
                              pin_memory=dist.device.type == "cuda")
        net.to(dist.device)
        autocast = (lambda: torch.autocast(dist.device.type, dtype=torch.bfloat16 if dist.device.type == "cpu"
                                           else torch.float16)) if amp else contextlib.nullcontext
        engine.print0(f"evaluating on {data or dataset} ({split}, {len(ds)} images), input {cfg['input_size']}, "
                      f"crop {cfg['crop_pct']}, {cfg['interpolation']}", dist=dist)
        return evaluate(net, loader, dist, autocast=autocast, progress=progress)
    finally:
        if joined:
            engine.cleanup_distributed()


# --- prediction -----------------------------------------------------------------------------------


@dataclass
class Prediction:
    path: str
    classes: list[tuple[int, str, float]]  # (index, name, probability), most likely first


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
    img_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    device: str = "auto",
    use_ema: bool = False,
) -> list[Prediction]:
    """Top-``topk`` classes of each image file, with names and probabilities."""
    from PIL import Image, UnidentifiedImageError

    from .data import build_transform

    if not images:
        raise ValueError("no images given")
    if topk < 1:
        raise ValueError(f"topk must be positive; got {topk}")
    dev = engine.resolve_device(device)
    net, run, _ = model_from_checkpoint(checkpoint, model, model_kwargs, pretrained=pretrained, use_ema=use_ema)
    net.to(dev)
    cfg = _data_config(net, run, img_size, crop_pct, interpolation)
    transform = build_transform(cfg, False)
    mode = "L" if cfg["input_size"][0] == 1 else "RGB"
    logits_list = []
    for path in images:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as img:
                tensor = transform(img.convert(mode))
        except (OSError, UnidentifiedImageError, SyntaxError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from err
        logits_list.append(net(tensor[None].to(dev))[0].float().cpu())
    logits = torch.stack(logits_list)
    names = class_names(logits.shape[1], run)
    probs = logits.softmax(dim=1)
    top = probs.topk(min(topk, probs.shape[1]), dim=1)
    return [
        Prediction(str(path), [(int(i), names[int(i)], float(p)) for p, i in zip(values, indices)])
        for path, values, indices in zip(images, top.values, top.indices)
    ]

