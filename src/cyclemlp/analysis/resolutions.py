"""Cost of a model as the input grows: GMACs, latency and peak memory at many input sizes.

CycleMLP has no weight tied to the input size and costs O(HW), so its GMACs, time and memory grow
linearly with the number of pixels; MLP-Mixer's token-mixing weight fixes its input size; PVT-v2's
spatial-reduction attention grows faster than linearly; Swin's windowed attention stays linear.
Every model is built once (timm's any-size mode where it has one, see
:func:`~cyclemlp.analysis.models.build_model`) and fed every size; failures are recorded with the
model's own error.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..tools.flops import count_cost
from .memory import cpu_peak_supported, peak_memory
from .models import build_model
from .report import save_figure, write_rows
from .settings import RESOLUTION_MODELS, RESOLUTION_SIZES

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_SIZES",
    "SizeResult",
    "loglog_slope",
    "measure_size",
    "resolutions_figure",
    "run_resolutions",
]

DEFAULT_MODELS = RESOLUTION_MODELS
DEFAULT_SIZES = RESOLUTION_SIZES


@dataclass
class SizeResult:
    """One model at one input size (``None`` fields: not measured because the model failed)."""

    model: str
    height: int
    width: int
    pixels: int
    params_m: float
    gmacs: float | None
    latency_ms: float | None
    cpu_ms: float | None
    peak_mem_mb: float | None
    error: str | None = None


def _error_text(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}"[:300]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_size(
    model: torch.nn.Module, name: str, size: tuple[int, int], batch_size: int = 1, repeats: int = 3,
    device: torch.device | str = "cpu",
) -> SizeResult:
    """Measure one model at one input size.

    After the FLOP count, one unmeasured pass warms up (a model may derive state from its weights
    on its first call at a size, as CycleMLP's inference form does: memory the model keeps, not
    the cost of a pass); then one pass measures peak memory and
    ``repeats`` passes the latency (median, milliseconds per batch) in wall-clock time and in
    CPU time of this process (all its threads summed: with one thread, the compute time whatever
    else the machine runs). GMACs are per image in the
    authors' convention (:func:`cyclemlp.count_cost`); peak memory is per batch.
    """
    device = torch.device(device)
    height, width = size
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    result = SizeResult(name, height, width, height * width, round(params_m, 3), None, None, None, None)
    x = torch.randn(batch_size, getattr(model, "in_chans", 3), height, width, device=device)
    try:
        macs = count_cost(model, size).macs
    except Exception as err:  # the model's own complaint about this input size is the result
        result.error = _error_text(err)
        return result
    result.gmacs = round(macs / 1e9, 4)
    model(x)
    peak = peak_memory(lambda: model(x), device)
    result.peak_mem_mb = None if peak is None else round(peak / 2**20, 1)
    times, cpu_times = [], []
    for _ in range(repeats):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        model(x)
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    result.latency_ms = round(1000 * statistics.median(times), 2)
    if device.type == "cpu":
        result.cpu_ms = round(1000 * statistics.median(cpu_times), 2)
    return result


def loglog_slope(pixels: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of ``log(values)`` against ``log(pixels)`` (1 = linear growth)."""
    if len(pixels) < 2:
        return math.nan
    return float(np.polyfit(np.log(pixels), np.log(values), 1)[0])


def _slopes(results: Sequence[SizeResult], field: str) -> dict[str, float]:
    slopes = {}
    for name in dict.fromkeys(r.model for r in results):
        points = [(r.pixels, getattr(r, field)) for r in results if r.model == name and getattr(r, field)]
        slopes[name] = loglog_slope([p for p, _ in points], [v for _, v in points])
    return slopes


def resolutions_figure(results: Sequence[SizeResult], meta: dict) -> "object":
    """Log-log panels of GMACs, latency and peak memory against the number of pixels."""
    from matplotlib.figure import Figure

    fields = [("gmacs", "GMACs (per image)"), ("latency_ms", "wall-clock latency (ms / batch)"),
              ("cpu_ms", "process CPU time (ms / batch)"), ("peak_mem_mb", "peak memory (MiB / batch)")]
    fields = [f for f in fields if any(getattr(r, f[0]) is not None for r in results)]
    figure = Figure(figsize=(4.6 * len(fields), 4.6))
    axes = figure.subplots(1, len(fields), squeeze=False)[0]
    names = list(dict.fromkeys(r.model for r in results))
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    for ax, (field, label) in zip(axes, fields):
        slopes = _slopes(results, field)
        for name in names:
            points = sorted((r.pixels, getattr(r, field), r.height == r.width)
                            for r in results if r.model == name and getattr(r, field) is not None)
            if not points:
                continue
            slope = f", slope {slopes[name]:.2f}" if not math.isnan(slopes[name]) else ""
            square = [(p, v) for p, v, sq in points if sq]
            ax.plot([p for p, _ in square], [v for _, v in square], "o-", color=colours[name],
                    label=f"{name}{slope}")
            other = [(p, v) for p, v, sq in points if not sq]
            if other:
                ax.plot([p for p, _ in other], [v for _, v in other], "s", mfc="none", color=colours[name])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("pixels (H x W); squares: non-square inputs")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    failed = {}
    for r in results:
        if r.error:
            failed.setdefault(r.model, []).append((f"{r.height}x{r.width}", r.error))
    notes = [f"{name} fails at {', '.join(s for s, _ in errs)}: {errs[0][1]}" for name, errs in failed.items()]
    title = (f"Cost against input size: batch {meta['batch_size']}, {meta['device']}, "
             f"threads {meta['threads']}, median of {meta['repeats']}")
    figure.suptitle("\n".join([title] + notes), fontsize=9)
    return figure


def run_resolutions(
    models: Sequence[str] = DEFAULT_MODELS,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    batch_size: int = 1,
    repeats: int = 3,
    device: str = "cpu",
    threads: int | None = None,
    out_dir: str | os.PathLike = "resolutions",
) -> list[SizeResult]:
    """Measure every model at every size; write ``resolutions.csv``, ``resolutions.json`` and
    ``resolutions.png`` under ``out_dir``.

    Args:
        models: timm model names.
        sizes: ``(height, width)`` input sizes.
        batch_size: images per forward pass.
        repeats: timed passes per size (the median is reported).
        device: ``"cpu"`` or a CUDA device.
        threads: CPU threads for the run (None: torch's default). On a machine shared with other
            jobs one thread gives steadier latencies: several threads wait for each other at every
            operator whenever one of them is descheduled.
        out_dir: output folder (created).
    """
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size and repeats must be >= 1; got {batch_size}, {repeats}")
    bad = [s for s in sizes if len(s) != 2 or min(s) < 1]
    if bad or not sizes:
        raise ValueError(f"sizes must be non-empty (height, width) pairs of positive integers; got {bad or sizes}")
    device_ = torch.device(device)
    if device_.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1; got {threads}")
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    results = []
    try:
        for name in models:
            model = build_model(name).to(device_)
            for size in sorted(sizes, key=lambda s: s[0] * s[1]):
                results.append(measure_size(model, name, tuple(size), batch_size, repeats, device_))
            del model
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(default_threads)
    meta = dict(
        batch_size=batch_size, repeats=repeats, device=str(device_), threads=used_threads,
        torch=torch.__version__,
        memory_method=("torch.cuda.max_memory_allocated" if device_.type == "cuda" else
                       "peak RSS (VmHWM after /proc/self/clear_refs) minus RSS before" if cpu_peak_supported()
                       else "not measurable on this system"),
        gmacs_loglog_slope=_slopes(results, "gmacs"),
    )
    out_dir = Path(out_dir)
    rows = [asdict(r) for r in results]
    write_rows(rows, out_dir / "resolutions.csv")
    write_rows(rows, out_dir / "resolutions.json", meta)
    save_figure(resolutions_figure(results, meta), out_dir / "resolutions.png")
    return results
