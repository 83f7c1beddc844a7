"""``cyclemlp predict IMAGE...``: the top-k classes of images, with names."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ._args import positive_int
from .eval import add_input_args, add_int8_arg, add_weights_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "predict",
        help="top-k classes of image files",
        description="Classify images with a checkpoint; classes are named from the checkpoint (ImageNet "
                    "names for 1000-class weights). An input that is missing or unreadable is reported and the "
                    "others are still predicted; the exit code is then 2.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    add_weights_args(parser)
    add_input_args(parser)
    parser.add_argument("--topk", type=positive_int, default=5, metavar="K", help="classes to show per image")
    add_int8_arg(parser)
    parser.add_argument("--json", metavar="PATH", help="also write the predictions (and the failures) as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io import atomic_write
    from ..training.evaluate import predict

    predictions = predict(
        args.images, args.checkpoint, model=args.model, model_kwargs=args.model_kwargs, pretrained=args.pretrained,
        topk=args.topk, img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation,
        device=args.device, use_ema=args.use_ema, int8=args.int8,
    )
    failed = [p for p in predictions if p.error]
    for pred in predictions:
        if pred.error:
            print(f"cyclemlp predict: error: {pred.path}: {pred.error}", file=sys.stderr)
            continue
        print(pred.path)
        for rank, (index, name, prob) in enumerate(pred.classes, 1):
            print(f"  {rank}. {name} ({index})  {100 * prob:.1f}%")
    if args.json:
        rows = [dataclasses.asdict(p) for p in predictions]
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)))
    if failed:
        print(f"cyclemlp predict: {len(failed)} of {len(predictions)} input(s) could not be predicted",
              file=sys.stderr)
        return 2
    return 0
