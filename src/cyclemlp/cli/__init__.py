"""The ``cyclemlp`` command: a thin layer over functions that can be called from Python.

Each subcommand lives in its own module of this package and exposes ``add_parser(subparsers)``,
which registers its arguments and sets ``func`` to a callable taking the parsed namespace.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from ..io import CheckpointError
from .malloc import add_malloc_argument, apply_malloc_choice

# Subcommand modules, in the order ``cyclemlp --help`` lists them.
COMMANDS: tuple[str, ...] = (
    "train", "eval", "predict", "detect", "segment", "flops", "export",
    "erf", "resolutions", "robustness", "ablate",
)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="cyclemlp",
        description="CycleMLP (Chen et al., ICLR 2022): models, training, dense prediction and analyses.",
    )
    parser.add_argument("--version", action="version", version=f"cyclemlp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    add_malloc_argument(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "passthrough", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.options = [*getattr(args, "options", []), *extra]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    try:
        apply_malloc_choice(args.malloc)
        return int(args.func(args) or 0)
    except (CheckpointError, FileNotFoundError, ValueError, OSError) as err:
        print(f"cyclemlp {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cyclemlp {args.command}: interrupted", file=sys.stderr)
        return 130
