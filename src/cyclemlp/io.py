"""Files: writing them atomically and reading checkpoints without executing code from them.

Everything the project writes for a user (checkpoints, logs, results, exports) goes through
:func:`atomic_write`, so a file is either its old version or its new one, never half-written.
Checkpoints are read with ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    import torch

__all__ = [
    "CheckpointError", "CheckpointMismatchError", "atomic_write", "checkpoint_file", "read_checkpoint", "save_weights",
]


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the model."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's keys or shapes do not match the model's."""


# --- writing ------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``, so ``path`` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_weights(
    model: "torch.nn.Module | Mapping[str, torch.Tensor]",
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a model's (or a state dict's) weights as safetensors, atomically.

    ``metadata`` values are stored as JSON strings in the safetensors header.
    """
    from safetensors.torch import save_file

    state = model.state_dict() if hasattr(model, "state_dict") else dict(model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {"format": "cyclemlp"}
    for key, value in (metadata or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


# --- reading ------------------------------------------------------------------------------------

# Run folders of the project's commands keep these checkpoints; a folder given where a checkpoint
# is expected stands for the first that exists.
RUN_CHECKPOINTS = ("best.pth", "last.pth")


def checkpoint_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or for a run folder its ``best.pth`` (else ``last.pth``)."""
    path = Path(path)
    if path.is_dir():
        for name in RUN_CHECKPOINTS:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} is a folder without {' or '.join(RUN_CHECKPOINTS)}; give a checkpoint file")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Read a checkpoint file (or a run folder's, see :func:`checkpoint_file`) without executing
    code from it; clear errors for bad files."""
    path = checkpoint_file(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    with open(path, "rb") as handle:
        head = handle.read(9)
    is_torch = head[:2] == b"PK" or head[:1] == b"\x80"
    is_safetensors = len(head) == 9 and head[8:9] == b"{"
    if is_safetensors and not is_torch:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(
                f"cannot read checkpoint {path}: the safetensors file is truncated or corrupt ({err})"
            ) from err
    if not is_torch:
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is neither a PyTorch (.pth) nor a safetensors file "
            f"(first bytes {head[:8]!r})"
        )
    import torch

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged archives
        text = str(err).split("\n")[0]
        if "Weights only load failed" in str(err) or "Unsupported global" in str(err):
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"refusing to load {path}: it contains pickled Python objects{what} besides tensors; "
                "checkpoints are loaded with weights_only=True and never execute code from the file"
            ) from err
        raise CheckpointError(
            f"cannot read checkpoint {path} ({size} bytes): the file is truncated or corrupt "
            f"({type(err).__name__}: {text})"
        ) from err
