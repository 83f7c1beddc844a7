"""Peak memory of one call, measured honestly on CPU and GPU.

GPU: ``torch.cuda.max_memory_allocated`` above what was allocated before the call. CPU: Python's
``tracemalloc`` does not see PyTorch's allocations, so the process's peak resident set size is
used instead: free heap pages are returned to the system (glibc ``malloc_trim``), the kernel's
high-water mark is reset (``/proc/self/clear_refs``, Linux >= 4.0), and the peak (``VmHWM``) after
the call minus the resident size before it is the memory the call needed at its worst moment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path
from typing import Callable

import torch

__all__ = ["cpu_peak_supported", "peak_memory"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in {_STATUS}")


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim
        pass


def cpu_peak_supported() -> bool:
    """Whether this system lets a process reset and read its peak resident set size."""
    try:
        _CLEAR_REFS.write_text("5")
        _status_bytes("VmHWM")
    except OSError:
        return False
    return True


def peak_memory(call: Callable[[], object], device: torch.device | str = "cpu") -> int | None:
    """Bytes of memory ``call()`` needed at its peak, beyond what was in use before; None where the
    system offers no way to measure it (CPU outside Linux). The call's result is discarded."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu" or not cpu_peak_supported():
        return None
    gc.collect()
    _malloc_trim()
    _CLEAR_REFS.write_text("5")
    before = _status_bytes("VmRSS")
    call()
    return max(0, _status_bytes("VmHWM") - before)
