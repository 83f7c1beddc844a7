"""CycleMLP against timm peers on Fashion-MNIST, each with the same input pipeline, recipe and
wall-clock budget.

    python -m benchmarks.fashion_mnist.run --budget-min 60            # the issue's budget
    python -m benchmarks.fashion_mnist.run --budget-min 10 --models cyclemlp resnet18
    python -m benchmarks.fashion_mnist.run --budget-min 30 --jobs 2      # two models at a time
    python -m benchmarks.fashion_mnist.run --budget-min 30 --reprob 0.25 # random erasing for every model
    python -m benchmarks.fashion_mnist.run --budget-min 30 --drop-path 0.1 # stochastic depth for every model
    python -m benchmarks.fashion_mnist.run --budget-min 60 --mixup 0.2 --weight-decay 0.1  # other recipe values
    python -m benchmarks.fashion_mnist.run --budget-min 60 --model-ema 0.999  # also evaluate a weight EMA
    python -m benchmarks.fashion_mnist.run --budget-min 60 --lr 1.5e-3     # another peak learning rate
    python -m benchmarks.fashion_mnist.run --budget-min 60 --pad-crop 2    # random translation by up to 2 px

Fairness: every model sees the same images — Fashion-MNIST resized from 28x28 to 32x32
(bilinear; 32 is the smallest size every peer's stride-32 network accepts), one grey channel —
and keeps its own, unmodified stem (each reduces by 4 before its first stage, so every model's
first stage works on the same 8x8 grid). Same augmentation, optimizer,
schedule and batch (the ``fashion-mnist`` recipe), same seed.

Budget: minutes of CPU time per model — on an idle machine with one training thread, wall-clock
minutes. Before any training, every model's training throughput (images per CPU second: a few
optimizer steps at the real input size, after warm-up steps) is measured, back to back; the budget then becomes a
number of training images (85 % of budget x throughput; the rest pays for evaluation), split into ``epochs`` rounds of
``samples_per_epoch`` images, each followed by an evaluation on the 10,000 test images, under a
cosine schedule that ends exactly at the budget. The plan is stored, so an interrupted benchmark
resumes model by model (a finished model is not retrained; a killed one continues from its last
checkpoint). The table reports the budget, the CPU time actually used and the wall time (which
on a shared machine also counts the time other programs took).

Outputs in ``--output``: ``results.json``, ``results.csv``, ``results.md`` and one run folder per
model (checkpoints, metrics, curves).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

import cyclemlp  # noqa: F401  (registers CycleMLP with timm)
from cyclemlp.cli.malloc import add_malloc_argument, apply_malloc_choice, malloc_in_force
from cyclemlp.io import atomic_write
from cyclemlp.tools.flops import count_cost
from cyclemlp.training.train import TrainConfig, recipe, train

TRAIN_IMAGES = 60000
EVAL_IMAGES = 10000
# Recipe values the benchmark can change, for every model alike: key -> (flag, description, largest value).
RECIPE_OPTIONS = {
    "reprob": ("--reprob", "random erasing", 1.0), "drop_path": ("--drop-path", "drop path", 1.0),
    "weight_decay": ("--weight-decay", "weight decay", 1.0), "mixup": ("--mixup", "Mixup alpha", 10.0),
    "cutmix": ("--cutmix", "CutMix alpha", 10.0),
    "model_ema_decay": ("--model-ema", "weight EMA decay", 1.0),
    "lr": ("--lr", "learning rate", 1.0), "pad_crop": ("--pad-crop", "translation padding", 8),
}


def recipe_settings() -> dict[str, float]:
    """The ``fashion-mnist`` recipe's value of every ``RECIPE_OPTIONS`` key; an EMA decay of 0
    stands for no weight EMA (the recipe keeps none)."""
    values = recipe("fashion-mnist")
    decay = values.get("model_ema_decay", TrainConfig.model_ema_decay) if values["model_ema"] else 0.0
    return {key: decay if key == "model_ema_decay" else values.get(key, getattr(TrainConfig, key))
            for key in RECIPE_OPTIONS}


@dataclass
class Entry:
    """One contestant: a display name, a timm model and its arguments."""

    name: str
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)


# The CycleMLP of the benchmark: B1's layout (SPEC §2: conv stem, 4 stages, stepsize 3) at 3/4 of
# its width and one block per stage (two in stage 3).
CYCLEMLP = Entry("cyclemlp", "cyclemlp_b1", dict(dims=(48, 96, 192, 384), depths=(1, 1, 2, 1)))
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


def measure_throughput(entry: Entry, img_size: int, batch_size: int, threads: int, steps: int = 60,
                       warmup: int = 8) -> float:
    """Training images per CPU second of ``entry`` (forward, backward, AdamW step) at ``img_size``.

    CPU time of this process, not wall time: on a shared machine the wall time depends on what
    else runs, the CPU time a model needs much less (with one thread it is the wall time of an
    idle machine). ``warmup`` steps first (allocation, oneDNN kernel selection), then ``steps``
    timed ones. Single steps vary by about 10 % and drift in slower and faster phases, so short
    probes misjudge: 6 timed steps after 2 missed a steady speed by about 10 %; with two threads, a
    20-step and a 60-step probe back to back on an idle machine gave CycleMLP 455 and 549, resnet18
    291 and 250 images per CPU second. 60 steps average over more of that drift; none removes it."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(entry.model, num_classes=10, in_chans=1, **entry.kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # the training runs' step
    images, targets = torch.randn(batch_size, 1, img_size, img_size), torch.randint(0, 10, (batch_size,))
    model.train()
    for i in range(steps + warmup):
        if i == warmup:
            start = time.process_time()
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch_size / (time.process_time() - start)


def plan(entry: Entry, budget_s: float, args: argparse.Namespace) -> dict[str, Any]:
    """Epoch rounds and images per round that fill ``budget_s`` for this model on this machine."""
    speed = measure_throughput(entry, args.img_size, args.batch_size, args.threads)
    images = 0.85 * budget_s * speed * args.threads
    # About one evaluation per 30,000 training images (at least 2, at most 30 rounds).
    epochs = int(min(30, max(2, round(images / 30000))))
    per_epoch = max(args.batch_size, int(images / epochs) // args.batch_size * args.batch_size)
    return dict(measured_img_per_cpu_s=round(speed, 1), epochs=epochs, samples_per_epoch=per_epoch,
                planned_train_images=epochs * per_epoch, budget_s=budget_s)


def config_for(entry: Entry, run_plan: dict[str, Any], out: Path, args: argparse.Namespace) -> TrainConfig:
    values = recipe("fashion-mnist")
    values.update(
        model=entry.model, model_kwargs=dict(entry.kwargs), dataset="fashion-mnist", img_size=args.img_size,
        batch_size=args.batch_size, epochs=run_plan["epochs"], samples_per_epoch=run_plan["samples_per_epoch"],
        # the recipe's warm-up (0.3 passes over the data), in rounds, at most a fifth of the schedule
        warmup_epochs=round(min(values["warmup_epochs"] * TRAIN_IMAGES / run_plan["samples_per_epoch"],
                                0.2 * run_plan["epochs"]), 3),
        workers=args.workers, threads=args.threads, seed=args.seed,
        output=str(out), progress=not args.no_progress, recipe="fashion-mnist",
    )
    for key in RECIPE_OPTIONS:
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.model_ema_decay is not None:
        values["model_ema"] = args.model_ema_decay > 0
    if (out / "last.pth").exists():
        values.update(output=None, resume=str(out))
    return TrainConfig(**values)


def plan_entry(entry: Entry, args: argparse.Namespace) -> dict[str, Any]:
    """The stored plan of ``entry``, measured now if there is none."""
    plan_path = Path(args.output) / entry.name / "plan.json"
    check_same_model(entry, plan_path.parent)
    if plan_path.exists():
        return json.loads(plan_path.read_text())
    run_plan = plan(entry, args.budget_min * 60, args)
    run_plan.update(model=entry.model, kwargs=entry.kwargs)
    atomic_write(plan_path, lambda tmp: Path(tmp).write_text(json.dumps(run_plan, indent=1)))
    return run_plan


def check_same_model(entry: Entry, folder: Path) -> None:
    """Stop if ``folder`` holds a run of another model or other arguments than ``entry`` (its plan or
    its training configuration says which): continuing it, or reporting its result under
    ``entry``'s name and size, would mix two models."""
    made = None
    for path, model_key, kwargs_key in ((folder / "plan.json", "model", "kwargs"),
                                        (folder / "config.json", "model", "model_kwargs")):
        if path.exists():
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise SystemExit(f"{path} cannot be read ({err}); move the folder aside or pass another --output") from err
            stored = stored.get("config", stored) if isinstance(stored, dict) else {}
            if model_key in stored:
                made = (stored[model_key], stored.get(kwargs_key, {}))
                break
    wanted = (entry.model, json.loads(json.dumps(entry.kwargs)))  # tuples as JSON lists
    if made is not None and (made[0], made[1]) != wanted:
        raise SystemExit(f"{folder} holds a run of {made[0]} with arguments {json.dumps(made[1])}, not "
                         f"{entry.model} with {json.dumps(wanted[1])}; pass those arguments to continue it, "
                         f"or another --output")


def run_entry(entry: Entry, args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.output) / entry.name
    run_plan = plan_entry(entry, args)
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
        cpu_min=round(sum(r.get("cpu_s", math.nan) for r in rows) / 60, 1),
        train_img_per_s=round(sum(r["train_img_per_s"] for r in rows) / len(rows), 1),
        data_passes=round(run_plan["planned_train_images"] / TRAIN_IMAGES, 2), epochs=len(rows),
        top1=round(last["eval_top1"], 2), best_top1=round(best["eval_top1"], 2), top5=round(last["eval_top5"], 2),
        ema_top1=round(last["eval_ema_top1"], 2) if "eval_ema_top1" in last else None,
    )


COLUMNS = [
    ("model", "model"), ("params_m", "params (M)"), ("mmacs", "MMACs/img"), ("budget_min", "budget (CPU min)"),
    ("cpu_min", "used (CPU min)"), ("wall_min", "wall (min)"), ("train_img_per_s", "train img/s"), ("data_passes", "passes over data"),
    ("top1", "test top-1 (%)"), ("best_top1", "best top-1 (%)"), ("top5", "test top-5 (%)"),
    ("ema_top1", "EMA weights top-1 (%)"),
]


def changed_option(conditions: dict[str, Any], settings: dict[str, float]) -> str | None:
    """The first recipe option of ``settings`` that differs from the run folder's ``conditions``
    (as "random erasing 0.25; pass --reprob 0.25 to continue it"), or None."""
    defaults = recipe_settings()
    for key, (flag, what, _) in RECIPE_OPTIONS.items():
        made = conditions.get(key, defaults[key])  # runs made before an option existed used the recipe's value
        if made != settings[key]:
            return f"{what} {made}; pass {flag} {made} to continue it"
    return None


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
        lines.append("| " + " | ".join("-" if row.get(key) is None else str(row[key]) for key, _ in COLUMNS) + " |")
    defaults = recipe_settings()
    changed = [f"{what} {conditions[key]}" for key, (_, what, _) in RECIPE_OPTIONS.items()
               if conditions.get(key, defaults[key]) != defaults[key]]
    notes = [
        "", f"Fashion-MNIST test set (10,000 images); input {conditions['img_size']}x{conditions['img_size']} grey "
        f"(resized from 28x28), every model with its own stem; recipe `fashion-mnist`"
        f"{' with ' + ' and '.join(changed) if changed else ''}; budget "
        f"{conditions['budget_min']} CPU minutes per model; {conditions['threads']} torch thread(s) + "
        f"{conditions['workers']} loader worker(s) per run; allocator {conditions.get('malloc', 'default')}; "
        f"{conditions['machine']}; load average "
        f"{conditions['load_start']} at the start, {conditions.get('load_end')} at the end; {conditions['started']}.",
    ]
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text("\n".join(lines + notes) + "\n"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cyclemlp", "resnet18", "pvt_v2_b0", "convnext_atto"],
                        help="contestants: cyclemlp, " + ", ".join(PEERS) + " or any timm model")
    parser.add_argument("--budget-min", type=float, default=60.0,
                        help="CPU minutes per model and thread (= wall minutes on an idle machine; default 60)")
    parser.add_argument("--img-size", type=int, default=32, help="input size for every model (default 32)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--workers", type=int, default=1, help="data-loading processes per run (default 1)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--reprob", type=float, default=None, metavar="P",
                        help="random erasing probability for every model (default: the recipe's, 0)")
    parser.add_argument("--drop-path", type=float, default=None, metavar="P",
                        help="stochastic depth (drop path rate) for every model (default: the recipe's, 0)")
    parser.add_argument("--weight-decay", type=float, default=None, metavar="WD",
                        help="AdamW weight decay for every model (default: the recipe's, 0.05)")
    parser.add_argument("--mixup", type=float, default=None, metavar="ALPHA",
                        help="Mixup alpha for every model (timm's Mixup; default: the recipe's, 0 = off)")
    parser.add_argument("--cutmix", type=float, default=None, metavar="ALPHA",
                        help="CutMix alpha for every model (with --mixup: switched per batch; default 0 = off)")
    parser.add_argument("--model-ema", dest="model_ema_decay", type=float, default=None, metavar="DECAY",
                        help="also keep an exponential moving average of the weights with this per-step decay and "
                        "evaluate it every round (timm's ModelEmaV3; default: the recipe's, 0 = none)")
    parser.add_argument("--lr", type=float, default=None, metavar="LR",
                        help="peak learning rate of the cosine schedule for every model (default: the recipe's, 3e-3)")
    parser.add_argument("--pad-crop", type=int, default=None, metavar="N",
                        help="random translation for every model: pad by N black pixels and crop back to size "
                        "(default: the recipe's, 0 = none)")
    parser.add_argument("--cyclemlp-kwargs", type=json.loads, default=None, metavar="JSON",
                        help=f"CycleMLP arguments (default {json.dumps(CYCLEMLP.kwargs)})")
    parser.add_argument("--output", default="benchmarks/fashion_mnist/results", help="results folder")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--jobs", type=int, default=1,
                        help="contestants trained at the same time, each in its own process (default 1); the "
                        "plans (throughput) are measured first, one model at a time")
    add_malloc_argument(parser, fallback="default")
    parser.add_argument("--only", metavar="NAME", help=argparse.SUPPRESS)  # internal: one contestant of --jobs
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1; got {args.jobs}")
    try:
        apply_malloc_choice(args.malloc, fallback="default")
    except ValueError as err:
        parser.error(str(err))
    if args.only is not None:
        args.models = [args.only]
    out = Path(args.output)
    conditions_path = out / "conditions.json"
    conditions = json.loads(conditions_path.read_text()) if conditions_path.exists() else dict(
        started=time.strftime("%Y-%m-%d %H:%M"), machine=f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}",
        torch=torch.__version__, timm=timm.__version__, load_start=round(os.getloadavg()[0], 1),
        malloc=malloc_in_force(),
    )
    defaults = recipe_settings()
    settings = {key: defaults[key] if getattr(args, key) is None else getattr(args, key) for key in RECIPE_OPTIONS}
    for key, (flag, _, largest) in RECIPE_OPTIONS.items():
        if not 0.0 <= settings[key] <= largest:
            parser.error(f"{flag} must be within [0, {largest:g}]; got {settings[key]}")
    if settings["lr"] <= 0:
        parser.error(f"--lr must be positive; got {settings['lr']}")
    if conditions_path.exists():
        problem = changed_option(conditions, settings)
        if problem:
            parser.error(f"{out} holds a benchmark run with {problem}, or another --output")
        if conditions.get("malloc", "default") != malloc_in_force():  # older runs: glibc's defaults
            parser.error(f"{out} holds a benchmark run under --malloc {conditions.get('malloc', 'default')}; "
                         f"pass that (this one runs under {malloc_in_force()}), or another --output")
    conditions.update(budget_min=args.budget_min, img_size=args.img_size, threads=args.threads, workers=args.workers,
                      batch_size=args.batch_size, **settings)
    atomic_write(conditions_path, lambda tmp: Path(tmp).write_text(json.dumps(conditions, indent=1)))
    results_path = out / "results.json"
    previous = json.loads(results_path.read_text())["results"] if results_path.exists() else []
    rows = {row["model"]: row for row in previous}  # models benchmarked by earlier invocations stay
    contestants = entries(args.models, args.cyclemlp_kwargs)
    for entry in contestants:  # all speed measurements first, under the same conditions
        plan_entry(entry, args)
    if args.only is not None:  # one contestant, in a process started by --jobs
        row = run_entry(contestants[0], args)
        atomic_write(out / contestants[0].name / "row.json", lambda tmp: Path(tmp).write_text(json.dumps(row)))
        return 0
    if args.jobs == 1:
        for entry in contestants:
            rows[entry.name] = run_entry(entry, args)
            conditions["load_end"] = round(os.getloadavg()[0], 1)
            write_tables(list(rows.values()), conditions, out)
    else:
        for entry, row in run_parallel(contestants, args, argv if argv is not None else sys.argv[1:]):
            rows[entry.name] = row
            conditions["load_end"] = round(os.getloadavg()[0], 1)
            write_tables(list(rows.values()), conditions, out)
    print((out / "results.md").read_text())
    return 0


def run_parallel(contestants: list[Entry], args: argparse.Namespace, argv: list[str]):
    """Train ``args.jobs`` contestants at a time, each in its own process (``--only NAME``), and
    yield ``(entry, row)`` as they finish. Budgets are CPU time turned into image counts before any
    training, so running side by side changes the wall time, not what a model learns."""
    pending, running = list(contestants), {}
    failed = []
    try:
        while pending or running:
            while pending and len(running) < args.jobs:
                entry = pending.pop(0)
                cmd = [sys.executable, "-m", "benchmarks.fashion_mnist.run", *strip_jobs(argv), "--only", entry.name,
                       "--no-progress"]
                log = open(Path(args.output) / entry.name / "log.txt", "a")
                running[entry.name] = (entry, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
                print(f"[{entry.name}] training in process {running[entry.name][1].pid} "
                      f"(log {Path(args.output) / entry.name / 'log.txt'})", flush=True)
            time.sleep(1.0)
            for name, (entry, proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                if proc.returncode != 0:
                    failed.append(f"{name} (exit status {proc.returncode}, see {Path(args.output) / name / 'log.txt'})")
                    continue
                yield entry, json.loads((Path(args.output) / name / "row.json").read_text())
    finally:  # interrupted: stop the children (each resumes from its last checkpoint next time)
        for _, proc, log in running.values():
            proc.terminate()
            proc.wait()
            log.close()
    if failed:
        raise SystemExit("benchmark runs failed: " + "; ".join(failed))


def strip_jobs(argv: list[str]) -> list[str]:
    """``argv`` without ``--jobs N`` / ``--jobs=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--jobs":
            skip = True
        elif not arg.startswith("--jobs="):
            out.append(arg)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
