"""What a classification run depends on: :class:`TrainConfig`, the recipes, and the rules that
decide which changes a resumed run accepts.

This module imports nothing heavy, so the command line can describe every setting (``cyclemlp
train --help``) without loading PyTorch.

* The field defaults of :class:`TrainConfig` are the authors' ImageNet recipe (DeiT-derived:
  AdamW, lr 5e-4 per 512 images, weight decay 0.05, 300 epochs of cosine schedule with 5 of
  warm-up, RandAugment, Mixup 0.8 / CutMix 1.0, label smoothing 0.1, random erasing 0.25,
  repeated augmentation, stochastic depth 0.1, EMA of the weights).
* :data:`RECIPES` holds named sets of changes to those defaults: ``imagenet`` (none) and
  ``fashion-mnist`` (the embedded default: the dataset, a narrow CycleMLP, a 15-epoch CPU
  schedule).
* :func:`resume_config` rebuilds a run's configuration from its record and the values given
  again on resumption, refusing every change that would alter the result.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = [
    "RECIPES", "RUN_FIELDS", "ResumeConflictError", "TrainConfig", "default_recipe", "flag", "recipe",
    "resume_config",
]

# --- recipes --------------------------------------------------------------------------------------

# Fashion-MNIST, 28x28 grey, on a CPU: CycleMLP with B1's layout at three quarters of its width and
# one block per stage but two in the third (0.16 GMACs at 32 px), 15 epochs. 32 px is the smallest
# input every timm peer of the Fashion-MNIST benchmark accepts with its own stem. Over short
# schedules flips beat random-resized crops (the models underfit); random erasing pays from about
# 13 epochs on. Reaches about 92 % test top-1 in a quarter of an hour on two CPU cores.
FASHION_MNIST = dict(
    dataset="fashion-mnist",
    model="cyclemlp_b1", model_kwargs=dict(dims=(48, 96, 192, 384), depths=(1, 1, 2, 1)),
    img_size=32, crop_pct=1.0, interpolation="bilinear", batch_size=128,
    lr=3e-3, weight_decay=0.05,
    epochs=15, warmup_epochs=0.3, warmup_lr=1e-5, min_lr=1e-5, sched_on_updates=True,
    scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.5, color_jitter=0.0, aa=None,
    reprob=0.25, mixup=0.0, cutmix=0.0, aug_repeats=0, drop_path=0.0, amp=False, model_ema=False,
)

RECIPES: dict[str, dict[str, Any]] = {"imagenet": {}, "fashion-mnist": FASHION_MNIST}

# Fields that cannot change what a run computes: a resumed run may take other values for them.
RUN_FIELDS: frozenset[str] = frozenset({"workers", "threads", "device", "progress", "tensorboard", "output", "resume"})

# Flags whose name is not the field's (``--drop`` sets ``drop_rate``, as in timm's train.py).
_FLAGS = {"drop_rate": "--drop"}


def flag(name: str) -> str:
    """The command-line flag of a :class:`TrainConfig` field."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def recipe(name: str) -> dict[str, Any]:
    """A copy of a named recipe's changes to the defaults."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return {k: dict(v) if isinstance(v, dict) else v for k, v in RECIPES[name].items()}


def default_recipe(dataset: str | None) -> str:
    """The recipe a run gets when none is named: the dataset's own where there is one, else the
    authors' (``imagenet``)."""
    key = (dataset or "").lower().replace("_", "-").removeprefix("torch/")
    key = "fashion-mnist" if key == "fashionmnist" else key
    return key if key in RECIPES else "imagenet"


# --- configuration --------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything a training run depends on. Names follow timm's ``train.py`` flags; the defaults
    are the authors' ImageNet recipe. ``None`` means "resolved at the start of the run" (from the
    data, the model or the recipe); the run's record holds the resolved values."""

    # model
    model: str = "cyclemlp_b1"
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. stepsize=7, pattern="paper"
    pretrained: bool = False
    initial_checkpoint: str | None = None  # weights to start from (not a resume)
    drop_rate: float = 0.0
    drop_path: float | None = 0.1  # None: the model's own default
    grad_checkpointing: bool = False
    in_chans: int | None = None  # None: the data's (1 for fashion-mnist, 3 for image folders)
    channels_last: bool = False
    # data
    dataset: str | None = None  # built-in name ("fashion-mnist")
    data: str | None = None  # ImageNet-layout root; for a built-in dataset, a folder with its files
    train_split: str | None = None  # None: train
    val_split: str | None = None  # None: test for built-in datasets, val for folders
    train_subset: int | None = None
    val_subset: int | None = None
    strict: bool = False  # stop at an unreadable image instead of skipping it
    img_size: int | None = 224  # None: the data's (built-in datasets) or the model's
    crop_pct: float | None = 0.875
    interpolation: str | None = "bicubic"
    mean: tuple[float, ...] | None = None  # None: the data's or the model's
    std: tuple[float, ...] | None = None
    batch_size: int = 128  # per process
    workers: int = 2
    # serve batches from images transformed once (None: when possible — an in-memory built-in
    # dataset whose augmentation is flips, translation and erasing; see cyclemlp.data.cached)
    cache_data: bool | None = None
    samples_per_epoch: int | None = None  # None: one pass over the training split per epoch
    # augmentation
    no_aug: bool = False
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.4
    aa: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    pad_crop: int = 0  # random translation: crop from the image zero-padded by N pixels per side
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    aug_repeats: int = 3
    # optimisation
    opt: str = "adamw"
    lr: float | None = None  # None: lr_base * global_batch / lr_base_size
    lr_base: float = 5e-4
    lr_base_size: int = 512
    weight_decay: float = 0.05
    momentum: float = 0.9
    opt_eps: float | None = 1e-8
    opt_betas: tuple[float, float] | None = (0.9, 0.999)
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
    amp: bool = True
    amp_dtype: str = "float16"
    model_ema: bool = True
    model_ema_decay: float = 0.99996
    # run
    seed: int = 42
    device: str = "auto"
    threads: int | None = None  # torch CPU threads per process (None: torch's default)
    output: str | None = None  # run folder; default runs/<model>-<data>[-N]
    resume: str | None = None  # a run folder, or its last.pth
    tensorboard: bool = False
    progress: bool = True
    recipe: str | None = None  # the recipe the values started from

    @classmethod
    def from_recipe(cls, name: str | None = None, **overrides: Any) -> "TrainConfig":
        """A config holding recipe ``name``'s values, then ``overrides``.

        Without a name the dataset's own recipe is taken where there is one (see
        :func:`default_recipe`). A recipe's ``model_kwargs`` belong to its ``model``: they are
        dropped when ``overrides`` name another model. Its ``dataset`` is dropped when
        ``overrides`` name a dataset or a ``data`` folder.
        """
        name = name or default_recipe(overrides.get("dataset"))
        values = recipe(name)
        if "model" in overrides and overrides["model"] != values.get("model", cls.model):
            values.pop("model_kwargs", None)
        if "dataset" in overrides or "data" in overrides:
            values.pop("dataset", None)
        values.update(overrides)
        values["recipe"] = name
        return cls(**values)

    def check(self) -> None:
        """Raise ValueError naming the first invalid value."""
        from ..data import builtin_name

        if self.dataset is None and self.data is None:
            raise ValueError("no dataset given: pass --dataset NAME (built-in) or --data DIR (image folder)")
        if self.dataset is not None:
            self.dataset = builtin_name(self.dataset)
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; known: {sorted(RECIPES)}")
        positive = dict(batch_size=self.batch_size, epochs=self.epochs, grad_accum_steps=self.grad_accum_steps)
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be positive; got {self.samples_per_epoch}")
        for name in ("train_subset", "val_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive; got {value}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be positive; got {self.threads}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0; got {self.workers}")
        if self.img_size is not None and self.img_size < 8:
            raise ValueError(f"img_size must be at least 8 pixels; got {self.img_size}")
        for name in ("lr", "lr_base"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number; got {value}")
        for name in ("warmup_lr", "min_lr"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a number >= 0; got {value}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0; got {self.warmup_epochs}")
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs:g}) must be shorter than the run ({self.epochs} epoch(s)); "
                "lower --warmup-epochs or raise --epochs"
            )
        if self.cooldown_epochs < 0:
            raise ValueError(f"cooldown_epochs must be >= 0; got {self.cooldown_epochs}")
        if self.amp_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"amp_dtype must be 'float16' or 'bfloat16'; got {self.amp_dtype!r}")
        if self.in_chans not in (None, 1, 3):
            raise ValueError(f"in_chans must be 1 or 3; got {self.in_chans}")
        for name in ("reprob", "hflip", "mixup_prob", "mixup_switch_prob", "smoothing", "drop_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]; got {value}")
        if self.drop_path is not None and not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be within [0, 1); got {self.drop_path}")
        if self.model_ema and not 0.0 < self.model_ema_decay < 1.0:
            raise ValueError(f"model_ema_decay must be within (0, 1); got {self.model_ema_decay}")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.pad_crop < 0:
            raise ValueError(f"pad_crop must be a number of pixels >= 0; got {self.pad_crop}")
        if self.crop_pct is not None and not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be within (0, 1]; got {self.crop_pct}")
        if not isinstance(self.model_kwargs, Mapping) or not all(isinstance(k, str) for k in self.model_kwargs):
            raise ValueError(f"model_kwargs must be a mapping of keyword arguments; got {self.model_kwargs!r}")

    def as_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (tuples become lists)."""
        return jsonable(dataclasses.asdict(self))


def jsonable(value: Any) -> Any:
    """``value`` with tuples turned into lists, recursively (what a JSON round trip gives)."""
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


# --- resuming -------------------------------------------------------------------------------------


class ResumeConflictError(ValueError):
    """Values given to a resumed run that differ from its record."""

    def __init__(self, run: str, conflicts: list[tuple[str, Any, Any]]) -> None:
        self.conflicts = conflicts
        lines = [f"  {flag(name)}: recorded {_show(recorded)}, given {_show(given)}"
                 for name, recorded, given in conflicts]
        super().__init__(
            f"cannot resume {run}: these values differ from the run's record and would change its result\n"
            + "\n".join(lines)
            + f"\nresume with `--resume {run}` alone (or the recorded values), or start a new run with another --output"
        )


def _show(value: Any) -> str:
    return "(unset)" if value is None else repr(value)


def resume_config(recorded: Mapping[str, Any], given: Mapping[str, Any], run: str, epochs_done: int) -> TrainConfig:
    """The configuration of a resumed run: its record, plus the given values that cannot change its
    result (:data:`RUN_FIELDS`) and a larger ``epochs`` (an extension).

    Args:
        recorded: the run's resolved configuration (``TrainConfig.as_dict()`` of its start).
        given: the values given on resumption (only those the user named; ``None`` counts as
            not named).
        run: the run folder, for messages.
        epochs_done: epochs the run has completed.

    Raises:
        ResumeConflictError: listing every given value that differs from the record.
        ValueError: ``epochs`` below the number already trained.
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in recorded.items() if k in known}
    conflicts = []
    for name, value in given.items():
        if value is None or name == "resume":
            continue
        if name not in known:
            raise ValueError(f"unknown setting {name!r}")
        if name in RUN_FIELDS:
            values[name] = value
        elif name == "epochs":
            if value < epochs_done:
                raise ValueError(f"cannot resume {run} with --epochs {value}: it has trained {epochs_done} epochs")
            if value < recorded["epochs"]:
                conflicts.append((name, recorded["epochs"], value))  # a shorter schedule changes the result
            values[name] = value
        elif name == "recipe":
            if value != recorded.get("recipe"):
                conflicts.append((name, recorded.get("recipe"), value))
        elif not _same(jsonable(value), recorded.get(name)):
            conflicts.append((name, recorded.get(name), jsonable(value)))
    if conflicts:
        raise ResumeConflictError(run, conflicts)
    for name in ("model_kwargs",):
        values[name] = dict(values.get(name) or {})
    for name in ("scale", "ratio", "opt_betas", "mean", "std"):
        if values.get(name) is not None:
            values[name] = tuple(values[name])
    return TrainConfig(**values)


def _same(given: Any, recorded: Any) -> bool:
    if isinstance(given, float) or isinstance(recorded, float):
        try:
            return float(given) == float(recorded)
        except (TypeError, ValueError):
            return False
    return given == recorded
