"""``cyclemlp predict IMAGE...``: the top-k classes of images, with names."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..io import atomic_write
from ..training.evaluate import predict
from .eval import add_weights_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "predict",
        help="top-k classes of image files",
        description="Classify images with a checkpoint; classes are named from the checkpoint (ImageNet "
                    "names for 1000-class weights).",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    add_weights_args(parser)
    parser.add_argument("--topk", type=int, default=5, metavar="K", help="classes to show per image (default 5)")
    parser.add_argument("--json", metavar="PATH", help="also write the predictions as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    predictions = predict(
        args.images, args.checkpoint, model=args.model, model_kwargs=args.model_kwargs, pretrained=args.pretrained,
        topk=args.topk, img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation,
        device=args.device, use_ema=args.use_ema,
    )
    for pred in predictions:
        print(pred.path)
        for rank, (index, name, prob) in enumerate(pred.classes, 1):
            print(f"  {rank}. {name} ({index})  {100 * prob:.1f}%")
    if args.json:
        rows = [dataclasses.asdict(p) for p in predictions]
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)))
    return 0
