"""``cyclemlp segment train|eval|predict``: semantic segmentation (Semantic FPN, UperNet)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._args import KwargsAction
from ._table import format_table
from .detect import report_predictions

# Crop and base scale (long, short) for the embedded data, whose images are small: the crop is
# the whole canvas/tile and the base scale keeps it at its size (the recipe's are 512 / (2048, 512)).
DATA_DEFAULTS = {
    "fashion-semantic": {"crop_size": 160, "scale": (640, 160)},
    "nuclei": {"crop_size": 128, "scale": (512, 128)},
}
# the embedded datasets (cyclemlp.dense.datasets.SEGMENTATION_DATASETS), named here so that
# --help does not load them
DATASETS = ("fashion-semantic", "nuclei")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "segment", help="semantic segmentation (Semantic FPN, UperNet)",
        description="Semantic FPN and UperNet (segmentation_models_pytorch) on CycleMLP encoders, ADE20K-layout data.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    train = actions.add_parser(
        "train", help="train a segmentation model (the paper's recipe by default)",
        description=(
            "Train Semantic FPN (AdamW lr 2e-4, wd 1e-4, poly 0.9, 40k iterations) or UperNet (Swin's "
            "setting: AdamW lr 6e-5, wd 0.01, 1500 warm-up iterations, poly 1.0, 160k iterations) with "
            "random rescale 0.5-2.0, crop, flip and photometric distortion. Without --data the "
            "embedded data is used: 'fashion-semantic' (real Fashion-MNIST objects on synthetic "
            "canvases, 11 classes) or 'nuclei' (a real microscopy image, nucleus vs background)."
        ),
    )
    train.add_argument("--model", choices=("semantic_fpn", "upernet"), default="semantic_fpn")
    train.add_argument("--backbone",
                       help="CycleMLP name (default: the model --weights records, else cyclemlp_b1 for Semantic "
                            "FPN and cyclemlp_t for UperNet)")
    _data_arguments(train)
    train.add_argument("--weights", help="classification checkpoint for the backbone: a run of `cyclemlp train` "
                       "(its backbone is rebuilt from its record) or the authors' file")
    train.add_argument("--output", default="runs/segment",
                       help="run folder (checkpoints, metrics); default runs/segment")
    train.add_argument("--resume", metavar="RUN", help="continue a run (folder or last.pth); give the values it was "
                       "started with (a differing one is refused)")
    train.add_argument("--iters", type=int, help="training iterations (40000 Semantic FPN, 160000 UperNet)")
    train.add_argument("--lr", type=float, help="base learning rate (2e-4 / 6e-5)")
    train.add_argument("--weight-decay", type=float, help="(1e-4 / 0.01)")
    train.add_argument("--power", type=float, help="poly decay power (0.9 / 1.0)")
    train.add_argument("--warmup-iters", type=int, help="linear warm-up iterations (0 / 1500)")
    train.add_argument("--batch-size", type=int, default=4, help="images per process (recipe: 4 x 8 GPUs)")
    train.add_argument("--crop-size", type=int, help="training crop (512; embedded data: the image size)")
    train.add_argument("--scale", type=int, nargs=2, metavar=("LONG", "SHORT"), help="base rescale size (2048 512)")
    train.add_argument("--ratio-range", type=float, nargs=2, default=[0.5, 2.0], metavar=("MIN", "MAX"))
    train.add_argument("--eval-interval", type=int, help="iterations between evaluations/checkpoints (4000 / 16000)")
    train.add_argument("--grad-clip", type=float, help="clip the gradient norm (off in the recipe)")
    train.add_argument("--backbone-kwargs", nargs="*", action=KwargsAction, default={}, metavar="KEY=VALUE",
                       help="passed to timm.create_model for the backbone, e.g. drop_path_rate=0.2")
    train.add_argument("--workers", type=int, default=2, help="data loader processes")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto")
    train.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars")
    train.set_defaults(func=run_train)

    evaluate = actions.add_parser("eval", help="mIoU / mAcc / aAcc (per class) of a trained model")
    evaluate.add_argument("checkpoint", help="run folder (best.pth, else last.pth) or checkpoint file")
    _data_arguments(evaluate, inference=True)
    evaluate.add_argument("--split", default="validation", help="split folder (default validation)")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--json", metavar="PATH", help="also write the metrics (with per-class values) as JSON")
    evaluate.set_defaults(func=run_eval)

    predict = actions.add_parser("predict", help="colour-palette overlays of a model's segmentation")
    predict.add_argument("checkpoint", help="run folder or checkpoint file")
    predict.add_argument("images", nargs="+", help="image files or folders (an unreadable one is reported, the "
                         "others are still predicted; the exit code is then 2)")
    predict.add_argument("--output", default="predictions", help="output folder (default predictions)")
    predict.add_argument("--mode", choices=("whole", "slide"), help="inference mode (default: the run's)")
    predict.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    predict.add_argument("--device", default="auto")
    predict.add_argument("--json", metavar="PATH", help="also write per-image class fractions as JSON")
    predict.set_defaults(func=run_predict)


def _data_arguments(parser: argparse.ArgumentParser, inference: bool = False) -> None:
    parser.add_argument("--dataset", choices=DATASETS, help="embedded dataset (default fashion-semantic)")
    parser.add_argument("--data-root", default=None,
                        help="where embedded data is converted (default ~/.cache/cyclemlp/data)")
    parser.add_argument("--data", metavar="DIR",
                        help="ADE20K-layout folder (images/{training,validation}, annotations/...)")
    parser.add_argument("--num-classes", type=int, help="classes of --data (150 for ADE20K)")
    parser.add_argument("--classes-file", help="class names of --data, one per line")
    parser.add_argument("--reduce-zero-label", action="store_true", help="label 0 -> 255 (ignore), others -1 (ADE20K)")
    parser.add_argument("--mode", choices=("whole", "slide"), **({} if inference else {"default": "whole"}),
                        help="inference: whole image or sliding crop windows")
    parser.add_argument("--stride", type=int, help="sliding-window stride (default 2/3 of the crop)")


def _resolve_data(args: argparse.Namespace) -> tuple[Path, list[str], bool, dict]:
    """(root, class names, reduce_zero_label, size defaults) of --dataset or --data."""
    if args.data:
        if args.dataset:
            raise ValueError("give either --dataset or --data, not both")
        if args.classes_file:
            classes = [line.strip() for line in Path(args.classes_file).read_text().splitlines() if line.strip()]
        elif args.num_classes:
            classes = [str(i) for i in range(args.num_classes)]
        else:
            raise ValueError("--data needs --num-classes or --classes-file")
        if args.num_classes and len(classes) != args.num_classes:
            raise ValueError(f"--classes-file lists {len(classes)} classes but --num-classes is {args.num_classes}")
        return Path(args.data), classes, args.reduce_zero_label, {}
    from ..dense.datasets import SEGMENTATION_DATASETS

    name = args.dataset or "fashion-semantic"
    data = SEGMENTATION_DATASETS[name](args.data_root)
    return data.root, list(data.classes), data.reduce_zero_label, DATA_DEFAULTS[name]


def run_train(args: argparse.Namespace) -> int:
    from ..dense.segmentation.data import SegmentationDataset, train_transform
    from ..dense.segmentation.train import SegmentationRecipe, train_segmenter
    from ..models.cyclemlp import MODEL_CONFIGS

    backbone = args.backbone
    if backbone not in (None, *MODEL_CONFIGS):
        raise ValueError(f"unknown backbone {backbone!r}; choose from {', '.join(MODEL_CONFIGS)}")
    root, classes, reduce_zero, defaults = _resolve_data(args)
    crop = args.crop_size or defaults.get("crop_size", 512)
    scale = tuple(args.scale or defaults.get("scale", (2048, 512)))
    transform = train_transform(crop, scale, tuple(args.ratio_range))
    train_set = SegmentationDataset(root, "training", len(classes), reduce_zero, transform)
    val_set = SegmentationDataset(root, "validation", len(classes), reduce_zero)
    print(f"{root}: {len(train_set)} training / {len(val_set)} validation images, {len(classes)} classes")
    recipe = SegmentationRecipe(
        iters=args.iters, lr=args.lr, weight_decay=args.weight_decay, power=args.power,
        warmup_iters=args.warmup_iters, batch_size=args.batch_size, crop_size=crop, scale=scale,
        ratio_range=tuple(args.ratio_range), eval_interval=args.eval_interval, grad_clip=args.grad_clip,
        workers=args.workers, seed=args.seed, mode=args.mode, stride=args.stride,
    )
    train_segmenter(
        args.model, backbone, train_set, val_set, classes, args.output, recipe, weights=args.weights,
        resume=args.resume, device=args.device, backbone_kwargs=args.backbone_kwargs, tensorboard=args.tensorboard,
    )
    print(f"run written to {args.output}")
    return 0


def _percent(value: float) -> str:
    return "nan" if value != value else f"{100 * value:.2f}"


def run_eval(args: argparse.Namespace) -> int:
    from ..dense.datasets import SEGMENTATION_DATASETS
    from ..dense.segmentation.data import SegmentationDataset
    from ..dense.segmentation.train import SegmentationRecipe, evaluate_segmenter, load_segmenter
    from ..io import atomic_write
    from ..training.engine import DistInfo, resolve_device

    device = resolve_device(args.device)
    model, config, path = load_segmenter(args.checkpoint, device)
    if not (args.dataset or args.data):  # the embedded data the model was trained on, by its classes
        matches = [
            name for name, prepare in SEGMENTATION_DATASETS.items()
            if list(prepare(args.data_root).classes) == config["classes"]
        ]
        if not matches:
            raise ValueError(f"{path} was not trained on embedded data; give --data")
        args.dataset = matches[0]
    root, classes, reduce_zero, _ = _resolve_data(args)
    if len(classes) != config["num_classes"]:
        raise ValueError(f"the data has {len(classes)} classes, the model {config['num_classes']} ({path})")
    recipe = SegmentationRecipe(**config["recipe"])
    if args.mode:
        recipe.mode = args.mode
    if args.stride:
        recipe.stride = args.stride
    dataset = SegmentationDataset(root, args.split, config["num_classes"], reduce_zero or config["reduce_zero_label"])
    result = evaluate_segmenter(model, dataset, recipe, config["classes"], DistInfo(device=device), progress=True)
    print(format_table(
        [[c["class"], 100 * c["IoU"], 100 * c["Acc"], c["pixels"]] for c in result["per_class"]],
        ["class", "IoU (%)", "Acc (%)", "pixels"],
    ))
    print(f"{path} on {root} [{dataset.split}, {len(dataset)} images, {recipe.mode} inference]: "
          f"mIoU {_percent(result['mIoU'])}  mAcc {_percent(result['mAcc'])}  aAcc {_percent(result['aAcc'])}")
    if args.json:
        payload = {"checkpoint": str(path), "data": str(root), "split": dataset.split, "mode": recipe.mode, **result}
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1)))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from ..data.folder import image_inputs
    from ..dense.segmentation.train import load_segmenter, predict_segmentation
    from ..io import atomic_write
    from ..training.engine import resolve_device

    device = resolve_device(args.device)
    model, config, _ = load_segmenter(args.checkpoint, device)
    if args.mode:
        config["recipe"]["mode"] = args.mode
    files, problems = image_inputs(args.images)
    records = predict_segmentation(model, files, args.output, config, device, args.alpha)
    if args.json:
        rows = records + [{"file": item, "error": problem} for item, problem in problems]
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)))

    def describe(record: dict) -> str:
        top = sorted(record["fractions"].items(), key=lambda kv: -kv[1])[:3]
        return f"{record['file']} -> {record['overlay']} ({', '.join(f'{k} {100 * v:.1f}%' for k, v in top)})"

    return report_predictions("segment predict", records, problems, describe)
