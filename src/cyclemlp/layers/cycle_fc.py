"""Cycle FC, the spatial operator of CycleMLP.

CycleMLP: A MLP-like Architecture for Dense Prediction (Chen et al., ICLR 2022, arXiv 2107.10224).

Cycle FC gives every input channel ``i`` a fixed integer offset ``(dy_i, dx_i)`` and computes

    out[b, y, x, o] = bias[o] + sum_i weight[o, i] * X[b, y + dy_i, x + dx_i, i]

with zeros read outside the grid. Because the offset belongs to the *input* channel and the
weight is pointwise, that is exactly "shift every channel by its own offset (zero fill), then one
Linear over channels". This module implements it that way: one shift (on CPU the native one-pass
kernel of :mod:`cyclemlp.layers.native`, else a one-hot depthwise convolution; a gather or slice copies
elsewhere) and one matrix multiply, with no deformable convolution and no loop over channels.

Tensors are channels-last, ``(B, H, W, C)``, throughout.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import native

__all__ = ["Pattern", "CycleFC", "cycle_fc", "cycle_offsets", "cycle_shift", "normalize_stepsize", "shift_stack"]

Pattern = Literal["official", "paper"]
PATTERNS: tuple[str, ...] = ("official", "paper")


def normalize_stepsize(stepsize: int | Sequence[int]) -> tuple[int, int]:
    """Return ``stepsize`` as ``(S_H, S_W)``; an int ``K`` stands for the square ``(K, K)``."""
    if isinstance(stepsize, bool):
        raise TypeError(f"stepsize must be an int or a pair of ints, got {stepsize!r}")
    if isinstance(stepsize, int):
        pair = (stepsize, stepsize)
    else:
        pair = tuple(stepsize)
        if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in pair):
            raise TypeError(f"stepsize must be an int or a pair of ints, got {stepsize!r}")
    if min(pair) < 1:
        raise ValueError(f"stepsize entries must be >= 1, got {pair}")
    return pair  # type: ignore[return-value]


@functools.lru_cache(maxsize=256)
def _offsets(channels: int, stepsize: tuple[int, int], pattern: str) -> tuple[tuple[int, int], ...]:
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    sh, sw = stepsize
    if pattern == "official":
        if sh != 1 and sw != 1:
            raise ValueError(
                f"pattern 'official' (the authors' released code) only defines stepsizes (1, K) and "
                f"(K, 1); got {stepsize}. Use pattern='paper' for 2-D stepsizes."
            )
        k = max(sh, sw)
        shifts = [((i + k // 2) % k) - k // 2 for i in range(channels)]
        if sh == 1:
            return tuple((0, s) for s in shifts)
        return tuple((s, 0) for s in shifts)
    if pattern == "paper":
        return tuple(
            ((i % sh) - sh // 2, ((i // sh) % sw) - sw // 2) for i in range(channels)
        )
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


def cycle_offsets(
    channels: int, stepsize: int | Sequence[int] = (1, 3), pattern: Pattern = "official"
) -> torch.Tensor:
    """Integer offsets ``(dy_i, dx_i)`` of every input channel, as a ``(channels, 2)`` tensor.

    ``official`` is the authors' released code (stepsizes ``(1, K)`` / ``(K, 1)`` only):
    ``s_i = ((i + K//2) mod K) - K//2`` along the stepsize's long axis. ``paper`` is the paper's
    formula, centred: ``dy_i = (i mod S_H) - S_H//2``, ``dx_i = (i // S_H mod S_W) - S_W//2``.
    """
    return torch.tensor(_offsets(channels, normalize_stepsize(stepsize), pattern), dtype=torch.long)


OffsetTable = tuple[tuple[int, int], ...]


def _as_table(offsets: torch.Tensor | Sequence[Sequence[int]]) -> OffsetTable:
    if isinstance(offsets, torch.Tensor):
        if offsets.dim() != 2 or offsets.shape[1] != 2:
            raise ValueError(f"offsets must have shape (C, 2); got {tuple(offsets.shape)}")
        offsets = offsets.tolist()
    return tuple((int(dy), int(dx)) for dy, dx in offsets)


class _ShiftPlan(NamedTuple):
    """How to build a shift stack eagerly for one feature-map size: a gather index into the unpadded map
    (out-of-grid reads clamped to the edge) and the border strips whose clamped reads must be
    zeroed, as (dimension 1 or 2, leading or trailing, invalid-mask) entries."""

    index: torch.Tensor
    strips: tuple[tuple[int, bool, torch.Tensor], ...]


def _build_plan(
    height: int, width: int, tables: tuple[OffsetTable, ...], device: torch.device
) -> _ShiftPlan:
    channels = len(tables[0])
    table = torch.tensor([pair for t in tables for pair in t], dtype=torch.long, device=device)
    source = torch.arange(channels, device=device).repeat(len(tables))
    src_y = torch.arange(height, device=device).view(height, 1, 1) + table[:, 0]  # (H, 1, KC)
    src_x = torch.arange(width, device=device).view(1, width, 1) + table[:, 1]  # (1, W, KC)
    flat = (src_y.clamp(0, height - 1) * width + src_x.clamp(0, width - 1)) * channels + source
    index = flat.reshape(1, height * width * len(source))  # explicit sizes: no export guards
    valid_y = (src_y >= 0) & (src_y < height)
    valid_x = (src_x >= 0) & (src_x < width)
    # Invalid reads only happen within the outer ph rows / pw columns.
    pad_h = max(abs(dy) for t in tables for dy, _ in t)
    pad_w = max(abs(dx) for t in tables for _, dx in t)
    strips = []
    if pad_h:
        strips.append((1, True, ~(valid_y[:pad_h] & valid_x)))
        strips.append((1, False, ~(valid_y[-pad_h:] & valid_x)))
    if pad_w:
        strips.append((2, True, ~(valid_y & valid_x[:, :pad_w])))
        strips.append((2, False, ~(valid_y & valid_x[:, -pad_w:])))
    return _ShiftPlan(index, tuple(strips))


_PLAN_CACHE: dict[tuple, _ShiftPlan] = {}
_PLAN_CACHE_SIZE = 64


def _plan_for(height: int, width: int, tables: tuple[OffsetTable, ...], device: torch.device) -> _ShiftPlan:
    key = (height, width, str(device), tables)
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        if len(_PLAN_CACHE) >= _PLAN_CACHE_SIZE:
            _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
        plan = _PLAN_CACHE[key] = _build_plan(height, width, tables, device)
    return plan


def _check_input(x: torch.Tensor, channels: int, what: str) -> None:
    if torch.jit.is_tracing():
        return  # a traced graph keeps no Python checks
    if x.dim() != 4:
        raise ValueError(
            f"{what} expects a channels-last tensor (B, H, W, C); got {x.dim()}-D input of shape "
            f"{tuple(x.shape)}"
        )
    if x.shape[-1] != channels:
        raise ValueError(
            f"{what} expects {channels} channels in the last dimension (B, H, W, C); got input of "
            f"shape {tuple(x.shape)}"
        )


# --- eager CPU shift as a depthwise convolution ------------------------------------------------
#
# The fallback where the native kernel (cyclemlp.layers.native) cannot be built. One offset table is a
# depthwise convolution whose kernel has a single 1 per channel, at the channel's offset. oneDNN
# runs it with its vectorised channels-last kernel, 1.3-3.3x faster than the slice copies or the
# gather below at B1's stage shapes (benchmarks/shift_kernels.py), and autograd's backward is the
# same kernel. Products with 0 and 1 and sums with zeros are exact in IEEE arithmetic, so the
# result equals the copy bit for bit, with two exceptions that only matter for non-finite input: an
# Inf or NaN also turns its channel's neighbours within the kernel into NaN (0 * Inf; the authors'
# deform_conv2d spreads it further, through its zero-weight bilinear taps), and -0.0 comes out as
# +0.0.
_CONV_MAX_TAPS = 16


def _fp32_convs_exact() -> bool:
    """oneDNN convolutions keep fp32 (no bf16/tf32 down-conversion chosen by the user)."""
    backend = torch.backends.mkldnn
    precisions = [getattr(backend, "fp32_precision", "none"), getattr(getattr(backend, "conv", None), "fp32_precision", "none")]
    return all(p in ("none", "ieee") for p in precisions)


def _conv_shift_applies(x: torch.Tensor, table: OffsetTable) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4:
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and _fp32_convs_exact()):
        return False
    return _table_info(table).kernel is not None


@functools.lru_cache(maxsize=256)
def _conv_kernel(table: OffsetTable) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """The one-hot depthwise kernel ``(C, 1, 2*ph+1, 2*pw+1)`` of an offset table and its padding,
    or None when it would have more than ``_CONV_MAX_TAPS`` taps (large stepsizes: the copy wins)."""
    pad_h = max(abs(dy) for dy, _ in table)
    pad_w = max(abs(dx) for _, dx in table)
    if (2 * pad_h + 1) * (2 * pad_w + 1) > _CONV_MAX_TAPS:
        return None
    with torch.inference_mode(False):  # cached: must stay usable by later autograd calls
        kernel = torch.zeros(len(table), 1, 2 * pad_h + 1, 2 * pad_w + 1)
        for channel, (dy, dx) in enumerate(table):
            kernel[channel, 0, pad_h + dy, pad_w + dx] = 1.0
    return kernel, (pad_h, pad_w)


def _conv_shift(x: torch.Tensor, table: OffsetTable) -> torch.Tensor:
    """``x`` (B, H, W, C) shifted by one offset table as a one-hot depthwise convolution; returns a
    contiguous (B, H, W, C) tensor. Differentiable (the backward is the adjoint convolution)."""
    kernel, padding = _table_info(table).kernel  # type: ignore[misc]
    nchw = x.contiguous().permute(0, 3, 1, 2)  # a channels-last NCHW view, no copy
    return F.conv2d(nchw, kernel, padding=padding, groups=x.shape[-1]).permute(0, 2, 3, 1)


class _TableInfo(NamedTuple):
    table: OffsetTable
    zero: bool  # all offsets zero: the shift is the identity
    kernel: tuple[torch.Tensor, tuple[int, int]] | None  # one-hot depthwise kernel and padding
    offsets: torch.Tensor  # (C, 2) int32, for the native kernel
    adjoint: torch.Tensor  # -offsets: the backward's shift


# Per offset-table object. Keyed by identity, so the hot path neither scans nor hashes the C pairs
# on every call (the entry keeps the table, so its id cannot be reused while the entry lives).
_TABLE_INFO: dict[int, _TableInfo] = {}


def _table_info(table: OffsetTable) -> _TableInfo:
    entry = _TABLE_INFO.get(id(table))
    if entry is None or entry.table is not table:
        if len(_TABLE_INFO) >= 1024:
            _TABLE_INFO.clear()
        zero = not any(dy or dx for dy, dx in table)
        with torch.inference_mode(False):  # cached: must stay usable outside inference mode
            offsets = torch.tensor(table, dtype=torch.int32).reshape(len(table), 2)
            entry = _TABLE_INFO[id(table)] = _TableInfo(
                table, zero, None if zero else _conv_kernel(table), offsets, -offsets)
    return entry


class _NativeShift(torch.autograd.Function):
    """The native one-pass shift; its backward is the same kernel with the negated offsets."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, offsets: torch.Tensor, adjoint: torch.Tensor) -> torch.Tensor:
        ctx.offsets = (offsets, adjoint)
        return torch.ops.cyclemlp.shift(x, offsets)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        offsets, adjoint = ctx.offsets
        return _NativeShift.apply(grad, adjoint, offsets), None, None


def _native_applies(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dim() == 4 and not x.is_complex() and native.available()


def eager_shift(x: torch.Tensor, table: OffsetTable) -> torch.Tensor:
    """One offset table in eager mode, differentiable: ``x`` itself for a table of zeros; on CPU the
    native kernel (:mod:`cyclemlp.layers.native`), or where it cannot be built the depthwise convolution
    (float32); the gather/slice kernels elsewhere."""
    info = _table_info(table)
    if info.zero:
        return x
    if _native_applies(x):
        return _NativeShift.apply(x, info.offsets, info.adjoint)
    if info.kernel is not None and _conv_shift_applies(x, table):
        return _conv_shift(x, table)
    return _ShiftStack.apply(x, (table,))


def shift_stack(x: torch.Tensor, tables: Sequence[torch.Tensor | Sequence[Sequence[int]]]) -> torch.Tensor:
    """Shifted copies of ``x`` (B, H, W, C), one per offset table, concatenated along channels.

    Returns ``(B, H, W, K * C)`` with ``out[..., k * C + i] = x[b, y + dy, x + dx, i]`` for
    ``(dy, dx) = tables[k][i]``, zeros outside the grid. A single gather produces all K copies
    (reads beyond the edge clamped), then the few border strips that read outside are zeroed.
    """
    tables = tuple(_as_table(t) for t in tables)
    if not tables or any(len(t) != len(tables[0]) for t in tables):
        raise ValueError("shift_stack needs one or more offset tables of equal length")
    _check_input(x, len(tables[0]), "Cycle FC")
    if len(tables) == 1 and not any(dy or dx for dy, dx in tables[0]):
        return x
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return _padded_gather_shift(x, tables)
    if len(tables) == 1 and _get_current_dispatch_mode() is None:
        return eager_shift(x, tables[0])
    return _ShiftStack.apply(x, tables)


def _padded_gather_shift(x: torch.Tensor, tables: tuple[OffsetTable, ...]) -> torch.Tensor:
    """Graph-mode shift (export, ONNX, compile, trace): zero pad by the largest offset, then one
    gather whose index is computed from the (possibly symbolic) sizes, so one graph serves every
    resolution with no shape guards."""
    batch, height, width, channels = x.shape
    pad_h = max(abs(dy) for t in tables for dy, _ in t)
    pad_w = max(abs(dx) for t in tables for _, dx in t)
    table = torch.tensor([pair for t in tables for pair in t], dtype=torch.long, device=x.device)
    source = torch.arange(channels, device=x.device).repeat(len(tables))
    rows = torch.arange(height, device=x.device).view(height, 1, 1) + (table[:, 0] + pad_h)
    cols = torch.arange(width, device=x.device).view(1, width, 1) + (table[:, 1] + pad_w)
    index = (rows * (width + 2 * pad_w) + cols) * channels + source  # (H, W, KC)
    padded = F.pad(x, (0, 0, pad_w, pad_w, pad_h, pad_h))
    padded = padded.reshape(batch, (height + 2 * pad_h) * (width + 2 * pad_w) * channels)
    return padded[:, index]  # (B, H, W, KC) straight from the index's shape: no reshape guards


_MAX_PERIOD = 16
_PERIOD_CACHE: dict[OffsetTable, int | None] = {}


def _period(table: OffsetTable) -> int | None:
    """The smallest P <= 16 with ``table[i] == table[i % P]`` for every channel, or None.

    Both offset patterns repeat with a period of at most S_H * S_W channels, so each table splits
    into P channel slices ``r::P`` that share one offset."""
    if table not in _PERIOD_CACHE:
        found = None
        for period in range(1, min(_MAX_PERIOD, len(table)) + 1):
            if all(table[i] == table[i % period] for i in range(period, len(table))):
                found = period
                break
        _PERIOD_CACHE[table] = found
    return _PERIOD_CACHE[table]


# The slice copies write the stack in P interleaved passes: while the stack stays in cache that
# costs nothing and they beat the gather (which reads an index per element) by about 2x; on
# stacks of more than about 8 MB the repeated passes go to memory and the gather wins
# (benchmarks/shift_kernels.py measures both).
_SLICED_MAX_ELEMENTS = 1 << 21


def _sliced_shift(x: torch.Tensor, tables: tuple[OffsetTable, ...], periods: tuple[int, ...]) -> torch.Tensor:
    """Eager shift as strided slice copies: for each table and channel slice ``r::P`` one copy of
    the in-grid window, and zeros in the strips that read outside. No index tensor is read."""
    batch, height, width, channels = x.shape
    out = x.new_empty(batch, height, width, len(tables) * channels)
    for k, (table, period) in enumerate(zip(tables, periods)):
        for r in range(min(period, channels)):
            dy, dx = table[r]
            dst = out[..., k * channels + r:(k + 1) * channels:period]
            src = x[..., r::period]
            rows, cols = height - abs(dy), width - abs(dx)
            if rows <= 0 or cols <= 0:
                dst.zero_()
                continue
            y0, x0 = max(-dy, 0), max(-dx, 0)  # first output row / column that reads inside
            dst[:, y0:y0 + rows, x0:x0 + cols].copy_(src[:, y0 + dy:y0 + dy + rows, x0 + dx:x0 + dx + cols])
            # zero what reads outside: the rows above/below the window, then (within its rows)
            # the columns left/right of it
            if dy < 0:
                dst[:, :y0].zero_()
            elif dy > 0:
                dst[:, rows:].zero_()
            if dx < 0:
                dst[:, y0:y0 + rows, :x0].zero_()
            elif dx > 0:
                dst[:, y0:y0 + rows, cols:].zero_()
    return out


def _gather_shift(x: torch.Tensor, tables: tuple[OffsetTable, ...]) -> torch.Tensor:
    """Eager shift. Stacks of up to 2M elements: strided slice copies (:func:`_sliced_shift`).
    Larger stacks, or offsets without a short channel period: one gather with edge-clamped reads from the unpadded
    map (no padded copy), then the thin border strips whose reads fell outside are zeroed."""
    batch, height, width, channels = x.shape
    if x.numel() * len(tables) <= _SLICED_MAX_ELEMENTS:
        periods = tuple(_period(t) for t in tables)
        if all(p is not None for p in periods):
            return _sliced_shift(x, tables, periods)  # type: ignore[arg-type]
    plan = _plan_for(height, width, tables, x.device)
    out = torch.gather(x.reshape(batch, height * width * channels), 1, plan.index.expand(batch, -1))
    out = out.view(batch, height, width, len(tables) * channels)
    for dim, leading, invalid in plan.strips:
        size = invalid.shape[dim - 1]
        start = 0 if leading else out.shape[dim] - size
        out.narrow(dim, start, size).masked_fill_(invalid, 0.0)
    return out


class _ShiftStack(torch.autograd.Function):
    """Shift stack whose backward is again a shift (by the negated offsets), summed over the
    stacked copies: a gather instead of the scatter-add that autograd would derive."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tables: tuple[OffsetTable, ...]) -> torch.Tensor:
        ctx.tables = tables
        return _gather_shift(x, tables)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        tables = ctx.tables
        batch, height, width, stacked = grad.shape
        adjoint = (tuple((-dy, -dx) for table in tables for dy, dx in table),)
        grad_x = _ShiftStack.apply(grad.contiguous(), adjoint)
        if len(tables) > 1:
            grad_x = grad_x.view(batch, height, width, len(tables), stacked // len(tables)).sum(dim=3)
        return grad_x, None


def cycle_shift(x: torch.Tensor, offsets: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
    """Shift every channel of ``x`` (B, H, W, C) by its own offset, reading zeros outside.

    ``out[b, y, x, i] = x[b, y + dy_i, x + dx_i, i]`` for ``offsets[i] = (dy_i, dx_i)``.
    Eagerly on CPU one pass of the native kernel (or its fallbacks, see :func:`eager_shift`); in graph
    mode a zero pad by the largest offset followed by one gather with a flat index.
    """
    return shift_stack(x, (offsets,))


# The shifts are leaves for torch.fx symbolic tracing: their bodies look at concrete shapes.
torch.fx.wrap("shift_stack")
torch.fx.wrap("cycle_shift")


def cycle_fc(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stepsize: int | Sequence[int] = (1, 3),
    pattern: Pattern = "official",
) -> torch.Tensor:
    """Functional Cycle FC over channels-last ``x`` (B, H, W, C_in); ``weight`` is (C_out, C_in)."""
    if weight.dim() != 2:
        raise ValueError(f"cycle_fc weight must be (C_out, C_in); got shape {tuple(weight.shape)}")
    offsets = _offsets(weight.shape[1], normalize_stepsize(stepsize), pattern)
    return F.linear(cycle_shift(x, offsets), weight, bias)


class CycleFC(nn.Module):
    """Cycle FC layer over channels-last input ``(B, H, W, in_features)``.

    Args:
        in_features: input channels ``C_in``.
        out_features: output channels ``C_out``.
        stepsize: ``(S_H, S_W)`` receptive field of the channel-wise offsets; an int means square.
            ``(1, K)`` mixes along the width, ``(K, 1)`` along the height, ``(1, 1)`` is a plain
            channel FC, and stepsizes larger than the feature map are allowed.
        pattern: ``"official"`` (the authors' released code, needed by their weights) or
            ``"paper"`` (the paper's formula, which also covers 2-D stepsizes such as 3x3).
        bias: learn an additive bias.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        stepsize: int | Sequence[int] = (1, 3),
        pattern: Pattern = "official",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.stepsize = normalize_stepsize(stepsize)
        self.pattern = pattern
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.offset_table: OffsetTable = _offsets(in_features, self.stepsize, pattern)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(cycle_shift(x, self.offset_table), self.weight, self.bias)

    @property
    def offsets(self) -> torch.Tensor:
        """The ``(C_in, 2)`` integer offsets ``(dy_i, dx_i)`` this layer reads its input at."""
        return torch.tensor(self.offset_table, dtype=torch.long)

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, stepsize={self.stepsize}, "
            f"pattern={self.pattern!r}, bias={self.bias is not None}"
        )
