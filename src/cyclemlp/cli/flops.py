"""``cyclemlp flops``: parameters, GMACs (the authors' convention) and FLOPs of models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm

from ..io import atomic_write
from ..models.cyclemlp import MODEL_CONFIGS
from ..tools.flops import count_cost
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
    parser.add_argument(
        "models", nargs="*", default=list(MODEL_CONFIGS),
        help="timm model names (default: every CycleMLP)",
    )
    parser.add_argument(
        "--img-size", type=int, nargs="+", default=[224], metavar=("H", "W"),
        help="input height and width (one value for square); default 224",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    parser.set_defaults(func=run)


def flops_table(models: list[str], img_size: tuple[int, int]) -> list[dict]:
    rows = []
    for name in models:
        model = timm.create_model(name)
        cost = count_cost(model, img_size)
        rows.append(
            dict(model=name, params_m=round(cost.params_m, 2), gmacs=round(cost.gmacs, 3),
                 gflops=round(cost.gflops, 3), img_size=list(img_size))
        )
    return rows


def run(args: argparse.Namespace) -> int:
    if len(args.img_size) not in (1, 2) or min(args.img_size) < 1:
        raise ValueError(f"--img-size takes one or two positive integers, got {args.img_size}")
    img_size = (args.img_size[0], args.img_size[-1])
    unknown = [m for m in args.models if not timm.is_model(m)]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; see timm.list_models() or {sorted(MODEL_CONFIGS)}")
    rows = flops_table(args.models, img_size)
    print(f"input {img_size[0]}x{img_size[1]}, one image")
    print(format_table(
        [[r["model"], r["params_m"], r["gmacs"], r["gflops"]] for r in rows],
        ["model", "params (M)", "GMACs (authors)", "GFLOPs (torch)"],
    ))
    if args.json:
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=2)))
    return 0
