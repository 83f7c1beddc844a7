"""Pieces shared by the detection and segmentation training commands (on top of :mod:`engine`).

The training loops themselves stay in :mod:`cyclemlp.dense.detection.train` and
:mod:`cyclemlp.dense.segmentation.train`; this module only holds what both need identically: the run
directory and resume rules, the AdamW parameter groups, saving a round and reading a run back,
evaluation shards, reading images for prediction and the class colours.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ..io import CheckpointError, save_weights
from ..training import engine
from ..training.config import jsonable

__all__ = [
    "adamw", "find_checkpoint", "finish_run", "load_run", "open_run", "palette", "read_image", "restore_run",
    "save_round", "shard", "short_list", "unwrap",
]


def adamw(
    model: nn.Module, lr: float, weight_decay: float, no_decay: Iterable[str] = ()
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; names containing any of ``no_decay`` get no decay."""
    no_decay = tuple(no_decay)
    decay, exempt = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (exempt if no_decay and any(key in name for key in no_decay) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if exempt:
        groups.append({"params": exempt, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)


def shard(dataset: Dataset, dist: engine.DistInfo | None) -> Dataset:
    """This process's share of ``dataset`` for evaluation: every item exactly once over all ranks
    (unlike DistributedSampler, which repeats items to even out the shares)."""
    if dist is None or not dist.distributed:
        return dataset
    return Subset(dataset, range(dist.rank, len(dataset), dist.world_size))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# Settings of a dense run that do not change its result: a resumed run may give others.
RUN_ONLY = frozenset({"workers"})


def open_run(
    out_dir: str | os.PathLike, resume: str | os.PathLike | None, config: dict[str, Any],
) -> dict[str, Any] | None:
    """Check the output folder and read the state to resume from.

    A folder that already holds a run is never overwritten: without ``resume`` that is an error.
    With ``resume`` the checkpoint's ``config`` must equal ``config`` in everything but the
    run-only recipe values (:data:`RUN_ONLY`); the error lists each difference. A backbone (and
    its arguments) not given is filled in from the checkpoint, in ``config``.
    """
    out = Path(out_dir)
    if resume is None:
        if (out / engine.LAST).exists():
            raise ValueError(
                f"{out} already holds a training run ({engine.LAST}); resume it with --resume {out} "
                "or choose another output folder"
            )
        return None
    state = engine.load_training_state(engine.resolve_resume(resume))
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{resume} holds no run configuration: it was not written by a cyclemlp training command")
    for key, unset in (("backbone", None), ("backbone_kwargs", {})):  # not given: the run's own
        if config.get(key) == unset:
            config[key] = saved.get(key, unset)
    differ = [(k, saved.get(k), v) for k, v in _flatten(config).items()
              if k.split(".")[-1] not in RUN_ONLY and _flatten(saved).get(k) != v]
    if differ:
        raise ValueError(
            f"cannot resume {resume}: these values differ from the run's record and would change its result\n"
            + "\n".join(f"  {k}: recorded {_flatten(saved).get(k)!r}, given {v!r}" for k, _, v in differ)
            + "\nresume with the values the run was started with"
        )
    return state


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"recipe": {"lr": 1}}`` -> ``{"recipe.lr": 1}``, tuples as lists (what a checkpoint holds)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "backbone_kwargs":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = jsonable(value)
    return out


def find_checkpoint(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """A run folder (its ``best.pth``, else ``last.pth``) or a checkpoint file, and its state.

    The state must carry the ``config`` the training command stores, to rebuild the model.
    """
    path = Path(path)
    if path.is_dir():
        for name in (engine.BEST, engine.LAST):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"{path} holds no {engine.BEST} or {engine.LAST}")
    try:
        state = engine.load_training_state(path)
    except CheckpointError as err:
        raise CheckpointError(f"{err}; give a run folder of `cyclemlp detect train` / `segment train`, or its "
                              "best.pth or last.pth") from err
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(
            f"{path} has no model configuration; it was not written by a cyclemlp dense-prediction run"
        )
    return path, state


def restore_run(
    state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
    ckpt: engine.CheckpointManager, log: engine.MetricsLogger, dist: engine.DistInfo,
) -> int:
    """Load a resumed run's model, optimiser, random state, best metric and log; returns the next
    epoch (round) to run."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    engine.restore_rng_state(state["rng"], dist)
    ckpt.best = state.get("best_metric")
    start = state["epoch"] + 1
    log.truncate(start)
    return start


def save_round(
    ckpt: engine.CheckpointManager, log: engine.MetricsLogger, dist: engine.DistInfo, model: nn.Module,
    optimizer: torch.optim.Optimizer, row: dict[str, Any], config: dict[str, Any], metric: float | None,
    **extra: Any,
) -> None:
    """Write the checkpoint, then log the epoch's (round's) row, so that a logged row always has its
    checkpoint (a collective call: the RNG states of all ranks are captured)."""
    ckpt.save(
        {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "epoch": row["epoch"],
         "rng": engine.capture_rng_state(dist), "metrics": row, "config": config, **extra},
        metric=metric,
    )
    log.log(row)


def finish_run(
    out_dir: str | os.PathLike, log: engine.MetricsLogger, dist: engine.DistInfo, model: nn.Module,
    config: dict[str, Any], title: str,
) -> None:
    """End of training: the final weights as ``model.safetensors`` (with the run's configuration in
    its metadata) and the curves PNG, written by rank 0."""
    if dist.is_main:
        final = log.rows[-1] if log.rows else {}
        save_weights(unwrap(model), Path(out_dir) / "model.safetensors", metadata={"config": config, "metrics": final})
        log.plot(title=title)
    log.close()
    engine.barrier(dist)


def load_run(
    checkpoint: str | os.PathLike, task: str, build: Callable[[dict[str, Any]], nn.Module],
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any], Path]:
    """The model of a training run (a folder: its best, else last checkpoint), in eval mode."""
    path, state = find_checkpoint(checkpoint)
    config = state["config"]
    if config.get("task") != task:
        raise ValueError(f"{path} is a {config.get('task')!r} checkpoint, not a {task!r} one")
    model = build(config)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config, path


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as a uint8 RGB tensor ``(3, H, W)``; ValueError naming the file if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as handle:
            array = np.asarray(handle.convert("RGB")).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read the image ({err})") from err
    return torch.from_numpy(array).permute(2, 0, 1)


def short_list(items: Sequence[str], limit: int = 8) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct colours per class (class 0 dark grey)."""
    import colorsys

    colours = [(40, 40, 40)]
    for i in range(num_classes - 1):  # golden-ratio steps around the hue circle
        colours.append(tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.8, 0.95)))
    return colours[:num_classes]
