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
