"""Argument parsing shared by several subcommands."""

from __future__ import annotations


def parse_weights(pairs: list[str]) -> dict[str, str]:
    """``["model=path", ...]`` -> ``{model: path}``."""
    weights = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--weights takes MODEL=FILE, got {pair!r}")
        weights[name] = path
    return weights


def parse_size(text: str) -> tuple[int, int]:
    """``"512"`` -> (512, 512); ``"512x1024"`` -> (512, 1024) (height x width)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values, default=0) < 1:
        raise ValueError(f"an input size is N or HxW with positive integers, got {text!r}")
    return values[0], values[-1]


def apply_threads(threads: int | None) -> None:
    """``--threads N``: the CPU threads torch uses from now on (None: leave torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
