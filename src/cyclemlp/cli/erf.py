"""``cyclemlp erf``: effective receptive fields of CycleMLP and its peers, side by side."""

from __future__ import annotations

import argparse

from ..analysis.settings import ERF_FRACTIONS, ERF_MODELS
from ._args import apply_threads, parse_size, parse_weights
from ._table import format_table


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "erf",
        help="effective receptive field of models, averaged over real photos",
        description=(
            "Gradient of the centre of the last-stage feature map with respect to the input, "
            "averaged over real photos, for each model; writes OUTPUT/erf.csv, erf.json, erf.png "
            "(side-by-side heat maps) and erf_maps.npz. Models without --weights keep their random "
            "initialisation, and the figure says so."
        ),
    )
    parser.add_argument("models", nargs="*", default=list(ERF_MODELS),
                        help=f"timm model names (default: {' '.join(ERF_MODELS)})")
    parser.add_argument("--source", default="foolbox",
                        help="'foolbox' (20 ImageNet photos), 'skimage' (5 photos) or a folder of images")
    parser.add_argument("--images", type=int, default=10, metavar="N", help="photos to average over (default 10)")
    parser.add_argument("--img-size", type=parse_size, default=(448, 448), metavar="N|HxW", help="input size")
    parser.add_argument("--weights", action="append", default=[], metavar="MODEL=FILE",
                        help="checkpoint for one model (repeatable; a run of `cyclemlp train` rebuilds the model it "
                             "records)")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(ERF_FRACTIONS),
                        help="shares of the total contribution whose areas are reported (default 0.2 0.5 0.99)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per backward pass (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--output", "-o", default="erf", metavar="DIR", help="output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis.erf import run_erf

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    apply_threads(args.threads)
    results = run_erf(
        args.models, args.source, args.images, args.img_size, parse_weights(args.weights),
        args.fractions, args.batch_size, args.output,
    )
    rows = [r.row() for r in results]
    area_columns = [k for k in rows[0] if k.endswith("_pct")]
    print(format_table(
        [[r["model"], r["weights"], r["feature_map"]] + [r[k] for k in area_columns] for r in rows],
        ["model", "weights", "last stage"] + [f"area {k[4:-4]}% (% of image)" for k in area_columns],
    ))
    print(f"wrote {args.output}/erf.csv, erf.json, erf.png, erf_maps.npz")
    return 0
