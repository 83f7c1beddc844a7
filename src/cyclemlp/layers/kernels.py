"""Fast and memory-lean kernels of the CycleMLP block, written with PyTorch ops.

Inference on CPU runs the block's Linear layers as fused oneDNN kernels (:func:`linear`,
:func:`use_onednn`).

Autograd would keep every intermediate a block produces. Two custom backward passes keep only
what is cheap to have and recompute the rest:

* :func:`mix_parts` — the token mixer's softmax-weighted sum of its branch outputs. Autograd
  would store the shifted inputs of the branches (or the three branch outputs); here only the
  mixer input is stored and the shifted inputs are rebuilt in the backward pass. The gradients of
  the weights and of the mixing coefficients come from per-image products ``g^T @ S_k``, so no
  branch output is ever needed.
* :func:`gelu_linear` — ``Linear(GELU(h))``: stores ``h`` only, not also ``GELU(h)``.
* :func:`channel_mlp` — the whole ``Linear -> GELU -> Linear`` on CPU, stores the same as
  :func:`gelu_linear` (its input and ``h``) but runs everything after the first product in row
  chunks, so no temporary the size of the hidden layer is ever allocated (see below).

Both fall back to plain autograd under tracing/compiling and skip the bookkeeping without grads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .cycle_fc import OffsetTable, eager_shift

__all__ = ["channel_mlp", "chunked_mlp_applies", "eager_mixing", "gelu_linear", "linear", "mix_branches", "mix_parts", "mlp_chunk_rows", "use_onednn"]

_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def use_onednn(x: torch.Tensor) -> bool:
    """Whether the block may run its Linear layers as fused oneDNN kernels.

    Only for CPU float32 inference in eager mode: with gradients, under tracing, compiling,
    scripting or any dispatch mode (FLOP counters, fake tensors), and on other devices, the
    plain ``torch.nn.functional`` ops run instead.
    """
    if (
        not _ONEDNN_LINEAR
        or torch.is_grad_enabled()
        or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.compiler.is_compiling()
        or _get_current_dispatch_mode() is not None
    ):
        return False
    return x.device.type == "cpu" and x.dtype == torch.float32


def linear(
    x: torch.Tensor,
    layer: nn.Linear,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
    onednn: bool = False,
) -> torch.Tensor:
    """``layer(x)``, then an exact GELU or ``+ residual`` if asked.

    With ``onednn`` (see :func:`use_onednn`) the whole thing is one oneDNN kernel — the fused
    linear kernels PyTorch's own CPU compiler emits — which skips the bias broadcast copy and the
    separate elementwise pass of ``F.linear`` followed by the activation or the add.
    """
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


def _plain_graph() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or not torch.is_grad_enabled()


def _weighted_branch_sum(
    rows: list[torch.Tensor], a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, batch: int, onednn: bool
) -> torch.Tensor:
    """``sum_k a_k * (rows_k @ W_k^T + b_k)`` from n products over ``(B*N, C)`` row matrices
    (2-D column slices are fine: products read them in place)."""
    dim = bias.shape[0]
    out = None
    for k, branch_rows in enumerate(rows):
        w, b = weight[:, k * dim:(k + 1) * dim], bias[:, k]
        if onednn:
            y = torch.ops.mkldnn._linear_pointwise(branch_rows, w.contiguous(), b.contiguous(), "none", [], "")
        else:
            y = F.linear(branch_rows, w, b)
        y = y.view(batch, -1, dim)
        scale = a[:, None, :, k]
        out = y * scale if out is None else out.addcmul_(y, scale)
    return out


def _folded(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image weights ``a_k[o] * W_k[o, i]`` (B, C, n*C) and biases ``sum_k a_k b_k`` (B, 1, C)."""
    batch = a.shape[0]
    dim, n = bias.shape
    mixed_weight = (weight.view(1, dim, n, dim) * a.unsqueeze(-1)).view(batch, dim, n * dim)
    return mixed_weight, (a * bias).sum(dim=-1).unsqueeze(1)


def _mix(stacked: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, fold: bool) -> torch.Tensor:
    batch, positions, _ = stacked.shape
    dim, n = bias.shape
    if fold:
        # one bmm with per-image folded weights
        mixed_weight, mixed_bias = _folded(a, weight, bias)
        return torch.baddbmm(mixed_bias, stacked, mixed_weight.transpose(1, 2))
    rows = stacked.reshape(batch * positions, n * dim)
    return _weighted_branch_sum([rows[:, k * dim:(k + 1) * dim] for k in range(n)], a, weight, bias, batch, False)


def _mix_parts(
    parts: list[torch.Tensor], a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, fold: bool, onednn: bool = False
) -> torch.Tensor:
    """:func:`_mix` over the branch inputs as separate ``(B, N, C)`` tensors."""
    batch, positions, dim = parts[0].shape
    if fold:
        # the folded bmm as n accumulating bmms, one per branch input (as fast as one over the stack)
        mixed_weight, mixed_bias = _folded(a, weight, bias)
        in_place = not torch.is_autocast_enabled(parts[0].device.type)  # autocast casts out-of-place ops only
        out = mixed_bias
        for k, part in enumerate(parts):
            w = mixed_weight[:, :, k * dim:(k + 1) * dim].transpose(1, 2)
            out = out.baddbmm_(part, w) if k and in_place else torch.baddbmm(out, part, w)
        return out
    rows = [part.reshape(batch * positions, dim) for part in parts]
    return _weighted_branch_sum(rows, a, weight, bias, batch, onednn)


def _per_image_backward(positions: int, dim: int) -> bool:
    """Whether :func:`_mix_backward_per_image` beats :func:`_mix_backward_per_branch`.

    The per-image products do elementwise work over B x C x n*C whatever the number of positions
    N; the per-branch products do about two more matrix products over all B x N rows. Measured
    (benchmarks/mix_backward.py): per-image wins from about N >= 64 while N >= C / 2 (B1 at 224:
    stages 1-3), per-branch below (B1's last stage at 224: 3.4x faster; 1x1 maps: over 20x).
    """
    return positions >= 64 and 2 * positions >= dim


# ``needs``: whether the gradients of (parts, a, weight, bias) are wanted.


def _mix_backward_per_image(grad, parts, a, weight, bias, needs):
    """Gradients through per-image products ``g^T @ part_k``: no branch output is rebuilt.

    Branch by branch, so that the elementwise work runs over contiguous (B, C, C) products (one
    stacked (B, C, n, C) tensor, broadcast across the branch axis, took 1.44x the time at B1's
    third stage, batch 32, one thread: benchmarks/mix_backward.py)."""
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
    """:func:`_mix_parts` keeping only the mixer input for the backward: the shifted branch
    inputs are rebuilt from it there (a shift costs about one copy)."""

    @staticmethod
    def forward(ctx, x, tables, a, weight, bias, fold, *parts):  # type: ignore[override]
        ctx.tables = tables
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
            parts = [eager_shift(x, table).reshape(batch, positions, dim) for table in ctx.tables]
        backward = _mix_backward_per_image if _per_image_backward(positions, dim) else _mix_backward_per_branch
        grad_parts, grad_a, grad_weight, grad_bias = backward(grad, parts, a, weight, bias, needs)
        grad_a, grad_weight, grad_bias = (
            g if g is None else g.to(dt) for g, dt in zip((grad_a, grad_weight, grad_bias), dtypes)
        )
        grad_parts = grad_parts or [None] * len(ctx.tables)
        return (None, None, grad_a, grad_weight, grad_bias, None, *grad_parts)


def eager_mixing() -> bool:
    """Whether the token mixer may run its eager path (separate branch inputs, custom backward):
    not under compiling, tracing, scripting or a dispatch mode (FLOP counters, fake tensors), which
    get the plain graph of :func:`mix_branches` instead."""
    return not (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
        or _get_current_dispatch_mode() is not None
    )


def mix_parts(
    parts: list[torch.Tensor],
    x: torch.Tensor,
    tables: tuple[OffsetTable, ...],
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    fold: bool,
    onednn: bool = False,
) -> torch.Tensor:
    """``sum_k a[:, None, :, k] * (S_k @ W_k^T + b_k)`` over the branch inputs ``S_k`` (eager path).

    Args:
        parts: n ``(B, N, C)`` branch inputs, ``S_k = eager_shift(x, tables[k])`` (``x`` itself for
            a table of zeros).
        x: ``(B, H, W, C)`` the mixer input they were built from (kept for the backward, which
            rebuilds them instead of keeping them).
        tables: the offset tables of the branches.
        a: ``(B, C, n)`` mixing coefficients.
        weight: ``(C, n*C)`` branch weights side by side; bias: ``(C, n)``.
        fold: compute the forward with per-image folded weights (cheaper for small C) instead of
            n products and a weighted sum.
        onednn: inference only, run the n products as oneDNN kernels (see :func:`use_onednn`).
    Returns ``(B, N, C)``.
    """
    if not torch.is_grad_enabled():
        return _mix_parts(parts, a, weight, bias, fold, onednn)
    return _MixParts.apply(x, tables, a, weight, bias, fold, *parts)


def mix_branches(
    stacked: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, fold: bool
) -> torch.Tensor:
    """The same sum over the stack ``S = [S_1 | ... | S_n]`` ``(B, N, n*C)`` of ``shift_stack``,
    as plain ops that autograd differentiates: the graph that export, compile and tracing see."""
    return _mix(stacked, a, weight, bias, fold)


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias):  # type: ignore[override]
        ctx.save_for_backward(hidden, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.gelu(hidden), weight, bias)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        hidden, weight = ctx.saved_tensors
        grad_hidden = grad_weight = grad_bias = None
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.ops.aten.gelu_backward((grad @ weight.to(grad.dtype)).to(hidden.dtype), hidden)
        if ctx.needs_input_grad[1]:
            act = F.gelu(hidden).reshape(-1, hidden.shape[-1]).to(grad.dtype)  # GELU recomputed
            grad_weight = (rows.t() @ act).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(dim=0).to(weight.dtype)
        return grad_hidden, grad_weight, grad_bias


def gelu_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(F.gelu(hidden), weight, bias)`` (exact GELU) keeping only ``hidden`` for backward."""
    if _plain_graph():
        return F.linear(F.gelu(hidden), weight, bias)
    return _GeluLinear.apply(hidden, weight, bias)


# --- the channel MLP in row chunks ---------------------------------------------------------------
#
# The hidden layer of the MLP is 4x as wide as its input: at B1's first stage, batch 32, one such
# tensor is 103 MB. glibc maps every block over its mmap threshold (at most 32 MB) anew from the
# system, so each fresh tensor that large is page-faulted in by whatever op writes it first (the
# bias copy of the first product, the GELU) -- on this project's 2-core VM that costs more than the
# op itself. Run row chunk by row chunk, everything after the first product (GELU, the second
# product, the whole backward pass) needs only chunk-sized temporaries, which the heap hands back
# warm and which stay in cache. `python -m benchmarks.mlp_chunks` times both forms at B1's stage
# shapes: at the first stage (at 3771c05, the README's table) the chunked MLP took 59.9 against
# 89.5 ms (inference) and 245 against 416 ms (training step); from the third stage on (hidden
# layers of 32 MB or less) the whole-tensor form was as fast or faster, so it stays.
_MLP_CHUNK_ELEMENTS = 1 << 21  # hidden-layer elements per chunk (8 MB in float32)
_MLP_WHOLE_MAX_ELEMENTS = 1 << 23  # up to 32 MB (glibc's largest mmap threshold) the heap serves it


def mlp_chunk_rows(rows: int, hidden: int) -> int:
    """Rows per chunk of the chunked MLP over ``rows`` rows with ``hidden`` hidden features: all of
    them while the hidden layer fits in ``_MLP_WHOLE_MAX_ELEMENTS``, else ``_MLP_CHUNK_ELEMENTS``
    worth (smaller chunks make slower products: benchmarks/mlp_chunks.py)."""
    if rows * hidden <= _MLP_WHOLE_MAX_ELEMENTS:
        return max(rows, 1)
    return max(64, _MLP_CHUNK_ELEMENTS // max(hidden, 1))


class _ChunkedMlp(torch.autograd.Function):
    """``fc2(GELU(fc1(x)))`` over ``(R, C)`` rows; saves ``x`` and ``h = fc1(x)`` (as autograd
    would for the first Linear and :func:`gelu_linear`), everything else in row chunks."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):  # type: ignore[override]
        hidden = F.linear(x, w1, b1)  # kept for the backward
        out = x.new_empty(x.shape[0], w2.shape[0])
        step = mlp_chunk_rows(*hidden.shape)
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
        grad_w1 = torch.zeros_like(w1) if needs_w1 else None
        grad_w2 = torch.zeros_like(w2) if needs_w2 else None
        grad_b1 = w1.new_zeros(w1.shape[0]) if needs_b1 and ctx.has_bias[0] else None
        grad_b2 = grad.sum(dim=0) if needs_b2 and ctx.has_bias[1] else None
        step = mlp_chunk_rows(*hidden.shape)
        for start in range(0, x.shape[0], step):
            rows = slice(start, start + step)
            grad_rows, hidden_rows = grad[rows], hidden[rows]
            if grad_w2 is not None:
                grad_w2.addmm_(grad_rows.t(), F.gelu(hidden_rows))  # GELU recomputed
            if not (needs_x or needs_w1 or needs_b1):
                continue
            grad_hidden = torch.ops.aten.gelu_backward(grad_rows @ w2, hidden_rows)
            if grad_w1 is not None:
                grad_w1.addmm_(grad_hidden.t(), x[rows])
            if grad_b1 is not None:
                grad_b1 += grad_hidden.sum(dim=0)
            if grad_x is not None:
                torch.mm(grad_hidden, w1, out=grad_x[rows])
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def chunked_mlp_applies(x: torch.Tensor, hidden: int) -> bool:
    """Whether :func:`channel_mlp` runs the training pass of an MLP with ``hidden`` hidden features
    over ``x``: on CPU in eager mode without autocast, when the hidden layer is too large for the
    heap (smaller ones run faster as plain autograd with :func:`gelu_linear`)."""
    return (
        torch.is_grad_enabled()
        and eager_mixing()
        and x.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
        and x.numel() // max(x.shape[-1], 1) * hidden > _MLP_WHOLE_MAX_ELEMENTS
    )


def channel_mlp(
    x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, residual: torch.Tensor | None = None, onednn: bool = False
) -> torch.Tensor:
    """``fc2(GELU(fc1(x)))`` (exact GELU) over the last dimension of ``x``, plus ``residual`` if given.

    For CPU training (:func:`chunked_mlp_applies`) and oneDNN inference (``onednn``, see
    :func:`use_onednn`; the residual add then rides on the second product): both run in row chunks
    of :func:`mlp_chunk_rows`. Elsewhere (compiling, tracing, other devices, autocast) the caller
    runs the plain ops.
    """
    if onednn:
        step = mlp_chunk_rows(x.numel() // x.shape[-1], fc1.out_features)
        if x.numel() // x.shape[-1] <= step:
            return linear(linear(x, fc1, gelu=True, onednn=True), fc2, residual=residual, onednn=True)
        rows = x.reshape(-1, x.shape[-1])
        res = None if residual is None else residual.reshape(-1, residual.shape[-1])
        out = rows.new_empty(rows.shape[0], fc2.out_features)
        for start in range(0, rows.shape[0], step):
            chunk = slice(start, start + step)
            out[chunk] = linear(linear(rows[chunk], fc1, gelu=True, onednn=True), fc2,
                                residual=None if res is None else res[chunk], onednn=True)
        return out.view(*x.shape[:-1], fc2.out_features)
    if not chunked_mlp_applies(x, fc1.out_features):
        raise RuntimeError("channel_mlp runs CPU training (see chunked_mlp_applies) or oneDNN inference only")
    out = _ChunkedMlp.apply(x.reshape(-1, x.shape[-1]), fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    out = out.view(*x.shape[:-1], fc2.out_features)
    return out if residual is None else residual + out
