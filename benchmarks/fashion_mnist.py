"""CycleMLP against timm peers on Fashion-MNIST: the same data, recipe and CPU budget for each.

    python -m benchmarks.fashion_mnist                         # the table in benchmarks/results/fashion_mnist
    python -m benchmarks.fashion_mnist --jobs 2                # two models at a time
    python -m benchmarks.fashion_mnist --report                # rebuild the tables from the run folders
    python -m benchmarks.fashion_mnist --budget-min 5 --models cyclemlp resnet18 --output /tmp/quick

Conditions (every model alike): Fashion-MNIST resized from 28x28 to 32x32 (bilinear; 32 is the
smallest size every peer's stride-32 network accepts), one grey channel, each model with its
own, unmodified stem; the ``fashion-mnist`` recipe (AdamW, peak lr 3e-3, cosine schedule, label
smoothing 0.1, flips, random erasing 0.25) with a random translation of up to 2 pixels; the same
seed; ``--threads`` torch threads and one loader process per run; freed memory kept in the
process (``--malloc keep``). CycleMLP is the recipe's model (B1's layout at 3/4 width, depths
1/1/2/1). ``--set KEY=VALUE`` changes a recipe value for every model.

Budget: CPU minutes per model and thread. Before any training each model's training throughput
(images per CPU second: 60 optimizer steps at the real input size after 8 warm-up steps) is
measured, back to back; the budget becomes a number of training images (85 % of budget x
throughput x threads; the rest pays for evaluation), split into rounds of ``samples_per_epoch``
images, each followed by an evaluation on the 10,000 test images, under a cosine schedule that
ends exactly at the budget. The plans are stored, so an interrupted benchmark continues model by
model (a finished run is left as it is; a killed one resumes from its last checkpoint).

Outputs in ``--output``: ``conditions.json``, ``results.json``, ``results.csv``, ``results.md``
(the table, its conditions and the command) and one run folder per model.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

import cyclemlp  # noqa: F401  (registers CycleMLP with timm)
from cyclemlp.cli._args import parse_kwargs
from cyclemlp.cli.malloc import add_malloc_argument, apply_malloc_choice, malloc_in_force
from cyclemlp.io import atomic_write
from cyclemlp.tools.environment import machine
from cyclemlp.tools.flops import count_cost
from cyclemlp.training.config import FASHION_MNIST, TrainConfig
from cyclemlp.training.record import RECORD
from cyclemlp.training.train import train

TRAIN_IMAGES = 60000
DEFAULT_OUTPUT = "benchmarks/results/fashion_mnist"
# the conditions of the table besides the recipe: translation by up to 2 pixels for every model
CONDITIONS = dict(pad_crop=2)


@dataclass
class Entry:
    """One contestant: a display name, a timm model and its arguments."""

    name: str
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)


CYCLEMLP = Entry("cyclemlp", FASHION_MNIST["model"], dict(FASHION_MNIST["model_kwargs"]))
PEERS = {name: Entry(name, name) for name in ("resnet18", "pvt_v2_b0", "convnext_atto")}


def entries(names: list[str]) -> list[Entry]:
    out = []
    for name in names:
        if name == "cyclemlp":
            out.append(CYCLEMLP)
        elif name in PEERS:
            out.append(PEERS[name])
        elif timm.is_model(name):
            out.append(Entry(name, name))
        else:
            raise SystemExit(f"unknown model {name!r}: use cyclemlp, {', '.join(PEERS)} or a timm model name")
    return out


def measure_throughput(entry: Entry, img_size: int, batch_size: int, threads: int, steps: int = 60,
                       warmup: int = 8) -> float:
    """Training images per CPU second of ``entry`` (forward, backward, fused AdamW step).

    CPU time of this process, not wall time: on a shared machine the wall time depends on what
    else runs, the CPU time a model needs much less. Single steps vary by about 10 % and drift, so
    60 steps are averaged after 8 warm-up steps (allocation, oneDNN kernel selection)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(entry.model, num_classes=10, in_chans=1, **entry.kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
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


def plan(entry: Entry, args: argparse.Namespace) -> dict[str, Any]:
    """Rounds and images per round that fill the budget for this model on this machine."""
    budget_s = args.budget_min * 60
    speed = measure_throughput(entry, FASHION_MNIST["img_size"], FASHION_MNIST["batch_size"], args.threads)
    images = 0.85 * budget_s * speed * args.threads
    # About one evaluation per 30,000 training images (at least 2, at most 30 rounds).
    epochs = int(min(30, max(2, round(images / 30000))))
    batch = FASHION_MNIST["batch_size"]
    per_epoch = max(batch, int(images / epochs) // batch * batch)
    return dict(measured_img_per_cpu_s=round(speed, 1), epochs=epochs, samples_per_epoch=per_epoch,
                planned_train_images=epochs * per_epoch, budget_s=budget_s, model=entry.model, kwargs=entry.kwargs)


def config_for(entry: Entry, run_plan: dict[str, Any], out: Path, args: argparse.Namespace) -> TrainConfig:
    """The training run of ``entry``: the recipe, the table's conditions and ``--set``, its plan."""
    # the recipe's warm-up (0.3 passes over the data), in rounds, at most a fifth of the schedule
    warmup = min(FASHION_MNIST["warmup_epochs"] * TRAIN_IMAGES / run_plan["samples_per_epoch"],
                 0.2 * run_plan["epochs"])
    return TrainConfig.from_recipe(
        "fashion-mnist", model=entry.model, model_kwargs=dict(entry.kwargs), **{**CONDITIONS, **args.set},
        epochs=run_plan["epochs"], samples_per_epoch=run_plan["samples_per_epoch"], warmup_epochs=round(warmup, 3),
        workers=args.workers, threads=args.threads, output=str(out), progress=not args.no_progress,
    )


def plan_entry(entry: Entry, args: argparse.Namespace) -> dict[str, Any]:
    """The stored plan of ``entry``, measured now if there is none."""
    path = Path(args.output) / entry.name / "plan.json"
    if path.exists():
        stored = json.loads(path.read_text())
        if (stored["model"], stored["kwargs"]) != (entry.model, json.loads(json.dumps(entry.kwargs))):
            raise SystemExit(f"{path.parent} holds a run of {stored['model']} {json.dumps(stored['kwargs'])}, not "
                             f"{entry.model} {json.dumps(entry.kwargs)}; pass another --output")
        return stored
    run_plan = plan(entry, args)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(run_plan, indent=1)))
    return run_plan


def run_entry(entry: Entry, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``entry`` (continuing its run folder if it has one) and return its table row."""
    out = Path(args.output) / entry.name
    run_plan = plan_entry(entry, args)
    print(f"[{entry.name}] plan: {run_plan}", flush=True)
    config = config_for(entry, run_plan, out, args)
    if (out / RECORD).exists():  # continue it; a finished run is left as it is
        config.resume = str(out)
    train(config)
    return table_row(entry, out)


def table_row(entry: Entry, out: Path) -> dict[str, Any]:
    run_plan = json.loads((out / "plan.json").read_text())
    rows = json.loads((out / "metrics.json").read_text())
    cost = count_cost(timm.create_model(entry.model, num_classes=10, in_chans=1, **entry.kwargs),
                      (FASHION_MNIST["img_size"],) * 2)
    last, best = rows[-1], max(rows, key=lambda r: r["eval_top1"])
    return dict(
        model=entry.name, timm_name=entry.model, kwargs=json.dumps(entry.kwargs), params_m=round(cost.params_m, 2),
        mmacs=round(cost.gmacs * 1000, 1), budget_min=round(run_plan["budget_s"] / 60, 1),
        wall_min=round(sum(r["epoch_s"] for r in rows) / 60, 1),
        cpu_min=round(sum(r.get("cpu_s", math.nan) for r in rows) / 60, 1),
        train_img_per_s=round(sum(r["train_img_per_s"] for r in rows) / len(rows), 1),
        data_passes=round(run_plan["planned_train_images"] / TRAIN_IMAGES, 2), epochs=len(rows),
        top1=round(last["eval_top1"], 2), best_top1=round(best["eval_top1"], 2), top5=round(last["eval_top5"], 2),
        finished=len(rows) == run_plan["epochs"],
    )


COLUMNS = [
    ("model", "model"), ("params_m", "params (M)"), ("mmacs", "MMACs/img"), ("budget_min", "budget (CPU min)"),
    ("cpu_min", "used (CPU min)"), ("wall_min", "wall (min)"), ("train_img_per_s", "train img/s"),
    ("data_passes", "passes over data"), ("top1", "test top-1 (%)"), ("best_top1", "best top-1 (%)"),
    ("top5", "test top-5 (%)"),
]


def write_tables(rows: list[dict[str, Any]], conditions: dict[str, Any], out: Path) -> None:
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(
        json.dumps(dict(conditions=conditions, results=rows), indent=1)))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "results.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()))
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in sorted(rows, key=lambda r: -r["top1"]):
        cells = [str(row[key]) + ("" if key != "model" or row.get("finished", True) else " (unfinished)")
                 for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    changes = ", ".join(f"{k}={v}" for k, v in conditions["recipe_changes"].items())
    notes = [
        "",
        f"Fashion-MNIST test set (10,000 images) after training on the 60,000 training images; input "
        f"{FASHION_MNIST['img_size']}x{FASHION_MNIST['img_size']} grey (resized from 28x28), every model with its "
        f"own stem; recipe `fashion-mnist` with {changes}; budget {conditions['budget_min']} CPU minutes per model "
        f"and thread; {conditions['threads']} torch thread(s) and {conditions['workers']} loader process(es) per "
        f"run; allocator {conditions['malloc']}; {conditions['machine']}; torch {conditions['torch']}, timm "
        f"{conditions['timm']}; load average {conditions['load_start']} at the start; started "
        f"{conditions['started']}.",
        "",
        f"Written by `{conditions['command']}`.",
    ]
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text("\n".join(lines + notes) + "\n"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cyclemlp", "resnet18", "pvt_v2_b0", "convnext_atto"],
                        help="contestants: cyclemlp, " + ", ".join(PEERS) + " or any timm model")
    parser.add_argument("--budget-min", type=float, default=60.0,
                        help="CPU minutes per model and thread (default 60)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (default 2)")
    parser.add_argument("--workers", type=int, default=1, help="data-loading processes per run (default 1)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="change a recipe value for every model, e.g. reprob=0.5 mixup=0.2")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"results folder (default {DEFAULT_OUTPUT})")
    parser.add_argument("--report", action="store_true", help="only rebuild the tables from the run folders")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--jobs", type=int, default=1,
                        help="contestants trained at the same time, each in its own process (default 1); the "
                        "plans (throughput) are measured first, one model at a time")
    add_malloc_argument(parser, fallback="keep")
    parser.add_argument("--only", metavar="NAME", help=argparse.SUPPRESS)  # internal: one contestant of --jobs
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1 or args.budget_min <= 0:
        parser.error("--jobs and --threads must be at least 1, --budget-min positive")
    try:
        args.set = parse_kwargs(args.set)
        apply_malloc_choice(args.malloc, fallback="keep")
        probe = config_for(CYCLEMLP, dict(epochs=2, samples_per_epoch=128), Path("unused"), args)
        probe.check()  # a --set value out of range, or not a setting
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output)
    conditions = dict(
        budget_min=args.budget_min, threads=args.threads, workers=args.workers, malloc=malloc_in_force(),
        recipe_changes={**CONDITIONS, **args.set},
    )
    path = out / "conditions.json"
    if path.exists():
        stored = json.loads(path.read_text())
        differ = sorted(k for k in conditions if stored.get(k) != json.loads(json.dumps(conditions[k])))
        if differ:
            raise SystemExit(f"{out} holds a benchmark under other conditions ({', '.join(differ)}: "
                             f"{', '.join(str(stored.get(k)) for k in differ)}); pass another --output")
        conditions = stored
    else:
        conditions.update(started=time.strftime("%Y-%m-%d %H:%M"), machine=machine(), torch=str(torch.__version__),
                          timm=timm.__version__, load_start=round(os.getloadavg()[0], 1),
                          command=shlex.join(["python", "-m", "benchmarks.fashion_mnist",
                                              *(argv if argv is not None else sys.argv[1:])]))
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(conditions, indent=1)))
    contestants = entries(args.models)
    rows: dict[str, dict[str, Any]] = {}
    results = out / "results.json"
    if results.exists():  # models benchmarked by earlier invocations stay in the table
        rows = {row["model"]: row for row in json.loads(results.read_text())["results"]}
    if args.report:
        for entry in contestants:
            if (out / entry.name / "metrics.json").exists():
                rows[entry.name] = table_row(entry, out / entry.name)
        if not rows:
            raise SystemExit(f"{out} holds no run to report")
        write_tables(list(rows.values()), conditions, out)
        print((out / "results.md").read_text())
        return 0
    for entry in contestants:  # all speed measurements first, under the same conditions
        plan_entry(entry, args)
    if args.only is not None:  # one contestant, in a process started by --jobs
        entry = next(e for e in contestants if e.name == args.only)
        row = run_entry(entry, args)
        atomic_write(out / entry.name / "row.json", lambda tmp: Path(tmp).write_text(json.dumps(row)))
        return 0
    finished = (((e, run_entry(e, args)) for e in contestants) if args.jobs == 1
                else run_parallel(contestants, args, argv if argv is not None else sys.argv[1:]))
    for entry, row in finished:
        rows[entry.name] = row
        write_tables(list(rows.values()), conditions, out)
    print((out / "results.md").read_text())
    return 0


def run_parallel(contestants: list[Entry], args: argparse.Namespace, argv: list[str]):
    """Train ``args.jobs`` contestants at a time, each in its own process (``--only NAME``), and
    yield ``(entry, row)`` as they finish. Budgets are CPU time turned into image counts before any
    training, so running side by side changes the wall time, not what a model learns."""
    pending, running, failed = list(contestants), {}, []
    try:
        while pending or running:
            while pending and len(running) < args.jobs:
                entry = pending.pop(0)
                cmd = [sys.executable, "-m", "benchmarks.fashion_mnist", *strip_jobs(argv), "--only", entry.name,
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
