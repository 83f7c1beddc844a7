"""Training, evaluation and prediction for semantic segmentation (``cyclemlp segment ...``).

Schedules (docs/design.md, section 6), counted in iterations:

* Semantic FPN (B1-B5): AdamW lr 2e-4, weight decay 1e-4, poly decay (power 0.9) to 0 over 40k
  iterations, batch 32 (8 GPUs x 4), 512x512 crops.
* UperNet (T/S/B), Swin's setting: AdamW lr 6e-5, weight decay 0.01 (none on norms), 1500
  linear warm-up iterations from 1e-6x, poly decay (power 1.0) over 160k iterations, 512 crops.

Evaluation and checkpoints happen every ``eval_interval`` iterations; a "round" of that many
iterations is one row of ``metrics.csv`` (its ``epoch`` column counts rounds) and one checkpoint.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ...io import atomic_write
from ...models.factory import backbone_arguments
from ...training import engine
from ..run import (
    adamw,
    finish_run,
    load_run,
    open_run,
    palette,
    read_image,
    restore_run,
    save_round,
    shard,
    unwrap,
)
from .data import IGNORE_INDEX, SegmentationDataset, normalize, rescale_size
from .metrics import confusion_matrix, segmentation_metrics
from .models import SEGMENTERS

__all__ = [
    "HEAD_DEFAULTS",
    "SegmentationRecipe",
    "build_segmenter",
    "evaluate_segmenter",
    "infer",
    "load_segmenter",
    "poly_lr",
    "predict_segmentation",
    "train_segmenter",
]

# The backbone of each head where none is named: the paper's pairings.
DEFAULT_BACKBONE = {"semantic_fpn": "cyclemlp_b1", "upernet": "cyclemlp_t"}

# The head-specific parts of the recipe (docs/design.md, section 6; UperNet follows Swin's setting).
HEAD_DEFAULTS: dict[str, dict[str, Any]] = {
    "semantic_fpn": {"iters": 40000, "lr": 2e-4, "weight_decay": 1e-4, "power": 0.9, "warmup_iters": 0,
                     "no_decay": (), "eval_interval": 4000},
    "upernet": {"iters": 160000, "lr": 6e-5, "weight_decay": 0.01, "power": 1.0, "warmup_iters": 1500,
                "no_decay": ("norm",), "eval_interval": 16000},
}


@dataclass
class SegmentationRecipe:
    """Settings of a segmentation run; ``None`` fields take the head's value from HEAD_DEFAULTS."""

    iters: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    power: float | None = None
    warmup_iters: int | None = None
    warmup_ratio: float = 1e-6
    min_lr: float = 0.0
    batch_size: int = 4
    crop_size: int = 512
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    eval_interval: int | None = None
    grad_clip: float | None = None
    workers: int = 2
    seed: int = 0
    mode: str = "whole"
    stride: int | None = None

    def resolved(self, head: str) -> "SegmentationRecipe":
        """A copy with the head's defaults filled in."""
        values = asdict(self)
        for key, value in HEAD_DEFAULTS[head].items():
            if key in values and values[key] is None:
                values[key] = value
        if values["stride"] is None:
            values["stride"] = max(1, values["crop_size"] * 2 // 3)
        return SegmentationRecipe(**values)


def poly_lr(recipe: SegmentationRecipe, iteration: int) -> float:
    """Poly decay from ``lr`` to ``min_lr`` over ``iters``, after an optional linear warm-up."""
    progress = min(1.0, iteration / recipe.iters)
    lr = (recipe.lr - recipe.min_lr) * (1 - progress) ** recipe.power + recipe.min_lr
    if iteration < recipe.warmup_iters:
        lr *= recipe.warmup_ratio + (1 - recipe.warmup_ratio) * iteration / recipe.warmup_iters
    return lr


def build_segmenter(config: dict[str, Any], weights: str | os.PathLike | None = None) -> nn.Module:
    """A segmentation model from a run's ``config`` (``model``, ``backbone``, ``num_classes``)."""
    if config["model"] not in SEGMENTERS:
        raise ValueError(f"unknown segmentation head {config['model']!r}; choose from {sorted(SEGMENTERS)}")
    return SEGMENTERS[config["model"]](
        config["backbone"], config["num_classes"], weights=weights, **config.get("backbone_kwargs", {})
    )


def _inference(recipe: SegmentationRecipe) -> tuple[str, tuple[int, int], int, int]:
    """The arguments of :func:`infer` after ``num_classes`` that a recipe fixes."""
    return recipe.mode, tuple(recipe.scale), recipe.crop_size, recipe.stride


def _forward_padded(model: nn.Module, x: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return model(x)[..., :height, :width]


@torch.no_grad()
def infer(
    model: nn.Module,
    image: torch.Tensor,
    num_classes: int,
    mode: str = "whole",
    scale: tuple[int, int] | None = None,
    crop_size: int = 512,
    stride: int = 341,
) -> torch.Tensor:
    """Class scores ``(num_classes, H, W)`` for one normalised image ``(3, H, W)``.

    The image is rescaled to ``scale`` (keep ratio, as in training; None keeps its size), run whole
    (``mode="whole"``) or in ``crop_size`` windows every ``stride`` pixels whose logits are averaged
    (``mode="slide"``), and the logits are resized back to the input size.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide'; got {mode!r}")
    height, width = image.shape[-2:]
    x = image[None]
    if scale is not None:
        x = F.interpolate(x, rescale_size(height, width, scale), mode="bilinear", align_corners=False)
    if mode == "whole":
        logits = _forward_padded(model, x)
    else:
        h, w = x.shape[-2:]
        logits = x.new_zeros((1, num_classes, h, w))
        count = x.new_zeros((1, 1, h, w))
        rows = max(h - crop_size + stride - 1, 0) // stride + 1
        cols = max(w - crop_size + stride - 1, 0) // stride + 1
        for r in range(rows):
            for c in range(cols):
                y1, x1 = min(r * stride + crop_size, h), min(c * stride + crop_size, w)
                y0, x0 = max(y1 - crop_size, 0), max(x1 - crop_size, 0)
                logits[..., y0:y1, x0:x1] += _forward_padded(model, x[..., y0:y1, x0:x1])
                count[..., y0:y1, x0:x1] += 1
        logits = logits / count
    return F.interpolate(logits, (height, width), mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def evaluate_segmenter(
    model: nn.Module,
    dataset: SegmentationDataset,
    recipe: SegmentationRecipe,
    classes: Sequence[str],
    dist: engine.DistInfo | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """mIoU / mAcc / aAcc and per-class IoU/Acc of ``model`` on ``dataset`` (all ranks get them).

    Images are evaluated one at a time at their own size (``recipe.mode``, ``recipe.scale``), the
    predictions compared with the full-resolution label maps.
    """
    dist = dist or engine.DistInfo()
    net = unwrap(model)
    net.eval()
    num_classes = len(classes)
    matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64)
    part = shard(dataset, dist)
    bar = engine.progress_bar(len(dataset), "eval", progress and dist.is_main)
    for index in range(len(part)):
        image, label = part[index]
        scores = infer(net, image.to(dist.device), num_classes, *_inference(recipe))
        matrix += confusion_matrix(scores.argmax(0).cpu(), label, num_classes)
        bar.update(dist.world_size)
    bar.close()
    matrix = engine.reduce_sum(matrix.to(dist.device), dist).cpu()
    return segmentation_metrics(matrix, classes)


class _Augmented(Dataset):
    """Items keyed by ``(pass, index)``, augmented with a random state that depends only on the key,
    so that a resumed run sees exactly the batches the interrupted one would have."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        data_pass, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + data_pass) * 1_000_003 + index)
            return self.dataset[index]


class _PassSampler(torch.utils.data.Sampler):
    """Endless ``(pass, index)`` keys of this rank's batches, starting at batch ``start``.

    Pass ``p`` is a permutation drawn from ``seed + p``, dealt to the ranks in turn; incomplete
    batches at the end of a pass are dropped."""

    def __init__(self, size: int, batch_size: int, dist: engine.DistInfo, seed: int, start: int) -> None:
        self.size, self.batch_size, self.dist, self.seed, self.start = size, batch_size, dist, seed, start
        self.per_pass = size // dist.world_size // batch_size
        if self.per_pass == 0:
            raise ValueError(
                f"the training set ({size} images) is smaller than one batch of {batch_size} per process "
                f"({dist.world_size} processes)"
            )

    def __iter__(self) -> Iterator[tuple[int, int]]:
        batch = self.start
        while True:
            data_pass, offset = divmod(batch, self.per_pass)
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + data_pass))
            share = order[self.dist.rank::self.dist.world_size].tolist()
            for index in share[offset * self.batch_size:(offset + 1) * self.batch_size]:
                yield data_pass, index
            batch += 1


def train_segmenter(
    model_name: str,
    backbone: str | None,
    train_set: SegmentationDataset,
    val_set: SegmentationDataset | None,
    classes: Sequence[str],
    out_dir: str | os.PathLike,
    recipe: SegmentationRecipe | None = None,
    weights: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    device: str = "auto",
    backbone_kwargs: dict[str, Any] | None = None,
    tensorboard: bool = False,
) -> list[dict[str, Any]]:
    """Train a segmentation model; writes ``last.pth``/``best.pth`` (best val mIoU) and metrics.

    Args:
        model_name: ``"semantic_fpn"`` or ``"upernet"``.
        backbone: a CycleMLP name; None: the one ``weights`` records, else :data:`DEFAULT_BACKBONE`.
        train_set: built with ``transform=train_transform(...)``.
        val_set: evaluated after every round; None: no evaluation.
        classes: class names (``len(classes)`` outputs).
        weights: classification checkpoint for the backbone (load report printed).
        resume: run folder or checkpoint to continue exactly.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``; under torchrun one share per process.

    Returns:
        The metrics rows of all rounds.
    """
    recipe = (recipe or SegmentationRecipe()).resolved(model_name)
    if resume is None:  # the backbone a project checkpoint records, so that its weights fit
        backbone, backbone_kwargs = backbone_arguments(backbone, backbone_kwargs or {}, weights,
                                                       DEFAULT_BACKBONE[model_name])
    dist = engine.setup_distributed(device)
    config = {
        "task": "segment", "model": model_name, "backbone": backbone, "num_classes": len(classes),
        "classes": list(classes), "reduce_zero_label": bool(getattr(train_set, "reduce_zero_label", False)),
        "backbone_kwargs": dict(backbone_kwargs or {}), "recipe": asdict(recipe),
    }
    state = open_run(out_dir, resume, config)
    engine.seed_everything(recipe.seed + dist.rank)
    model = build_segmenter(config, weights=None if state else weights)
    if getattr(model, "backbone_load_report", None) is not None:
        engine.print0(f"backbone initialisation: {model.backbone_load_report}", dist=dist)
    if dist.distributed and dist.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # mmseg's SyncBN
    model.to(dist.device)
    optimizer = adamw(model, recipe.lr, recipe.weight_decay, HEAD_DEFAULTS[model_name]["no_decay"])
    ckpt = engine.CheckpointManager(out_dir, enabled=dist.is_main, mode="max")
    log = engine.MetricsLogger(out_dir, enabled=dist.is_main, tensorboard=tensorboard)
    start = 0
    if state:
        start = restore_run(state, model, optimizer, ckpt, log, dist)
        engine.print0(f"resumed after round {state['epoch']} (iteration {state['iteration']})", dist=dist)
    ddp = nn.parallel.DistributedDataParallel(model) if dist.distributed else model

    rounds = math.ceil(recipe.iters / recipe.eval_interval)
    iteration = start * recipe.eval_interval
    sampler = _PassSampler(len(train_set), recipe.batch_size, dist, recipe.seed, iteration)
    batches = iter(DataLoader(
        _Augmented(train_set, recipe.seed), batch_size=recipe.batch_size, sampler=sampler,
        num_workers=recipe.workers,
        # its own generator: creating the loader must not draw from the global RNG (dropout's), or a
        # resumed run would diverge
        generator=torch.Generator().manual_seed(recipe.seed),
    ))
    for index in range(start, rounds):
        ddp.train()
        end = min(recipe.iters, (index + 1) * recipe.eval_interval)
        total, steps, t0 = torch.zeros((), device=dist.device), 0, time.time()
        bar = engine.progress_bar(end - iteration, f"round {index + 1}/{rounds}", dist.is_main, unit="it")
        for images, labels in islice(batches, end - iteration):
            lr = poly_lr(recipe, iteration)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, labels = images.to(dist.device, non_blocking=True), labels.to(dist.device, non_blocking=True)
            loss = F.cross_entropy(ddp(images), labels, ignore_index=IGNORE_INDEX)
            engine.check_finite(engine.reduce_mean(loss.detach(), dist), index, iteration, ckpt.last_path)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            total += loss.detach()
            steps += 1
            iteration += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
        bar.close()
        row: dict[str, Any] = {
            "epoch": index, "iteration": iteration, "lr": lr,
            "train_loss": float(engine.reduce_mean(total / max(1, steps), dist)),
            "train_time_s": round(time.time() - t0, 1),
        }
        metric = None
        if val_set is not None:
            result = evaluate_segmenter(model, val_set, recipe, classes, dist)
            row.update({f"val_{k}": result[k] for k in ("mIoU", "mAcc", "aAcc")})
            metric = result["mIoU"]
        engine.print0(
            f"iteration {iteration}: loss {row['train_loss']:.4f}"
            + (f", val mIoU {metric:.4f}" if metric is not None else ""), dist=dist,
        )
        save_round(ckpt, log, dist, model, optimizer, row, config, metric, iteration=iteration)
    finish_run(out_dir, log, dist, model, config, f"{model_name} / {backbone}")
    return log.rows


def load_segmenter(
    checkpoint: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any], Path]:
    """The model saved by :func:`train_segmenter` (a run folder: best, else last checkpoint)."""
    return load_run(checkpoint, "segment", build_segmenter, device)


@torch.no_grad()
def predict_segmentation(
    model: nn.Module,
    images: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: dict[str, Any],
    device: str | torch.device = "cpu",
    alpha: float = 0.5,
) -> list[dict[str, Any]]:
    """Segment image files; writes ``<name>_overlay.png`` (colour-palette overlay) and
    ``<name>_label.png`` (palette PNG of class indices) into ``out_dir``.

    Returns per image the written files and the fraction of pixels per predicted class; an
    unreadable image gets ``file`` and ``error`` only, and the others are still predicted.
    """
    from PIL import Image
    from torchvision.utils import draw_segmentation_masks

    recipe = SegmentationRecipe(**config["recipe"])
    classes = config["classes"]
    colours = palette(len(classes))
    flat = [v for c in colours for v in c]
    model.eval().to(device)
    out = Path(out_dir)
    records = []
    for path in map(Path, images):
        try:
            image = read_image(path)
        except ValueError as err:
            records.append({"file": str(path), "error": str(err)})
            continue
        scores = infer(model, normalize(image).to(device), len(classes), *_inference(recipe))
        pred = scores.argmax(0).cpu()
        masks = torch.stack([pred == c for c in range(len(classes))])
        overlay = draw_segmentation_masks(image, masks, alpha=alpha, colors=colours)
        label = Image.fromarray(pred.numpy().astype(np.uint8), mode="P")
        label.putpalette(flat)
        overlay_pil = Image.fromarray(overlay.permute(1, 2, 0).numpy())
        files = {"overlay": out / f"{path.stem}_overlay.png", "label": out / f"{path.stem}_label.png"}
        atomic_write(files["overlay"], lambda tmp, image=overlay_pil: image.save(tmp, format="PNG"))
        atomic_write(files["label"], lambda tmp, image=label: image.save(tmp, format="PNG"))
        counts = torch.bincount(pred.flatten(), minlength=len(classes)).double() / pred.numel()
        records.append({
            "file": str(path), **{k: str(v) for k, v in files.items()},
            "fractions": {classes[c]: round(float(counts[c]), 4) for c in range(len(classes)) if counts[c] > 0},
        })
    return records
