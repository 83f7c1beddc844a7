"""A model's products alone: the speed ceiling of any implementation that does the same work.

Every FLOP of CycleMLP is a matrix product or a convolution (the stem and the downsampling
layers); the rest of a forward pass (normalisation, activation, the shifts of Cycle FC, the
branch re-weighting) moves memory. This module records the products a model really executes, at
their exact shapes, strides and arguments, and replays them alone on random data of the same
shapes. The replay's time is what the model would cost if everything but its products were free:
a throughput target above that ceiling cannot be reached on this machine and BLAS by any
implementation that computes the same products, however well it fuses the rest.

    from benchmarks.gemm_bound import record_products, replay_seconds
    calls = record_products(lambda: model(x))
    seconds = replay_seconds(calls, repeats=5)

Inference on CPU is replayed both through ``addmm`` and through the fused oneDNN Linear kernel
CycleMLP's eager path uses; the faster of the two is the ceiling (:func:`ceiling_seconds`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten

# the ATen operators that do a model's multiply-accumulate work
PRODUCT_OPS = frozenset({
    aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
    aten.convolution.default, aten.convolution_backward.default,
})


@dataclass(frozen=True)
class _Meta:
    """A tensor argument, remembered by its layout only."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def materialize(self) -> torch.Tensor:
        size = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) if all(self.shape) else 0
        storage = torch.randn(size, dtype=self.dtype, device=self.device) if self.dtype.is_floating_point \
            else torch.zeros(size, dtype=self.dtype, device=self.device)
        return storage.as_strided(self.shape, self.stride)


@dataclass(frozen=True)
class ProductCall:
    """One recorded product: the operator and its arguments (tensors as layouts)."""

    op: Any
    args: tuple
    kwargs: dict


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[ProductCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PRODUCT_OPS:
            def meta(value: Any) -> Any:
                if isinstance(value, torch.Tensor):
                    return _Meta(tuple(value.shape), tuple(value.stride()), value.dtype, value.device)
                return value

            self.calls.append(ProductCall(func, tree_map(meta, args), tree_map(meta, kwargs)))
        return func(*args, **kwargs)


def record_products(fn: Callable[[], object]) -> list[ProductCall]:
    """Run ``fn`` once and return the products it executed, in order (forward and, if ``fn``
    calls ``backward``, the backward products too)."""
    recorder = _Recorder()
    with recorder:
        fn()
    if not recorder.calls:
        raise ValueError("no matrix product or convolution was executed")
    return recorder.calls


def product_flops(calls: list[ProductCall]) -> int:
    """Multiply-accumulate work of the recorded products, in FLOPs (2 per MAC), counted from
    the operators themselves (a check that the recording saw the model's work)."""
    from torch.utils.flop_counter import FlopCounterMode

    made: dict[_Meta, torch.Tensor] = {}
    inputs = [_replay_inputs(call, made) for call in calls]
    with FlopCounterMode(display=False) as counter:
        for call, (args, kwargs) in zip(calls, inputs):
            call.op(*args, **kwargs)
    return counter.get_total_flops()


def _replay_inputs(call: ProductCall, made: dict[_Meta, torch.Tensor] | None = None) -> tuple[tuple, dict]:
    """Random tensors for a call's arguments; calls that share ``made`` share tensors of equal
    layout (which keeps the replay's memory near one forward pass; re-used data can only make
    the replay faster, so the ceiling stays a ceiling)."""
    made = {} if made is None else made

    def real(value: Any) -> Any:
        if not isinstance(value, _Meta):
            return value
        if value not in made:
            made[value] = value.materialize()
        return made[value]

    return tree_map(real, call.args), tree_map(real, call.kwargs)


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _as_onednn(call: ProductCall, args: tuple, kwargs: dict) -> Callable[[], object] | None:
    """The same ``addmm(bias, x, weight.t())`` as the fused oneDNN linear kernel that CycleMLP's
    CPU inference path uses (None where that kernel does not apply)."""
    if not _ONEDNN or call.op is not aten.addmm.default or kwargs or len(args) != 3:
        return None
    bias, x, weight_t = args
    if bias.dim() != 1 or x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    weight = weight_t.t().contiguous()
    x = x.contiguous()
    return lambda: torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def replay_seconds(calls: list[ProductCall], repeats: int, warmup: int = 1, onednn: bool = False) -> float:
    """Median time of executing the recorded products back to back (inputs made beforehand).
    With ``onednn``, Linear-shaped products run as fused oneDNN kernels instead of ``addmm``."""
    made: dict[_Meta, torch.Tensor] = {}
    inputs = [_replay_inputs(call, made) for call in calls]
    device = next((a.device for args, _ in inputs for a in args if isinstance(a, torch.Tensor)), None)
    steps: list[Callable[[], object]] = []
    for call, (args, kwargs) in zip(calls, inputs):
        fast = _as_onednn(call, args, kwargs) if onednn else None
        steps.append(fast or (lambda call=call, args=args, kwargs=kwargs: call.op(*args, **kwargs)))

    def run() -> None:
        for step in steps:
            step()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        for _ in range(warmup):
            run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def ceiling_seconds(calls: list[ProductCall], repeats: int) -> float:
    """The faster of replaying ``calls`` through ATen's products and through oneDNN Linear
    kernels (the latter only where it applies: CPU fp32)."""
    best = replay_seconds(calls, repeats)
    if _ONEDNN and any(call.op is aten.addmm.default for call in calls):
        best = min(best, replay_seconds(calls, repeats, onednn=True))
    return best
