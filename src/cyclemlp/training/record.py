"""A training run's folder, and the record that makes it one run.

A run folder holds::

    config.json          the record: the resolved configuration (every value that affects the
                         result, recipe values included), the model's name and full constructor
                         arguments, the classes, the input size and preprocessing, the process
                         count, the package versions and any extension of the schedule
    last.pth             the latest training state (weights, optimizer, schedule, random
                         generators, metrics history, best metric, and the record)
    best.pth             the training state of the best evaluated epoch
    metrics.csv / .json  one row per epoch
    curves.png           loss and accuracy curves (at the end)
    model.safetensors    the final weights, with the record's model, classes and preprocessing in
                         the metadata (at the end; its presence marks a finished run)

``last.pth`` is the source of truth: each epoch it is written first (atomically), and everything
else is brought into agreement with it — after the epoch, and again when a killed run is resumed
(:func:`repair`), so that after a resume no file disagrees with another and none is left
half-written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..io import CheckpointError, atomic_write

__all__ = [
    "BEST", "LAST", "RECORD", "WEIGHTS", "RunFolder", "check_new_run_folder", "lock", "open_run_folder",
    "remove_temporaries", "write_json",
]

RECORD = "config.json"
LAST = "last.pth"
BEST = "best.pth"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "model_ema.safetensors"
CURVES = "curves.png"

# what :func:`cyclemlp.io.atomic_write` names its temporary files: ``.<name>.<random>.tmp``
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")


@dataclass
class RunFolder:
    """A run folder opened to resume it."""

    path: Path
    state: dict[str, Any] | None  # last.pth, None before the first epoch ended
    record: dict[str, Any]  # last.pth's record, else config.json's

    @property
    def config(self) -> dict[str, Any]:
        return self.record["config"]

    @property
    def epochs_done(self) -> int:
        return 0 if self.state is None else int(self.state["epoch"]) + 1


def run_folder_of(path: str | os.PathLike) -> Path:
    """The run folder named by ``path``: the folder itself, or the folder of its ``last.pth``."""
    path = Path(path)
    if path.is_dir():
        return path
    if not path.exists():
        raise FileNotFoundError(f"run to resume not found: {path}")
    if path.name != LAST:
        raise ValueError(f"--resume takes a run folder (or its {LAST}); got {path} (to start from a file's weights, "
                         "pass --initial-checkpoint)")
    return path.parent


def open_run_folder(path: str | os.PathLike) -> RunFolder:
    """Read what a run folder holds to resume it (its ``last.pth``, else its record)."""
    from .engine import load_training_state

    folder = run_folder_of(path)
    state = None
    if (folder / LAST).is_file():
        state = load_training_state(folder / LAST)
        if not isinstance(state.get("record"), Mapping):
            raise CheckpointError(f"{folder / LAST} holds no run record: it was not written by `cyclemlp train`")
        record = dict(state["record"])
    elif (folder / RECORD).is_file():
        record = read_json(folder / RECORD)
        if not isinstance(record.get("config"), Mapping):
            raise CheckpointError(f"{folder / RECORD} is not a run record")
    else:
        raise FileNotFoundError(
            f"nothing to resume in {folder}: it holds no run record ({RECORD}) and no {LAST}; the run never "
            "started, start it anew"
        )
    return RunFolder(folder, state, record)


def check_new_run_folder(path: Path) -> None:
    """Refuse to start a new run in a folder that holds one."""
    if (path / LAST).exists() or (path / RECORD).exists():
        raise ValueError(
            f"{path} already holds a training run; pass --resume {path} to continue it, or another --output"
        )


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def write_json(path: Path, value: Any) -> bool:
    """Write ``value`` as JSON unless the file already holds exactly that; True if written."""
    text = json.dumps(value, indent=1) + "\n"
    if path.is_file() and path.read_text() == text:
        return False
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return True


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files an interrupted atomic write left in ``folder``."""
    removed = []
    for item in folder.iterdir() if folder.is_dir() else ():
        if item.is_file() and _TEMPORARY.match(item.name):
            item.unlink()
            removed.append(item)
    return removed


# Descriptors of the run folders this process holds locked. A forked child (a DataLoader worker)
# closes its copies at once: a lock shared with a child would outlive a killed trainer for as long
# as its workers take to notice, and refuse the resume meanwhile.
_LOCKED: set[int] = set()


def _close_locks_in_child() -> None:
    for fd in _LOCKED:
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCKED.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_locks_in_child)


@contextlib.contextmanager
def lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on a run folder: a second process training the same folder stops
    with a clear error instead of interleaving its files. (No lock file is created; the lock goes
    with the process, not with its forked children.)"""
    try:
        import fcntl
    except ImportError:  # not on Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ValueError(f"{folder} is being trained by another process; wait for it to end") from err
            raise
        _LOCKED.add(fd)
        yield
    finally:
        _LOCKED.discard(fd)
        os.close(fd)


def same_best(folder: Path, state: Mapping[str, Any]) -> bool:
    """Whether ``best.pth`` holds the state of the run's best epoch (or no epoch was best yet)."""
    from .engine import load_training_state

    best_epoch = state.get("best_epoch")
    path = folder / BEST
    if best_epoch is None:
        return not path.exists()
    if not path.is_file():
        return False
    try:
        return int(load_training_state(path)["epoch"]) == int(best_epoch)
    except CheckpointError:
        return False


def repair_best(folder: Path, state: Mapping[str, Any]) -> bool:
    """Make ``best.pth`` the best epoch's state where a kill left it behind ``last.pth``; True if
    it was rewritten."""
    if same_best(folder, state):
        return False
    if state.get("best_epoch") != state["epoch"]:
        raise CheckpointError(
            f"{folder / BEST} does not hold the best epoch ({state.get('best_epoch')}) and {LAST} (epoch "
            f"{state['epoch']}) cannot replace it"
        )
    atomic_write(folder / BEST, lambda tmp: shutil.copyfile(folder / LAST, tmp))
    return True
