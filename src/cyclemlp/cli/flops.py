"""``cyclemlp flops``: parameters, GMACs (the authors' convention) and FLOPs of models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._args import KwargsAction, parse_size
from ._table import format_table


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "flops",
        help="parameter and FLOP counts of CycleMLP models (or any timm model)",
        description=(
            "Count parameters, GMACs in the authors' convention (fvcore: multiply-add = 1, LayerNorm "
            "5 per element) and GFLOPs in PyTorch's convention (2 per multiply-add, LayerNorm free) "
            "for one image."
        ),
    )
    parser.add_argument("models", nargs="*", help="timm model names (default: every CycleMLP)")
    parser.add_argument("--model-kwargs", nargs="*", action=KwargsAction, default={}, metavar="KEY=VALUE",
                        help="constructor arguments for every model, e.g. \"dims=(48,96,192,384)\"")
    parser.add_argument("--img-size", type=parse_size, default=(224, 224), metavar="N|HxW", help="input size")
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    parser.set_defaults(func=run)


def flops_table(models: list[str], img_size: tuple[int, int], model_kwargs: dict | None = None) -> list[dict]:
    from ..models.factory import create_model
    from ..tools.flops import count_cost

    rows = []
    for name in models:
        cost = count_cost(create_model(name, **(model_kwargs or {})), img_size)
        rows.append(
            dict(model=name, params_m=round(cost.params_m, 2), gmacs=round(cost.gmacs, 3),
                 gflops=round(cost.gflops, 3), img_size=list(img_size))
        )
    return rows


def run(args: argparse.Namespace) -> int:
    from ..io import atomic_write
    from ..models.cyclemlp import MODEL_CONFIGS

    rows = flops_table(args.models or list(MODEL_CONFIGS), args.img_size, args.model_kwargs)
    print(f"input {args.img_size[0]}x{args.img_size[1]}, one image")
    print(format_table(
        [[r["model"], r["params_m"], r["gmacs"], r["gflops"]] for r in rows],
        ["model", "params (M)", "GMACs (authors)", "GFLOPs (torch)"],
    ))
    if args.json:
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=2)))
    return 0
