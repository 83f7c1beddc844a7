"""``cyclemlp robustness``: ImageNet-C-style corruption errors and mCE of trained classifiers."""

from __future__ import annotations

import argparse
import logging

from ..analysis.settings import CORRUPTIONS, SEVERITIES
from ._args import apply_threads
from ._table import format_table

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "robustness",
        help="top-1 error under 15 corruptions x 5 severities, and mCE against a baseline model",
        description=(
            "Evaluate trained classifiers on an evaluation set corrupted with the 15 ImageNet-C corruptions "
            "of the imagecorruptions package at 5 severities (applied after each model's resize and crop), "
            "and normalise the corruption errors by a baseline model (mCE, as in the paper). Writes "
            "OUTPUT/robustness.csv, robustness_errors.csv, robustness.json and robustness.png."
        ),
    )
    parser.add_argument("checkpoints", nargs="+", metavar="[LABEL=]CHECKPOINT",
                        help="trained checkpoints (project files record their model; others need --model)")
    parser.add_argument("--model", help="timm model name for checkpoints that do not record theirs")
    parser.add_argument("--baseline", metavar="LABEL",
                        help="the model that normalises the mCE (a label of the checkpoints, or of --baseline-results)")
    parser.add_argument("--baseline-results", metavar="JSON",
                        help="robustness.json of an earlier run holding the baseline")
    parser.add_argument("--dataset", default="fashion-mnist", help="built-in dataset (default fashion-mnist)")
    parser.add_argument("--data", metavar="DIR", help="ImageNet-layout folder instead of a built-in dataset")
    parser.add_argument("--split", help="evaluation split (default: test for built-ins, val for folders)")
    parser.add_argument("--subset", type=int, default=500,
                        help="evaluation images, evenly spread over the split; 0 = all (default 500)")
    parser.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS), choices=CORRUPTIONS, metavar="NAME",
                        help="corruptions (default: the 15 of ImageNet-C)")
    parser.add_argument("--severities", type=int, nargs="+", default=list(SEVERITIES), choices=SEVERITIES,
                        help="severities (default 1 2 3 4 5)")
    parser.add_argument("--batch-size", type=int, default=128, help="evaluation batch size (default 128)")
    parser.add_argument("--workers", type=int, default=2, help="processes corrupting images (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random corruptions (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the models (default: torch's)")
    parser.add_argument("--output", "-o", default="robustness", metavar="DIR", help="output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis.robustness import load_eval_model, run_robustness

    if args.baseline_results is None and args.baseline is None and len(args.checkpoints) > 1:
        logger.info("no --baseline: reporting errors without mCE")
    apply_threads(args.threads)
    if args.subset < 0 or args.batch_size < 1 or args.workers < 0:
        raise ValueError("--subset must be >= 0, --batch-size >= 1 and --workers >= 0")
    models = []
    for item in args.checkpoints:
        label, sep, path = item.rpartition("=")
        models.append(load_eval_model(path, label if sep else None, args.model))
    summaries = run_robustness(
        models, args.baseline, args.baseline_results, args.output,
        dataset=None if args.data else args.dataset, data=args.data, split=args.split, subset=args.subset or None,
        corruptions=args.corruptions, severities=args.severities, batch_size=args.batch_size, workers=args.workers,
        seed=args.seed, log=logger.info,
    )
    rows = []
    for label, s in summaries.items():
        rows.append([label, 100 * s["clean_error"], 100 * s["mean_corruption_error"],
                     "-" if "mCE" not in s else 100 * s["mCE"], "-" if "mCE" not in s else 100 * s["relative_mCE"]])
    print(format_table(rows, ["model", "clean error (%)", "mean corruption error (%)", "mCE (%)", "relative mCE (%)"]))
    print(f"wrote {args.output}/robustness.csv, robustness_errors.csv, robustness.json, robustness.png")
    return 0
