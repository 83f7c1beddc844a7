"""Same detector, same budget: RetinaNet with a CycleMLP-B1 vs torchvision ResNet-50 / ResNet-18 backbone.

Every backbone gets the identical detector (FPN from stride 8, P3-P7, 256 channels, torchvision's
RetinaNet head and losses), data (``--dataset trees``: the embedded real tree-crown tiles, AP on
the validation strip and on the held-out OSBS_029 + SOAP_061 images; ``--dataset fashion``: the
Fashion-MNIST canvases, boxes only), schedule and image size, and the same
initialisation regime: **random initialisation for all** (no ImageNet weights can be downloaded
here). ResNets keep trainable batch norm (frozen batch norm is only meaningful with pretrained
statistics).

Each backbone's run lives in ``OUTPUT/<backbone>/`` (the usual ``cyclemlp detect`` run folder);
an interrupted benchmark continues where it stopped (runs are resumed, finished ones skipped).
Results: ``OUTPUT/results.json`` and a Markdown table ``OUTPUT/results.md`` stating the budget.

    python benchmarks/detection_backbones.py --output runs/bench-detection --epochs 4 --min-size 320
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from cyclemlp.checkpoint import atomic_write
from torch.utils.data import Subset

from cyclemlp.dense_datasets import DETECTION_DATASETS
from cyclemlp.detection import retinanet
from cyclemlp.detection.data import CocoDataset
from cyclemlp.detection.train import DetectionRecipe, evaluate_detector, load_detector, train_detector


def _params(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def _datasets(args: argparse.Namespace) -> tuple[CocoDataset | Subset, dict[str, CocoDataset], list[str]]:
    splits = DETECTION_DATASETS[args.dataset](args.data_root)
    train = CocoDataset(splits["train"].ann_file, splits["train"].image_dir, train=True)
    categories = train.categories
    if args.train_subset:
        train = Subset(train, range(min(args.train_subset, len(train))))
    evaluation = {s: CocoDataset(splits[s].ann_file, splits[s].image_dir) for s in ("val", "test") if s in splits}
    return train, evaluation, categories


def run_backbone(name: str, args: argparse.Namespace) -> dict:
    out = Path(args.output) / name
    result_path = out / "result.json"
    if result_path.is_file():
        print(f"{name}: already done ({result_path})")
        return json.loads(result_path.read_text())
    train_set, evaluation, categories = _datasets(args)
    recipe = DetectionRecipe(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, warmup_iters=args.warmup_iters,
        milestones=tuple(args.milestones), min_size=args.min_size, max_size=args.max_size,
        workers=args.workers, seed=args.seed, eval_interval=args.epochs + 1,  # evaluated below
    )
    resume = out if (out / "last.pth").is_file() else None
    rows = train_detector("retinanet", name, train_set, None, out, recipe, resume=resume, device=args.device,
                          categories=categories)
    model, _, _ = load_detector(out / "last.pth", args.device)
    built = retinanet(name, num_classes=len(categories) + 1)
    result = {
        "backbone": name,
        "params_backbone_m": round(_params(built.backbone.body), 2),
        "params_detector_m": round(_params(built), 2),
        "epochs": len(rows),
        "train_images": len(train_set),
        "train_time_s": round(sum(r["train_time_s"] for r in rows), 1),
        "final_train_loss": round(rows[-1]["train_loss"], 4),
        "train_loss_per_epoch": [round(r["train_loss"], 4) for r in rows],
    }
    for split, dataset in evaluation.items():
        t0 = time.time()
        metrics, _ = evaluate_detector(model, dataset, args.device, batch_size=1)
        result[split] = {k: round(v, 4) for k, v in metrics.items()}
        result[f"{split}_seconds_per_image"] = round((time.time() - t0) / len(dataset), 3)
    atomic_write(result_path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    return result


DATA_NOTES = {
    "trees": "the embedded tree crowns: 400x400 tiles of the two large deepforest images (real aerial RGB); "
             "val = the held-out bottom strip of those images, test = OSBS_029 + SOAP_061 (98 boxes)",
    "fashion": "the embedded Fashion-MNIST canvases (real objects, synthetic layout, 160x160, boxes only); "
               "val = canvases of Fashion-MNIST test images",
}


def table(results: list[dict], args: argparse.Namespace) -> str:
    base = next((r for r in results if r["backbone"] == args.backbones[0]), results[0])
    splits = [s for s in ("val", "test") if s in results[0]]
    header = (f"| backbone | params backbone / detector (M) | train time (s) | time vs {base['backbone']} "
              "| final train loss |")
    header += "".join(f" {s} AP | {s} AP50 |" for s in splits)
    lines = [header, "|" + "---|" * (5 + 2 * len(splits))]
    for r in results:
        line = (f"| {r['backbone']} | {r['params_backbone_m']} / {r['params_detector_m']} | {r['train_time_s']} | "
                f"{r['train_time_s'] / base['train_time_s']:.2f} | {r['final_train_loss']} |")
        line += "".join(f" {r[s]['bbox_AP']:.3f} | {r[s]['bbox_AP50']:.3f} |" for s in splits)
        lines.append(line)
    budget = (
        f"Budget (identical for every backbone): random initialisation; RetinaNet; {args.epochs} epochs over "
        f"{results[0]['train_images']} training images of {DATA_NOTES[args.dataset]}; batch {args.batch_size}, "
        f"AdamW lr {args.lr} wd 1e-4, {args.warmup_iters} warm-up iterations, lr x0.1 after epochs "
        f"{list(args.milestones)}, images resized to short side {args.min_size} (long side at most "
        f"{args.max_size}), horizontal flips, seed {args.seed}; one process on {torch.get_num_threads()} CPU "
        f"threads ({platform.machine()}) shared with other work, so times are indicative only. AP: COCO box "
        "AP (pycocotools) of the final weights."
    )
    return "\n".join(lines) + "\n\n" + budget + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/bench-detection")
    parser.add_argument("--backbones", nargs="+", default=["cyclemlp_b1", "resnet50", "resnet18"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--warmup-iters", type=int, default=50)
    parser.add_argument("--milestones", type=int, nargs="*", default=[3])
    parser.add_argument("--min-size", type=int, default=320)
    parser.add_argument("--max-size", type=int, default=533)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--dataset", choices=sorted(DETECTION_DATASETS), default="trees")
    parser.add_argument("--train-subset", type=int, help="train on the first N training images only")
    args = parser.parse_args(argv)
    results = [run_backbone(name, args) for name in args.backbones]
    text = table(results, args)
    out = Path(args.output)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(
        {"settings": vars(args), "results": results}, indent=1)))
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(text))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
