"""``cyclemlp export``: ONNX / TorchScript / torch.export files with dynamic batch and size."""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch

from ..models.checkpoint import load_checkpoint, read_state_dict
from ..models.cyclemlp import CycleMLP
from ..tools.export import FORMATS, SUFFIX, export_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="export a model to ONNX, TorchScript or a torch.export program",
        description=(
            "Export a timm/CycleMLP classifier with dynamic batch, height and width, then check the "
            "file against eager PyTorch at three resolutions (ONNX through onnxruntime). The file is "
            "written only if every check passes."
        ),
    )
    parser.add_argument("model", help="model name, e.g. cyclemlp_b1")
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument("--checkpoint", metavar="PATH", help="weights: the project's or the authors' file")
    parser.add_argument("--num-classes", type=int, help="classifier size (default: from the checkpoint, else 1000)")
    parser.add_argument("--img-size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"),
                        help="example input size for tracing (default 224 224); the file stays dynamic")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--output", "-o", metavar="PATH", help="output file (default: MODEL + format suffix)")
    parser.set_defaults(func=run)


def _classes_in(path: str) -> int | None:
    state, _ = read_state_dict(path)
    head = state.get("head.weight")
    return int(head.shape[0]) if head is not None and head.dim() == 2 else None


def run(args: argparse.Namespace) -> int:
    if not timm.is_model(args.model):
        raise ValueError(f"unknown model {args.model!r}")
    num_classes = args.num_classes
    if num_classes is None:
        num_classes = (_classes_in(args.checkpoint) if args.checkpoint else None) or 1000
    model = timm.create_model(args.model, num_classes=num_classes)
    if args.checkpoint:
        if isinstance(model, CycleMLP):
            print(load_checkpoint(model, args.checkpoint))
        else:
            timm.models.load_checkpoint(model, args.checkpoint)
    output = Path(args.output or f"{args.model}{SUFFIX[args.format]}")
    with torch.no_grad():
        result = export_model(model, output, args.format, tuple(args.img_size), args.opset)
    print(result)
    return 0
