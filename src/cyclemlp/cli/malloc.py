"""Process-wide settings the project's commands apply at start-up.

glibc's allocator serves every block over its mmap threshold (which it raises to at most 32 MB)
straight from the operating system and unmaps it when freed, and it trims the top of the heap back
to the system whenever more than the trim threshold lies free there. A training or inference step
of a vision model allocates and frees activations of tens to hundreds of MB, so each step
page-faults and zeroes them anew. :func:`keep_freed_memory` turns both off: freed memory stays in
the process and the next step reuses it. The cost is that the process holds on to its peak memory
until it exits, as PyTorch's CUDA caching allocator does on the GPU.

The ``cyclemlp`` commands apply it unless ``--malloc default`` is given or the environment sets
``CYCLEMLP_MALLOC=default``; importing the package never does. The scripts in ``benchmarks/`` (and
``cyclemlp bench``) run under glibc's defaults unless told ``keep``: a process that hosts many models
in turn keeps the memory of all of them, which skews the comparison. ``python -m
benchmarks.allocator`` measures what the setting changes, one model per process.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt(3) parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536  # glibc's DEFAULT_MMAP_MAX

MALLOC_CHOICES = ("keep", "default")
ENV_VAR = "CYCLEMLP_MALLOC"

_applied = False


def malloc_choice(flag: str | None = None, fallback: str = "keep") -> str:
    """The allocator setting wanted: ``flag`` when given, else ``$CYCLEMLP_MALLOC``, else ``fallback``."""
    choice = flag if flag is not None else os.environ.get(ENV_VAR, fallback)
    if choice not in MALLOC_CHOICES:
        source = "--malloc" if flag is not None else ENV_VAR
        raise ValueError(f"{source} must be one of {', '.join(MALLOC_CHOICES)}; got {choice!r}")
    return choice


def keep_freed_memory() -> bool:
    """Keep memory freed by this process for its own reuse (glibc only).

    Sets ``M_MMAP_MAX`` to 0 (no block comes from its own mapping) and ``M_TRIM_THRESHOLD`` to its
    largest value (glibc takes the argument as ``size_t``, so -1 means never). Returns whether the
    settings are in force; on other C libraries nothing changes and it returns False. Blocks
    already mapped before the call are still unmapped when freed.
    """
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.debug("allocator settings left alone: not glibc")
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.debug("allocator settings left alone: mallopt not found")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_MAX, 0) != 1:
        log.debug("allocator settings left alone: mallopt refused M_MMAP_MAX")
        return False
    if mallopt(_M_TRIM_THRESHOLD, -1) != 1:
        mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)  # all or nothing
        log.debug("allocator settings left alone: mallopt refused M_TRIM_THRESHOLD")
        return False
    _applied = True
    return True


def apply_malloc_choice(flag: str | None = None, fallback: str = "keep") -> bool:
    """Apply the setting :func:`malloc_choice` names; returns whether freed memory is now kept."""
    return malloc_choice(flag, fallback) == "keep" and keep_freed_memory()


def malloc_in_force() -> str:
    """``keep`` once :func:`keep_freed_memory` succeeded in this process, else ``default``."""
    return "keep" if _applied else "default"


def add_malloc_argument(parser: argparse.ArgumentParser, fallback: str = "keep") -> None:
    """Add ``--malloc {keep,default}`` (default None: :func:`malloc_choice` decides, with ``fallback``)."""
    parser.add_argument(
        "--malloc", choices=MALLOC_CHOICES, default=None,
        help="keep: freed memory stays in the process for reuse (faster steps, a higher peak that is "
        f"held until exit; glibc only); default: the C library's own behaviour. Default: ${ENV_VAR}, "
        f"else {fallback}",
    )
