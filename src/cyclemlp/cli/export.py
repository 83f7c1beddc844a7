"""``cyclemlp export``: ONNX / TorchScript / torch.export files with dynamic batch and size."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..tools.export import FORMATS, SUFFIX
from ._args import parse_size
from .eval import add_weights_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="export a model to ONNX, TorchScript or a torch.export program",
        description=(
            "Export a classifier with dynamic batch, height and width, then check the file against eager "
            "PyTorch at two resolutions (ONNX through onnxruntime): the file is written only if every check "
            "passes. The project's checkpoints rebuild their own model, input size and channels, and their "
            "classes and preprocessing are stored in the file. Without weights nothing is exported unless "
            "--random-weights is given."
        ),
    )
    add_weights_args(parser)
    parser.add_argument("--random-weights", action="store_true",
                        help="export the model with freshly initialised weights (seeded by --seed)")
    parser.add_argument("--num-classes", type=int, help="classifier size of --random-weights or of a file that "
                        "does not record it (default: the file's, else 1000)")
    parser.add_argument("--in-chans", type=int, choices=(1, 3), help="input channels of --random-weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="file format")
    parser.add_argument("--img-size", type=parse_size, metavar="N|HxW",
                        help="example input size for tracing (default: the checkpoint's, else the model's); the "
                             "file stays dynamic")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset")
    parser.add_argument("--output", "-o", metavar="PATH",
                        help="output file (default: next to the checkpoint, its name with the format's suffix; "
                             "MODEL.onnx etc. for --random-weights)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..models.factory import checkpoint_file, create_model, data_config, model_from_checkpoint
    from ..tools.export import export_model

    if args.checkpoint is None and not args.pretrained:
        if not args.random_weights:
            raise ValueError("no weights given: pass --checkpoint PATH (or --pretrained, or --random-weights to "
                             "export an untrained model)")
        if args.model is None:
            raise ValueError("--random-weights needs --model NAME")
        torch.manual_seed(args.seed)
        kwargs = dict(args.model_kwargs, num_classes=args.num_classes or 1000, in_chans=args.in_chans or 3)
        model, run_info = create_model(args.model, **kwargs).eval(), None
        default_out = Path(f"{args.model}{SUFFIX[args.format]}")
    else:
        if args.random_weights:
            raise ValueError("--random-weights and --checkpoint/--pretrained exclude each other")
        model, run_info, report = model_from_checkpoint(args.checkpoint, args.model, args.model_kwargs,
                                                        num_classes=args.num_classes, pretrained=args.pretrained,
                                                        use_ema=args.use_ema)
        print(report)
        if args.checkpoint is not None:
            source = checkpoint_file(args.checkpoint)
            default_out = source.with_suffix(SUFFIX[args.format])
        else:
            default_out = Path(f"{args.model}{SUFFIX[args.format]}")
    output = Path(args.output) if args.output else default_out
    if output.exists() and not args.overwrite:
        raise ValueError(f"{output} exists; pass --overwrite to replace it, or another --output")
    cfg = data_config(model, run_info, args.img_size)
    in_chans, height, width = cfg["input_size"]
    metadata = dict(model=run_info["model"] if run_info else args.model, input_size=[in_chans, height, width],
                    mean=list(cfg["mean"]), std=list(cfg["std"]), crop_pct=cfg["crop_pct"],
                    interpolation=cfg["interpolation"])
    if run_info:
        metadata.update(classes=run_info["classes"], model_kwargs=run_info["model_kwargs"])
    result = export_model(model, output, args.format, (height, width), args.opset, in_chans=in_chans,
                          metadata=metadata)
    print(result)
    return 0
