"""The small training engine shared by classification, dense prediction and the analyses.

Plain functions and two small classes, no framework: a training loop stays visible in the
caller. Typical use (``train_one_epoch`` and ``evaluate`` are the caller's own)::

    from cyclemlp import engine

    dist = engine.setup_distributed(device="auto")          # reads torchrun's environment
    engine.seed_everything(seed + dist.rank)
    ckpt = engine.CheckpointManager(out_dir, enabled=dist.is_main, mode="max")
    log = engine.MetricsLogger(out_dir, enabled=dist.is_main, tensorboard=False)
    start = 0
    if resume:
        state = engine.load_training_state(engine.resolve_resume(resume))
        model.load_state_dict(state["model"]); optimizer.load_state_dict(state["optimizer"])
        engine.restore_rng_state(state["rng"], dist)        # exact continuation
        ckpt.best = state["best_metric"]; log.truncate(state["epoch"] + 1)
        start = state["epoch"] + 1
    for epoch in range(start, epochs):
        bar = engine.progress_bar(len(loader.dataset), f"epoch {epoch}", dist.is_main)
        for images, targets in loader:
            loss = ...
            engine.check_finite(engine.reduce_mean(loss.detach(), dist), epoch, step, ckpt.last_path)
            bar.update(images.shape[0] * dist.world_size)
        bar.close()
        row = {"epoch": epoch, "train_loss": ..., "eval_top1": ...}
        log.log(row)
        ckpt.save({"model": ..., "optimizer": ..., "epoch": epoch,
                   "rng": engine.capture_rng_state(dist), "metrics": row}, metric=row["eval_top1"])
    log.plot()
    engine.cleanup_distributed()

API
---
Distributed (torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``):

* :func:`setup_distributed` ``(device="auto", backend=None) -> DistInfo`` — initialises the default
  process group when ``WORLD_SIZE > 1`` (nccl on CUDA, gloo on CPU), pins ``cuda:LOCAL_RANK``.
* :class:`DistInfo` — ``rank``, ``world_size``, ``local_rank``, ``device``, ``is_main`` (rank 0),
  ``distributed`` (world size > 1).
* :func:`cleanup_distributed`, :func:`barrier`, :func:`reduce_sum`, :func:`reduce_mean`
  (all-reduce of a tensor; identity in one process), :func:`all_gather_objects`, :func:`print0`.

Reproducibility:

* :func:`seed_everything` ``(seed)`` — python, numpy, torch (CPU and every CUDA device).
* :func:`capture_rng_state` ``(dist=None) -> dict`` and :func:`restore_rng_state` ``(state, dist=None)``
  — every generator's state as tensors and plain values (loadable with ``weights_only=True``).
  With ``dist`` the states of all ranks are gathered (collective call) and each rank gets its own
  back on restore, so a resumed multi-process run continues exactly.

Checkpoints, logs, safety:

* :class:`CheckpointManager` ``(directory, enabled=True, mode="max")`` — ``save(state, metric)``
  writes ``last.pth`` atomically every call and copies it to ``best.pth`` when ``metric`` improves
  (``state["best_metric"]`` is filled in); ``last_path``, ``best_path``, ``best``, ``latest()``.
* :func:`load_training_state` ``(path) -> dict`` — reads a file written by the manager with
  ``weights_only=True``; :func:`resolve_resume` ``(path)`` accepts a file or a run directory.
* :class:`MetricsLogger` ``(directory, enabled=True, tensorboard=False)`` — ``log(row)`` appends one
  row (a dict, typically one epoch) and rewrites ``metrics.csv`` and ``metrics.json`` atomically;
  ``truncate(epoch)`` drops rows from ``epoch`` on (resume); ``plot(path=None)`` draws loss and
  accuracy curves to ``curves.png``.
* :func:`check_finite` ``(loss, epoch, step, checkpoint=None)`` raises :class:`NonFiniteLossError`
  with a message naming the step and the intact checkpoint when the loss is NaN or infinite.
* :func:`progress_bar` ``(total, desc, enabled, unit="img")`` — a tqdm bar showing throughput and
  ETA, silent where ``enabled`` is False (non-zero ranks).

Everything a user keeps is written through :func:`cyclemlp.models.checkpoint.atomic_write`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as torch_dist

from ..io import CheckpointError, atomic_write, read_checkpoint

__all__ = [
    "CheckpointManager",
    "DistInfo",
    "MetricsLogger",
    "NonFiniteLossError",
    "all_gather_objects",
    "barrier",
    "capture_rng_state",
    "check_finite",
    "cleanup_distributed",
    "load_training_state",
    "print0",
    "progress_bar",
    "reduce_mean",
    "reduce_sum",
    "resolve_device",
    "resolve_resume",
    "restore_rng_state",
    "seed_everything",
    "setup_distributed",
]

logger = logging.getLogger(__name__)

LAST = "last.pth"
BEST = "best.pth"


# --- distributed --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly one-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"``/None: CUDA (``cuda:local_rank``) if available, else CPU; otherwise as given."""
    if device is None or str(device) == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def setup_distributed(
    device: str | torch.device | None = "auto",
    backend: str | None = None,
    timeout_s: float = 1800.0,
) -> DistInfo:
    """Read torchrun's environment and, with more than one process, join the process group.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` (becomes ``cuda:LOCAL_RANK``), ...
        backend: process-group backend; default nccl for CUDA devices, gloo otherwise.
        timeout_s: collective-operation timeout.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not torch_dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        torch_dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def _active(dist: DistInfo | None) -> bool:
    return dist is not None and dist.distributed and torch_dist.is_initialized()


def barrier(dist: DistInfo | None) -> None:
    if _active(dist):
        torch_dist.barrier()


def reduce_sum(tensor: torch.Tensor, dist: DistInfo | None) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (a new tensor; the input is not modified)."""
    out = tensor.detach().clone()
    if _active(dist):
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out


def reduce_mean(tensor: torch.Tensor, dist: DistInfo | None) -> torch.Tensor:
    """Mean of ``tensor`` over all ranks."""
    out = reduce_sum(tensor, dist)
    return out / dist.world_size if _active(dist) else out


def all_gather_objects(obj: Any, dist: DistInfo | None) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not _active(dist):
        return [obj]
    gathered: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def print0(*args: Any, dist: DistInfo | None = None, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    if dist is None or dist.is_main:
        print(*args, **kwargs)


# --- random state -------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _local_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_local_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def capture_rng_state(dist: DistInfo | None = None) -> dict[str, Any]:
    """The state of every random generator, storable with ``torch.save`` and readable with
    ``weights_only=True``. With a distributed ``dist`` it is a collective call returning the
    states of all ranks (``{"ranks": [...]}``)."""
    return {"ranks": all_gather_objects(_local_rng_state(), dist)}


def restore_rng_state(state: Mapping[str, Any], dist: DistInfo | None = None) -> None:
    """Restore what :func:`capture_rng_state` captured; each rank takes its own entry.

    Raises ValueError when the state was captured with another number of processes.
    """
    ranks = state["ranks"]
    world = dist.world_size if dist is not None else 1
    rank = dist.rank if dist is not None else 0
    if len(ranks) != world:
        raise ValueError(
            f"the checkpoint's random state comes from {len(ranks)} process(es), this run has {world}; "
            "resume with the same number of processes for an exact continuation"
        )
    _set_local_rng_state(ranks[rank])


# --- checkpoints --------------------------------------------------------------------------------


def _torch_save(obj: Any) -> Any:
    return lambda tmp: torch.save(obj, tmp)


class CheckpointManager:
    """Keeps ``last.pth`` (every save) and ``best.pth`` (best metric so far) in ``directory``.

    Args:
        directory: where the files go (created on first save).
        enabled: False on non-zero ranks: ``save`` then only tracks the best metric.
        mode: ``"max"`` (accuracy) or ``"min"`` (loss) for what counts as better.
    """

    def __init__(self, directory: str | os.PathLike, enabled: bool = True, mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min'; got {mode!r}")
        self.directory = Path(directory)
        self.enabled = enabled
        self.mode = mode
        self.best: float | None = None
        self.best_epoch: int | None = None

    @property
    def last_path(self) -> Path:
        return self.directory / LAST

    @property
    def best_path(self) -> Path:
        return self.directory / BEST

    def is_better(self, metric: float) -> bool:
        if not math.isfinite(metric):
            return False
        if self.best is None:
            return True
        return metric > self.best if self.mode == "max" else metric < self.best

    def save(self, state: dict[str, Any], metric: float | None = None) -> bool:
        """Write ``state`` to ``last.pth`` (atomically), then copy it to ``best.pth`` if ``metric``
        improved.

        ``state["best_metric"]`` and ``state["best_epoch"]`` (``state["epoch"]`` of the best
        metric) are set before writing, so ``last.pth`` alone says which epoch ``best.pth``
        must hold. Returns whether this was a new best.
        """
        improved = metric is not None and self.is_better(float(metric))
        if improved:
            self.best = float(metric)
            self.best_epoch = state.get("epoch")
        state = {**state, "best_metric": self.best, "best_epoch": self.best_epoch}
        if self.enabled:
            atomic_write(self.last_path, _torch_save(state))
            if improved:
                atomic_write(self.best_path, lambda tmp: shutil.copyfile(self.last_path, tmp))
        return improved

    def latest(self) -> Path | None:
        """``last.pth`` if it exists."""
        return self.last_path if self.last_path.is_file() else None


def resolve_resume(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory whose ``last.pth`` is taken."""
    path = Path(path)
    if path.is_dir():
        if not (path / LAST).is_file():
            raise FileNotFoundError(f"nothing to resume in {path}: it holds no {LAST}")
        return path / LAST
    if not path.exists():
        raise FileNotFoundError(f"checkpoint to resume not found: {path}")
    return path


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training state written by :class:`CheckpointManager` (``weights_only=True``)."""
    state = read_checkpoint(path)
    if not isinstance(state, Mapping) or "epoch" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a training checkpoint of cyclemlp (it has no 'epoch'/'model' entries)")
    return dict(state)


# --- metrics ------------------------------------------------------------------------------------


class MetricsLogger:
    """Per-epoch metrics as ``metrics.csv`` + ``metrics.json`` (rewritten atomically after each row),
    optionally TensorBoard scalars (``tb/``), and a PNG of the curves at the end.

    An existing ``metrics.json`` in ``directory`` is read back (unless ``read_existing`` is False),
    so a resumed run continues its log (call :meth:`truncate` with the resumed epoch to drop rows
    written after that checkpoint); or set :attr:`rows` from the checkpoint and call :meth:`sync`.
    """

    def __init__(self, directory: str | os.PathLike, enabled: bool = True, tensorboard: bool = False,
                 read_existing: bool = True) -> None:
        self.directory = Path(directory)
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self._tb = None
        if enabled and read_existing and self.json_path.is_file():
            try:
                self.rows = json.loads(self.json_path.read_text())
            except json.JSONDecodeError:
                logger.warning("ignoring unreadable %s", self.json_path)
        if tensorboard:
            self.open_tensorboard()

    def open_tensorboard(self) -> None:
        """Also write every logged row as TensorBoard scalars, under ``directory/tb``."""
        if not self.enabled or self._tb is not None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError("TensorBoard logging needs the 'tensorboard' package (pip install tensorboard)") from err
        self._tb = SummaryWriter(str(self.directory / "tb"))

    @property
    def csv_path(self) -> Path:
        return self.directory / "metrics.csv"

    @property
    def json_path(self) -> Path:
        return self.directory / "metrics.json"

    def truncate(self, epoch: int) -> None:
        """Forget rows whose ``epoch`` is ``epoch`` or later."""
        self.rows = [r for r in self.rows if r.get("epoch", -1) < epoch]

    def log(self, row: Mapping[str, Any]) -> None:
        row = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
        self.rows.append(row)
        if not self.enabled:
            return
        self.sync()
        if self._tb is not None:
            step = int(row.get("epoch", len(self.rows) - 1))
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def sync(self) -> bool:
        """Write ``metrics.json`` and ``metrics.csv`` where they do not hold :attr:`rows`; True if
        either was written."""
        if not self.enabled:
            return False
        written = False
        for path, text in ((self.json_path, json.dumps(self.rows, indent=1)), (self.csv_path, self._csv())):
            if not (path.is_file() and path.read_text() == text):
                atomic_write(path, lambda tmp, text=text: Path(tmp).write_text(text))
                written = True
        return written

    def _csv(self) -> str:
        fields: list[str] = []
        for row in self.rows:
            fields += [k for k in row if k not in fields]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        return buffer.getvalue()

    def plot(self, path: str | os.PathLike | None = None, title: str = "") -> Path | None:
        """Loss curves (keys containing ``loss``) and accuracy curves (``top1``/``top5``/``acc``)
        against the epoch; written to ``path`` (default ``curves.png``). None where disabled."""
        if not self.enabled or not self.rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path) if path else self.directory / "curves.png"
        keys = [k for k in self.rows[-1] if isinstance(self.rows[-1][k], (int, float))]
        groups = [
            ("loss", [k for k in keys if "loss" in k]),
            ("accuracy (%)", [k for k in keys if any(s in k for s in ("top1", "top5", "acc"))]),
        ]
        groups = [(label, ks) for label, ks in groups if ks]
        fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5.5 * max(1, len(groups)), 4), squeeze=False)
        for ax, (label, ks) in zip(axes[0], groups):
            for key in ks:
                pts = [(r["epoch"] + 1, r[key]) for r in self.rows if isinstance(r.get(key), (int, float))]
                if pts:
                    ax.plot(*zip(*pts), marker="o", markersize=3, label=key)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend()
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)
        return path

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# --- safety and progress ------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def check_finite(
    loss: torch.Tensor | float, epoch: int, step: int, checkpoint: str | os.PathLike | None = None
) -> None:
    """Raise :class:`NonFiniteLossError` if ``loss`` is NaN/Inf, naming the last good checkpoint.

    Pass a loss already reduced over ranks (:func:`reduce_mean`) so every rank stops together.
    """
    value = float(loss)
    if math.isfinite(value):
        return
    where = (
        f"the last good checkpoint {checkpoint} is intact (resume from it with a lower learning rate "
        "or gradient clipping)"
        if checkpoint is not None and Path(checkpoint).is_file()
        else "no checkpoint had been written yet"
    )
    raise NonFiniteLossError(
        f"training loss is {value} at epoch {epoch}, step {step}; stopping before the weights are "
        f"updated with it; {where}"
    )


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "img", leave: bool = True) -> Any:
    """A tqdm bar counting ``unit``s (throughput as ``unit``/s and an ETA); silent if not ``enabled``.

    Update with the number of items done on all ranks (``batch * world_size``).
    """
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, leave=leave,
        disable=not enabled, file=sys.stderr, mininterval=1.0, smoothing=0.1,
    )

