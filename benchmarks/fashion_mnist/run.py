"""CycleMLP against timm peers on Fashion-MNIST, each with the same input pipeline, recipe and
wall-clock budget.

    python -m benchmarks.fashion_mnist.run --budget-min 60            # the issue's budget
    python -m benchmarks.fashion_mnist.run --budget-min 10 --models cyclemlp resnet18

Fairness: every model sees the same images — Fashion-MNIST upsampled from 28x28 to 56x56
(bilinear), one grey channel — and keeps its own, unmodified stem (all of them reduce by 4 at
the stem, so every model's first stage works on a 14x14 grid). Same augmentation, optimizer,
schedule and batch (the ``fashion-mnist`` recipe), same seed.

Budget: before training, each model's training throughput is measured on this machine (a few
optimizer steps on the real input size); the budget then becomes a number of training images
(85 % of budget x throughput; the rest pays for evaluation), split into ``epochs`` rounds of
``samples_per_epoch`` images, each followed by an evaluation on the 10,000 test images, under a
cosine schedule that ends exactly at the budget. The plan is stored, so an interrupted benchmark
resumes model by model (a finished model is not retrained; a killed one continues from its last
checkpoint). The table reports the planned budget and the wall time actually used.

Outputs in ``--output``: ``results.json``, ``results.csv``, ``results.md`` and one run folder per
model (checkpoints, metrics, curves).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

import cyclemlp  # noqa: F401  (registers CycleMLP with timm)
from cyclemlp.checkpoint import atomic_write
from cyclemlp.flops import count_cost
from cyclemlp.train import TrainConfig, recipe, train

TRAIN_IMAGES = 60000
EVAL_IMAGES = 10000


@dataclass
class Entry:
    """One contestant: a display name, a timm model and its arguments."""

    name: str
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)


# The CycleMLP of the benchmark: B1's layout at half its width (SPEC §2 shape, 4 stages, stepsize 3).
CYCLEMLP = Entry("cyclemlp", "cyclemlp_b1", dict(dims=(32, 64, 160, 256), depths=(2, 2, 4, 2)))
PEERS = {
    "resnet18": Entry("resnet18", "resnet18"),
    "pvt_v2_b0": Entry("pvt_v2_b0", "pvt_v2_b0"),
    "convnext_atto": Entry("convnext_atto", "convnext_atto"),
    "resmlp_12": Entry("resmlp_12", "resmlp_12_224", dict(img_size=56, patch_size=4)),
}


def entries(names: list[str], cyclemlp_kwargs: dict[str, Any] | None) -> list[Entry]:
    out = []
    for name in names:
        if name == "cyclemlp":
            out.append(Entry("cyclemlp", CYCLEMLP.model, dict(cyclemlp_kwargs or CYCLEMLP.kwargs)))
        elif name in PEERS:
            out.append(PEERS[name])
        elif timm.is_model(name):
            out.append(Entry(name, name))
        else:
            raise SystemExit(f"unknown model {name!r}: use cyclemlp, {', '.join(PEERS)} or a timm model name")
    return out


def measure_throughput(entry: Entry, img_size: int, batch_size: int, threads: int, steps: int = 6) -> float:
    """Training images per second of ``entry`` (forward, backward, AdamW step) at ``img_size``."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(entry.model, num_classes=10, in_chans=1, **entry.kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, targets = torch.randn(batch_size, 1, img_size, img_size), torch.randint(0, 10, (batch_size,))
    model.train()
    for i in range(steps + 2):
        if i == 2:  # the first steps allocate and warm up
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch_size / (time.perf_counter() - start)


def plan(entry: Entry, budget_s: float, args: argparse.Namespace) -> dict[str, Any]:
    """Epoch rounds and images per round that fill ``budget_s`` for this model on this machine."""
    speed = measure_throughput(entry, args.img_size, args.batch_size, args.threads)
    images = 0.85 * budget_s * speed
    # About one evaluation per 30,000 training images (at least 2, at most 30 rounds).
    epochs = int(min(30, max(2, round(images / 30000))))
    per_epoch = max(args.batch_size, int(images / epochs) // args.batch_size * args.batch_size)
    return dict(measured_img_per_s=round(speed, 1), epochs=epochs, samples_per_epoch=per_epoch,
                planned_train_images=epochs * per_epoch, budget_s=budget_s)


def config_for(entry: Entry, run_plan: dict[str, Any], out: Path, args: argparse.Namespace) -> TrainConfig:
    values = recipe("fashion-mnist")
    values.update(
        model=entry.model, model_kwargs=dict(entry.kwargs), dataset="fashion-mnist", img_size=args.img_size,
        batch_size=args.batch_size, epochs=run_plan["epochs"], samples_per_epoch=run_plan["samples_per_epoch"],
        warmup_epochs=min(1, run_plan["epochs"] - 1), workers=args.workers, threads=args.threads, seed=args.seed,
        output=str(out), progress=not args.no_progress, recipe="fashion-mnist",
    )
    if (out / "last.pth").exists():
        values.update(output=None, resume=str(out))
    return TrainConfig(**values)


def run_entry(entry: Entry, args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.output) / entry.name
    plan_path = out / "plan.json"
    if plan_path.exists():
        run_plan = json.loads(plan_path.read_text())
    else:
        run_plan = plan(entry, args.budget_min * 60, args)
        atomic_write(plan_path, lambda tmp: Path(tmp).write_text(json.dumps(run_plan, indent=1)))
    print(f"[{entry.name}] plan: {run_plan}", flush=True)
    if not (out / "model.safetensors").exists():
        train(config_for(entry, run_plan, out, args))
    rows = json.loads((out / "metrics.json").read_text())
    model = timm.create_model(entry.model, num_classes=10, in_chans=1, **entry.kwargs)
    cost = count_cost(model, (args.img_size, args.img_size))
    last, best = rows[-1], max(rows, key=lambda r: r["eval_top1"])
    return dict(
        model=entry.name, timm_name=entry.model, kwargs=json.dumps(entry.kwargs), params_m=round(cost.params_m, 2),
        mmacs=round(cost.gmacs * 1000, 1), budget_min=round(run_plan["budget_s"] / 60, 1),
        wall_min=round(sum(r["epoch_s"] for r in rows) / 60, 1),
        train_img_per_s=round(sum(r["train_img_per_s"] for r in rows) / len(rows), 1),
        data_passes=round(run_plan["planned_train_images"] / TRAIN_IMAGES, 2), epochs=len(rows),
        top1=round(last["eval_top1"], 2), best_top1=round(best["eval_top1"], 2), top5=round(last["eval_top5"], 2),
    )


COLUMNS = [
    ("model", "model"), ("params_m", "params (M)"), ("mmacs", "MMACs/img"), ("budget_min", "budget (min)"),
    ("wall_min", "wall (min)"), ("train_img_per_s", "train img/s"), ("data_passes", "passes over data"),
    ("top1", "test top-1 (%)"), ("best_top1", "best top-1 (%)"), ("top5", "test top-5 (%)"),
]


def write_tables(rows: list[dict[str, Any]], conditions: dict[str, Any], out: Path) -> None:
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(
        json.dumps(dict(conditions=conditions, results=rows), indent=1)))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "results.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()))
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in sorted(rows, key=lambda r: -r["top1"]):
        lines.append("| " + " | ".join(str(row[key]) for key, _ in COLUMNS) + " |")
    notes = [
        "", f"Fashion-MNIST test set (10,000 images); input {conditions['img_size']}x{conditions['img_size']} grey "
        f"(upsampled from 28x28), every model with its own stem; recipe `fashion-mnist`; budget "
        f"{conditions['budget_min']} min per model; {conditions['threads']} torch thread(s) + "
        f"{conditions['workers']} loader worker(s) per run; {conditions['machine']}; load average "
        f"{conditions['load_start']} at the start, {conditions.get('load_end')} at the end; {conditions['started']}.",
    ]
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text("\n".join(lines + notes) + "\n"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cyclemlp", "resnet18", "pvt_v2_b0", "convnext_atto"],
                        help="contestants: cyclemlp, " + ", ".join(PEERS) + " or any timm model")
    parser.add_argument("--budget-min", type=float, default=60.0, help="wall-clock minutes per model (default 60)")
    parser.add_argument("--img-size", type=int, default=56, help="input size for every model (default 56)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--workers", type=int, default=1, help="data-loading processes per run (default 1)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cyclemlp-kwargs", type=json.loads, default=None, metavar="JSON",
                        help=f"CycleMLP arguments (default {json.dumps(CYCLEMLP.kwargs)})")
    parser.add_argument("--output", default="benchmarks/fashion_mnist/results", help="results folder")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.output)
    conditions_path = out / "conditions.json"
    conditions = json.loads(conditions_path.read_text()) if conditions_path.exists() else dict(
        started=time.strftime("%Y-%m-%d %H:%M"), machine=f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}",
        torch=torch.__version__, timm=timm.__version__, load_start=round(os.getloadavg()[0], 1),
    )
    conditions.update(budget_min=args.budget_min, img_size=args.img_size, threads=args.threads, workers=args.workers,
                      batch_size=args.batch_size)
    atomic_write(conditions_path, lambda tmp: Path(tmp).write_text(json.dumps(conditions, indent=1)))
    rows = []
    for entry in entries(args.models, args.cyclemlp_kwargs):
        rows.append(run_entry(entry, args))
        conditions["load_end"] = round(os.getloadavg()[0], 1)
        write_tables(rows, conditions, out)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
