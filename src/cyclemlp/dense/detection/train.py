"""Training, evaluation and prediction for the detectors (``cyclemlp detect train|eval|predict``).

The default schedule is the 1x recipe (docs/design.md, section 6; the PVT recipes the authors pointed to):
AdamW (lr 1e-4 RetinaNet / 2e-4 Mask R-CNN, weight decay 1e-4), 12 epochs, linear warm-up over
500 iterations from 0.001x, lr x0.1 after epochs 8 and 11, images resized to 800 (short side) /
1333 (long side), random horizontal flips. The recipe's batch is 16 (8 GPUs x 2); ``batch_size``
here is per process and the learning rate is not rescaled.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

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
from .data import CocoDataset, collate
from .evaluate import coco_evaluate, coco_results
from .models import DETECTORS

__all__ = [
    "DEFAULT_LR",
    "DetectionRecipe",
    "build_detector",
    "detection_lr",
    "draw_detections",
    "evaluate_detector",
    "load_detector",
    "predict_detections",
    "train_detector",
]

DEFAULT_LR = {"retinanet": 1e-4, "mask_rcnn": 2e-4}


@dataclass
class DetectionRecipe:
    """Optimisation and input settings; the defaults are the 1x schedule (docs/design.md, section 6)."""

    epochs: int = 12
    lr: float | None = None  # None: DEFAULT_LR of the detector
    weight_decay: float = 1e-4
    batch_size: int = 2
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    milestones: tuple[int, ...] = (8, 11)
    gamma: float = 0.1
    min_size: int = 800
    max_size: int = 1333
    grad_clip: float | None = None
    workers: int = 2
    seed: int = 0
    eval_interval: int = 1


def detection_lr(recipe: DetectionRecipe, base_lr: float, epoch: int, iteration: int) -> float:
    """Learning rate at ``iteration`` (counted from the start of training) within ``epoch``."""
    factor = recipe.gamma ** sum(epoch >= m for m in recipe.milestones)
    if iteration < recipe.warmup_iters:
        factor *= recipe.warmup_ratio + (1 - recipe.warmup_ratio) * iteration / recipe.warmup_iters
    return base_lr * factor


def build_detector(config: dict[str, Any], weights: str | os.PathLike | None = None) -> nn.Module:
    """A detector from a run's ``config`` (``model``, ``backbone``, ``num_classes``, sizes)."""
    if config["model"] not in DETECTORS:
        raise ValueError(f"unknown detector {config['model']!r}; choose from {sorted(DETECTORS)}")
    return DETECTORS[config["model"]](
        config["backbone"], num_classes=config["num_classes"], weights=weights,
        min_size=config["min_size"], max_size=config["max_size"], **config.get("backbone_kwargs", {}),
    )


def _to_device(images: list[torch.Tensor], targets: list[dict], device: torch.device) -> tuple[list, list]:
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
    return images, targets


@torch.no_grad()
def evaluate_detector(
    model: nn.Module,
    dataset: CocoDataset,
    device: torch.device | str = "cpu",
    dist: engine.DistInfo | None = None,
    batch_size: int = 2,
    workers: int = 0,
    progress: bool = False,
) -> tuple[dict[str, float], str]:
    """COCO box (and, for models with masks, mask) AP of ``model`` on ``dataset``.

    In a distributed run each process evaluates its share and rank 0 computes the metrics
    (the other ranks get empty metrics).
    """
    dist = dist or engine.DistInfo(device=torch.device(device))
    net = unwrap(model)
    net.eval()
    loader = DataLoader(shard(dataset, dist), batch_size=batch_size, num_workers=workers, collate_fn=collate)
    results: list[dict] = []
    bar = engine.progress_bar(len(dataset), "eval", progress and dist.is_main)
    for images, targets in loader:
        outputs = net([im.to(dist.device) for im in images])
        for target, output in zip(targets, outputs):
            results += coco_results(target["image_id"], output, dataset.label_to_category)
        bar.update(len(images) * dist.world_size)
    bar.close()
    gathered = engine.all_gather_objects(results, dist)
    if not dist.is_main:
        return {}, ""
    merged = [r for part in gathered for r in part]
    has_masks = getattr(net, "roi_heads", None) is not None and net.roi_heads.has_mask()
    iou_types = ("bbox", "segm") if has_masks else ("bbox",)
    return coco_evaluate(dataset.coco, merged, iou_types, image_ids=dataset.ids)


def train_detector(
    model_name: str,
    backbone: str | None,
    train_set: CocoDataset | Dataset,
    val_set: CocoDataset | None,
    out_dir: str | os.PathLike,
    recipe: DetectionRecipe | None = None,
    weights: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    device: str = "auto",
    backbone_kwargs: dict[str, Any] | None = None,
    tensorboard: bool = False,
    categories: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Train a detector; writes ``last.pth``/``best.pth`` and ``metrics.{csv,json}`` to ``out_dir``.

    Args:
        model_name: ``"retinanet"`` or ``"mask_rcnn"``.
        backbone: a CycleMLP name (or ``"resnet18"``/``"resnet50"``); None: the one ``weights``
            records, else ``cyclemlp_b1``.
        train_set: a :class:`CocoDataset` built with ``train=True`` (or any dataset of the same
            items, e.g. a ``Subset`` of one; then pass ``categories``).
        val_set: evaluated every ``recipe.eval_interval`` epochs and after the last; the best
            checkpoint follows its box AP (mask AP for Mask R-CNN). None: no evaluation.
        weights: classification/backbone checkpoint for the CycleMLP backbone (its load report is
            logged); ignored when resuming.
        resume: a run folder or checkpoint to continue exactly (same model, data order, RNG).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``. Under torchrun every process trains on its
            share of each epoch (DistributedDataParallel).

    Returns:
        The metrics rows of all epochs.
    """
    recipe = recipe or DetectionRecipe()
    if resume is None:  # the backbone a project checkpoint records, so that its weights fit
        backbone, backbone_kwargs = backbone_arguments(backbone, backbone_kwargs or {}, weights, "cyclemlp_b1")
    dist = engine.setup_distributed(device)
    categories = list(categories or train_set.categories)
    config = {
        "task": "detect", "model": model_name, "backbone": backbone, "num_classes": len(categories) + 1,
        "categories": categories, "min_size": recipe.min_size, "max_size": recipe.max_size,
        "backbone_kwargs": dict(backbone_kwargs or {}), "recipe": asdict(recipe),
    }
    state = open_run(out_dir, resume, config)
    engine.seed_everything(recipe.seed + dist.rank)
    model = build_detector(config, weights=None if state else weights)
    report = getattr(model, "backbone_load_report", None)
    if report is not None:
        engine.print0(f"backbone initialisation: {report}", dist=dist)
    model.to(dist.device)
    base_lr = recipe.lr if recipe.lr is not None else DEFAULT_LR[model_name]
    optimizer = adamw(model, base_lr, recipe.weight_decay)

    ckpt = engine.CheckpointManager(out_dir, enabled=dist.is_main, mode="max")
    log = engine.MetricsLogger(out_dir, enabled=dist.is_main, tensorboard=tensorboard)
    start = 0
    if state:
        start = restore_run(state, model, optimizer, ckpt, log, dist)
        engine.print0(f"resumed from epoch {state['epoch']} (best {ckpt.best})", dist=dist)
    ddp = nn.parallel.DistributedDataParallel(model) if dist.distributed else model

    sampler = DistributedSampler(train_set, dist.world_size, dist.rank, shuffle=True, seed=recipe.seed)
    loader = DataLoader(
        train_set, batch_size=recipe.batch_size, sampler=sampler, num_workers=recipe.workers,
        collate_fn=collate,  # no persistent workers: each epoch seeds them from the (resumable) RNG
    )
    key = "segm_AP" if model_name == "mask_rcnn" else "bbox_AP"
    for epoch in range(start, recipe.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        sums: dict[str, torch.Tensor] = {}
        steps, t0 = 0, time.time()
        bar = engine.progress_bar(len(sampler) * dist.world_size, f"epoch {epoch}/{recipe.epochs}", dist.is_main)
        for step, (images, targets) in enumerate(loader):
            iteration = epoch * len(loader) + step
            lr = detection_lr(recipe, base_lr, epoch, iteration)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, targets = _to_device(images, targets, dist.device)
            losses = ddp(images, targets)
            loss = sum(losses.values())
            engine.check_finite(engine.reduce_mean(loss.detach(), dist), epoch, step, ckpt.last_path)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            for name, value in {"loss": loss, **losses}.items():
                sums[name] = sums.get(name, 0) + value.detach()
            steps += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(len(images) * dist.world_size)
        bar.close()
        row: dict[str, Any] = {"epoch": epoch, "lr": lr}
        for name, total in sums.items():
            row["train_" + name if name == "loss" else "train_loss_" + name.removeprefix("loss_")] = float(
                engine.reduce_mean(total / max(1, steps), dist)
            )
        row["train_time_s"] = round(time.time() - t0, 1)
        metric = None
        last = epoch == recipe.epochs - 1
        if val_set is not None and ((epoch + 1) % recipe.eval_interval == 0 or last):
            metrics, text = evaluate_detector(model, val_set, dist.device, dist, recipe.batch_size)
            row.update({f"val_{k}": v for k, v in metrics.items()})
            metric = metrics.get(key)
            engine.print0(text, dist=dist)
        engine.print0(
            f"epoch {epoch}: loss {row['train_loss']:.4f}"
            + (f", val {key} {metric:.4f}" if metric is not None else ""), dist=dist,
        )
        save_round(ckpt, log, dist, model, optimizer, row, config, metric)
    finish_run(out_dir, log, dist, model, config, f"{model_name} / {backbone}")
    return log.rows


def load_detector(
    checkpoint: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any], Path]:
    """The detector saved by :func:`train_detector` (a run folder: best, else last checkpoint)."""
    return load_run(checkpoint, "detect", build_detector, device)


def _category(categories: Sequence[str], label: Any) -> str:
    label = int(label)
    return categories[label - 1] if 0 < label <= len(categories) else str(label)


def draw_detections(
    image: torch.Tensor, output: dict[str, torch.Tensor], categories: Sequence[str], score_threshold: float = 0.5
) -> torch.Tensor:
    """``image`` (3, H, W) float in [0, 1] with the boxes (and masks) scoring ``score_threshold``
    or more drawn on it; returns uint8 (3, H, W)."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    canvas = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    keep = output["scores"].cpu() >= score_threshold
    boxes, labels, scores = output["boxes"].cpu()[keep], output["labels"].cpu()[keep], output["scores"].cpu()[keep]
    colours = palette(len(categories) + 1)
    colors = [colours[int(label)] for label in labels]
    if "masks" in output and keep.any():
        canvas = draw_segmentation_masks(canvas, output["masks"].cpu()[keep][:, 0] > 0.5, alpha=0.45, colors=colors)
    names = [f"{_category(categories, label)} {score:.2f}" for label, score in zip(labels, scores)]
    if len(boxes):
        canvas = draw_bounding_boxes(canvas, boxes, labels=names, colors=colors, width=2)
    return canvas


@torch.no_grad()
def predict_detections(
    model: nn.Module,
    images: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    categories: Sequence[str],
    score_threshold: float = 0.5,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """Run ``model`` on image files, write ``<name>.png`` with drawn detections into ``out_dir``.

    Returns one record per image: ``file``, ``output`` (the written PNG) and ``detections`` (boxes
    x0, y0, x1, y1 with label names and scores at or above the threshold); an unreadable image
    gets ``file`` and ``error`` only, and the others are still predicted.
    """
    from PIL import Image

    model.eval().to(device)
    out = Path(out_dir)
    records = []
    for path in map(Path, images):
        try:
            image = read_image(path).float() / 255
        except ValueError as err:
            records.append({"file": str(path), "error": str(err)})
            continue
        output = {k: v.cpu() for k, v in model([image.to(device)])[0].items()}
        drawn = draw_detections(image, output, categories, score_threshold)
        target = out / f"{path.stem}.png"
        pil = Image.fromarray(drawn.permute(1, 2, 0).numpy())
        atomic_write(target, lambda tmp, pil=pil: pil.save(tmp, format="PNG"))
        keep = output["scores"] >= score_threshold
        records.append({
            "file": str(path), "output": str(target),
            "detections": [
                {"label": _category(categories, label), "score": round(float(score), 4),
                 "box": [round(float(v), 1) for v in box]}
                for box, label, score in zip(output["boxes"][keep], output["labels"][keep], output["scores"][keep])
            ],
        })
    return records
