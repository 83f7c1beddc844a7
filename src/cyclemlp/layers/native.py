"""The native CPU kernels: Cycle FC's shift, and one CycleMLP block in inference on one image;
small C++ sources compiled on first use.

Cycle FC's shift moves every channel by its own offset. No PyTorch operator does that in one pass:
the readable form (a gather, :func:`~cyclemlp.layers.cycle_fc.cycle_shift`) reads an index per
element. ``csrc/shift.cpp`` does it at copy speed: each output pixel reads the few source pixels
its channels' offsets point at and keeps the right one per channel, vectorised, in parallel over
rows with ATen's thread pool. It moves bits, so it equals the copy definition exactly for every
dtype.

``csrc/block.cpp`` (``torch.ops.cyclemlp.block_inference``) runs a whole block in CPU float32
inference on one image with the same ATen and oneDNN calls as the Python inference path of
:mod:`cyclemlp.layers.kernels`, so that one image pays one operator call per block instead of
some fifty; see :func:`cyclemlp.layers.kernels.cycle_block`.

The kernels are built with ``torch.utils.cpp_extension`` (a C++ compiler and ninja; ``ninja`` comes
with the package's dependencies) into PyTorch's extension cache the first time a process needs it,
about 20 s once per source version, then loaded from the cache in well under a second. ``bash
setup.sh`` builds it ahead. It is registered as the operator ``torch.ops.cyclemlp.shift`` with
its autograd formula (the adjoint of a shift is the shift by the negated offsets) and a fake
implementation for shape propagation. Where it cannot be built, Cycle FC shifts with
:func:`~cyclemlp.layers.cycle_fc.cycle_shift` instead, and one warning per process names the
reason. ``CYCLEMLP_NATIVE=0`` turns the native kernel off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["ENV_VAR", "available", "build_error", "shift"]

ENV_VAR = "CYCLEMLP_NATIVE"
SOURCES = tuple(Path(__file__).with_name("csrc") / name for name in ("shift.cpp", "block.cpp"))
# One build per torch version (an extension compiled against another libtorch may not load) and
# per source file: PyTorch's extension cache keys builds by name, and a build whose source path
# changed is compiled again, so two checkouts sharing one name would rebuild each other's.
_EXTENSION = "_".join([
    "cyclemlp_native_torch" + re.sub(r"\W", "_", torch.__version__),
    hashlib.sha1("\n".join(str(source.resolve()) for source in SOURCES).encode()).hexdigest()[:8],
])

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "ok": False, "error": None}


def enabled() -> bool:
    """False when ``$CYCLEMLP_NATIVE`` says off (0, false, no, off)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def _op_registered() -> bool:
    try:
        torch.ops.cyclemlp.shift  # noqa: B018
        torch.ops.cyclemlp.block_inference  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def _build() -> None:
    # a CUDA build of torch looks for CUDA on import of cpp_extension and logs that it found none:
    # not news for a CPU kernel
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(name=_EXTENSION, sources=[str(source) for source in SOURCES],
                           extra_cflags=["-O3", "-fopenmp"], is_python_module=False, verbose=False)
    finally:
        cpp_log.setLevel(level)

    torch.library.register_fake("cyclemlp::shift", _shift_fake)
    torch.library.register_autograd("cyclemlp::shift", _shift_backward, setup_context=_shift_setup)


def _shift_fake(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)


def _shift_setup(ctx, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
    ctx.offsets = inputs[1]


def _shift_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    return torch.ops.cyclemlp.shift(grad, -ctx.offsets), None


def available() -> bool:
    """Whether the native operators (``torch.ops.cyclemlp.shift``, ``.block_inference``) are ready,
    building or loading them on the first call. Never raises: a failed build warns once and
    returns False (the gather and the Python block path take over)."""
    if _state["tried"]:
        return bool(_state["ok"])
    with _lock:
        if not _state["tried"]:
            if not enabled():
                _state["error"] = f"turned off by {ENV_VAR}={os.environ.get(ENV_VAR)}"
            elif _op_registered():
                _state["ok"] = True
            else:
                try:
                    _build()
                    _state["ok"] = True
                except Exception as err:  # no compiler, no ninja, read-only cache, ...: fall back
                    message = str(err).strip()
                    _state["error"] = f"{type(err).__name__}: {message.splitlines()[-1] if message else ''}"
                    warnings.warn(
                        f"cyclemlp: the native kernels could not be built ({_state['error']}); Cycle FC falls "
                        f"back to a slower gather, and one image runs each block through Python. They need a "
                        f"C++ compiler and ninja (pip install ninja); set {ENV_VAR}=0 to silence this.",
                        RuntimeWarning, stacklevel=2)
            _state["tried"] = True
    return bool(_state["ok"])


def build_error() -> str | None:
    """Why the native kernel is not in use (after :func:`available` was asked), or None."""
    return None if _state["ok"] else (str(_state["error"]) if _state["error"] else None)


def shift(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out[b, y, x, c] = x[b, y + offsets[c, 0], x + offsets[c, 1], c]``, zeros outside; ``x`` is
    (B, H, W, C) on the CPU, ``offsets`` (C, 2) integers. Differentiable."""
    if not available():
        raise RuntimeError(f"the native shift kernel is not available: {build_error()}")
    return torch.ops.cyclemlp.shift(x, offsets)


def main() -> int:
    """Build (or load) the kernel now and say whether it works (``bash setup.sh`` runs this)."""
    if available():
        x = torch.arange(2 * 3 * 4 * 3, dtype=torch.float32).reshape(2, 3, 4, 3)
        got = shift(x, torch.tensor([[0, -1], [0, 0], [1, 1]], dtype=torch.int32))
        want = torch.zeros_like(x)
        want[:, :, 1:, 0] = x[:, :, :-1, 0]
        want[..., 1] = x[..., 1]
        want[:, :-1, :-1, 2] = x[:, 1:, 1:, 2]
        if not torch.equal(got, want):
            print("cyclemlp native kernels: built, but the shift gives wrong results; set CYCLEMLP_NATIVE=0")
            return 1
        print("cyclemlp native kernels (shift, one-image block): ready")
        return 0
    print(f"cyclemlp native kernels: not available ({build_error()}); Cycle FC shifts with a gather")
    return 0 if not enabled() else 1
