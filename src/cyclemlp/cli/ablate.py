"""``cyclemlp ablate``: the paper's token-mixer ablations trained under one budget."""

from __future__ import annotations

import argparse

from ..analysis.settings import ABLATION_MODEL_KWARGS, ABLATION_TRAIN_CONFIG, VARIANTS
from ._args import apply_threads, square_size
from ._table import format_table


def add_parser(sub: argparse._SubParsersAction) -> None:
    names = [v.name for v in VARIANTS]
    budget = ABLATION_TRAIN_CONFIG
    parser = sub.add_parser(
        "ablate",
        help="train the paper's token-mixer ablations under one budget and compare them",
        description=(
            "Train CycleMLP variants (without each branch; stepsize 3 / 7 / 3x3; offset pattern official / "
            "paper; Cycle FC vs spatial FC) with the same data, schedule and seed, and write OUTPUT/ablate.csv, "
            "ablate.json and ablate.png (runs in OUTPUT/runs/). Variants: " + ", ".join(
                f"{v.name} ({v.description})" for v in VARIANTS)
        ),
    )
    parser.add_argument("--variants", nargs="+", default=names, choices=names, metavar="NAME",
                        help="variants to train, the first being the reference (default: all)")
    parser.add_argument("--model", default="cyclemlp_b1", help="the CycleMLP model to change (default cyclemlp_b1)")
    parser.add_argument("--dims", type=int, nargs="+", default=list(ABLATION_MODEL_KWARGS["dims"]),
                        help="stage widths (default 32 64 128 256: B1 at half width); 0 = the model's own")
    parser.add_argument("--dataset", default=budget["dataset"], help="built-in dataset (default fashion-mnist)")
    parser.add_argument("--data", metavar="DIR", help="ImageNet-layout folder instead of a built-in dataset")
    parser.add_argument("--img-size", type=square_size, default=budget["img_size"], metavar="N",
                        help="square input size")
    parser.add_argument("--epochs", type=int, default=budget["epochs"], help="epochs per run (default 3)")
    parser.add_argument("--warmup-epochs", type=float, default=None,
                        help="learning-rate warm-up (default: the recipe's, 1 epoch)")
    parser.add_argument("--train-subset", type=int, default=budget["train_subset"],
                        help="training images per run, 0 = all (default 5000)")
    parser.add_argument("--val-subset", type=int, default=budget["val_subset"],
                        help="evaluation images, 0 = all (default 2000)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: the recipe's, 128)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes (default 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for training (default: torch's); 1 is much faster on a busy machine")
    parser.add_argument("--output", "-o", default="ablate", metavar="DIR", help="output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis.ablate import run_ablation

    config = dict(recipe=ABLATION_TRAIN_CONFIG["recipe"], dataset=None if args.data else args.dataset,
                  data=args.data, img_size=args.img_size, epochs=args.epochs,
                  train_subset=args.train_subset or None, val_subset=args.val_subset or None,
                  workers=args.workers)
    if args.batch_size is not None:
        config["batch_size"] = args.batch_size
    if args.lr is not None:
        config["lr"] = args.lr
    if args.warmup_epochs is not None:
        config["warmup_epochs"] = args.warmup_epochs
    model_kwargs = {} if args.dims == [0] else dict(dims=tuple(args.dims))
    variants = [next(v for v in VARIANTS if v.name == name) for name in args.variants]
    apply_threads(args.threads)
    results = run_ablation(args.model, variants, config, model_kwargs, args.seeds, args.output)
    print(format_table(
        [[r.variant, r.params_m, r.gmacs, r.top1, r.top1_std if len(r.seeds) > 1 else "-",
          "-" if r.sampling_se is None else r.sampling_se, r.best_top1, r.wall_s] for r in results],
        ["variant", "params (M)", "GMACs", "top-1 (%)", "std (seeds)", "s.e. (eval)", "best top-1 (%)", "train s"],
    ))
    print(f"wrote {args.output}/ablate.csv, ablate.json, ablate.png")
    return 0
