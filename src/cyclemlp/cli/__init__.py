"""The ``cyclemlp`` command: a thin layer over functions that can be called from Python.

Each subcommand lives in its own module of this package and exposes ``add_parser(subparsers)``,
which registers its arguments and sets ``func`` to a callable taking the parsed namespace. The
modules import nothing heavy at the top, so ``--help`` answers without loading PyTorch; the
work is imported when it runs.

A user's mistake (a bad value, a missing or unreadable file, a checkpoint that does not fit) is
one line ``cyclemlp COMMAND: error: ...`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Sequence

from ..io import CheckpointError
from ._args import HelpFormatter, Parser
from .malloc import add_malloc_argument, apply_malloc_choice

# Subcommand modules, in the order ``cyclemlp --help`` lists them.
COMMANDS: tuple[str, ...] = (
    "train", "eval", "predict", "detect", "segment", "flops", "export",
    "erf", "resolutions", "robustness", "ablate",
)


def build_parser() -> Parser:
    from .. import __version__

    parser = Parser(
        prog="cyclemlp", formatter_class=HelpFormatter,
        description="CycleMLP (Chen et al., ICLR 2022): models, training, dense prediction and analyses.",
    )
    parser.add_argument("--version", action="version", version=f"cyclemlp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    add_malloc_argument(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    command = " ".join(filter(None, (args.command, getattr(args, "action", None))))
    try:
        apply_malloc_choice(args.malloc)
        return int(args.func(args) or 0)
    except (CheckpointError, FileNotFoundError, ValueError, OSError) as err:
        print(f"cyclemlp {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cyclemlp {command}: interrupted", file=sys.stderr)
        return 130
