"""Same detector, same budget: RetinaNet with a CycleMLP-B1 vs torchvision ResNet-50 / ResNet-18 backbone.

Every backbone gets the identical detector (FPN from stride 8, P3-P7, 256 channels, torchvision's
RetinaNet head and losses), data (``--dataset trees``: the embedded real tree-crown tiles, AP on
the validation strip and on the held-out OSBS_029 + SOAP_061 images; ``--dataset fashion``: the
Fashion-MNIST canvases, boxes only), schedule and image size, and the same
initialisation regime: **random initialisation for all** (no ImageNet weights can be downloaded
here). ResNets keep trainable batch norm (frozen batch norm is only meaningful with pretrained
statistics).

The defaults are the committed table's budget (the Fashion-MNIST canvases, 400 training images,
3 epochs at 160 px, one CPU process). Each backbone's run lives in ``OUTPUT/<backbone>/`` (the
usual ``cyclemlp detect`` run folder, git-ignored); an interrupted benchmark continues where it
stopped (runs are resumed, finished ones skipped). Results: ``OUTPUT/results.json`` and a Markdown
table ``OUTPUT/results.md`` stating the budget, the machine and the command.

    python -m benchmarks.detection_backbones                      # benchmarks/results/detection_backbones
    python -m benchmarks.detection_backbones --dataset trees --epochs 4 --min-size 320 --max-size 533 --output /tmp/d
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from cyclemlp.dense.datasets import DETECTION_DATASETS
from cyclemlp.dense.detection import retinanet
from cyclemlp.dense.detection.data import CocoDataset
from cyclemlp.dense.detection.train import DetectionRecipe, evaluate_detector, load_detector, train_detector
from cyclemlp.io import atomic_write
from cyclemlp.tools.environment import command_line, machine


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


def step_times(args: argparse.Namespace, num_classes: int) -> dict[str, dict[str, float]]:
    """Median seconds of one training step (forward, backward, AdamW) and of one inference forward
    for each backbone, on the same random batch at ``--min-size``; the backbones take turns in every
    round so that load from other processes affects all of them alike."""
    torch.manual_seed(args.seed)
    size = args.min_size
    images = [torch.rand(3, size, size) for _ in range(args.batch_size)]
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.55, 0.5, 0.9, 0.8]]) * size
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2])} for _ in images]
    models = {name: retinanet(name, num_classes=num_classes, min_size=size, max_size=size) for name in args.backbones}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}

    def train_step(name: str) -> float:
        model, optimizer = models[name], optimizers[name]
        model.train()
        start = time.perf_counter()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    @torch.no_grad()
    def infer_step(name: str) -> float:
        models[name].eval()
        start = time.perf_counter()
        models[name](images)
        return time.perf_counter() - start

    times = {name: {"train": [], "infer": []} for name in models}
    for round_index in range(args.speed_warmup + args.speed_rounds):
        order = list(models)[round_index % len(models):] + list(models)[:round_index % len(models)]
        for name in order:
            train_s, infer_s = train_step(name), infer_step(name)
            if round_index >= args.speed_warmup:
                times[name]["train"].append(train_s)
                times[name]["infer"].append(infer_s)
    return {
        name: {kind: round(float(torch.tensor(values).median()), 4) for kind, values in kinds.items()}
        for name, kinds in times.items()
    }


DATA_NOTES = {
    "trees": "the embedded tree crowns: 400x400 tiles of the two large deepforest images (real aerial RGB); "
             "val = the held-out bottom strip of those images, test = OSBS_029 + SOAP_061 (98 boxes)",
    "fashion": "the embedded Fashion-MNIST canvases (real objects, synthetic layout, 160x160, boxes only); "
               "val = canvases of Fashion-MNIST test images",
}


def table(results: list[dict], args: argparse.Namespace, speed: dict | None) -> str:
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
        f"thread(s), {machine()}, torch {torch.__version__}; times on a shared machine are indicative only. AP: "
        "COCO box AP (pycocotools) of the final weights."
    )
    text = "\n".join(lines) + "\n\n" + budget + "\n"
    if speed:
        base_speed = speed[args.backbones[0]]
        text += (
            f"\nStep times (median of {args.speed_rounds} interleaved rounds after {args.speed_warmup} warm-up, "
            f"batch {args.batch_size} at {args.min_size}x{args.min_size}, same process):\n\n"
            f"| backbone | train step (s) | vs {args.backbones[0]} | inference (s) | vs {args.backbones[0]} |\n"
            "|---|---|---|---|---|\n"
        )
        for name, t in speed.items():
            text += (f"| {name} | {t['train']:.3f} | {t['train'] / base_speed['train']:.2f} | {t['infer']:.3f} | "
                     f"{t['infer'] / base_speed['infer']:.2f} |\n")
    return text + f"\nWritten by `{command_line()}`.\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="benchmarks/results/detection_backbones")
    parser.add_argument("--backbones", nargs="+", default=["cyclemlp_b1", "resnet50", "resnet18"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--warmup-iters", type=int, default=100)
    parser.add_argument("--milestones", type=int, nargs="*", default=[2])
    parser.add_argument("--min-size", type=int, default=160)
    parser.add_argument("--max-size", type=int, default=160)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--dataset", choices=sorted(DETECTION_DATASETS), default="fashion")
    parser.add_argument("--train-subset", type=int, default=400, help="train on the first N training images only "
                        "(0: all)")
    parser.add_argument("--speed-rounds", type=int, default=10,
                        help="timed rounds of the step-time comparison (0: skip)")
    parser.add_argument("--speed-warmup", type=int, default=2)
    args = parser.parse_args(argv)
    results = [run_backbone(name, args) for name in args.backbones]
    speed = None
    speed_path = Path(args.output) / "speed.json"
    if args.speed_rounds:
        if speed_path.is_file():
            speed = json.loads(speed_path.read_text())
        else:
            speed = step_times(args, len(_datasets(args)[2]) + 1)
            atomic_write(speed_path, lambda tmp: Path(tmp).write_text(json.dumps(speed, indent=1)))
    text = table(results, args, speed)
    out = Path(args.output)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(
        {"settings": vars(args), "results": results, "step_times": speed}, indent=1)))
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(text))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
