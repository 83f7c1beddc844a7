"""glibc's malloc thresholds for one image at a time.

At batch 1 a CycleMLP block's activations take a few MB of heap for a moment (the first stage's
3136 x 256 hidden layer and the copies around it at 224 px). glibc's malloc adapts two thresholds
as a process runs: blocks larger than the *mmap threshold* are mapped on their own, and free memory
at the top of the heap beyond the *trim threshold* (twice the other) goes back to the system. In a
process that runs one CycleMLP and nothing larger, both settle just below a block's transient
memory: every image then gives a few MB back to the system and takes them again, page by page
(thousands of page faults per forward; ``python -m benchmarks.latency`` measures it in "One model
alone in a process").

:func:`keep_freed_memory` sets the two thresholds to the top of glibc's own adaptive range: blocks
up to 32 MiB come from the heap, and the heap's top is returned past 64 MiB free. A process keeps
at most that much freed memory for reuse. The package calls it once, the first time a block runs
one float32 image on the CPU, unless ``CYCLEMLP_KEEP_HEAP=0`` or the process was started with
glibc's malloc tunables set (``MALLOC_*_`` or ``glibc.malloc.*`` in ``GLIBC_TUNABLES``: the user's
choice stands). It holds for the whole process.
Elsewhere than glibc (musl, macOS, Windows, a preloaded jemalloc or tcmalloc taking ``malloc``) it
does nothing useful and nothing harmful.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["ENV_VAR", "applied", "enabled", "keep_freed_memory", "keep_freed_memory_once"]

ENV_VAR = "CYCLEMLP_KEEP_HEAP"

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest mmap threshold glibc's adaptation reaches on 64-bit systems
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # the trim threshold glibc pairs with it
_USER_TUNABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_state = {"done": False, "applied": False}


def enabled() -> bool:
    """False when ``$CYCLEMLP_KEEP_HEAP`` says off (0, false, no, off) or glibc's malloc thresholds are
    tuned in the environment."""
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return not (any(name in os.environ for name in _USER_TUNABLES)
                or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""))


def keep_freed_memory() -> bool:
    """Set glibc's mmap threshold to 32 MiB and its trim threshold to 64 MiB for this process;
    True if glibc took both."""
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):  # no such confstr name (not glibc), no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def keep_freed_memory_once() -> None:
    """:func:`keep_freed_memory` the first time it is called in a process, if :func:`enabled`."""
    if not _state["done"]:
        _state["done"] = True
        _state["applied"] = enabled() and keep_freed_memory()


def applied() -> bool:
    """Whether the package has set the thresholds in this process."""
    return bool(_state["applied"])
