"""``cyclemlp bench``: the speed benchmark of ``benchmarks/run.py`` (needs a source checkout)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="speed benchmark: Cycle FC, models vs peers, GEMM efficiency, memory, compile, ONNX",
        description="Runs benchmarks/run.py of the source checkout; options after 'bench' go to it "
        "(see 'cyclemlp bench -- --help').",
        add_help=False,
    )
    # every option is passed on to benchmarks/run.py
    parser.set_defaults(func=run, passthrough=True, options=[])


def benchmarks_root() -> Path:
    root = Path(__file__).resolve().parents[3]
    if not (root / "benchmarks" / "run.py").is_file():
        raise FileNotFoundError(
            f"cyclemlp bench runs benchmarks/run.py from a source checkout; none found at {root}. "
            "Clone the repository and install it with 'pip install -e .'"
        )
    return root


def run(args: argparse.Namespace) -> int:
    root = benchmarks_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.run import main

    options = [o for o in args.options if o != "--"]
    if args.malloc is not None:  # ``cyclemlp --malloc X bench``; an option after 'bench' still wins
        options = ["--malloc", args.malloc, *options]
    return main(options)
