"""Shared pieces of the kernel micro-benchmarks (``mix_backward``, ``shift_kernels``)."""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    """``--threads`` and ``--repeats``; the description is the first paragraph of ``doc``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser
