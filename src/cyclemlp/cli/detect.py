"""``cyclemlp detect train|eval|predict``: object detection and instance segmentation."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._args import KwargsAction
from ._table import format_table

# What the embedded datasets need besides the recipe: the detector that fits their annotations,
# image sizes (trees: the recipe's 800/1333, i.e. 2x the 400-pixel tiles; fashion: 2x the
# 160-pixel canvases) and the split reported by ``eval``.
DATA_DEFAULTS = {
    "trees": {"model": "retinanet", "min_size": 800, "max_size": 1333, "eval_split": "test"},
    "fashion": {"model": "mask_rcnn", "min_size": 320, "max_size": 533, "eval_split": "val"},
}
# the embedded datasets (cyclemlp.dense.datasets.DETECTION_DATASETS), named here so that --help
# does not load them
DATASETS = ("fashion", "trees")
BASELINES = ("resnet18", "resnet34", "resnet50", "resnet101")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "detect", help="object detection / instance segmentation (RetinaNet, Mask R-CNN)",
        description="RetinaNet and Mask R-CNN (torchvision) with CycleMLP backbones on COCO-format data.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    train = actions.add_parser(
        "train", help="train a detector (the paper's 1x recipe by default)",
        description=(
            "Train RetinaNet or Mask R-CNN. Defaults follow the 1x recipe: AdamW, lr 1e-4 (RetinaNet) / "
            "2e-4 (Mask R-CNN), weight decay 1e-4, 12 epochs, 500 warm-up iterations, lr x0.1 after "
            "epochs 8 and 11. Without --train-ann the embedded data is used: 'trees' (real aerial tree "
            "crowns, boxes) for RetinaNet, 'fashion' (real Fashion-MNIST objects on synthetic canvases, "
            "masks) for Mask R-CNN. Run under torchrun for several processes."
        ),
    )
    train.add_argument("--model", choices=("retinanet", "mask_rcnn"), help="detector (default: the data's)")
    train.add_argument("--backbone", help="CycleMLP name, or resnet18/resnet50 (baselines) (default: the model "
                       "--weights records, else cyclemlp_b1)")
    _data_arguments(train)
    train.add_argument("--train-ann", help="COCO json of the training split (custom data)")
    train.add_argument("--train-images", help="image folder of the training split")
    train.add_argument("--val-ann", help="COCO json of the validation split")
    train.add_argument("--val-images", help="image folder of the validation split")
    train.add_argument("--weights", help="classification checkpoint for the backbone: a run of `cyclemlp train` "
                       "(its backbone is rebuilt from its record) or the authors' file")
    train.add_argument("--output", default="runs/detect", help="run folder (checkpoints, metrics); default runs/detect")
    train.add_argument("--resume", metavar="RUN", help="continue a run (folder or last.pth); give the values it was "
                       "started with (a differing one is refused)")
    train.add_argument("--epochs", type=int, default=12)
    train.add_argument("--lr", type=float, help="base learning rate (default 1e-4 RetinaNet, 2e-4 Mask R-CNN)")
    train.add_argument("--weight-decay", type=float, default=1e-4)
    train.add_argument("--batch-size", type=int, default=2, help="images per process (recipe: 2 x 8 GPUs)")
    train.add_argument("--warmup-iters", type=int, default=500)
    train.add_argument("--milestones", type=int, nargs="*", default=[8, 11], help="epochs after which lr x0.1")
    train.add_argument("--min-size", type=int, help="short side images are resized to (recipe 800)")
    train.add_argument("--max-size", type=int, help="long-side limit (recipe 1333)")
    train.add_argument("--grad-clip", type=float, help="clip the gradient norm (off in the recipe)")
    train.add_argument("--backbone-kwargs", nargs="*", action=KwargsAction, default={}, metavar="KEY=VALUE",
                       help="passed to timm.create_model for the backbone, e.g. drop_path_rate=0.2")
    train.add_argument("--eval-interval", type=int, default=1, help="evaluate every N epochs (and after the last)")
    train.add_argument("--workers", type=int, default=2, help="data loader processes")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto")
    train.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars")
    train.set_defaults(func=run_train)

    evaluate = actions.add_parser("eval", help="COCO box/mask AP of a trained detector")
    evaluate.add_argument("checkpoint", help="run folder (best.pth, else last.pth) or checkpoint file")
    _data_arguments(evaluate)
    evaluate.add_argument("--split", help="split of the embedded data (default: trees test, fashion val)")
    evaluate.add_argument("--ann", help="COCO json to evaluate on (custom data)")
    evaluate.add_argument("--images", help="its image folder")
    evaluate.add_argument("--batch-size", type=int, default=2)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--json", metavar="PATH", help="also write the metrics as JSON")
    evaluate.set_defaults(func=run_eval)

    predict = actions.add_parser("predict", help="draw a detector's boxes/masks on images")
    predict.add_argument("checkpoint", help="run folder or checkpoint file")
    predict.add_argument("images", nargs="+", help="image files or folders (an unreadable one is reported, the "
                         "others are still predicted; the exit code is then 2)")
    predict.add_argument("--output", default="predictions", help="folder for the drawn images (default predictions)")
    predict.add_argument("--score-threshold", type=float, default=0.5)
    predict.add_argument("--device", default="auto")
    predict.add_argument("--json", metavar="PATH", help="also write the detections as JSON")
    predict.set_defaults(func=run_predict)


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASETS, help="embedded dataset (default: the detector's)")
    parser.add_argument("--data-root", default=None,
                        help="where embedded data is converted (default ~/.cache/cyclemlp/data)")


def _dataset(ann: str, images: str | None, masks: bool, train: bool):
    from ..dense.detection.data import CocoDataset

    if not images:
        raise ValueError(f"{ann}: give its image folder too")
    return CocoDataset(ann, images, masks=masks, train=train)


def run_train(args: argparse.Namespace) -> int:
    from ..dense.datasets import DETECTION_DATASETS
    from ..dense.detection.train import DetectionRecipe, train_detector
    from ..models.cyclemlp import MODEL_CONFIGS

    if args.backbone not in (None, *MODEL_CONFIGS, *BASELINES):
        raise ValueError(
            f"unknown backbone {args.backbone!r}; choose a CycleMLP ({', '.join(MODEL_CONFIGS)}) or resnet18/50"
        )
    if args.train_ann:
        if args.dataset:
            raise ValueError("give either --dataset or --train-ann, not both")
        model = args.model or "retinanet"
        defaults = {"min_size": 800, "max_size": 1333}
        masks = model == "mask_rcnn"
        train_set = _dataset(args.train_ann, args.train_images, masks, True)
        val_set = _dataset(args.val_ann, args.val_images, masks, False) if args.val_ann else None
    else:
        data = args.dataset or ("fashion" if args.model == "mask_rcnn" else "trees")
        defaults = DATA_DEFAULTS[data]
        model = args.model or defaults["model"]
        masks = model == "mask_rcnn"
        if masks and data == "trees":
            raise ValueError("the tree-crown data has boxes only; Mask R-CNN needs masks (use --dataset fashion)")
        splits = DETECTION_DATASETS[data](args.data_root)
        train_set = _dataset(splits["train"].ann_file, splits["train"].image_dir, masks, True)
        val_set = _dataset(splits["val"].ann_file, splits["val"].image_dir, masks, False)
    print(train_set.summary)
    if val_set is not None:
        print(val_set.summary)
    recipe = DetectionRecipe(
        epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
        warmup_iters=args.warmup_iters, milestones=tuple(args.milestones),
        min_size=args.min_size or defaults["min_size"], max_size=args.max_size or defaults["max_size"],
        grad_clip=args.grad_clip, workers=args.workers, seed=args.seed, eval_interval=args.eval_interval,
    )
    train_detector(
        model, args.backbone, train_set, val_set, args.output, recipe, weights=args.weights, resume=args.resume,
        device=args.device, backbone_kwargs=args.backbone_kwargs, tensorboard=args.tensorboard,
    )
    print(f"run written to {args.output}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..dense.datasets import DETECTION_DATASETS
    from ..dense.detection.evaluate import METRIC_NAMES
    from ..dense.detection.train import evaluate_detector, load_detector
    from ..io import atomic_write
    from ..training.engine import resolve_device

    device = resolve_device(args.device)
    model, config, path = load_detector(args.checkpoint, device)
    masks = config["model"] == "mask_rcnn"
    if args.ann:
        dataset = _dataset(args.ann, args.images, masks, False)
    else:
        data = args.dataset or ("fashion" if masks else "trees")
        split = args.split or DATA_DEFAULTS[data]["eval_split"]
        splits = DETECTION_DATASETS[data](args.data_root)
        if split not in splits:
            raise ValueError(f"{data} has the splits {sorted(splits)}; got {split!r}")
        dataset = _dataset(splits[split].ann_file, splits[split].image_dir, masks, False)
    if list(dataset.categories) != list(config["categories"]):
        raise ValueError(
            f"the data's categories {dataset.categories} are not the model's {config['categories']} "
            f"({path}); its labels would be outside the model's class list"
        )
    print(dataset.summary)
    metrics, text = evaluate_detector(model, dataset, device, batch_size=args.batch_size, progress=True)
    print(text)
    types = [t for t in ("bbox", "segm") if f"{t}_AP" in metrics]
    rows = [[t, *(f"{metrics[f'{t}_{m}']:.3f}" for m in METRIC_NAMES)] for t in types]
    print(format_table(rows, ["type", *METRIC_NAMES]))
    if args.json:
        payload = {"checkpoint": str(path), "data": str(dataset.ann_file), "metrics": metrics}
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2)))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from ..data.folder import image_inputs
    from ..dense.detection.train import load_detector, predict_detections
    from ..io import atomic_write
    from ..training.engine import resolve_device

    device = resolve_device(args.device)
    model, config, _ = load_detector(args.checkpoint, device)
    files, problems = image_inputs(args.images)
    records = predict_detections(model, files, args.output, config["categories"], args.score_threshold, device)
    if args.json:
        rows = records + [{"file": item, "error": problem} for item, problem in problems]
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)))
    return report_predictions(
        "detect predict", records, problems,
        lambda r: f"{r['file']}: {len(r['detections'])} detections -> {r['output']}",
    )


def report_predictions(command: str, records: list[dict], problems: list[tuple[str, str]], describe) -> int:
    """Print each prediction (``describe(record)``) and each input that failed; 2 if any failed."""
    failed = [{"file": item, "error": problem} for item, problem in problems] + [r for r in records if "error" in r]
    for record in records:
        if "error" not in record:
            print(describe(record))
    for record in failed:
        print(f"cyclemlp {command}: error: {record['file']}: {record['error']}", file=sys.stderr)
    if failed:
        print(f"cyclemlp {command}: {len(failed)} input(s) could not be predicted", file=sys.stderr)
    return 2 if failed else 0
