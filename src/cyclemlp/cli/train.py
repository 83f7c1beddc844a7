"""``cyclemlp train``: train a classifier (CycleMLP or any timm model); flags follow timm's train.py.

Values come from the recipe (``--recipe``; without it the dataset's own recipe where there is one,
else the authors' ImageNet recipe), then from the flags given. ``--resume RUN`` continues a run
from its record instead: only flags that cannot change the result, and a larger ``--epochs``, may
be given with it. Multi-process: ``torchrun --nproc_per_node N -m cyclemlp train ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..training.config import FASHION_MNIST, RECIPES, TrainConfig
from ._args import KwargsAction, show, square_size

# Flags that are not TrainConfig fields
_NOT_CONFIG = ("func", "command", "action", "verbose", "malloc")


def _floats(n: int):
    return dict(type=float, nargs=n, metavar="X")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train a classifier on a built-in dataset or an ImageNet-layout folder",
        description=(
            "Train a CycleMLP (or any timm model) with timm's data pipeline, optimizers and schedules. "
            "The run folder (--output) gets its record config.json (every resolved value), last.pth and "
            "best.pth every epoch, metrics.csv/json, and at the end curves.png and model.safetensors; "
            "every file is written atomically. --resume RUN continues a run exactly, even after a kill. "
            "Defaults: the authors' ImageNet recipe; the fashion-mnist recipe's values where they differ "
            "are shown after them. Multi-process: torchrun --nproc_per_node N -m cyclemlp train ..."
        ),
        argument_default=argparse.SUPPRESS,  # only flags given on the command line override the recipe
    )
    g = parser.add_argument_group("recipe")
    g.add_argument("--recipe", choices=sorted(RECIPES),
                   help="the values to start from: 'imagenet' (the authors' recipe, the defaults below) or "
                        "'fashion-mnist' (the embedded dataset, a narrow CycleMLP-B1, 15 epochs on a CPU); "
                        "any flag below overrides one of its values (default: the dataset's recipe where it "
                        "has one, else imagenet)")

    g = parser.add_argument_group("model")
    g.add_argument("--model", help="timm model name")
    g.add_argument("--model-kwargs", nargs="*", action=KwargsAction, metavar="KEY=VALUE",
                   help="model constructor arguments, Python literals: e.g. stepsize=7 pattern=paper "
                        "\"dims=(48,96,192,384)\" (a recipe's belong to its model: they are dropped with "
                        "another --model)")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, help="start from timm's pretrained weights")
    g.add_argument("--initial-checkpoint", metavar="PATH", help="start from these weights (head re-initialised if "
                   "the class count differs)")
    g.add_argument("--drop", dest="drop_rate", type=float, metavar="P", help="dropout before the classifier")
    g.add_argument("--drop-path", type=float, metavar="P", help="stochastic depth rate (auto: the model's)")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute activations in the backward pass to save memory")
    g.add_argument("--in-chans", type=int, choices=(1, 3), help="image channels (auto: the data's)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="channels-last memory format")

    g = parser.add_argument_group("data")
    g.add_argument("--data", metavar="DIR", help="ImageNet-layout root with train/ and val/ (or the folder "
                   "holding a built-in dataset's files)")
    g.add_argument("--dataset", metavar="NAME", help="built-in dataset: fashion-mnist")
    g.add_argument("--train-split", metavar="NAME", help="training split (auto: train)")
    g.add_argument("--val-split", metavar="NAME", help="evaluation split (auto: val; test for built-ins)")
    g.add_argument("--train-subset", type=int, metavar="N", help="use N training images (quick runs)")
    g.add_argument("--val-subset", type=int, metavar="N", help="use N evaluation images")
    g.add_argument("--strict", action=argparse.BooleanOptionalAction,
                   help="stop at an unreadable image instead of skipping it with a warning")
    g.add_argument("--img-size", type=square_size, metavar="N", help="square input size (auto: the data's / model's)")
    g.add_argument("--crop-pct", type=float, metavar="F", help="evaluation centre-crop fraction")
    g.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest"), help="resize interpolation")
    g.add_argument("--mean", type=float, nargs="+", metavar="M", help="normalisation mean per channel (auto: the "
                   "data's / model's)")
    g.add_argument("--std", type=float, nargs="+", metavar="S", help="normalisation std per channel")
    g.add_argument("-b", "--batch-size", type=int, metavar="N", help="images per process and step")
    g.add_argument("-j", "--workers", type=int, metavar="N", help="data-loading processes per training process")
    g.add_argument("--cache-data", action=argparse.BooleanOptionalAction,
                   help="transform every image once and keep it in memory (auto: when the data is a built-in "
                   "in-memory dataset and the augmentation is flips, translation and erasing)")
    g.add_argument("--samples-per-epoch", type=int, metavar="N", help="images drawn per epoch (auto: one pass "
                   "over the training split)")

    g = parser.add_argument_group("augmentation")
    g.add_argument("--no-aug", action="store_true", help="no training augmentation (resize and centre crop only)")
    g.add_argument("--scale", **_floats(2), help="random-resized-crop area range")
    g.add_argument("--ratio", **_floats(2), help="random-resized-crop aspect range")
    g.add_argument("--hflip", type=float, metavar="P", help="horizontal flip probability")
    g.add_argument("--color-jitter", type=float, metavar="F", help="colour jitter strength (0 = off)")
    g.add_argument("--aa", metavar="POLICY", help="auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument("--reprob", type=float, metavar="P", help="random erasing probability")
    g.add_argument("--remode", choices=("pixel", "rand", "const"), help="random erasing fill")
    g.add_argument("--recount", type=int, metavar="N", help="random erasing count")
    g.add_argument("--pad-crop", type=int, metavar="N",
                   help="random translation: crop the input size from the image zero-padded by N pixels per side")
    g.add_argument("--mixup", type=float, metavar="ALPHA", help="mixup alpha (0 = off)")
    g.add_argument("--cutmix", type=float, metavar="ALPHA", help="cutmix alpha (0 = off)")
    g.add_argument("--mixup-prob", type=float, metavar="P", help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup-switch-prob", type=float, metavar="P", help="probability of cutmix instead of mixup")
    g.add_argument("--mixup-mode", choices=("batch", "pair", "elem"), help="how mixup parameters are drawn")
    g.add_argument("--smoothing", type=float, metavar="EPS", help="label smoothing")
    g.add_argument("--aug-repeats", type=int, metavar="N", help="repeated augmentation count (0 = off)")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--opt", metavar="NAME", help="timm optimizer")
    g.add_argument("--lr", type=float, metavar="LR", help="learning rate (auto: --lr-base scaled by the global "
                   "batch / --lr-base-size)")
    g.add_argument("--lr-base", type=float, metavar="LR", help="learning rate at --lr-base-size")
    g.add_argument("--lr-base-size", type=int, metavar="N", help="global batch of --lr-base")
    g.add_argument("--weight-decay", type=float, metavar="WD", help="weight decay (not on 1-D parameters)")
    g.add_argument("--momentum", type=float, metavar="M", help="SGD momentum")
    g.add_argument("--opt-fused", action=argparse.BooleanOptionalAction,
                   help="torch's fused Adam/AdamW step (auto: on for adam/adamw on CPU and CUDA)")
    g.add_argument("--opt-eps", type=float, metavar="EPS", help="optimizer epsilon")
    g.add_argument("--opt-betas", **_floats(2), help="optimizer betas")
    g.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradient norm")
    g.add_argument("--sched", metavar="NAME", help="timm schedule")
    g.add_argument("--epochs", type=int, metavar="N", help="epochs to train; with --resume, a larger N extends "
                   "the run (the schedule is rebuilt for N epochs from the next step on)")
    g.add_argument("--warmup-epochs", type=float, metavar="N", help="linear warm-up epochs")
    g.add_argument("--warmup-lr", type=float, metavar="LR", help="learning rate at the start of warm-up")
    g.add_argument("--min-lr", type=float, metavar="LR", help="lowest learning rate of the schedule")
    g.add_argument("--cooldown-epochs", type=int, metavar="N", help="epochs at --min-lr after the schedule")
    g.add_argument("--sched-on-updates", action=argparse.BooleanOptionalAction,
                   help="step the schedule every update instead of every epoch")
    g.add_argument("--grad-accum-steps", type=int, metavar="N", help="accumulate gradients over N batches")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, help="mixed precision (bfloat16 on CPU)")
    g.add_argument("--amp-dtype", choices=("float16", "bfloat16"), help="mixed-precision type on CUDA")
    g.add_argument("--model-ema", action=argparse.BooleanOptionalAction, help="keep an EMA of the weights")
    g.add_argument("--model-ema-decay", type=float, metavar="D", help="EMA decay")

    g = parser.add_argument_group("run (may differ when resuming: they do not change the result)")
    g.add_argument("--seed", type=int, help="random seed")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads per process (auto: torch's)")
    g.add_argument("--output", metavar="DIR", help="run folder (auto: runs/<model>-<data>[-N])")
    g.add_argument("--resume", metavar="RUN", help="continue the run in this folder (or its last.pth) from its "
                   "record; a finished run with nothing to train is left unchanged")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, help="also log to DIR/tb")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bars")
    parser.set_defaults(func=run)
    _describe_defaults(parser)


def _describe_defaults(parser: argparse.ArgumentParser) -> None:
    """Append each flag's default (and the fashion-mnist recipe's value where it differs) to its
    help: the parser itself keeps no defaults, so that only given flags override a recipe."""
    defaults = TrainConfig()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for action in parser._actions:
        if action.dest not in fields or action.dest in ("recipe", "resume"):
            continue
        default = getattr(defaults, action.dest)
        if default is None and "auto" in (action.help or ""):
            continue  # the help says how it is resolved
        text = f"default {'none' if default is None else show(default)}"
        if action.dest in FASHION_MNIST and FASHION_MNIST[action.dest] != default:
            text += f"; fashion-mnist: {show(FASHION_MNIST[action.dest])}"
        action.help = f"{action.help} ({text})" if action.help else text


def given_values(args: argparse.Namespace) -> dict:
    """The configuration values named on the command line (tuples where the config has tuples)."""
    given = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    for key in ("scale", "ratio", "opt_betas", "mean", "std"):
        if key in given:
            given[key] = tuple(given[key])
    return given


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A new run's configuration: the recipe's values, then the flags given."""
    given = given_values(args)
    return TrainConfig.from_recipe(given.pop("recipe", None), **given)


def run(args: argparse.Namespace) -> int:
    from ..training.engine import NonFiniteLossError
    from ..training.train import train

    given = given_values(args)
    try:
        result = train(**given) if given.get("resume") else train(config_from_args(args))
    except NonFiniteLossError as err:
        print(f"cyclemlp train: stopped: {err}", file=sys.stderr)
        return 1
    if result.trained_epochs or result.weights is not None:
        weights = f"weights {result.weights}, curves {result.output_dir / 'curves.png'}" if result.weights else \
            f"checkpoint {result.last_checkpoint}"
        print(
            f"{'done' if result.trained_epochs else 'complete'}: top-1 {result.top1:.2f}% (best "
            f"{result.best_top1:.2f}% at epoch {result.best_epoch + 1}), top-5 {result.top5:.2f}%"
            f"{f', {result.wall_s / 60:.1f} min' if result.trained_epochs else ''}; {weights}"
        )
    return 0
