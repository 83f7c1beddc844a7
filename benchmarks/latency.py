"""One image at a time: CPU latency of CycleMLP against same-accuracy peers, where its time goes,
whether int8 pays, batch 16 against a release, and CUDA where there is one.

The setting is FasterNet's (Chen et al., CVPR 2023, Table 3): batch 1, fp32, 224 px, one thread;
and the same at two threads. Every model of a table is timed in turns (one call of each per round),
so that a shared machine's drift hits all alike. Run it from the repository root:

    python -m benchmarks.latency                               # writes benchmarks/results/latency
    python -m benchmarks.latency --isa avx2 --output benchmarks/results/latency/avx2
    python -m benchmarks.latency --quick --output /tmp/latency  # a smoke run (a minute)

``--isa avx2`` re-runs the whole benchmark with PyTorch, oneDNN, MKL and FBGEMM held to AVX2 and
FMA (the vector instructions of a CPU without AVX-512 or VNNI), on the same machine.

It writes ``report.md`` and ``results.json`` into ``--output``. Sections:

* latency at batch 1, one and two threads: ms (fastest and median of the rounds), GFLOP/s
  (PyTorch's FLOP count of the readable form over the fastest time) and, for each goal, the ratio
  peer / CycleMLP from the fastest times and the spread of the per-round ratios;
* where CycleMLP's batch-1 time goes: operator self time by kind, and the wall time outside any
  operator (Python and dispatch);
* int8 (``cyclemlp.quantize_int8``) against fp32 at batch 1 in turns, and, given a trained
  Fashion-MNIST run (``--fashion-run``, e.g. the README's main command's), the test-set top-1 of
  both and their agreement;
* each model alone in its own process, with glibc's adaptive malloc thresholds and as shipped
  (page faults per image and ms);
* batch 16 at two threads against a git revision (``--against``, e.g. a release tag): the same
  models timed in child processes that take turns between the two source trees, with two peers as
  drift controls;
* CUDA batch 1 and 64, fp32 and bf16 autocast, where a CUDA device is present.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "src", ROOT / "tests"):  # the package, and the authors' formulation in tests/
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import timm  # noqa: E402
from deform_reference import deform_model  # noqa: E402

import cyclemlp  # noqa: E402
from benchmarks.op_breakdown import KINDS, breakdown  # noqa: E402
from cyclemlp import count_cost  # noqa: E402
from cyclemlp.io import atomic_write  # noqa: E402
from cyclemlp.tools.environment import environment  # noqa: E402

AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}


def _run_with_avx2(argv: list[str]) -> int:
    """Run this benchmark again in a process whose libraries are held to AVX2 (they read these
    variables when they load, so it has to be a new process)."""
    env = dict(os.environ, **AVX2_ENV)
    return subprocess.call([sys.executable, "-m", "benchmarks.latency", *argv], env=env, cwd=ROOT)


OURS = ["cyclemlp_b1", "cyclemlp_b2", "cyclemlp_t"]
DEFORM = {"deform_b1": "cyclemlp_b1", "deform_b2": "cyclemlp_b2"}  # the authors' construction
PEERS = ["resnet50", "poolformer_s12", "poolformer_s24", "convnext_tiny", "swin_tiny_patch4_window7_224",
         "pvt_v2_b1", "pvt_v2_b2"]
# (ours, peer, goal): ours must be faster than the peer by at least ``goal``
GOALS = [("cyclemlp_b1", "resnet50", 1.7), ("cyclemlp_b1", "poolformer_s12", 1.1),
         ("cyclemlp_b2", "convnext_tiny", 1.2), ("cyclemlp_b2", "swin_tiny_patch4_window7_224", 1.2),
         ("cyclemlp_b2", "poolformer_s24", 1.1)]
# compared for information, with no goal
OTHER_PAIRS = [("cyclemlp_b1", "deform_b1"), ("cyclemlp_b2", "deform_b2"), ("cyclemlp_b1", "pvt_v2_b1"),
               ("cyclemlp_b2", "pvt_v2_b2"), ("cyclemlp_t", "swin_tiny_patch4_window7_224")]
BATCH16_MODELS = ["cyclemlp_b1", "cyclemlp_b2", "resnet50", "pvt_v2_b1"]  # the last two: drift controls


def build(name: str) -> nn.Module:
    model = deform_model(DEFORM[name]) if name in DEFORM else timm.create_model(name)
    return model.eval()


def flops(name: str, size: int = 224) -> int:
    """FLOPs per image in PyTorch's convention (the authors' network counts as its twin)."""
    return count_cost(timm.create_model(DEFORM.get(name, name)), size).flops


def rounds(fns: dict[str, Callable[[], object]], count: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds of each call of each of ``fns``, called in turns for ``count`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(count):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def paired(times: dict[str, list[float]], ours: str, peer: str) -> dict:
    """peer / ours: from the fastest calls, and the median, 10th and 90th percentile of the
    per-round ratios (both called in the same round, so under the same load)."""
    per_round = [p / o for o, p in zip(times[ours], times[peer])]
    return dict(ours=ours, peer=peer, ratio=min(times[peer]) / min(times[ours]),
                round_median=statistics.median(per_round), round_p10=_quantile(per_round, 0.1),
                round_p90=_quantile(per_round, 0.9))


def _inference(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def call() -> object:
        with torch.inference_mode():
            return model(x)
    return call


# --- latency at batch 1 ---------------------------------------------------------------------------


def bench_latency(names: list[str], threads: int, count: int, cost: dict[str, int]) -> dict:
    torch.set_num_threads(threads)
    x = torch.randn(1, 3, 224, 224)
    models = {name: build(name) for name in names}
    times = rounds({name: _inference(model, x) for name, model in models.items()}, count)
    rows = [dict(model=name, ms=min(t) * 1e3, median_ms=statistics.median(t) * 1e3, p90_ms=_quantile(t, 0.9) * 1e3,
                 gflops=cost[name] / 1e9, gflop_s=cost[name] / min(t) / 1e9) for name, t in times.items()]
    goals = [dict(paired(times, ours, peer), goal=goal) for ours, peer, goal in GOALS
             if ours in times and peer in times]
    for goal in goals:
        goal["met"] = goal["ratio"] >= goal["goal"] and goal["round_median"] >= goal["goal"]
    others = [paired(times, ours, peer) for ours, peer in OTHER_PAIRS if ours in times and peer in times]
    return dict(threads=threads, rounds=count, models=rows, goals=goals, others=others)


# --- where the time goes ---------------------------------------------------------------------------


def bench_breakdown(name: str, steps: int, threads: int) -> dict:
    """Operator self time by kind at batch 1, and the wall time outside operators."""
    torch.set_num_threads(threads)
    model = build(name)
    x = torch.randn(1, 3, 224, 224)
    call = _inference(model, x)
    elapsed: list[float] = []

    def timed() -> None:
        start = time.perf_counter()
        call()
        elapsed.append(time.perf_counter() - start)

    top: dict[str, float] = {}
    kinds = breakdown(timed, steps, top)
    profiled = sum(elapsed[1:]) / steps  # the first call is breakdown's unprofiled warm-up
    wall = min(rounds({"model": call}, max(steps, 5))["model"])
    return dict(model=name, threads=threads, wall_ms=wall * 1e3, profiled_ms=profiled * 1e3,
                kinds={kind: seconds * 1e3 for kind, seconds in kinds.items()},
                outside_ms=max(profiled - sum(kinds.values()), 0.0) * 1e3,
                everything_else_top={k: v * 1e3 for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:6]})


# --- int8 -----------------------------------------------------------------------------------------


def bench_int8(names: list[str], threads: list[int], count: int) -> list[dict]:
    """fp32 against ``cyclemlp.quantize_int8`` at batch 1, in turns."""
    rows = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        x = torch.randn(1, 3, 224, 224)
        fns, pairs = {}, []
        for name in names:
            fp32 = build(name)
            int8 = cyclemlp.quantize_int8(fp32_copy(fp32))
            fns[f"{name} fp32"], fns[f"{name} int8"] = _inference(fp32, x), _inference(int8, x)
            pairs.append(name)
        times = rounds(fns, count)
        for name in pairs:
            rows.append(dict(paired(times, f"{name} int8", f"{name} fp32"), model=name, threads=n_threads,
                             fp32_ms=min(times[f"{name} fp32"]) * 1e3, int8_ms=min(times[f"{name} int8"]) * 1e3))
    return rows


def fp32_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


def fashion_int8(run: str, count: int) -> dict:
    """Top-1 on the Fashion-MNIST test set of a trained run, fp32 and int8, their agreement, and
    the batch-1 latency of both at one thread."""
    from cyclemlp.data import build_dataset, build_loader, build_transform
    from cyclemlp.models.factory import data_config, model_from_checkpoint

    fp32, record, _ = model_from_checkpoint(run)
    int8 = cyclemlp.quantize_int8(fp32_copy(fp32))
    cfg = data_config(fp32, record)
    dataset = build_dataset("fashion-mnist", None, "test", build_transform(cfg, False), in_chans=cfg["input_size"][0])
    loader = build_loader(dataset, 250, False, workers=0)
    torch.set_num_threads(os.cpu_count() or 1)
    hits = {"fp32": 0, "int8": 0}
    agree = total = 0
    with torch.inference_mode():
        for images, targets, _ in loader:
            a, b = fp32(images).argmax(1), int8(images).argmax(1)
            hits["fp32"] += int((a == targets).sum())
            hits["int8"] += int((b == targets).sum())
            agree += int((a == b).sum())
            total += len(targets)
    torch.set_num_threads(1)
    x = torch.randn(1, *cfg["input_size"])
    times = rounds({"int8": _inference(int8, x), "fp32": _inference(fp32, x)}, max(count, 10))
    return dict(run=str(run), images=total, input_size=list(cfg["input_size"]),
                fp32_top1=100 * hits["fp32"] / total, int8_top1=100 * hits["int8"] / total,
                agreement=100 * agree / total, **paired(times, "int8", "fp32"),
                fp32_ms=min(times["fp32"]) * 1e3, int8_ms=min(times["int8"]) * 1e3)


# --- batch 16 against a revision -------------------------------------------------------------------

CHILD = r"""
import json, sys, time, torch, timm
sys.path.insert(0, sys.argv[1])
import cyclemlp
torch.set_num_threads(2)
x = torch.randn(16, 3, 224, 224)
out = {}
models = {name: timm.create_model(name).eval() for name in sys.argv[3].split(",")}
with torch.inference_mode():
    for model in models.values():
        model(x)
    for _ in range(int(sys.argv[2])):
        for name, model in models.items():
            start = time.perf_counter(); model(x); out.setdefault(name, []).append(time.perf_counter() - start)
print(json.dumps({name: min(t) for name, t in out.items()}))
"""


def bench_against(revision: str, turns: int, calls: int) -> dict:
    """Batch 16, two threads: this tree and ``revision``'s, each in child processes, taking turns."""
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "tree"
        other.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(other)], input=archive.stdout, check=True)
        trees = {"this tree": ROOT / "src", revision: other / "src"}
        times: dict[str, dict[str, list[float]]] = {tree: {} for tree in trees}
        for _ in range(turns):
            for index, (tree, src) in enumerate(trees.items()):  # each tree builds its own native shift
                env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(Path(tmp) / "extensions" / str(index)))
                result = subprocess.run([sys.executable, "-c", CHILD, str(src), str(calls), ",".join(BATCH16_MODELS)],
                                        capture_output=True, text=True, env=env, check=True)
                for name, seconds in json.loads(result.stdout.strip().splitlines()[-1]).items():
                    times[tree].setdefault(name, []).append(seconds)
    rows = []
    for name in BATCH16_MODELS:
        new, old = min(times["this tree"][name]), min(times[revision][name])
        rows.append(dict(model=name, this_img_s=16 / new, revision_img_s=16 / old, speedup=old / new))
    controls = [row["speedup"] for row in rows if not row["model"].startswith("cyclemlp")]
    drift = statistics.geometric_mean(controls)
    for row in rows:
        row["over_drift"] = row["speedup"] / drift
    return dict(revision=revision, turns=turns, rows=rows)


# --- one model alone in a process -----------------------------------------------------------------

ALONE_CHILD = r"""
import json, resource, sys, time, torch, timm
sys.path.insert(0, sys.argv[1])
import cyclemlp
torch.set_num_threads(int(sys.argv[3]))
model, x = timm.create_model(sys.argv[4]).eval(), torch.randn(1, 3, 224, 224)
with torch.inference_mode():
    for _ in range(5):
        model(x)
    faults, times = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
    for _ in range(int(sys.argv[2])):
        start = time.perf_counter(); model(x); times.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps(dict(ms=min(times) * 1e3, faults=faults / len(times))))
"""

ALONE_MODELS = ["cyclemlp_b1", "cyclemlp_b2", "poolformer_s12"]
# glibc's adaptive malloc thresholds, and the package's setting of them (cyclemlp.layers.heap)
HEAPS = {"glibc": {"CYCLEMLP_KEEP_HEAP": "0"}, "shipped": {}}


def bench_alone(names: list[str], threads: int, turns: int, calls: int) -> list[dict]:
    """Batch 1, each model alone in its own process (as a deployed model runs), with glibc's adaptive
    malloc thresholds and as shipped (the first one-image CycleMLP block sets them; the peers run
    the same either way), in turns."""
    # the children start without malloc settings of this process's own, so "glibc" means glibc's
    base = {k: v for k, v in os.environ.items()
            if not (k.startswith("MALLOC_") or (k == "GLIBC_TUNABLES" and "glibc.malloc." in v))}
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(turns):
        for name in names:
            for heap, extra in HEAPS.items():
                result = subprocess.run(
                    [sys.executable, "-c", ALONE_CHILD, str(ROOT / "src"), str(calls), str(threads), name],
                    capture_output=True, text=True, env=dict(base, **extra), check=True)
                runs.setdefault((name, heap), []).append(json.loads(result.stdout.strip().splitlines()[-1]))
    rows = []
    for name in names:
        glibc, shipped = runs[(name, "glibc")], runs[(name, "shipped")]
        rows.append(dict(model=name, threads=threads, glibc_ms=min(r["ms"] for r in glibc),
                         shipped_ms=min(r["ms"] for r in shipped),
                         glibc_faults=statistics.median(r["faults"] for r in glibc),
                         shipped_faults=statistics.median(r["faults"] for r in shipped)))
        rows[-1]["speedup"] = rows[-1]["glibc_ms"] / rows[-1]["shipped_ms"]
    return rows


# --- CUDA -----------------------------------------------------------------------------------------


def bench_cuda(names: list[str], count: int) -> list[dict]:
    device = torch.device("cuda")
    rows = []
    for batch in (1, 64):
        x = torch.randn(batch, 3, 224, 224, device=device)
        for dtype in ("fp32", "bf16"):
            fns = {}
            for name in names:
                model = build(name).to(device)

                def call(model: nn.Module = model, dtype: str = dtype) -> None:
                    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=dtype == "bf16"):
                        model(x)
                    torch.cuda.synchronize()
                fns[name] = call
            times = rounds(fns, count)
            rows += [dict(model=name, batch=batch, dtype=dtype, ms=min(t) * 1e3, img_s=batch / min(t))
                     for name, t in times.items()]
    return rows


# --- report ---------------------------------------------------------------------------------------


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows])


def report(results: dict) -> str:
    env = results["environment"]
    isa = ", ".join(f"{k}={v}" for k, v in env.get("isa_limits", {}).items()) or "none"
    parts = [
        "# Latency: one image at a time",
        "",
        f"Machine: {env['machine']}; instruction-set limits: {isa}. torch {env['torch']}, timm {env['timm']}, "
        f"cyclemlp {env['cyclemlp']}; {env['date']}; load average at the start {env['load_average']}.",
        f"Command: `{env['command']}`",
        "",
        "fp32, 224 px, `torch.inference_mode()`, random weights, models timed in turns. ms: the fastest "
        "call and the median of the rounds. GFLOP/s: PyTorch's FLOP count of the model (the authors' "
        "network: of its twin) over the fastest call. Ratios: peer ms / CycleMLP ms from the fastest calls, "
        "and the median [10th-90th percentile] of the ratios within each round. A goal is met when both "
        "the ratio and the round median reach it. The first one-image CycleMLP block sets glibc's malloc "
        "thresholds for the process (`cyclemlp.layers.heap`), so they hold for the peers too.",
    ]
    for section in results["latency"]:
        parts += ["", f"## Batch 1, {section['threads']} thread{'s' if section['threads'] > 1 else ''} "
                  f"({section['rounds']} rounds)", "",
                  table(section["models"], ["model", "ms", "median_ms", "p90_ms", "gflops", "gflop_s"]), ""]
        for row in section["goals"] + section["others"]:
            row["round spread"] = f"{row['round_median']:.2f} [{row['round_p10']:.2f}-{row['round_p90']:.2f}]"
        parts += [table(section["goals"], ["ours", "peer", "ratio", "round spread", "goal", "met"]), "",
                  table(section["others"], ["ours", "peer", "ratio", "round spread"])]
    if results.get("breakdown"):
        parts += ["", "## Where the batch-1 time goes", "",
                  "ms per image: the fastest unprofiled call (wall), the profiled call (profiled; the profiler "
                  "adds some time per operator), the operators' self time by kind within it, and the rest of "
                  "the profiled call, outside any operator: Python and dispatch.", ""]
        rows = []
        for item in results["breakdown"]:
            row = {"model": item["model"], "threads": item.get("threads", 1), "wall": item["wall_ms"],
                   "profiled": item["profiled_ms"]}
            row.update({kind: item["kinds"][kind] for kind in KINDS if kind != "optimizer step"})
            row["outside operators"] = item["outside_ms"]
            rows.append(row)
        parts.append(table(rows, ["model", "threads", "wall", "profiled", *[k for k in KINDS if k != "optimizer step"],
                                  "outside operators"]))
        for item in results["breakdown"]:
            if item.get("threads", 1) != 1:
                continue
            parts.append(f"\n{item['model']}, one thread, largest of everything else (ms): " + ", ".join(
                f"`{name}` {ms:.2f}" for name, ms in item["everything_else_top"].items()))
    if results.get("int8"):
        parts += ["", "## int8 (`cyclemlp.quantize_int8`) against fp32, batch 1", "",
                  "Dynamic post-training int8 (FBGEMM) for the products of the blocks 128 channels wide and "
                  "wider; the rest in fp32. Ratio: fp32 ms / int8 ms.", "",
                  table(results["int8"], ["model", "threads", "fp32_ms", "int8_ms", "ratio", "round_median",
                                          "round_p10", "round_p90"])]
    fashion = results.get("fashion_int8")
    if fashion:
        parts += ["", f"Fashion-MNIST model ({fashion['images']} test images, input {fashion['input_size']}): "
                  f"top-1 fp32 {fashion['fp32_top1']:.2f} %, int8 {fashion['int8_top1']:.2f} % "
                  f"(drop {fashion['fp32_top1'] - fashion['int8_top1']:.2f} points), agreement "
                  f"{fashion['agreement']:.2f} %; batch 1, one thread: fp32 {fashion['fp32_ms']:.2f} ms, int8 "
                  f"{fashion['int8_ms']:.2f} ms, ratio {fashion['ratio']:.2f} (round median "
                  f"{fashion['round_median']:.2f})."]
    if results.get("int8_decision"):
        parts += ["", results["int8_decision"]]
    against = results.get("against")
    if against:
        parts += ["", f"## Batch 16, two threads, against {against['revision']}", "",
                  f"img/s of the fastest call in {against['turns']} turns of child processes per tree; speedup: "
                  "this tree over the revision. The peers' code is the same in both: their speedup shows the "
                  "drift between turns, and over_drift is the speedup divided by theirs (geometric mean).", "",
                  table(against["rows"], ["model", "this_img_s", "revision_img_s", "speedup", "over_drift"])]
    if results.get("alone"):
        parts += ["", "## One model alone in a process", "",
                  "Batch 1, each model in its own child process, as a deployed model runs (the tables above time "
                  "all models in one process). glibc: glibc's adaptive malloc thresholds (`CYCLEMLP_KEEP_HEAP=0`); "
                  "shipped: as the package runs, which sets them for the process at the first one-image block "
                  "(`cyclemlp.layers.heap`; the peers run the same in both). faults: minor page faults per "
                  "image, memory the allocator gave back to the system and takes again. ms: the fastest call "
                  "over all turns; speedup: glibc ms / shipped ms.", "",
                  table(results["alone"], ["model", "threads", "glibc_ms", "shipped_ms", "glibc_faults",
                                           "shipped_faults", "speedup"])]
    parts += ["", "## CUDA", ""]
    if results.get("cuda"):
        parts += [f"Device: {results['cuda_device']}.", "",
                  table(results["cuda"], ["model", "batch", "dtype", "ms", "img_s"])]
    else:
        parts.append("No CUDA device was present in this run; this section is measured where one is.")
    return "\n".join(parts) + "\n"


def int8_decision(results: dict) -> str:
    fashion = results.get("fashion_int8")
    rows = [r for r in results.get("int8", []) if r["threads"] == 1]
    if not rows or not fashion:
        return ""
    accurate = fashion["fp32_top1"] - fashion["int8_top1"] <= 0.5 and fashion["agreement"] >= 99.0
    fast = all(r["ratio"] >= 1.3 for r in rows)
    verdict = "meets" if accurate and fast else "misses"
    return (f"Bar for shipping int8: at least 1.3x over fp32 at batch 1 for B1 and B2 (one thread), a top-1 drop "
            f"of at most 0.5 points and at least 99 % agreement on the Fashion-MNIST model. This run {verdict} it "
            f"(speed {'yes' if fast else 'no'}, accuracy {'yes' if accurate else 'no'}). The Fashion-MNIST model "
            f"itself gains {fashion['ratio']:.2f}x: at 32 px its products are small and half of its stages are "
            "narrower than 128 channels, so the fixed cost per call dominates.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="benchmarks/results/latency", help="folder for report.md and results.json")
    parser.add_argument("--isa", choices=["native", "avx2"], default="native",
                        help="instruction sets the libraries may use (default native)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the batch-1 tables (default 20)")
    parser.add_argument("--fashion-run", help="a trained Fashion-MNIST run folder or checkpoint for int8 accuracy")
    parser.add_argument("--against", help="a git revision (e.g. a release tag) to time batch 16 against")
    parser.add_argument("--turns", type=int, default=4, help="child-process turns per tree for --against (default 4)")
    parser.add_argument("--quick", action="store_true", help="smoke run: B1 and two peers, few rounds")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.turns < 1 or min(args.threads) < 1:
        parser.error("--rounds, --turns and --threads must be positive")
    if args.fashion_run and not Path(args.fashion_run).exists():
        parser.error(f"--fashion-run {args.fashion_run}: no such run folder or checkpoint")
    if args.against and subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet",
                                        f"{args.against}^{{commit}}"], capture_output=True).returncode != 0:
        parser.error(f"--against {args.against}: not a revision of this repository")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.isa == "avx2" and not os.environ.get("ONEDNN_MAX_CPU_ISA"):
        return _run_with_avx2(argv if argv is not None else sys.argv[1:])
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    names = OURS + list(DEFORM) + PEERS
    if args.quick:
        names, args.rounds, args.threads = ["cyclemlp_b1", "resnet50", "poolformer_s12"], 3, [1]
    env = environment()
    env.update(load_average=round(os.getloadavg()[0], 1),
               isa_limits={k: os.environ[k] for k in AVX2_ENV if k in os.environ})
    results: dict = dict(environment=env)
    cost = {name: flops(name) for name in names}
    results["latency"] = []
    for threads in args.threads:
        print(f"batch 1, {threads} thread(s) ...", flush=True)
        results["latency"].append(bench_latency(names, threads, args.rounds, cost))
    print("breakdown ...", flush=True)
    profiled = ["cyclemlp_b1"] if args.quick else ["cyclemlp_b1", "poolformer_s12", "cyclemlp_b2", "convnext_tiny"]
    results["breakdown"] = [bench_breakdown(name, 3, threads) for threads in args.threads for name in profiled]
    print("int8 ...", flush=True)
    results["int8"] = bench_int8(["cyclemlp_b1"] if args.quick else OURS[:2], args.threads, args.rounds)
    if args.fashion_run:
        results["fashion_int8"] = fashion_int8(args.fashion_run, args.rounds)
    results["int8_decision"] = int8_decision(results)
    if args.against:
        print(f"batch 16 against {args.against} ...", flush=True)
        results["against"] = bench_against(args.against, 1 if args.quick else args.turns, 2 if args.quick else 5)
    print("alone in a process ...", flush=True)
    results["alone"] = [row for threads in args.threads for row in bench_alone(
        ["cyclemlp_b1"] if args.quick else ALONE_MODELS, threads, 1 if args.quick else 2, 5 if args.quick else 30)]
    if torch.cuda.is_available():
        results["cuda_device"] = torch.cuda.get_device_name()
        results["cuda"] = bench_cuda(OURS + PEERS if not args.quick else names, args.rounds)
    text = report(results)
    atomic_write(output / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    atomic_write(output / "report.md", lambda tmp: Path(tmp).write_text(text))
    print(text)
    print(f"wrote {output}/report.md and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
