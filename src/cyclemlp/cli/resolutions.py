"""``cyclemlp resolutions``: GMACs, latency and peak memory of models from small to large inputs."""

from __future__ import annotations

import argparse

from ..analysis.settings import RESOLUTION_MODELS, RESOLUTION_SIZES
from ._args import parse_size
from ._table import format_table


def add_parser(sub: argparse._SubParsersAction) -> None:
    default_sizes = [f"{h}x{w}" for h, w in RESOLUTION_SIZES]
    parser = sub.add_parser(
        "resolutions",
        help="GMACs, latency and peak memory of models across input sizes",
        description=(
            "Run every model at every input size (random weights: cost does not depend on them) and "
            "record GMACs (authors' convention, per image), median latency and peak memory, or the "
            "model's own error where it cannot take that size. Writes OUTPUT/resolutions.csv, "
            "resolutions.json and resolutions.png (log-log against the number of pixels)."
        ),
    )
    parser.add_argument("models", nargs="*", default=list(RESOLUTION_MODELS),
                        help=f"timm model names (default: {' '.join(RESOLUTION_MODELS)})")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=list(RESOLUTION_SIZES), metavar="N|HxW",
                        help=f"input sizes (default: {' '.join(default_sizes)})")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per size, median reported (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's); 1 gives steadier latencies on a busy machine")
    parser.add_argument("--output", "-o", default="resolutions", metavar="DIR", help="output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis.resolutions import run_resolutions

    results = run_resolutions(args.models, args.sizes, args.batch_size, args.repeats, args.device,
                              args.threads, args.output)
    print(format_table(
        [[r.model, f"{r.height}x{r.width}", r.params_m,
          *(("-" if v is None else v) for v in (r.gmacs, r.latency_ms, r.cpu_ms, r.peak_mem_mb)),
          r.error or "ok"] for r in results],
        ["model", "input", "params (M)", "GMACs", "latency (ms)", "CPU (ms)", "peak mem (MiB)", "status"],
    ))
    print(f"wrote {args.output}/resolutions.csv, resolutions.json, resolutions.png")
    return 0
