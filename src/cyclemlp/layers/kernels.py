"""Fused kernels of the CycleMLP block: the readable forward passes of
:class:`~cyclemlp.models.cyclemlp.CycleMixer` and :class:`~cyclemlp.models.cyclemlp.CycleBlock`,
computed faster and with less memory.

The modules call :func:`cycle_mixer` and :func:`cycle_block` when their ``fused`` attribute is set
and :func:`~cyclemlp.layers.config.fused_applies` agrees (eager mode, no hooks); everything else
here is private to them. The kernels read the modules' parameters and compute the same function:

* The token mixer never materialises its branch outputs. Its shifted inputs are
  ``S = [shift_w(x), shift_h(x), x]`` (the shifts by the native CPU kernel); every branch is
  linear, so ``mean_HW(h + w + c)`` is ``mean_HW(S) @ [W_h | W_w | W_c]^T`` plus biases, and the
  softmax-weighted sum of the branch outputs is a product of ``S`` with per-image weights
  ``a_k[o] * W_k[o, i]``. For training, a custom backward keeps only the mixer input and rebuilds
  the shifted inputs (a shift costs about one copy); the weight and coefficient gradients come
  from per-image products ``g^T @ S_k``, so no branch output is needed there either.
* CPU inference runs the Linear layers as fused oneDNN kernels (the bias, the exact GELU and the
  residual adds inside the product).
* The channel MLP keeps only its input and the first product for backward (GELU is recomputed),
  and runs everything after the first product in row chunks when its hidden layer is large.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .cycle_fc import CycleFC, _fused_shift

__all__ = ["cycle_block", "cycle_mixer"]

_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

# Up to this width the token mixer multiplies by per-image folded weights (B x C x 3C, cheap next to
# the activations); wider, by the three branch weights followed by a weighted sum.
_FOLD_MAX_DIM = 128


def _onednn_inference(x: torch.Tensor) -> bool:
    return _ONEDNN_LINEAR and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32


def _linear(
    x: torch.Tensor, layer: nn.Linear, gelu: bool = False, residual: torch.Tensor | None = None, onednn: bool = False
) -> torch.Tensor:
    """``layer(x)``, then an exact GELU or ``+ residual`` if asked; with ``onednn`` one oneDNN kernel
    (the fused linear kernels of PyTorch's own CPU compiler), which skips the bias broadcast copy
    and the separate elementwise pass."""
    if onednn:
        weight = layer.weight if layer.weight.dtype == x.dtype else layer.weight.to(x.dtype)
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, layer.bias, "add")
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, weight, layer.bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, weight, layer.bias, "none", [], "")
    out = F.linear(x, layer.weight, layer.bias)
    if gelu:
        out = F.gelu(out)
    return out if residual is None else residual + out


# --- the CycleMLP block ----------------------------------------------------------------------------


def cycle_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of a ``CycleBlock`` (``norm1``, ``mixer``, ``norm2``, ``mlp``, ``drop_path``).
    In CPU inference the residual adds ride on the last product of the mixer and of the MLP."""
    if not block.training and _onednn_inference(x):
        x = _mixer(block.mixer, block.norm1(x), residual=x, onednn=True)
        return _channel_mlp(block.mlp, block.norm2(x), residual=x, onednn=True)
    x = x + block.drop_path(_mixer(block.mixer, block.norm1(x)))
    return x + block.drop_path(_channel_mlp(block.mlp, block.norm2(x)))


def _mixer(
    mixer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None, onednn: bool = False
) -> torch.Tensor:
    if getattr(mixer, "fused", False):
        return cycle_mixer(mixer, x, residual, onednn)
    out = mixer(x)  # a mixer without fused kernels (turned off, or another kind)
    return out if residual is None else residual + out


# --- the token mixer -------------------------------------------------------------------------------


def cycle_mixer(
    mixer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None, onednn: bool = False
) -> torch.Tensor:
    """The forward of a ``CycleMixer`` over ``x`` (B, H, W, C), plus ``residual`` if given;
    ``onednn``: CPU float32 inference (see :func:`_linear`)."""
    batch, height, width, dim = x.shape
    layers = [fc for fc in (mixer.width_fc, mixer.height_fc, mixer.channel_fc) if fc is not None]
    n = len(layers)
    weight = torch.cat([fc.weight for fc in layers], dim=1)  # (C, n*C)
    bias = torch.stack(
        [fc.bias if fc.bias is not None else torch.zeros_like(fc.weight[:, 0]) for fc in layers], dim=1
    )  # (C, n)
    offsets = tuple(fc.offsets if isinstance(fc, CycleFC) else None for fc in layers)
    parts = [_shifted(x, o).reshape(batch, height * width, dim) for o in offsets]
    # mean over positions of the summed branch outputs, without computing them
    pooled = F.linear(torch.cat([part.mean(dim=1) for part in parts], dim=1), weight, bias.sum(dim=1))
    # reweight's output index is channel * n + branch. The softmax over the n branches is taken
    # across a (B, n, C) view: over a last dimension of size 3 it is an order of magnitude slower.
    a = mixer.reweight(pooled).reshape(batch, dim, n).transpose(1, 2).softmax(dim=1).transpose(1, 2)  # (B, C, n)
    fold = dim <= _FOLD_MAX_DIM
    if torch.is_grad_enabled():
        out = _MixParts.apply(x, offsets, a, weight, bias, fold, *parts)
    else:
        out = _mix_parts(parts, a, weight, bias, fold, onednn)
    return _linear(out.view(batch, height, width, dim), mixer.proj, residual=residual, onednn=onednn)


def _shifted(x: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    return x if offsets is None else _fused_shift(x, offsets)


def _folded(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image weights ``a_k[o] * W_k[o, i]`` (B, C, n*C) and biases ``sum_k a_k b_k`` (B, 1, C)."""
    batch = a.shape[0]
    dim, n = bias.shape
    mixed_weight = (weight.view(1, dim, n, dim) * a.unsqueeze(-1)).view(batch, dim, n * dim)
    return mixed_weight, (a * bias).sum(dim=-1).unsqueeze(1)


def _mix_parts(
    parts: list[torch.Tensor], a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, fold: bool,
    onednn: bool = False,
) -> torch.Tensor:
    """``sum_k a[:, None, :, k] * (S_k @ W_k^T + b_k)`` over the branch inputs ``S_k`` (B, N, C);
    ``weight`` (C, n*C) holds the branch weights side by side, ``bias`` (C, n), ``a`` (B, C, n)."""
    batch, positions, dim = parts[0].shape
    if fold:
        # n accumulating products with per-image folded weights (as fast as one over the stack)
        mixed_weight, mixed_bias = _folded(a, weight, bias)
        in_place = not torch.is_autocast_enabled(parts[0].device.type)  # autocast casts out-of-place ops only
        out = mixed_bias
        for k, part in enumerate(parts):
            w = mixed_weight[:, :, k * dim:(k + 1) * dim].transpose(1, 2)
            out = out.baddbmm_(part, w) if k and in_place else torch.baddbmm(out, part, w)
        return out
    out = None
    for k, part in enumerate(parts):
        rows = part.reshape(batch * positions, dim)
        w, b = weight[:, k * dim:(k + 1) * dim], bias[:, k]
        if onednn:
            y = torch.ops.mkldnn._linear_pointwise(rows, w.contiguous(), b.contiguous(), "none", [], "")
        else:
            y = F.linear(rows, w, b)
        y = y.view(batch, positions, dim)
        scale = a[:, None, :, k]
        out = y * scale if out is None else out.addcmul_(y, scale)
    return out


def _per_image_backward(positions: int, dim: int) -> bool:
    """Whether :func:`_mix_backward_per_image` beats :func:`_mix_backward_per_branch`.

    The per-image products do elementwise work over B x C x n*C whatever the number of positions
    N; the per-branch products do about two more matrix products over all B x N rows. Per image
    wins from about N >= 64 while N >= C / 2 (B1 at 224: stages 1-3), per branch below (B1's last
    stage at 224: 3.4x faster; 1x1 maps: over 20x); ``python -m benchmarks.mix_backward`` times both.
    """
    return positions >= 64 and 2 * positions >= dim


# ``needs``: whether the gradients of (parts, a, weight, bias) are wanted.


def _mix_backward_per_image(grad, parts, a, weight, bias, needs):
    """Gradients through per-image products ``g^T @ part_k``: no branch output is rebuilt.

    Branch by branch, so that the elementwise work runs over contiguous (B, C, C) products (one
    stacked (B, C, n, C) tensor, broadcast across the branch axis, is slower:
    benchmarks/mix_backward.py)."""
    batch, positions, dim = grad.shape
    grad_parts = [] if needs[0] else None
    grad_a = a.new_empty(a.shape) if needs[1] else None
    grad_weight = weight.new_empty(weight.shape) if needs[2] else None
    grad_bias = None
    grad_t = grad.transpose(1, 2)
    grad_sum = grad.sum(dim=1) if needs[1] or needs[3] else None  # (B, C)
    for k, part in enumerate(parts):
        w_k, a_k = weight[:, k * dim:(k + 1) * dim], a[:, :, k]
        if needs[1] or needs[2]:
            per_image = torch.bmm(grad_t, part)  # (B, C, C): g^T S_k
            if needs[1]:
                grad_a[:, :, k] = (per_image * w_k).sum(dim=-1)
            if needs[2]:
                grad_weight[:, k * dim:(k + 1) * dim] = (per_image * a_k.unsqueeze(-1)).sum(dim=0)
            del per_image
        if needs[0]:
            grad_parts.append(torch.bmm(grad, w_k.unsqueeze(0) * a_k.unsqueeze(-1)))
    if needs[1]:
        grad_a += bias * grad_sum.unsqueeze(-1)
    if needs[3]:
        grad_bias = (a * grad_sum.unsqueeze(-1)).sum(dim=0)
    return grad_parts, grad_a, grad_weight, grad_bias


def _mix_backward_per_branch(grad, parts, a, weight, bias, needs):
    """Gradients branch by branch with plain matrix products over all ``B*N`` rows; the
    coefficient gradient needs each branch output, recomputed here."""
    batch, positions, dim = grad.shape
    grad_parts = [] if needs[0] else None
    grad_weight = weight.new_empty(weight.shape) if needs[2] else None
    grad_a = a.new_empty(a.shape) if needs[1] else None
    grad_bias = bias.new_empty(bias.shape) if needs[3] else None
    for k, part in enumerate(parts):
        rows = part.reshape(batch * positions, dim)
        cols = slice(k * dim, (k + 1) * dim)
        grad_k = (grad * a[:, None, :, k]).view(batch * positions, dim)  # d out / d y_k
        if needs[1]:
            y_k = F.linear(rows, weight[:, cols], bias[:, k]).view(batch, positions, dim)
            grad_a[:, :, k] = (grad * y_k).sum(dim=1)
        if needs[2]:
            torch.mm(grad_k.t(), rows, out=grad_weight[:, cols])
        if needs[3]:
            grad_bias[:, k] = grad_k.sum(dim=0)
        if needs[0]:
            grad_parts.append((grad_k @ weight[:, cols]).view(batch, positions, dim))
    return grad_parts, grad_a, grad_weight, grad_bias


class _MixParts(torch.autograd.Function):
    """:func:`_mix_parts` keeping only the mixer input ``x`` for the backward: the branch inputs
    are rebuilt from it there, by the shifts ``offsets`` (None: ``x`` itself)."""

    @staticmethod
    def forward(ctx, x, offsets, a, weight, bias, fold, *parts):  # type: ignore[override]
        ctx.offsets = offsets
        ctx.save_for_backward(x, a, weight, bias)
        return _mix_parts(list(parts), a, weight, bias, fold)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, a, weight, bias = ctx.saved_tensors
        batch, positions, dim = grad.shape
        grad = grad.contiguous()
        needs = (any(ctx.needs_input_grad[6:]), *ctx.needs_input_grad[2:5])
        # under autocast the saved tensors and the gradient can differ in precision: compute in
        # the gradient's, hand back each gradient in its input's
        dtypes = (a.dtype, weight.dtype, bias.dtype)
        x, a, weight, bias = (t.to(grad.dtype) for t in (x, a, weight, bias))
        with torch.no_grad():  # recomputed
            parts = [_shifted(x, o).reshape(batch, positions, dim) for o in ctx.offsets]
        backward = _mix_backward_per_image if _per_image_backward(positions, dim) else _mix_backward_per_branch
        grad_parts, grad_a, grad_weight, grad_bias = backward(grad, parts, a, weight, bias, needs)
        grad_a, grad_weight, grad_bias = (
            g if g is None else g.to(dt) for g, dt in zip((grad_a, grad_weight, grad_bias), dtypes)
        )
        grad_parts = grad_parts or [None] * len(ctx.offsets)
        return (None, None, grad_a, grad_weight, grad_bias, None, *grad_parts)


# --- the channel MLP -------------------------------------------------------------------------------
#
# The hidden layer of the MLP is 4x as wide as its input: at B1's first stage, batch 32, one such
# tensor is 103 MB. glibc maps every block over its mmap threshold (at most 32 MB) anew from the
# system, so each fresh tensor that large is page-faulted in by whatever op writes it first (the
# bias copy of the first product, the GELU), which can cost more than the op itself. Row chunk by
# row chunk, everything after the first product (GELU, the second product, the whole backward)
# needs only chunk-sized temporaries, which the heap hands back warm and which stay in cache.
# `python -m benchmarks.mlp_chunks` times both forms at B1's stage shapes: chunks win clearly at
# the first stage; from the third stage on (hidden layers of 32 MB or less) whole tensors are as
# fast or faster, so those run in one chunk.
_MLP_CHUNK_ELEMENTS = 1 << 21  # hidden-layer elements per chunk (8 MB in float32)
_MLP_WHOLE_MAX_ELEMENTS = 1 << 23  # up to 32 MB (glibc's largest mmap threshold) the heap serves it


def _mlp_chunk_rows(rows: int, hidden: int) -> int:
    """Rows per chunk over ``rows`` rows with ``hidden`` hidden features: all of them while the
    hidden layer fits in ``_MLP_WHOLE_MAX_ELEMENTS``, else ``_MLP_CHUNK_ELEMENTS`` worth (smaller
    chunks make slower products: benchmarks/mlp_chunks.py)."""
    if rows * hidden <= _MLP_WHOLE_MAX_ELEMENTS:
        return max(rows, 1)
    return max(64, _MLP_CHUNK_ELEMENTS // max(hidden, 1))


def _channel_mlp(
    mlp: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None, onednn: bool = False
) -> torch.Tensor:
    """``mlp.fc2(GELU(mlp.fc1(x)))`` (timm's ``Mlp`` without dropout or norm) plus ``residual``."""
    rows = x.reshape(-1, x.shape[-1])
    fc1, fc2 = mlp.fc1, mlp.fc2
    if onednn:
        res = None if residual is None else residual.reshape(-1, residual.shape[-1])
        step = _mlp_chunk_rows(rows.shape[0], fc1.out_features)
        if rows.shape[0] <= step:
            out = _linear(_linear(rows, fc1, gelu=True, onednn=True), fc2, residual=res, onednn=True)
        else:
            out = rows.new_empty(rows.shape[0], fc2.out_features)
            for start in range(0, rows.shape[0], step):
                chunk = slice(start, start + step)
                out[chunk] = _linear(_linear(rows[chunk], fc1, gelu=True, onednn=True), fc2,
                                     residual=None if res is None else res[chunk], onednn=True)
        return out.view(*x.shape[:-1], fc2.out_features)
    if torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
        out = _ChunkedMlp.apply(rows, fc1.weight, fc1.bias, fc2.weight, fc2.bias).view(*x.shape[:-1], -1)
    else:
        out = mlp(x)
    return out if residual is None else residual + out


class _ChunkedMlp(torch.autograd.Function):
    """``fc2(GELU(fc1(x)))`` over ``(R, C)`` rows; saves ``x`` and ``h = fc1(x)``, not ``GELU(h)``,
    and runs everything after the first product in row chunks of :func:`_mlp_chunk_rows`."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):  # type: ignore[override]
        hidden = F.linear(x, w1, b1)  # kept for the backward
        out = x.new_empty(x.shape[0], w2.shape[0])
        step = _mlp_chunk_rows(*hidden.shape)
        for start in range(0, x.shape[0], step):
            rows = slice(start, start + step)
            act = F.gelu(hidden[rows])
            if b2 is None:
                torch.mm(act, w2.t(), out=out[rows])
            else:
                torch.addmm(b2, act, w2.t(), out=out[rows])
        ctx.save_for_backward(x, hidden, w1, w2)
        ctx.has_bias = (b1 is not None, b2 is not None)
        return out

    @staticmethod
    @once_differentiable  # a second derivative would need the products recorded; say so
    def backward(ctx, grad):  # type: ignore[override]
        x, hidden, w1, w2 = ctx.saved_tensors
        grad = grad.contiguous()
        needs_x, needs_w1, needs_b1, needs_w2, needs_b2 = ctx.needs_input_grad
        grad_x = x.new_empty(x.shape) if needs_x else None
        grad_w1 = grad_w2 = grad_b1 = None
        grad_b2 = grad.sum(dim=0) if needs_b2 and ctx.has_bias[1] else None
        step = _mlp_chunk_rows(*hidden.shape)
        for start in range(0, x.shape[0], step):
            rows = slice(start, start + step)
            grad_rows, hidden_rows = grad[rows], hidden[rows]
            if needs_w2:  # GELU recomputed
                grad_w2 = _accumulate_mm(grad_w2, grad_rows.t(), F.gelu(hidden_rows))
            if not (needs_x or needs_w1 or needs_b1):
                continue
            grad_hidden = torch.ops.aten.gelu_backward(grad_rows @ w2, hidden_rows)
            if needs_w1:
                grad_w1 = _accumulate_mm(grad_w1, grad_hidden.t(), x[rows])
            if needs_b1 and ctx.has_bias[0]:
                grad_b1 = grad_hidden.sum(dim=0) if grad_b1 is None else grad_b1.add_(grad_hidden.sum(dim=0))
            if grad_x is not None:
                torch.mm(grad_hidden, w1, out=grad_x[rows])
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def _accumulate_mm(total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b) if total is None else total.addmm_(a, b)
