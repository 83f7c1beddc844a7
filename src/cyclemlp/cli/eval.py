"""``cyclemlp eval``: top-1/top-5, loss and img/s of a checkpoint on a dataset."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ._args import KwargsAction, parse_size, positive_int


def add_weights_args(parser: argparse.ArgumentParser) -> None:
    """Flags naming the weights and the model (shared by eval, predict and export)."""
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="weights: a run folder (its best.pth, else last.pth), a run's .pth or model.safetensors "
                             "(they record their model), the authors' .pth or a timm state dict (with --model)")
    parser.add_argument("--model", help="timm model name, for files that do not record theirs")
    parser.add_argument("--model-kwargs", nargs="*", action=KwargsAction, default={}, metavar="KEY=VALUE",
                        help="model constructor arguments, for files that do not record theirs, e.g. "
                             "\"dims=(48,96,192,384)\" stepsize=7")
    parser.add_argument("--pretrained", action="store_true", help="use timm's pretrained weights (needs internet)")
    parser.add_argument("--use-ema", action="store_true", help="use the EMA weights of a training checkpoint")


def add_input_args(parser: argparse.ArgumentParser) -> None:
    """Preprocessing flags (shared by eval and predict): the checkpoint's unless given."""
    parser.add_argument("--img-size", type=parse_size, metavar="N|HxW", help="input size (default: the checkpoint's)")
    parser.add_argument("--crop-pct", type=float, metavar="F", help="centre-crop fraction (default: the checkpoint's)")
    parser.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest"),
                        help="resize interpolation (default: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")


def add_int8_arg(parser: argparse.ArgumentParser) -> None:
    """``--int8`` (shared by eval and predict)."""
    parser.add_argument("--int8", action="store_true",
                        help="post-training dynamic int8 quantization for CPU inference: the blocks of 128 channels "
                             "or more multiply in int8 (FBGEMM), the rest stays float32. Faster on the CPU; outputs "
                             "are close to the float32 ones, not equal, so check the accuracy on your data (eval "
                             "--int8). CPU only: --device auto means cpu")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="top-1/top-5, loss and throughput of a checkpoint on a dataset",
        description="Evaluate a checkpoint with its own preprocessing (input size, crop, interpolation, mean/std) "
                    "unless overridden. Works under torchrun as well.",
    )
    add_weights_args(parser)
    add_input_args(parser)
    parser.add_argument("--data", metavar="DIR", help="ImageNet-layout root (evaluates DIR/<split>)")
    parser.add_argument("--dataset", metavar="NAME", help="built-in dataset: fashion-mnist")
    parser.add_argument("--split", help="split to evaluate (default: val; test for built-ins)")
    parser.add_argument("--subset", type=positive_int, metavar="N", help="evaluate N images only")
    parser.add_argument("--strict", action="store_true", help="stop at an unreadable image instead of skipping it")
    parser.add_argument("-b", "--batch-size", type=positive_int, default=128, metavar="N", help="batch size")
    parser.add_argument("-j", "--workers", type=int, default=2, metavar="N", help="data-loading processes")
    parser.add_argument("--amp", action="store_true", help="mixed precision")
    add_int8_arg(parser)
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io import atomic_write
    from ..training.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint, dataset=args.dataset, data=args.data, split=args.split, model=args.model,
        model_kwargs=args.model_kwargs, pretrained=args.pretrained, use_ema=args.use_ema, img_size=args.img_size,
        crop_pct=args.crop_pct, interpolation=args.interpolation, batch_size=args.batch_size,
        workers=args.workers, device=args.device, subset=args.subset, strict=args.strict, amp=args.amp,
        progress=args.progress, int8=args.int8,
    )
    print(result)
    if args.json:
        row = dict(checkpoint=args.checkpoint, data=args.data or args.dataset, **dataclasses.asdict(result))
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(row, indent=1)))
    return 0
