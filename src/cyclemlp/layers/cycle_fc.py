"""Cycle FC, the spatial operator of CycleMLP.

CycleMLP: A MLP-like Architecture for Dense Prediction (Chen et al., ICLR 2022, arXiv 2107.10224).

Cycle FC gives every input channel ``i`` a fixed integer offset ``(dy_i, dx_i)`` and computes

    out[b, y, x, o] = bias[o] + sum_i weight[o, i] * X[b, y + dy_i, x + dx_i, i]

with zeros read outside the grid. Because the offset belongs to the *input* channel and the
weight is pointwise, that is exactly "shift every channel by its own offset (zero fill), then one
Linear over channels" -- no deformable convolution and no loop over channels.

Tensors are channels-last, ``(B, H, W, C)``, throughout.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import native
from .config import fused_applies, use_fused

__all__ = ["Pattern", "CycleFC", "cycle_fc", "cycle_offsets", "cycle_shift", "normalize_stepsize"]

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


def offset_table(channels: int, stepsize: int | Sequence[int], pattern: Pattern = "official") -> list[tuple[int, int]]:
    """The offsets ``(dy_i, dx_i)`` of :func:`cycle_offsets` as a list of pairs."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    sh, sw = normalize_stepsize(stepsize)
    if pattern == "official":
        if sh != 1 and sw != 1:
            raise ValueError(
                f"pattern 'official' (the authors' released code) only defines stepsizes (1, K) and "
                f"(K, 1); got {(sh, sw)}. Use pattern='paper' for 2-D stepsizes."
            )
        k = max(sh, sw)
        shifts = [((i + k // 2) % k) - k // 2 for i in range(channels)]
        return [(0, s) for s in shifts] if sh == 1 else [(s, 0) for s in shifts]
    if pattern == "paper":
        return [((i % sh) - sh // 2, ((i // sh) % sw) - sw // 2) for i in range(channels)]
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


def cycle_offsets(
    channels: int, stepsize: int | Sequence[int] = (1, 3), pattern: Pattern = "official"
) -> torch.Tensor:
    """Integer offsets ``(dy_i, dx_i)`` of every input channel, as a ``(channels, 2)`` tensor.

    ``official`` is the authors' released code (stepsizes ``(1, K)`` / ``(K, 1)`` only):
    ``s_i = ((i + K//2) mod K) - K//2`` along the stepsize's long axis. ``paper`` is the paper's
    formula, centred: ``dy_i = (i mod S_H) - S_H//2``, ``dx_i = (i // S_H mod S_W) - S_W//2``.
    """
    return torch.tensor(offset_table(channels, stepsize, pattern), dtype=torch.long)


def cycle_shift(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Shift every channel of ``x`` (B, H, W, C) by its own offset, reading zeros outside.

    ``out[b, y, x, i] = x[b, y + dy_i, x + dx_i, i]`` for ``offsets[i] = (dy_i, dx_i)``, a
    ``(C, 2)`` integer tensor on ``x``'s device (or pairs of ints): one gather from the map with the
    source positions clamped to the grid, then zeros wherever the unclamped position lies outside.
    The index is computed from the (possibly symbolic) sizes, so traced and exported graphs serve
    every resolution.
    """
    if not torch.jit.is_scripting():
        if not isinstance(offsets, torch.Tensor):
            offsets = torch.tensor(offsets, dtype=torch.long, device=x.device)
        if not torch.jit.is_tracing():
            _check_input(x, offsets.shape[0])
    batch, height, width, channels = x.shape
    rows = torch.arange(height, device=x.device).view(height, 1, 1) + offsets[:, 0]  # (H, 1, C)
    cols = torch.arange(width, device=x.device).view(1, width, 1) + offsets[:, 1]  # (1, W, C)
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)  # (H, W, C)
    index = rows.clamp(0, height - 1) * width + cols.clamp(0, width - 1)  # (H, W, C)
    index = index.reshape(1, height * width, channels).expand(batch, height * width, channels)
    shifted = x.reshape(batch, height * width, channels).gather(1, index)
    return shifted.view(batch, height, width, channels).masked_fill(~inside, 0.0)


def _check_input(x: torch.Tensor, channels: int) -> None:
    if x.dim() != 4:
        raise ValueError(
            f"Cycle FC expects a channels-last tensor (B, H, W, C); got {x.dim()}-D input of shape "
            f"{tuple(x.shape)}"
        )
    if x.shape[-1] != channels:
        raise ValueError(
            f"Cycle FC expects {channels} channels in the last dimension (B, H, W, C); got input of "
            f"shape {tuple(x.shape)}"
        )


# A leaf for torch.fx symbolic tracing (timm's feature extraction too): its body builds an index
# from the concrete sizes.
torch.fx.wrap("cycle_shift")


def _fused_shift(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """:func:`cycle_shift` by the native CPU kernel (:mod:`cyclemlp.layers.native`) where it runs."""
    if x.device.type == "cpu" and x.dim() == 4 and not x.is_complex() and native.available():
        _check_input(x, offsets.shape[0])
        return native.shift(x, offsets)
    return cycle_shift(x, offsets)


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
    offsets = cycle_offsets(weight.shape[1], stepsize, pattern).to(x.device)
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

    ``fused`` (default :func:`~cyclemlp.layers.config.use_fused`) shifts with the native CPU
    kernel where it runs, else with :func:`cycle_shift`.
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
        self.fused = use_fused()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        # the offsets (dy_i, dx_i) follow from stepsize and pattern: not part of the state dict
        self.register_buffer("offsets", torch.empty(in_features, 2, dtype=torch.long, device=device), persistent=False)
        self.init_non_persistent_buffers()
        self.reset_parameters()

    def init_non_persistent_buffers(self) -> None:
        """Fill the ``(C_in, 2)`` offsets buffer (also timm's hook after building on the meta device)."""
        self.offsets.copy_(cycle_offsets(self.in_features, self.stepsize, self.pattern))

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and not torch.jit.is_scripting():
            if fused_applies(self, x):
                return F.linear(_fused_shift(x, self.offsets), self.weight, self.bias)
        return F.linear(cycle_shift(x, self.offsets), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, stepsize={self.stepsize}, "
            f"pattern={self.pattern!r}, bias={self.bias is not None}"
        )
