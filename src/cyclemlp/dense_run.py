"""Pieces shared by the detection and segmentation training commands (on top of :mod:`engine`).

The training loops themselves stay in :mod:`cyclemlp.detection.train` and
:mod:`cyclemlp.segmentation.train`; this module only holds what both need identically: the run
directory and resume rules, the AdamW parameter groups, and reading a run's checkpoint back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from . import engine
from .checkpoint import CheckpointError

__all__ = ["adamw", "find_checkpoint", "open_run", "shard", "unwrap"]


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


def open_run(
    out_dir: str | os.PathLike, resume: str | os.PathLike | None, config: dict[str, Any],
    compare: Iterable[str],
) -> dict[str, Any] | None:
    """Check the output folder and read the state to resume from.

    A folder that already holds a run is never overwritten: without ``resume`` that is an error.
    With ``resume`` the checkpoint's ``config`` must agree with ``config`` on the ``compare`` keys.
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
    saved = state.get("config", {})
    differ = [k for k in compare if k in saved and saved[k] != config.get(k)]
    if differ:
        raise ValueError(
            f"cannot resume {resume}: it was trained with "
            + ", ".join(f"{k}={saved[k]!r}" for k in differ)
            + "; this run asks for "
            + ", ".join(f"{k}={config.get(k)!r}" for k in differ)
        )
    return state


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
    state = engine.load_training_state(path)
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path} has no model configuration; it was not written by a cyclemlp dense-prediction run")
    return path, state
