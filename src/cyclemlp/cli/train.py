"""``cyclemlp train``: train a classifier (CycleMLP or any timm model); flags follow timm's train.py.

Values come from ``--recipe`` (if given), then from the flags given on the command line; every
recipe value can be overridden. Multi-process: ``torchrun --nproc_per_node N -m cyclemlp train ...``.
"""

from __future__ import annotations

import argparse
import sys

from timm.utils import ParseKwargs

from ..training.engine import NonFiniteLossError
from ..training.train import RECIPES, TrainConfig, train


def _floats(n: int):
    return dict(type=float, nargs=n, metavar="X")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train a classifier on a built-in dataset or an ImageNet-layout folder",
        description=(
            "Train a CycleMLP (or any timm model) with timm's data pipeline, optimizers and schedules. "
            "Writes last.pth/best.pth every epoch (atomically), metrics.csv/json, curves.png and "
            "model.safetensors to --output. Multi-process: torchrun --nproc_per_node N -m cyclemlp train ..."
        ),
        argument_default=argparse.SUPPRESS,  # only flags given on the command line override the recipe
    )
    g = parser.add_argument_group("recipe")
    g.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="start from a recipe: 'imagenet' = the authors' (SPEC §5), 'fashion-mnist' = the "
                        "short CPU schedule; any flag below overrides its value")

    g = parser.add_argument_group("model")
    g.add_argument("--model", help="timm model name (default cyclemlp_b1)")
    g.add_argument("--model-kwargs", nargs="*", action=ParseKwargs, metavar="KEY=VALUE",
                   help="extra model arguments, e.g. stepsize=7 pattern=paper \"branches=('width','channel')\"")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, help="start from timm's pretrained weights")
    g.add_argument("--initial-checkpoint", metavar="PATH", help="start from these weights (head re-initialised if "
                   "the class count differs)")
    g.add_argument("--drop", dest="drop_rate", type=float, metavar="P", help="dropout before the classifier")
    g.add_argument("--drop-path", type=float, metavar="P", help="stochastic depth rate (default: the model's)")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute activations in the backward pass to save memory")
    g.add_argument("--in-chans", type=int, choices=(1, 3), help="image channels (default: the data's)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="channels-last memory format")

    g = parser.add_argument_group("data")
    g.add_argument("--data", metavar="DIR", help="ImageNet-layout root with train/ and val/ (or the folder "
                   "holding a built-in dataset's files)")
    g.add_argument("--dataset", metavar="NAME", help="built-in dataset: fashion-mnist")
    g.add_argument("--train-split", metavar="NAME", help="training split (default train)")
    g.add_argument("--val-split", metavar="NAME", help="evaluation split (default val; test for built-ins)")
    g.add_argument("--train-subset", type=int, metavar="N", help="use N training images (quick runs)")
    g.add_argument("--val-subset", type=int, metavar="N", help="use N evaluation images")
    g.add_argument("--strict", action=argparse.BooleanOptionalAction,
                   help="stop at an unreadable image instead of skipping it with a warning")
    g.add_argument("--img-size", type=int, metavar="PX", help="input size (default: the recipe's / model's)")
    g.add_argument("--crop-pct", type=float, metavar="F", help="evaluation centre-crop fraction")
    g.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest"), help="resize interpolation")
    g.add_argument("--mean", type=float, nargs="+", metavar="M", help="normalisation mean per channel")
    g.add_argument("--std", type=float, nargs="+", metavar="S", help="normalisation std per channel")
    g.add_argument("-b", "--batch-size", type=int, metavar="N", help="images per process and step (default 128)")
    g.add_argument("-j", "--workers", type=int, metavar="N", help="data-loading processes per training process")
    g.add_argument("--cache-data", action=argparse.BooleanOptionalAction,
                   help="transform every image once and keep it in memory (default: when the data is a built-in "
                   "in-memory dataset and the augmentation is flips only)")
    g.add_argument("--samples-per-epoch", type=int, metavar="N", help="images drawn per epoch (default: one pass "
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
    g.add_argument("--opt", metavar="NAME", help="timm optimizer (default adamw)")
    g.add_argument("--lr", type=float, metavar="LR", help="learning rate (default: --lr-base scaled by the "
                   "global batch / --lr-base-size)")
    g.add_argument("--lr-base", type=float, metavar="LR", help="learning rate at --lr-base-size")
    g.add_argument("--lr-base-size", type=int, metavar="N", help="global batch of --lr-base")
    g.add_argument("--weight-decay", type=float, metavar="WD", help="weight decay (not on 1-D parameters)")
    g.add_argument("--momentum", type=float, metavar="M", help="SGD momentum")
    g.add_argument("--opt-fused", action=argparse.BooleanOptionalAction,
                   help="torch's fused Adam/AdamW step (default: on for adam/adamw on CPU and CUDA)")
    g.add_argument("--opt-eps", type=float, metavar="EPS", help="optimizer epsilon")
    g.add_argument("--opt-betas", **_floats(2), help="optimizer betas")
    g.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradient norm")
    g.add_argument("--sched", metavar="NAME", help="timm schedule (default cosine)")
    g.add_argument("--epochs", type=int, metavar="N", help="epochs to train")
    g.add_argument("--warmup-epochs", type=float, metavar="N", help="linear warm-up epochs")
    g.add_argument("--warmup-lr", type=float, metavar="LR", help="learning rate at the start of warm-up")
    g.add_argument("--min-lr", type=float, metavar="LR", help="lowest learning rate of the schedule")
    g.add_argument("--cooldown-epochs", type=int, metavar="N", help="epochs at --min-lr after the schedule")
    g.add_argument("--sched-on-updates", action=argparse.BooleanOptionalAction,
                   help="step the schedule every update instead of every epoch")
    g.add_argument("--grad-accum-steps", type=int, metavar="N", help="accumulate gradients over N batches")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, help="mixed precision")
    g.add_argument("--amp-dtype", choices=("float16", "bfloat16"), help="mixed-precision type on CUDA")
    g.add_argument("--model-ema", action=argparse.BooleanOptionalAction, help="keep an EMA of the weights")
    g.add_argument("--model-ema-decay", type=float, metavar="D", help="EMA decay")

    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, help="random seed (default 42)")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads per process (default: torch's)")
    g.add_argument("--output", metavar="DIR", help="run folder (default runs/<model>-<data>[-N])")
    g.add_argument("--resume", metavar="PATH", help="continue the run of this last.pth or run folder")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, help="also log to DIR/tb")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bars (default on)")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's configuration: the recipe's values, then the flags given."""
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "verbose", "malloc", "recipe")}
    for key in ("scale", "ratio", "opt_betas", "mean", "std"):
        if key in given:
            given[key] = tuple(given[key])
    return TrainConfig.from_recipe(getattr(args, "recipe", None), **given)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        result = train(config)
    except NonFiniteLossError as err:
        print(f"cyclemlp train: stopped: {err}", file=sys.stderr)
        return 1
    if result.weights is not None:
        print(
            f"done: top-1 {result.top1:.2f}% (best {result.best_top1:.2f}% at epoch {result.best_epoch + 1}), "
            f"top-5 {result.top5:.2f}%, {result.wall_s / 60:.1f} min; weights {result.weights}, "
            f"curves {result.output_dir / 'curves.png'}"
        )
    return 0
