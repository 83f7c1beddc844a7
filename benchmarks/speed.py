"""The speed benchmark: Cycle FC alone, whole models, GEMM efficiency, memory, compile and ONNX.

Everything is measured in ONE run on one machine, so the ratios in the report compare like with
like. Run it from the repository root:

    python -m benchmarks.speed                    # writes benchmarks/results/speed
    python -m benchmarks.speed --quick --output /tmp/speed        # a smoke run (minutes)

It prints the tables, writes ``results.json``, ``cycle_fc.csv``, ``models.csv``, ``report.md``
and ``models.png`` into ``--output``, and checks the project's speed targets against the measured
ratios (the check never changes the numbers; it only reads them).
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
for _path in (ROOT / "src", ROOT / "tests"):  # the package, and the authors' formulation in tests/
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import timm  # noqa: E402
from deform_reference import DeformCycleFC, deform_model  # noqa: E402

import cyclemlp  # noqa: E402,F401  (registers the models)
from benchmarks.gemm_bound import ceiling_seconds, record_products, replay_seconds  # noqa: E402
from cyclemlp import CycleFC, count_cost  # noqa: E402
from cyclemlp.cli.malloc import add_malloc_argument, apply_malloc_choice, malloc_in_force  # noqa: E402
from cyclemlp.io import atomic_write  # noqa: E402
from cyclemlp.layers import native  # noqa: E402
from cyclemlp.tools.environment import machine  # noqa: E402

B1_STAGES = [(56, 64), (28, 128), (14, 320), (7, 512)]  # (side, channels) of B1 at 224
PEERS = ["pvt_v2_b1", "pvt_v2_b2", "resnet50", "swin_tiny_patch4_window7_224", "convnext_tiny", "poolformer_s24"]
DEFORM = {"deform_b1": "cyclemlp_b1", "deform_b2": "cyclemlp_b2"}


# --- timing -------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def minor_faults() -> int | None:
    """Minor page faults of this process so far (pages the kernel had to map and zero on first
    touch), or None where the platform does not count them."""
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timeit_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                       warmup: int = 2, faults: dict[str, float | None] | None = None) -> dict[str, float]:
    """Median wall time in seconds of each of ``fns``, timed in turns (one call of each per round).

    On a shared machine the cost of memory (page faults as freed blocks go back to the system,
    other programs' traffic) drifts over seconds; taking turns exposes every contestant to the same
    drift, so the ratios between them hold where back-to-back blocks of calls differ by up to 2x.
    If ``faults`` is given, it receives each function's mean minor page faults per timed call:
    what it paid for fresh memory (4 KiB pages). The C allocator's state decides how many there
    are, so they show whether a slow run was slowed by fresh memory or by something else."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    faulted: dict[str, int] = dict.fromkeys(fns, 0)
    for _ in range(repeats):
        for name, fn in fns.items():
            before = minor_faults()
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
            if before is not None:
                faulted[name] += minor_faults() - before  # type: ignore[operator]
    if faults is not None:
        counted = minor_faults() is not None
        faults.update({name: faulted[name] / repeats if counted else None for name in fns})
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_peak(device: torch.device, repeats: int) -> float:
    """fp32 GEMM throughput in GFLOP/s: the best of a few large square products."""
    best = 0.0
    for n in (1024, 2048):
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        seconds = timeit(lambda: a @ b, device, repeats)
        best = max(best, 2 * n**3 / seconds / 1e9)
    return best


# --- models -------------------------------------------------------------------------------------


def build(name: str) -> nn.Module:
    if name in DEFORM:
        return deform_model(DEFORM[name])
    return timm.create_model(name)


def nominal_flops(name: str) -> int:
    """FLOPs per 224 image in PyTorch's convention (the deform network counts as its twin)."""
    return count_cost(timm.create_model(DEFORM.get(name, name)), 224).flops


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _memory_probe(name: str, batch: int, device: str, malloc: str, queue: mp.Queue) -> None:
    """In a fresh process with the allocator setting ``malloc``: the peak memory one training step
    adds on top of the model, its gradients' absence and the AdamW state (activations, gradients,
    temporaries)."""
    apply_malloc_choice(malloc)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build(name).to(dev).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # allocate the optimizer state up front
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    x = torch.randn(batch, 3, 224, 224, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        _train_step(model, optimizer, x, y)
        torch.cuda.synchronize(dev)
        queue.put(torch.cuda.max_memory_allocated(dev) - base)
        return
    try:  # give freed heap pages back so the baseline is what is really live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    _train_step(model, optimizer, x, y)
    done.set()
    watcher.join()
    peak[0] = max(peak[0], _rss_bytes())
    queue.put(peak[0] - base)


def train_step_peak_mb(name: str, batch: int, device: torch.device) -> float | None:
    if device.type == "cpu" and not os.path.exists("/proc/self/statm"):
        return None
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_probe, args=(name, batch, str(device), malloc_in_force(), queue))
    proc.start()
    proc.join()
    return queue.get(timeout=5) / 2**20 if proc.exitcode == 0 else None


def bench_cycle_fc(batches: list[int], device: torch.device, repeats: int) -> list[dict]:
    """Cycle FC (1x3, official pattern) vs the deform formulation vs a plain Linear, the three
    timed in turns (:func:`timeit_interleaved`, at least 9 rounds)."""
    rows = []
    for batch in batches:
        for side, dim in B1_STAGES:
            layers = {
                "cyclemlp": CycleFC(dim, dim, (1, 3)).to(device),
                "deform_conv2d": DeformCycleFC(dim, dim, (1, 3)).to(device),
                "linear": nn.Linear(dim, dim).to(device),
            }
            x = torch.randn(batch, side, side, dim, device=device)
            # the least a shift adds to a product: one copy of the activation forward and one of
            # its gradient backward (a BLAS product cannot read per-channel shifted operands)
            buffer = torch.empty_like(x)
            copy_ms = timeit(lambda: buffer.copy_(x), device, repeats) * 1e3
            with torch.no_grad():
                fwd = timeit_interleaved({impl: (lambda layer=layer: layer(x)) for impl, layer in layers.items()},
                                         device, max(repeats, 9))
            xg = x.clone().requires_grad_(True)
            grad = torch.randn(batch, side, side, dim, device=device)
            faults: dict[str, float | None] = {}
            fwd_bwd = timeit_interleaved(
                {impl: (lambda layer=layer: layer(xg).backward(grad)) for impl, layer in layers.items()},
                device, max(repeats, 9), faults=faults)
            for impl in layers:
                rows.append(dict(batch=batch, shape=f"{side}x{side}x{dim}", impl=impl,
                                 fwd_ms=fwd[impl] * 1e3, fwd_bwd_ms=fwd_bwd[impl] * 1e3,
                                 fwd_bwd_faults=faults[impl]))
            rows[-1]["copy_ms"] = copy_ms
    return rows


def product_ceilings(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int,
                     train_repeats: int) -> dict:
    """Throughput if the model's matrix products and convolutions were its only cost (see
    benchmarks/gemm_bound.py): inference (eval, no grad) and a training step's forward +
    backward (the optimizer step, memory-bound, left out, so this stays a ceiling)."""
    model.eval()
    with torch.no_grad():
        infer = ceiling_seconds(record_products(lambda: model(x)), repeats)
    model.train()
    train = replay_seconds(record_products(lambda: nn.functional.cross_entropy(model(x), y).backward()),
                           train_repeats)
    model.zero_grad(set_to_none=True)
    return dict(products_infer_img_s=len(x) / infer, products_train_img_s=len(x) / train)


def bench_models(names: list[str], batch: int, device: torch.device, repeats: int,
                 train_repeats: int, memory: bool) -> list[dict]:
    """Whole models: all built first, then inference, latency and training timed in turns
    (:func:`timeit_interleaved`), so that the machine's drift hits every model alike."""
    x = torch.randn(batch, 3, 224, 224, device=device)
    x1 = x[:1].clone()
    y = torch.randint(0, 1000, (batch,), device=device)
    models = {}
    for name in names:
        torch.manual_seed(0)
        models[name] = build(name).to(device).eval()
    with torch.no_grad():
        infer = timeit_interleaved({n: (lambda m=m: m(x)) for n, m in models.items()}, device, repeats)
        latency = timeit_interleaved({n: (lambda m=m: m(x1)) for n, m in models.items()}, device, max(repeats, 5))
    optimizers = {}
    for name, model in models.items():
        model.train()
        optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_faults: dict[str, float | None] = {}
    train = timeit_interleaved(
        {n: (lambda m=m, o=optimizers[n]: _train_step(m, o, x, y)) for n, m in models.items()},
        device, train_repeats, warmup=1, faults=train_faults)
    rows = []
    for name, model in models.items():
        flops = nominal_flops(name)
        rows.append(dict(
            model=name, params_m=sum(p.numel() for p in model.parameters()) / 1e6,
            gflops_per_img=flops / 1e9, infer_img_s=batch / infer[name], latency_ms=latency[name] * 1e3,
            train_img_s=batch / train[name], train_faults=train_faults[name],
            achieved_gflop_s=flops * batch / infer[name] / 1e9,
            train_peak_mb=train_step_peak_mb(name, batch, device) if memory else None,
        ))
        if name.startswith("cyclemlp"):
            rows[-1].update(product_ceilings(model, x, y, repeats, train_repeats))
        print(f"  {name}: {rows[-1]['infer_img_s']:.2f} img/s", flush=True)
    return rows


def bench_graph_modes(names: list[str], batch: int, device: torch.device, repeats: int) -> list[dict]:
    """Inference in eager, torch.compile and (CPU) ONNX Runtime for a few models."""
    from cyclemlp.tools.export import export_model

    rows = []
    for name in names:
        model = timm.create_model(name).to(device).eval()
        x = torch.randn(batch, 3, 224, 224, device=device)
        with torch.no_grad():
            eager = timeit(lambda model=model, x=x: model(x), device, repeats)
            start = time.perf_counter()
            compiled = torch.compile(model)
            compiled(x)
            compile_s = time.perf_counter() - start
            fast = timeit(lambda compiled=compiled, x=x: compiled(x), device, repeats)
        row = dict(model=name, eager_img_s=batch / eager, compile_img_s=batch / fast, compile_s=compile_s,
                   onnxruntime_img_s=None)
        if device.type == "cpu":
            import onnxruntime as ort

            with tempfile.TemporaryDirectory() as tmp:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    path = export_model(model, Path(tmp) / f"{name}.onnx", "onnx").path
                options = ort.SessionOptions()
                options.intra_op_num_threads = torch.get_num_threads()
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                feed = {"image": x.numpy()}
                row["onnxruntime_img_s"] = batch / timeit(lambda: session.run(None, feed), device, repeats)
        rows.append(row)
        print(f"  {name}: eager {row['eager_img_s']:.2f}, compile {row['compile_img_s']:.2f} img/s", flush=True)
        del model, compiled
        torch._dynamo.reset()
    return rows


# --- report -------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def check_targets(results: dict) -> list[dict]:
    """The project's speed targets, evaluated on this run's numbers."""
    fc = {(r["batch"], r["shape"], r["impl"]): r for r in results["cycle_fc"]}
    models = {r["model"]: r for r in results["models"]}
    checks = []

    def add(what: str, value: float | None, goal: float, higher: bool = True, needs: float | None = None,
            ceiling: float | None = None, faults: tuple[float | None, float | None] | None = None) -> None:
        ok = value is not None and (value >= goal if higher else value <= goal)
        checks.append(dict(target=what, value=value, goal=("≥ " if higher else "≤ ") + f"{goal:g}", met=ok,
                           needs_peak_share=needs, products_only=ceiling,
                           reachable=None if ceiling is None else (ceiling >= goal if higher else ceiling <= goal),
                           page_faults=None if faults is None or None in faults else
                           f"{faults[0]:.0f} / {faults[1]:.0f}"))

    def needs(model: str, goal: float, other: str, key: str = "infer_img_s", passes: int = 1) -> float | None:
        """Share of the measured matmul peak that ``model`` must sustain to reach ``goal`` x the
        other model's throughput: goal x other img/s x own FLOPs per image (x passes: forward +
        backward counted as 3 forwards) / peak. Above 1.0 the target is out of reach on this
        machine whatever the implementation."""
        own, them = models.get(model, {}), models.get(other, {})
        if own.get("gflops_per_img") is None or them.get(key) is None:
            return None
        return goal * them[key] * own["gflops_per_img"] * passes / results["matmul_peak_gflop_s"]

    for batch in sorted({r["batch"] for r in results["cycle_fc"]}):
        stage1 = f"{B1_STAGES[0][0]}x{B1_STAGES[0][0]}x{B1_STAGES[0][1]}"
        add(f"Cycle FC fwd+bwd vs deform, {stage1}, batch {batch} (x faster)",
            _ratio(fc[(batch, stage1, "deform_conv2d")]["fwd_bwd_ms"], fc[(batch, stage1, "cyclemlp")]["fwd_bwd_ms"]),
            15)
        for side, dim in B1_STAGES:
            shape = f"{side}x{side}x{dim}"
            linear = fc[(batch, shape, "linear")]
            floor = None if linear.get("copy_ms") is None else \
                _ratio(linear["fwd_bwd_ms"] + 2 * linear["copy_ms"], linear["fwd_bwd_ms"])
            cycle = fc[(batch, shape, "cyclemlp")]
            add(f"Cycle FC fwd+bwd / Linear, {shape}, batch {batch}",
                _ratio(cycle["fwd_bwd_ms"], linear["fwd_bwd_ms"]), 1.3, False,
                ceiling=floor, faults=(cycle.get("fwd_bwd_faults"), linear.get("fwd_bwd_faults")))

    def infer(name: str, key: str = "infer_img_s") -> float | None:
        return models.get(name, {}).get(key)

    def ceiling(name: str, other: str, key: str = "infer_img_s") -> float | None:
        """The ratio ``name`` would reach if its products were its only cost."""
        return _ratio(infer(name, "products_" + key), infer(other, key))

    add("cyclemlp_b1 inference / deform B1", _ratio(infer("cyclemlp_b1"), infer("deform_b1")), 3,
        needs=needs("cyclemlp_b1", 3, "deform_b1"), ceiling=ceiling("cyclemlp_b1", "deform_b1"))
    add("cyclemlp_b1 inference / pvt_v2_b1", _ratio(infer("cyclemlp_b1"), infer("pvt_v2_b1")), 1.5,
        needs=needs("cyclemlp_b1", 1.5, "pvt_v2_b1"), ceiling=ceiling("cyclemlp_b1", "pvt_v2_b1"))
    for peer in ("resnet50", "swin_tiny_patch4_window7_224", "pvt_v2_b2"):
        add(f"cyclemlp_b2 inference / {peer}", _ratio(infer("cyclemlp_b2"), infer(peer)), 1.0,
            needs=needs("cyclemlp_b2", 1.0, peer), ceiling=ceiling("cyclemlp_b2", peer))
    add("cyclemlp_b1 training / deform B1",
        _ratio(infer("cyclemlp_b1", "train_img_s"), infer("deform_b1", "train_img_s")), 4,
        needs=needs("cyclemlp_b1", 4, "deform_b1", "train_img_s", passes=3),
        ceiling=ceiling("cyclemlp_b1", "deform_b1", "train_img_s"),
        faults=(infer("cyclemlp_b1", "train_faults"), infer("deform_b1", "train_faults")))
    add("cyclemlp_b2 achieved GFLOP/s / matmul peak",
        _ratio(models.get("cyclemlp_b2", {}).get("achieved_gflop_s"), results["matmul_peak_gflop_s"]), 0.65)
    add("cyclemlp_b1 train-step peak memory / deform B1",
        _ratio(models.get("cyclemlp_b1", {}).get("train_peak_mb"), models.get("deform_b1", {}).get("train_peak_mb")),
        0.7, False)
    return checks


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(results: dict, output: Path) -> str:
    env = results["environment"]
    parts = [
        f"Machine: {env['machine']}; torch {env['torch']}, {env['threads']} threads, device {env['device']}, "
        f"allocator {env.get('malloc', 'default')}; "
        f"{'Cycle FC shift ' + env['shift'] + '; ' if env.get('shift') else ''}"
        f"fp32 matmul peak {results['matmul_peak_gflop_s']:.1f} GFLOP/s (measured in this run).",
        f"Command: `{env['command']}`",
        "",
        "Cycle FC alone (ms, median):",
        markdown_table(results["cycle_fc"], ["batch", "shape", "impl", "fwd_ms", "fwd_bwd_ms", "fwd_bwd_faults",
                                             "copy_ms"]),
        "(copy_ms: one copy of the activation; Linear fwd+bwd plus two such copies is the least a Cycle FC "
        "that shifts its input for a BLAS product can cost. fwd_bwd_faults: minor page faults per forward + "
        "backward, i.e. 4 KiB pages of fresh memory the kernel mapped and zeroed during the call; how many "
        "there are depends on the C allocator's state, not on the operator.)",
        "",
        f"Whole models at 224x224 (inference and training batch {results['batch']}, latency batch 1):",
        markdown_table(results["models"], ["model", "params_m", "gflops_per_img", "infer_img_s", "latency_ms",
                                           "train_img_s", "train_faults", "achieved_gflop_s", "train_peak_mb"]),
        "(train_faults: minor page faults per training step, as for Cycle FC above.)",
    ]
    ceilings = [r for r in results["models"] if r.get("products_infer_img_s") is not None]
    if ceilings:
        parts += ["", "Products only (img/s if the model's matrix products and convolutions, replayed alone at "
                  "their exact shapes, were its whole cost; training: forward + backward, no optimizer step):",
                  markdown_table(ceilings, ["model", "infer_img_s", "products_infer_img_s", "train_img_s",
                                            "products_train_img_s"])]
    if results.get("graph_modes"):
        parts += ["", "Graph modes (inference img/s):",
                  markdown_table(results["graph_modes"], ["model", "eager_img_s", "compile_img_s", "compile_s",
                                                          "onnxruntime_img_s"])]
    parts += ["", "Targets (needs_peak_share: the share of the measured matmul peak the model would have to "
              "sustain to meet a throughput target; above 1.00 no implementation can. products_only: the ratio "
              "the model would reach if its own products were its whole cost (for Cycle FC / Linear: Linear "
              "plus the two copies a shift needs); reachable NO means that even "
              "then the target is missed, so no implementation computing the same products can meet it on "
              "this machine; page_faults: minor page faults per call of the two sides of a ratio):",
              markdown_table(results["targets"], ["target", "value", "goal", "met", "needs_peak_share",
                                                  "products_only", "reachable", "page_faults"])]
    text = "\n".join(parts) + "\n"
    atomic_write(output / "report.md", lambda tmp: Path(tmp).write_text(text))
    return text


def write_files(results: dict, output: Path) -> None:
    atomic_write(output / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    for key, name in (("cycle_fc", "cycle_fc.csv"), ("models", "models.csv"), ("graph_modes", "graph_modes.csv")):
        rows = results.get(key) or []
        if not rows:
            continue

        def write_csv(tmp: str, rows: list[dict] = rows) -> None:
            with open(tmp, "w", newline="") as handle:
                fields = list(dict.fromkeys(key for row in rows for key in row))  # some rows have more
                writer = csv.DictWriter(handle, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(output / name, write_csv)
    plot(results, output / "models.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    models = results["models"]
    names = [r["model"].replace("_patch4_window7_224", "") for r in models]
    colors = ["tab:red" if n.startswith("cyclemlp") else "tab:gray" if n.startswith("deform") else "tab:blue"
              for n in names]
    for ax, key, title in ((axes[0], "infer_img_s", f"inference img/s (batch {results['batch']})"),
                           (axes[1], "train_img_s", f"training img/s (batch {results['batch']})")):
        ax.barh(names, [r[key] for r in models], color=colors)
        ax.set_title(title)
        ax.invert_yaxis()
    fc = [r for r in results["cycle_fc"] if r["batch"] == max(r["batch"] for r in results["cycle_fc"])]
    shapes = [f"{s}x{s}x{d}" for s, d in B1_STAGES]
    width = 0.27
    for i, impl in enumerate(("cyclemlp", "deform_conv2d", "linear")):
        values = [next(r["fwd_bwd_ms"] for r in fc if r["shape"] == s and r["impl"] == impl) for s in shapes]
        axes[2].bar([j + (i - 1) * width for j in range(len(shapes))], values, width, label=impl)
    axes[2].set_xticks(range(len(shapes)), shapes)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("ms (log)")
    axes[2].set_title(f"Cycle FC forward+backward, batch {fc[0]['batch']}")
    axes[2].legend()
    fig.suptitle(f"{results['environment']['machine']} — one run")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="benchmarks/results/speed", help="folder for the report files")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32, help="inference/training batch (default 32)")
    parser.add_argument("--fc-batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--models", nargs="+", default=["cyclemlp_b1", "cyclemlp_b2", *DEFORM, *PEERS])
    parser.add_argument("--graph-models", nargs="*", default=["cyclemlp_b1", "cyclemlp_b2", "pvt_v2_b1", "resnet50"],
                        help="models also timed under torch.compile and ONNX Runtime (none: skip)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the training-step memory probes")
    add_malloc_argument(parser, fallback="default")
    parser.add_argument("--report-from", metavar="RESULTS_JSON",
                        help="measure nothing: re-derive the targets, report and chart from a saved results.json")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: batch 4, B1 and its deform twin + pvt_v2_b1, 2 repeats, no graph modes")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.fc_batches, args.repeats, args.train_repeats = 4, [4], 2, 1
        args.models, args.graph_models = ["cyclemlp_b1", "deform_b1", "pvt_v2_b1"], []
    if args.batch < 1 or args.repeats < 1 or args.train_repeats < 1:
        parser.error("--batch, --repeats and --train-repeats must be positive")
    unknown = [m for m in args.models + args.graph_models if m not in DEFORM and not timm.is_model(m)]
    if unknown:
        parser.error(f"unknown model(s): {unknown}")
    return args


def shift_kernel_in_use(device: torch.device) -> str:
    """Which eager shift this run's Cycle FC uses on ``device``."""
    if device.type != "cpu":
        return "gather"
    if native.available():
        return "native kernel"
    return f"gather (native kernel unavailable: {native.build_error()})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if args.report_from:
        try:
            results = json.loads(Path(args.report_from).read_text())
            results["targets"] = check_targets(results)
        except (OSError, ValueError) as err:
            raise SystemExit(f"bench: cannot read {args.report_from}: {err}") from err
        except (KeyError, TypeError, AttributeError) as err:
            raise SystemExit(f"bench: {args.report_from} is not a results.json of this benchmark "
                             f"(missing or malformed {err})") from err
        write_files(results, output)
        print(write_report(results, output))
        return 0
    try:
        apply_malloc_choice(args.malloc, fallback="default")
    except ValueError as err:
        raise SystemExit(f"bench: {err}") from err
    device = torch.device(args.device)
    command = "python -m benchmarks.speed " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict = dict(environment=dict(
        machine=machine(), torch=str(torch.__version__), threads=torch.get_num_threads(),
        device=str(device), malloc=malloc_in_force(), command=command.strip(), date=time.strftime("%Y-%m-%d %H:%M"),
        shift=shift_kernel_in_use(device), load_average=round(os.getloadavg()[0], 1),
    ), batch=args.batch)
    print("matmul peak ...", flush=True)
    results["matmul_peak_gflop_s"] = matmul_peak(device, args.repeats)
    print("Cycle FC ...", flush=True)
    results["cycle_fc"] = bench_cycle_fc(args.fc_batches, device, args.repeats)
    print("models ...", flush=True)
    results["models"] = bench_models(args.models, args.batch, device, args.repeats, args.train_repeats,
                                     memory=not args.no_memory)
    if args.graph_models:
        print("graph modes ...", flush=True)
        results["graph_modes"] = bench_graph_modes(args.graph_models, args.batch, device, args.repeats)
    results["targets"] = check_targets(results)
    write_files(results, output)
    print(write_report(results, output))
    print(f"wrote {output}/results.json, report.md, *.csv, models.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
