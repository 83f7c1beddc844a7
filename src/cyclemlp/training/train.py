"""Image-classification training: any timm model (CycleMLP or a peer) on a built-in dataset or
an ImageNet-layout folder, one process or many (``torchrun``).

Python use::

    from cyclemlp.training.train import TrainConfig, train

    result = train(TrainConfig(model="cyclemlp_b1", dataset="fashion-mnist", epochs=2,
                               model_kwargs=dict(stepsize=7, pattern="paper")))
    print(result.top1, result.weights)

    # a ready-made module (e.g. an ablation variant): called as factory(num_classes=, in_chans=)
    result = train(TrainConfig(dataset="fashion-mnist", epochs=1), model_factory=my_builder)

``recipe("imagenet")`` is the authors' recipe (SPEC §5); ``TrainConfig.from_recipe(name, **overrides)``
starts from a recipe and overrides any value. The loop itself is :func:`train_one_epoch`: forward,
NaN/Inf guard, backward (gradient accumulation, DDP ``no_sync`` on the micro-steps), clipping,
optimizer and EMA steps, all on one screen. Each epoch ends with an evaluation, a metrics row and
an atomic checkpoint (``last.pth``, ``best.pth``); the run ends with ``model.safetensors`` and
``curves.png`` in the output folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import timm
import torch
from timm.data import Mixup, resolve_data_config
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data import (
    CachedLoader,
    build_dataset,
    build_loader,
    build_sampler,
    build_transform,
    builtin_name,
    cache_images,
    cacheable,
    default_splits,
    native_in_chans,
    static_part,
)
from ..io import CheckpointError, save_weights
from ..models.factory import load_weights
from . import engine
from .evaluate import evaluate

__all__ = ["RECIPES", "TrainConfig", "TrainResult", "build_model", "recipe", "train", "train_one_epoch"]

logger = logging.getLogger(__name__)

# --- recipes --------------------------------------------------------------------------------------

# The authors' ImageNet recipe (DeiT-derived), SPEC §5. Batch 128 per process: 8 processes make
# the global 1024, for which the linear rule gives lr 5e-4 * 1024 / 512 = 1e-3.
IMAGENET = dict(
    img_size=224, crop_pct=0.875, interpolation="bicubic", batch_size=128,
    opt="adamw", lr=None, lr_base=5e-4, lr_base_size=512, opt_eps=1e-8, opt_betas=(0.9, 0.999),
    weight_decay=0.05, clip_grad=None,
    sched="cosine", epochs=300, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, cooldown_epochs=0,
    sched_on_updates=False,
    scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, color_jitter=0.4, aa="rand-m9-mstd0.5-inc1",
    reprob=0.25, remode="pixel", recount=1,
    mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch", smoothing=0.1,
    aug_repeats=3, drop_path=0.1, amp=True, amp_dtype="float16", model_ema=True, model_ema_decay=0.99996,
)

# Fashion-MNIST, 28x28 grey: a short CPU schedule, chosen by measurement (README "Training").
# 32 px is the smallest input every peer of the benchmark accepts with its own stem; over short
# schedules flips alone beat random-resized crops, translation and drop path (the models underfit);
# from about 13 epochs on, random erasing (``reprob=0.25``) pays (README "Training").
FASHION_MNIST = dict(
    img_size=32, crop_pct=1.0, interpolation="bilinear", batch_size=128,
    opt="adamw", lr=3e-3, weight_decay=0.05, clip_grad=None,
    sched="cosine", epochs=10, warmup_epochs=0.3, warmup_lr=1e-5, min_lr=1e-5, sched_on_updates=True,
    scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.5, color_jitter=0.0, aa=None,
    reprob=0.0, remode="pixel", recount=1,
    mixup=0.0, cutmix=0.0, smoothing=0.1, aug_repeats=0, drop_path=0.0, amp=False, model_ema=False,
)

# timm optimizer names whose torch class has a fused step (``fused=True``)
FUSED_OPTIMIZERS = frozenset({"adam", "adamw"})

RECIPES: dict[str, dict[str, Any]] = {"imagenet": IMAGENET, "fashion-mnist": FASHION_MNIST}


def recipe(name: str) -> dict[str, Any]:
    """A copy of a named recipe's values (``imagenet``: SPEC §5; ``fashion-mnist``)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return dict(RECIPES[name])


# --- configuration --------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything a training run depends on. Names follow timm's ``train.py`` flags."""

    # model
    model: str = "cyclemlp_b1"
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. stepsize=7, pattern="paper"
    pretrained: bool = False
    initial_checkpoint: str | None = None  # weights to start from (not a resume)
    drop_rate: float = 0.0
    drop_path: float | None = None  # None: the model's own default
    grad_checkpointing: bool = False
    in_chans: int | None = None  # None: the data's (1 for fashion-mnist, 3 for image folders)
    channels_last: bool = False
    # data
    dataset: str | None = None  # built-in name ("fashion-mnist")
    data: str | None = None  # ImageNet-layout root; for a built-in dataset, a folder with its files
    train_split: str | None = None
    val_split: str | None = None
    train_subset: int | None = None
    val_subset: int | None = None
    strict: bool = False  # stop at an unreadable image instead of skipping it
    img_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    batch_size: int = 128  # per process
    workers: int = 2
    # serve batches from images transformed once (None: when possible — an in-memory built-in
    # dataset whose augmentation is flips only; see cyclemlp.data.cached)
    cache_data: bool | None = None
    samples_per_epoch: int | None = None  # None: one pass over the training split per epoch
    # augmentation
    no_aug: bool = False
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.4
    aa: str | None = None
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    pad_crop: int = 0  # random translation: crop from the image zero-padded by N pixels per side
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    aug_repeats: int = 0
    # optimisation
    opt: str = "adamw"
    lr: float | None = None  # None: lr_base * global_batch / lr_base_size
    lr_base: float = 5e-4
    lr_base_size: int = 512
    weight_decay: float = 0.05
    momentum: float = 0.9
    opt_eps: float | None = None
    opt_betas: tuple[float, float] | None = None
    # torch's fused (one-kernel) Adam/AdamW step; None: on for adam/adamw on CPU and CUDA
    opt_fused: bool | None = None
    clip_grad: float | None = None
    sched: str = "cosine"
    epochs: int = 300
    warmup_epochs: float = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cooldown_epochs: int = 0
    sched_on_updates: bool = False
    grad_accum_steps: int = 1
    amp: bool = False
    amp_dtype: str = "float16"
    model_ema: bool = False
    model_ema_decay: float = 0.99996
    # run
    seed: int = 42
    device: str = "auto"
    threads: int | None = None  # torch CPU threads per process (None: torch's default)
    output: str | None = None  # run folder; default runs/<model>-<data>[-N]
    resume: str | None = None  # a last.pth, or a run folder
    tensorboard: bool = False
    progress: bool = True
    recipe: str | None = None  # informational: the recipe the values came from

    @classmethod
    def from_recipe(cls, name: str | None, **overrides: Any) -> "TrainConfig":
        """A config holding recipe ``name``'s values, then ``overrides``."""
        values = recipe(name) if name else {}
        values.update(overrides)
        if name:
            values.setdefault("recipe", name)
        return cls(**values)

    def check(self) -> None:
        """Raise ValueError naming the first invalid value."""
        if self.dataset is None and self.data is None:
            raise ValueError("no dataset given: pass --dataset NAME (built-in) or --data DIR (image folder)")
        if self.dataset is not None:
            self.dataset = builtin_name(self.dataset)
        positive = dict(batch_size=self.batch_size, epochs=self.epochs, grad_accum_steps=self.grad_accum_steps)
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be positive; got {self.samples_per_epoch}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be positive; got {self.threads}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0; got {self.workers}")
        if self.img_size is not None and self.img_size < 8:
            raise ValueError(f"img_size must be at least 8 pixels; got {self.img_size}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number; got {self.lr}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0; got {self.warmup_epochs}")
        if self.amp_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"amp_dtype must be 'float16' or 'bfloat16'; got {self.amp_dtype!r}")
        if self.in_chans not in (None, 1, 3):
            raise ValueError(f"in_chans must be 1 or 3; got {self.in_chans}")
        for name in ("reprob", "hflip", "mixup_prob", "mixup_switch_prob", "smoothing"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]; got {value}")
        if self.pad_crop < 0:
            raise ValueError(f"pad_crop must be a number of pixels >= 0; got {self.pad_crop}")
        if self.crop_pct is not None and not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be within (0, 1]; got {self.crop_pct}")
        if not isinstance(self.model_kwargs, Mapping):
            raise ValueError(f"model_kwargs must be a mapping of keyword arguments; got {self.model_kwargs!r}")


@dataclass
class TrainResult:
    """What a finished run produced (accuracies in percent)."""

    output_dir: Path
    epochs: int
    top1: float
    top5: float
    loss: float
    best_top1: float
    best_epoch: int
    train_img_per_s: float
    wall_s: float
    params: int
    weights: Path | None
    last_checkpoint: Path
    best_checkpoint: Path
    history: list[dict[str, Any]]
    config: dict[str, Any]


# --- building blocks ------------------------------------------------------------------------------


def build_model(
    config: TrainConfig, num_classes: int, in_chans: int, model_factory: Callable[..., nn.Module] | None = None
) -> nn.Module:
    """The model to train: ``model_factory(num_classes=, in_chans=)`` if given, else
    ``timm.create_model(config.model, ...)`` with ``config.model_kwargs``."""
    if model_factory is not None:
        return model_factory(num_classes=num_classes, in_chans=in_chans)
    import cyclemlp  # noqa: F401  (registers the CycleMLP models with timm)

    if not timm.is_model(config.model):
        raise ValueError(f"unknown model {config.model!r}; see timm.list_models() (CycleMLP: cyclemlp_b1 ...)")
    kwargs = dict(config.model_kwargs)
    kwargs.setdefault("drop_rate", config.drop_rate)
    if config.drop_path is not None:
        kwargs.setdefault("drop_path_rate", config.drop_path)
    try:
        return timm.create_model(
            config.model, pretrained=config.pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
        )
    except TypeError as err:
        raise ValueError(f"model {config.model!r} does not accept these model kwargs {kwargs}: {err}") from err


def _data_config(config: TrainConfig, model: nn.Module, dataset: Any, in_chans: int) -> dict[str, Any]:
    """Input size, interpolation, crop and normalisation: the config's values, else the data's
    (built-in datasets) or the model's (image folders)."""
    resolved = resolve_data_config({}, model=model)
    if getattr(dataset, "native_size", None):
        mean, std = dataset.mean * in_chans, dataset.std * in_chans
        resolved.update(input_size=(in_chans, dataset.native_size, dataset.native_size), crop_pct=1.0,
                        mean=mean, std=std)
    size = config.img_size or resolved["input_size"][-1]
    out = dict(
        input_size=(in_chans, size, size),
        interpolation=config.interpolation or resolved["interpolation"],
        crop_pct=config.crop_pct if config.crop_pct is not None else resolved["crop_pct"],
        mean=tuple(config.mean) if config.mean else tuple(resolved["mean"]),
        std=tuple(config.std) if config.std else tuple(resolved["std"]),
    )
    if len(out["mean"]) != in_chans or len(out["std"]) != in_chans:
        if len(out["mean"]) == 3 and in_chans == 1:  # an RGB model default on grey input
            out["mean"], out["std"] = (sum(out["mean"]) / 3,), (sum(out["std"]) / 3,)
        else:
            raise ValueError(f"mean/std need {in_chans} value(s); got {out['mean']} / {out['std']}")
    return out


def _output_dir(config: TrainConfig) -> Path:
    if config.resume:
        return engine.resolve_resume(config.resume).parent
    if config.output:
        out = Path(config.output)
        if (out / engine.LAST).exists():
            raise ValueError(
                f"{out} already holds a training run; pass --resume {out} to continue it, or another --output"
            )
        return out
    data = config.dataset or Path(str(config.data)).name
    base = Path("runs") / f"{config.model}-{data}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _autocast(config: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if not config.amp:
        return contextlib.nullcontext
    dtype = torch.bfloat16 if (config.amp_dtype == "bfloat16" or device.type != "cuda") else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


# --- one epoch ------------------------------------------------------------------------------------


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    scheduler: Any,
    epoch: int,
    num_updates: int,
    dist: engine.DistInfo,
    *,
    accum_steps: int = 1,
    updates_per_epoch: int,
    sched_on_updates: bool = False,
    mixup: Mixup | None = None,
    scaler: torch.amp.GradScaler | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    clip_grad: float | None = None,
    ema: ModelEmaV3 | None = None,
    channels_last: bool = False,
    last_checkpoint: Path | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train for one epoch; returns ``train_loss`` (mean over images), ``train_img_per_s``,
    ``skipped`` (unreadable images) and ``num_updates`` (optimizer steps so far)."""
    model.train()
    device = dist.device
    total_batches = updates_per_epoch * accum_steps
    bar = engine.progress_bar(total_batches * loader.batch_size * dist.world_size, f"train {epoch}",
                              progress and dist.is_main)
    loss_sum = torch.zeros((), device=device)
    seen = torch.zeros((), device=device)
    skipped = 0
    start = shown = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for step, (images, targets, n_skipped) in enumerate(loader):
        if step >= total_batches:  # a trailing group smaller than accum_steps is not used
            break
        skipped += n_skipped
        micro = step % accum_steps
        if micro == 0 and sched_on_updates:
            scheduler.step_update(num_updates)
        if images is not None:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if mixup is not None and len(images) % 2:
                images, targets = images[:-1], targets[:-1]  # mixup pairs images within the batch
            n_images = len(images)
            if mixup is not None:
                images, targets = mixup(images, targets)
            last_micro = micro == accum_steps - 1
            sync = contextlib.nullcontext() if (last_micro or not dist.distributed) else model.no_sync()
            with sync:
                with autocast():
                    loss = criterion(model(images), targets)
                engine.check_finite(engine.reduce_mean(loss.detach(), dist), epoch, step, last_checkpoint)
                scaled = loss / accum_steps
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum += loss.detach() * n_images
            seen += n_images
        if micro == accum_steps - 1:
            if scaler is not None:
                if clip_grad is not None:
                    scaler.unscale_(optimizer)
                    dispatch_clip_grad(model.parameters(), clip_grad)
                scaler.step(optimizer)
                scaler.update()
            else:
                if clip_grad is not None:
                    dispatch_clip_grad(model.parameters(), clip_grad)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if ema is not None:
                ema.update(model, step=num_updates)
        bar.update(loader.batch_size * dist.world_size)
        if bar.n and time.perf_counter() - shown > 1.0:  # the loss .item() syncs: once a second
            shown = time.perf_counter()
            bar.set_postfix(loss=f"{(loss_sum / seen.clamp(min=1)).item():.4f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
    bar.close()
    elapsed = time.perf_counter() - start
    totals = engine.reduce_sum(torch.stack([loss_sum, seen, torch.tensor(float(skipped), device=device)]), dist)
    return dict(
        train_loss=(totals[0] / totals[1].clamp(min=1)).item(),
        train_img_per_s=totals[1].item() / max(elapsed, 1e-9),
        skipped=int(totals[2].item()),
        num_updates=num_updates,
    )


# --- the run --------------------------------------------------------------------------------------


def train(
    config: TrainConfig | Mapping[str, Any] | None = None,
    model_factory: Callable[..., nn.Module] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train and evaluate a classifier; see :class:`TrainConfig` for every setting.

    Args:
        config: a :class:`TrainConfig` or a mapping of its fields (``recipe`` in a mapping selects
            the starting values).
        model_factory: builds the model instead of timm: ``factory(num_classes=, in_chans=)``.
        overrides: fields replacing the config's.

    Under ``torchrun`` every process calls this; rank 0 writes the files. Raises ValueError /
    FileNotFoundError / CheckpointError for bad settings, data or checkpoints, and
    :class:`cyclemlp.training.engine.NonFiniteLossError` when the loss becomes NaN/Inf.
    """
    if config is None:
        config = TrainConfig()
    elif isinstance(config, Mapping):
        values = dict(config)
        config = TrainConfig.from_recipe(values.pop("recipe", None), **values)
    config = dataclasses.replace(config, **overrides)
    config.check()
    joined = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    dist = engine.setup_distributed(config.device)
    try:
        return _run(config, model_factory, dist)
    finally:
        if joined:
            engine.cleanup_distributed()


def _run(config: TrainConfig, model_factory: Callable[..., nn.Module] | None, dist: engine.DistInfo) -> TrainResult:
    wall_start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    engine.seed_everything(config.seed + dist.rank)
    device = dist.device

    # data (classes first: they size the model's head)
    train_split, val_split = default_splits(config.dataset)
    train_split, val_split = config.train_split or train_split, config.val_split or val_split
    in_chans = config.in_chans or native_in_chans(config.dataset)
    train_set = build_dataset(config.dataset, config.data, train_split, in_chans=in_chans, strict=config.strict,
                              subset=config.train_subset)
    classes = list(train_set.classes)
    val_set = build_dataset(config.dataset, config.data, val_split, in_chans=in_chans, strict=config.strict,
                            subset=config.val_subset, classes=classes)

    # model
    model = build_model(config, len(classes), in_chans, model_factory)
    if config.initial_checkpoint:
        load_weights(model, config.initial_checkpoint, reset_head=True)  # logs what it loaded
    if config.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
        model.set_grad_checkpointing(True)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())

    data_config = _data_config(config, model, getattr(train_set, "dataset", train_set), in_chans)
    aug = dict(scale=tuple(config.scale), ratio=tuple(config.ratio), hflip=config.hflip,
               color_jitter=config.color_jitter, auto_augment=config.aa, re_prob=config.reprob,
               re_mode=config.remode, re_count=config.recount, pad_crop=config.pad_crop, no_aug=config.no_aug)
    size = data_config["input_size"]
    not_cacheable = cacheable(train_set, aug, size) or cacheable(val_set, dict(no_aug=True), size)
    if config.cache_data and not_cacheable:
        raise ValueError(f"cannot cache the data in memory: {not_cacheable}")
    cache = not not_cacheable if config.cache_data is None else config.cache_data
    train_loader: Any
    val_loader: Any
    if cache:  # timm's transform once per image (flip, translation, erasing drawn per batch), then indexing
        train_x, train_y = cache_images(train_set, build_transform(data_config, True, **static_part(aug)),
                                        config.workers)
        val_x, val_y = cache_images(val_set, build_transform(data_config, False), config.workers)
        train_sampler = build_sampler(train_set, config.batch_size, True, dist.rank, dist.world_size, config.seed,
                                      config.aug_repeats, config.samples_per_epoch)
        black = [-m / s for m, s in zip(data_config["mean"], data_config["std"])]  # 0 after normalising
        erasing = None
        if config.reprob > 0 and not config.no_aug:  # timm's, on the normalised batch (as its PrefetchLoader)
            erasing = RandomErasing(config.reprob, mode=config.remode, max_count=config.recount, device="cpu")
        train_loader = CachedLoader(train_set, train_x, train_y, train_sampler, config.batch_size, True,
                                    hflip=0.0 if config.no_aug else config.hflip,
                                    pad_crop=0 if config.no_aug else config.pad_crop, fill=black, erasing=erasing)
        val_loader = CachedLoader(val_set, val_x, val_y, build_sampler(val_set, config.batch_size, False, dist.rank,
                                                                       dist.world_size), config.batch_size, False)
    else:
        _set_transform(train_set, build_transform(data_config, True, **aug))
        _set_transform(val_set, build_transform(data_config, False))
        pin = device.type == "cuda"
        train_loader = build_loader(train_set, config.batch_size, True, dist.rank, dist.world_size, config.seed,
                                    config.workers, config.aug_repeats, pin, config.samples_per_epoch)
        val_loader = build_loader(val_set, config.batch_size, False, dist.rank, dist.world_size, config.seed,
                                  config.workers, 0, pin)
    updates_per_epoch = len(train_loader) // config.grad_accum_steps
    if updates_per_epoch < 1:
        raise ValueError(
            f"{len(train_loader)} batch(es) per epoch cannot fill one accumulation of {config.grad_accum_steps}"
        )

    # optimisation
    global_batch = config.batch_size * dist.world_size * config.grad_accum_steps
    lr = config.lr if config.lr is not None else config.lr_base * global_batch / config.lr_base_size
    opt_kwargs: dict[str, Any] = {}
    if config.opt_eps is not None:
        opt_kwargs["eps"] = config.opt_eps
    if config.opt_betas is not None:
        opt_kwargs["betas"] = tuple(config.opt_betas)
    fused_opt = config.opt.lower() in FUSED_OPTIMIZERS
    if config.opt_fused and not fused_opt:
        raise ValueError(f"--opt-fused: torch has a fused step for {sorted(FUSED_OPTIMIZERS)}, not {config.opt!r}")
    if config.opt_fused or (config.opt_fused is None and fused_opt and device.type in ("cpu", "cuda")):
        opt_kwargs["fused"] = True  # the same update as the per-tensor loop, in one kernel per step
    optimizer = create_optimizer_v2(model, opt=config.opt, lr=lr, weight_decay=config.weight_decay,
                                    momentum=config.momentum, **opt_kwargs)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=config.sched, num_epochs=config.epochs, warmup_epochs=config.warmup_epochs,
        warmup_lr=config.warmup_lr, min_lr=config.min_lr, cooldown_epochs=config.cooldown_epochs,
        step_on_epochs=not config.sched_on_updates, updates_per_epoch=updates_per_epoch,
    )
    autocast = _autocast(config, device)
    use_scaler = config.amp and device.type == "cuda" and config.amp_dtype == "float16"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    ema = ModelEmaV3(model, decay=config.model_ema_decay) if config.model_ema else None
    mixup = None
    if config.mixup > 0 or config.cutmix > 0:
        mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.mixup_prob,
                      switch_prob=config.mixup_switch_prob, mode=config.mixup_mode,
                      label_smoothing=config.smoothing, num_classes=len(classes))
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif config.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(config.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    train_model: nn.Module = model
    if dist.distributed:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # files
    out_dir = Path(engine.all_gather_objects(str(_output_dir(config)) if dist.is_main else None, dist)[0])
    ckpt = engine.CheckpointManager(out_dir, enabled=dist.is_main, mode="max")
    log = engine.MetricsLogger(out_dir, enabled=dist.is_main, tensorboard=config.tensorboard)
    run_info = dict(
        model=config.model if model_factory is None else getattr(model_factory, "__name__", "custom"),
        model_kwargs=_jsonable(dict(config.model_kwargs)), num_classes=len(classes), in_chans=in_chans,
        classes=classes, data_config=_jsonable(data_config),
        dataset=config.dataset or str(config.data), custom_model=model_factory is not None,
    )
    config_dict = _jsonable(dataclasses.asdict(config))
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        engine.atomic_write(out_dir / "config.json", lambda tmp: Path(tmp).write_text(
            json.dumps(dict(config=config_dict, run=run_info, lr=lr, global_batch=global_batch,
                            world_size=dist.world_size, params=params), indent=1)))

    start_epoch, num_updates = 0, 0
    if config.resume:
        state = engine.load_training_state(engine.resolve_resume(config.resume))
        _check_resume(state, run_info)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None:
            if not state.get("model_ema"):
                raise CheckpointError(f"{config.resume} has no EMA weights; resume without --model-ema")
            ema.module.load_state_dict(state["model_ema"])
        engine.restore_rng_state(state["rng"], dist)
        ckpt.best = state.get("best_metric")
        start_epoch, num_updates = state["epoch"] + 1, state["num_updates"]
        log.rows = [dict(r) for r in state.get("history", [])]  # the log as of that checkpoint
        engine.print0(f"resumed from {config.resume} at epoch {start_epoch}", dist=dist)

    engine.print0(
        f"training {run_info['model']} ({params / 1e6:.2f}M params) on {run_info['dataset']}: "
        f"{len(train_set)} train / {len(val_set)} eval images, {len(classes)} classes, input "
        f"{data_config['input_size']}, global batch {global_batch}, lr {lr:.3g}, {config.epochs} epochs, "
        f"{dist.world_size} process(es) on {device}{', images cached in memory' if cache else ''}; writing to "
        f"{out_dir}",
        dist=dist,
    )
    metrics: dict[str, Any] = {}
    train_stats: dict[str, float] = {}
    for epoch in range(start_epoch, config.epochs):
        epoch_start, cpu_start = time.perf_counter(), time.process_time()
        train_loader.sampler.set_epoch(epoch)
        if not config.sched_on_updates:
            scheduler.step(epoch)
        train_stats = train_one_epoch(
            train_model, train_loader, optimizer, criterion, scheduler, epoch, num_updates, dist,
            accum_steps=config.grad_accum_steps, updates_per_epoch=updates_per_epoch,
            sched_on_updates=config.sched_on_updates, mixup=mixup, scaler=scaler, autocast=autocast,
            clip_grad=config.clip_grad, ema=ema, channels_last=config.channels_last,
            last_checkpoint=ckpt.latest() if dist.is_main else None, progress=config.progress,
        )
        num_updates = int(train_stats.pop("num_updates"))
        result = evaluate(model, val_loader, dist, autocast=autocast, desc=f"eval {epoch}",
                          progress=config.progress, channels_last=config.channels_last)
        row = dict(epoch=epoch, lr=optimizer.param_groups[0]["lr"], **train_stats,
                   eval_loss=result.loss, eval_top1=result.top1, eval_top5=result.top5,
                   eval_skipped=result.skipped)
        if ema is not None:
            ema_result = evaluate(ema.module, val_loader, dist, autocast=autocast, desc=f"eval ema {epoch}",
                                  progress=config.progress, channels_last=config.channels_last)
            row.update(eval_ema_loss=ema_result.loss, eval_ema_top1=ema_result.top1, eval_ema_top5=ema_result.top5)
        row["epoch_s"] = round(time.perf_counter() - epoch_start, 2)
        row["cpu_s"] = round(time.process_time() - cpu_start, 2)  # this process's CPU time (not its loaders')
        row["time_s"] = round((log.rows[-1].get("time_s", 0.0) if log.rows else 0.0) + row["epoch_s"], 2)
        improved = ckpt.save(
            dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                 scaler=scaler.state_dict() if scaler is not None else None,
                 model_ema=ema.module.state_dict() if ema is not None else None, epoch=epoch, num_updates=num_updates,
                 rng=engine.capture_rng_state(dist), metrics=row, history=log.rows + [row], run=run_info,
                 config=config_dict),
            metric=result.top1,
        )
        log.log(row)  # after the checkpoint: a logged epoch always has its checkpoint
        skipped = f", skipped {row['skipped'] + result.skipped} unreadable image(s)" if row["skipped"] + result.skipped else ""
        engine.print0(
            f"epoch {epoch + 1}/{config.epochs}: train loss {row['train_loss']:.4f} "
            f"({row['train_img_per_s']:.0f} img/s), eval loss {result.loss:.4f}, top-1 {result.top1:.2f}%, "
            f"top-5 {result.top5:.2f}%{' (best)' if improved else ''}{skipped}",
            dist=dist,
        )
        metrics = row

    weights = None
    if dist.is_main:
        final = metrics or (log.rows[-1] if log.rows else {})
        meta = dict(run=run_info, epoch=final.get("epoch"), eval_top1=final.get("eval_top1"))
        weights = save_weights(model, out_dir / "model.safetensors", metadata=meta)
        if ema is not None:
            save_weights(ema.module, out_dir / "model_ema.safetensors", metadata=meta)
        log.plot(title=f"{run_info['model']} on {run_info['dataset']}")
    log.close()
    engine.barrier(dist)

    final = log.rows[-1] if log.rows else metrics
    best_row = max(log.rows, key=lambda r: r["eval_top1"]) if log.rows else final
    return TrainResult(
        output_dir=out_dir, epochs=config.epochs, top1=final.get("eval_top1", float("nan")),
        top5=final.get("eval_top5", float("nan")), loss=final.get("eval_loss", float("nan")),
        best_top1=best_row.get("eval_top1", float("nan")), best_epoch=best_row.get("epoch", -1),
        train_img_per_s=train_stats.get("train_img_per_s", float("nan")),
        wall_s=time.perf_counter() - wall_start, params=params, weights=weights,
        last_checkpoint=ckpt.last_path, best_checkpoint=ckpt.best_path,
        history=list(log.rows), config=config_dict,
    )


def _set_transform(dataset: Any, transform: Callable) -> None:
    getattr(dataset, "dataset", dataset).transform = transform  # through a Subset


def _check_resume(state: Mapping[str, Any], run_info: Mapping[str, Any]) -> None:
    saved = state.get("run", {})
    for key in ("model", "num_classes", "in_chans", "model_kwargs"):
        if key in saved and saved[key] != run_info[key]:
            raise CheckpointError(
                f"cannot resume: the checkpoint was trained with {key}={saved[key]!r}, this run has "
                f"{key}={run_info[key]!r}"
            )
