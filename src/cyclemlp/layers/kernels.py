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
* CPU inference runs the Linear layers as fused oneDNN kernels (the bias and the residual adds
  inside the product); the blocks and mixers whose ``int8`` attribute is set
  (:func:`cyclemlp.quantize_int8`) run them as FBGEMM int8 products instead (dynamic quantization).
  One image at a time, a float32 block runs as one native operator that makes the same calls
  (:func:`_native_block`).
* The channel MLP keeps only its input and the first product for backward (GELU is recomputed),
  and runs everything after the first product in row chunks when its hidden layer is large.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import heap, native
from .cycle_fc import CycleFC, _fused_shift

__all__ = ["check_int8", "cycle_block", "cycle_mixer", "drop_inference_cache", "embed_conv"]

_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_ONEDNN_CONV = _ONEDNN_LINEAR and all(
    hasattr(torch.ops.mkldnn, op) for op in ("_convolution_pointwise", "_reorder_convolution_weight"))
_ONEDNN_PACK = _ONEDNN_LINEAR and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")

# Up to this width the token mixer multiplies by per-image folded weights (B x C x 3C, cheap next to
# the activations); wider, by the three branch weights followed by a weighted sum.
_FOLD_MAX_DIM = 128


def _onednn_inference(x: torch.Tensor) -> bool:
    return _ONEDNN_LINEAR and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32


def _linear(
    x: torch.Tensor, layer: nn.Linear, gelu: bool = False, residual: torch.Tensor | None = None, onednn: bool = False,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``layer(x)``, then an exact GELU or ``+ residual`` if asked; with ``onednn`` one oneDNN kernel
    (the fused linear kernels of PyTorch's own CPU compiler), which skips the bias broadcast copy
    and adds the residual inside the product, multiplying by ``weight`` if given (``layer.weight``
    in the layout of :func:`_packed`). The GELU follows in place: oneDNN's fused GELU is no faster
    with AVX-512 and slower with AVX2."""
    if onednn:
        if weight is None:
            weight = layer.weight if layer.weight.dtype == x.dtype else layer.weight.to(x.dtype)
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, layer.bias, "add")
        out = torch.ops.mkldnn._linear_pointwise(x, weight, layer.bias, "none", [], "")
        return torch.ops.aten.gelu_(out) if gelu else out
    out = F.linear(x, layer.weight, layer.bias)
    if gelu:
        out = F.gelu(out)
    return out if residual is None else residual + out


# --- the inference form of the weights -------------------------------------------------------------
#
# In inference the parameters stay the same from call to call, so whatever the kernels derive from
# them alone is derived once per module and kept: the branch weights side by side and their bias
# sums, and every weight in the blocked layout oneDNN multiplies by, which it would otherwise
# reorder into on every call (``_reorder_linear_weight`` for the row count of the product;
# ``_reorder_convolution_weight`` for the input size: without it, a layout picked for another
# size costs a slow reorder per call under some instruction sets).
#
# Each module holds its own cache, and a stale one is never read. It is keyed by the address and
# version counter of every parameter it derives from, and by a count of optimizer steps:
# * in-place updates (``load_state_dict``, in-place ops under ``no_grad``, foreach optimizers) bump
#   the version counter;
# * replaced tensors (``.to()``, ``load_state_dict(assign=True)``, ``param.data = ...``) change the
#   address: the cache holds the tensors it was built from, so their memory cannot be handed to a
#   replacement while it lives;
# * fused optimizers (``AdamW(fused=True)``) update in place without bumping the version counter:
#   a global optimizer-step hook counts the steps of every optimizer in the process.
# Parameters created under ``torch.inference_mode`` have no version counter: such a module keeps no
# cache and derives the inference form on every call.
# ``train()`` and ``eval()`` drop the cache (also the way to refresh it after writing through
# ``param.data``, which bypasses the version counter), and copies and pickles of a module leave it
# behind.

# Up to this many rows per product the Linear weights are kept reordered for that row count (batch
# 1 at 224 px has 3136 rows in the first stage). Larger products gain nothing from it
# (benchmarks/latency.py, batch 16) and would keep one more copy of every weight.
_PACK_MAX_ROWS = 4096

_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class _InferenceCache:
    __slots__ = ("entries", "key", "sources")

    def __init__(self, key: tuple = (), sources: tuple = ()) -> None:
        self.key = key
        self.sources = sources  # keeps the memory of the parameters it derives from allocated
        self.entries: dict = {}

    def __reduce__(self):  # copies and pickles start empty
        return (_InferenceCache, ())


def _inference_cache(module: nn.Module, sources: list[torch.Tensor]) -> dict:
    """The inference cache of ``module``, emptied first if any of ``sources`` changed since it was
    filled."""
    try:
        key = (_optimizer_steps, *((t.data_ptr(), t._version) for t in sources))
    except RuntimeError:  # inference tensors (made under torch.inference_mode) have no version counter
        return {}  # a change could not be seen: derived anew on every call
    cache = module.__dict__.get("_inference_cache")
    if cache is None or cache.key != key:
        cache = _InferenceCache(key, tuple(t.detach() for t in sources))
        module.__dict__["_inference_cache"] = cache
    return cache.entries


def drop_inference_cache(module: nn.Module) -> None:
    """Forget the inference form of ``module``'s weights (its own, not its submodules')."""
    module.__dict__.pop("_inference_cache", None)


def _packed(cache: dict, name: str, weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` (out, in) in oneDNN's layout for a product over ``rows`` rows, kept in ``cache``
    for the last row count it was asked for; the plain weight above ``_PACK_MAX_ROWS`` rows."""
    if rows > _PACK_MAX_ROWS or not _ONEDNN_PACK or weight.dtype != torch.float32:
        return weight
    entry = cache.get(name)
    if entry is None or entry[0] != rows:
        entry = cache[name] = (rows, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows))
    return entry[1]


def embed_conv(embed: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``embed.proj(x)`` (an ``nn.Conv2d``) over channels-last ``x``; in CPU float32 inference by
    oneDNN with the weight reordered once for ``x``'s size, where the convolution reorders it on
    every call. The same convolution: for some sizes oneDNN picks another kernel for the reordered
    weight, which sums in another order (float rounding)."""
    conv = embed.proj
    if (embed.training or not _ONEDNN_CONV or not _onednn_inference(x) or conv.padding_mode != "zeros"
            or isinstance(conv.padding, str) or conv.weight.dtype != torch.float32
            or not x.is_contiguous(memory_format=torch.channels_last)):
        return conv(x)
    cache = _inference_cache(embed, [conv.weight])
    size = tuple(x.shape)
    entry = cache.get("weight")
    if entry is None or entry[0] != size:
        weight = torch.ops.mkldnn._reorder_convolution_weight(
            conv.weight.detach(), list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, list(size))
        entry = cache["weight"] = (size, weight)
    return torch.ops.mkldnn._convolution_pointwise(
        x, entry[1], conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, "none", [],
        "")


# --- int8 products ---------------------------------------------------------------------------------
#
# The blocks and mixers whose ``int8`` attribute is set (:func:`cyclemlp.quantize_int8`) multiply by
# int8 weights in CPU float32 inference (post-training dynamic quantization, as PyTorch's
# ``quantize_dynamic`` does it): each weight is quantized once, one symmetric scale per output
# channel, and packed with its bias for FBGEMM, in the module's inference cache beside the float32
# forms (so it follows the weights the same way); each product quantizes its input on every call,
# one scale over the whole input, to 7 bits (``reduce_range``: with 8-bit inputs the AVX2 kernels'
# 16-bit pairwise sums can saturate), and returns float32.

_INT8_ENGINE = next((e for e in ("fbgemm", "x86") if e in torch.backends.quantized.supported_engines), None)


def check_int8() -> None:
    """Raise RuntimeError unless this PyTorch has FBGEMM's int8 kernels (its x86 builds do)."""
    if _INT8_ENGINE is None or not hasattr(torch.ops.quantized, "linear_dynamic"):
        raise RuntimeError(
            "int8 inference needs PyTorch's FBGEMM quantized engine (x86 CPUs), which this PyTorch lacks "
            f"(its quantized engines: {', '.join(torch.backends.quantized.supported_engines)})")


@contextlib.contextmanager
def _quantized_engine():
    """PyTorch's quantized engine set to FBGEMM's while weights are packed: the packed form, not the
    engine of the moment, picks the kernels of the products."""
    check_int8()
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = _INT8_ENGINE
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def _int8_packed(layer: nn.Module) -> torch.ScriptObject:
    """``layer.weight`` (out, in) in int8 with the scales of PyTorch's per-channel dynamic
    quantization (``max |w_o| / 127.5``), packed with ``layer.bias`` for FBGEMM."""
    weight = layer.weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127.5).clamp_min(torch.finfo(torch.float32).eps)
    bias = None if layer.bias is None else layer.bias.detach().float()
    with _quantized_engine(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor, torch.quantize_per_channel", UserWarning)
        weight = torch.quantize_per_channel(weight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0,
                                            torch.qint8)
        return torch.ops.quantized.linear_prepack(weight, bias)


def _linear_int8(rows: torch.Tensor, packed: torch.ScriptObject) -> torch.Tensor:
    """``rows @ W^T + b`` (float32) by FBGEMM from the packed int8 weight, ``rows`` quantized on the
    fly to 7 bits."""
    return torch.ops.quantized.linear_dynamic(rows, packed, True)


# --- the CycleMLP block ----------------------------------------------------------------------------


def cycle_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of a ``CycleBlock`` (``norm1``, ``mixer``, ``norm2``, ``mlp``, ``drop_path``).
    In CPU inference the residual adds ride on the last product of the mixer and of the MLP (or
    follow it, with int8 products: the block's and the mixer's ``int8``); one float32 image runs
    the whole block as one native operator (:func:`_native_block`) where it is built, and the
    first such call keeps glibc from returning the block's transient memory after every image
    (:mod:`cyclemlp.layers.heap`)."""
    if not block.training and _onednn_inference(x):
        cache = _inference_cache(block, _block_sources(block))
        if x.shape[0] == 1:
            heap.keep_freed_memory_once()  # glibc keeps the block's transient memory (layers/heap.py)
            native_form = _native_block(block, x, cache)
            if native_form is not None:
                return torch.ops.cyclemlp.block_inference(x, *native_form)
        norm1, norm2 = block.norm1, block.norm2
        x = _mixer(block.mixer, F.layer_norm(x, norm1.normalized_shape, norm1.weight, norm1.bias, norm1.eps),
                   residual=x, onednn=True)
        y = F.layer_norm(x, norm2.normalized_shape, norm2.weight, norm2.bias, norm2.eps)
        if getattr(block, "int8", False):
            return _channel_mlp_int8(block.mlp, y, x, cache)
        return _channel_mlp(block.mlp, y, residual=x, onednn=True, cache=cache)
    x = x + block.drop_path(_mixer(block.mixer, block.norm1(x)))
    return x + block.drop_path(_channel_mlp(block.mlp, block.norm2(x)))


def _block_sources(block: nn.Module) -> list[torch.Tensor]:
    """Every parameter of ``block`` its inference form derives from: the norms', the mixer's
    (the reweighting's included) and the MLP's. Read from the modules' own dictionaries: this runs
    on every call, and attribute lookup through ``nn.Module`` costs ten times as much."""
    modules = block._modules
    mixer, mlp = modules["mixer"], modules["mlp"]._modules
    layers = [mlp["fc1"], mlp["fc2"]]
    if getattr(mixer, "fused", False):
        parts = mixer._modules
        reweight = parts["reweight"]._modules
        layers += [modules["norm1"], modules["norm2"], *(parts[n] for n in _BRANCHES if parts.get(n) is not None),
                   parts["proj"], reweight["fc1"], reweight["fc2"]]
    sources = []
    for layer in layers:
        for name in ("weight", "bias"):
            tensor = layer._parameters.get(name)
            if tensor is not None:
                sources.append(tensor)
    return sources


def _native_block(block: nn.Module, x: torch.Tensor, cache: dict) -> tuple | None:
    """The arguments after ``x`` of ``torch.ops.cyclemlp.block_inference`` (``csrc/block.cpp``)
    for ``block`` over one float32 image ``x``, kept in the block's inference ``cache`` for the
    last image size; None where that operator does not apply: not built, int8 products, a mixer
    without fused kernels or without all three branches, a layer without its bias, or an MLP
    hidden layer too large for one chunk. The operator makes exactly the calls of the Python
    path below, so the two give the same numbers; it only saves the interpreter's time between
    them."""
    mixer = block.mixer
    if (not _ONEDNN_PACK or getattr(block, "int8", False) or getattr(mixer, "int8", False)
            or not getattr(mixer, "fused", False) or not native.available()):
        return None
    rows = x.shape[1] * x.shape[2]
    entry = cache.get("native")
    if entry is None or entry[0] != rows:
        entry = cache["native"] = (rows, _native_block_form(block, rows, cache))
    return entry[1]


def _native_block_form(block: nn.Module, rows: int, cache: dict) -> tuple | None:
    mixer, mlp = block.mixer, block.mlp
    layers = _branch_layers(mixer)
    norms = (block.norm1, block.norm2)
    if (len(layers) != 3 or not (isinstance(layers[0], CycleFC) and isinstance(layers[1], CycleFC))
            or isinstance(layers[2], CycleFC) or mlp.fc1.out_features * rows > _MLP_WHOLE_MAX_ELEMENTS
            or not all(isinstance(n, nn.LayerNorm) and n.weight is not None and n.bias is not None for n in norms)
            or any(fc.bias is None for fc in (mixer.proj, mixer.reweight.fc1, mixer.reweight.fc2, mlp.fc1, mlp.fc2))):
        return None
    reweight = mixer.reweight
    tensors = [block.norm1.weight, block.norm1.bias, block.norm2.weight, block.norm2.bias,
               layers[0].offsets, layers[1].offsets,
               reweight.fc1.weight, reweight.fc1.bias, reweight.fc2.weight, reweight.fc2.bias,
               _packed(cache, "fc1", mlp.fc1.weight, rows), mlp.fc1.bias, _packed(cache, "fc2", mlp.fc2.weight, rows),
               mlp.fc2.bias]
    proj = mixer.proj
    mixer_cache = _inference_cache(mixer, [t for fc in (*layers, proj) for t in (fc.weight, fc.bias) if t is not None])
    form = mixer_cache.get("branches")
    if form is None:
        form = mixer_cache["branches"] = _branch_form(layers)
    weight, bias, stacked, biases, _ = form
    fold = mixer.dim <= _FOLD_MAX_DIM
    if fold:
        tensors += [weight, _bias_sum(mixer_cache, bias), stacked, bias, proj.weight, proj.bias]
    else:
        tensors += [*(_packed(mixer_cache, f"branch{k}", stacked[k], rows) for k in range(3)), *biases,
                    _packed(mixer_cache, "proj", proj.weight, rows), proj.bias]
    if any(t.dtype != torch.float32 for t in tensors if t.is_floating_point()):
        return None
    return [t.detach() for t in tensors], block.norm1.eps, block.norm2.eps, fold


def _mixer(
    mixer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None, onednn: bool = False
) -> torch.Tensor:
    if getattr(mixer, "fused", False):
        return cycle_mixer(mixer, x, residual, onednn)
    out = mixer(x)  # a mixer without fused kernels (turned off, or another kind)
    return out if residual is None else residual + out


# --- the token mixer -------------------------------------------------------------------------------


def cycle_mixer(
    mixer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None, onednn: bool | None = None
) -> torch.Tensor:
    """The forward of a ``CycleMixer`` over ``x`` (B, H, W, C), plus ``residual`` if given;
    ``onednn``: CPU float32 inference (see :func:`_linear`; None: whenever that applies)."""
    if onednn is None:
        onednn = not mixer.training and _onednn_inference(x)
    if onednn:
        return _mixer_inference(mixer, x, residual)
    batch, height, width, dim = x.shape
    layers = _branch_layers(mixer)
    n = len(layers)
    weight = torch.cat([fc.weight for fc in layers], dim=1)  # (C, n*C)
    bias = torch.stack(
        [fc.bias if fc.bias is not None else torch.zeros_like(fc.weight[:, 0]) for fc in layers], dim=1
    )  # (C, n)
    offsets = tuple(fc.offsets if isinstance(fc, CycleFC) else None for fc in layers)
    parts = [_shifted(x, o).reshape(batch, height * width, dim) for o in offsets]
    # mean over positions of the summed branch outputs, without computing them
    pooled = F.linear(torch.cat([part.mean(dim=1) for part in parts], dim=1), weight, bias.sum(dim=1))
    a = _coefficients(mixer.reweight, pooled, n)
    fold = dim <= _FOLD_MAX_DIM
    if torch.is_grad_enabled():
        out = _MixParts.apply(x, offsets, a, weight, bias, fold, *parts)
    else:
        out = _mix_parts(parts, a, weight, bias, fold)
    return _linear(out.view(batch, height, width, dim), mixer.proj, residual=residual)


_BRANCHES = ("width_fc", "height_fc", "channel_fc")


def _branch_layers(mixer: nn.Module) -> list[nn.Module]:
    return [fc for fc in (getattr(mixer, name) for name in _BRANCHES) if fc is not None]


def _coefficients(reweight: nn.Module, pooled: torch.Tensor, n: int) -> torch.Tensor:
    """The branch weights ``a`` (B, C, n): softmax over the branches of ``reweight(pooled)``
    (timm's ``Mlp``: Linear, exact GELU, Linear), whose output index is channel * n + branch. The
    softmax over the n branches is taken across a (B, n, C) view: over a last dimension of size 3
    it is an order of magnitude slower."""
    fc1, fc2 = reweight.fc1, reweight.fc2
    logits = F.linear(F.gelu(F.linear(pooled, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
    return logits.reshape(pooled.shape[0], -1, n).transpose(1, 2).softmax(dim=1).transpose(1, 2)


def _mixer_inference(mixer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """:func:`cycle_mixer` in CPU float32 inference, from the cached inference form of the weights.

    One image at a time the mixing takes the cheaper order for its width. Narrow (C <= 128): the
    per-image folded weights are plain matrices, so the projection folds into them too,
    ``P diag(a_k) W_k`` (n C^3 multiply-adds against a product of N C^2 saved, N the positions),
    and the branches accumulate through oneDNN products with the residual inside. Wide: the branch
    outputs ``y_k`` first, and the pooled mean from them as the readable form does (no product over
    the weights for the mean)."""
    batch, height, width, dim = x.shape
    positions, rows = height * width, batch * height * width
    layers = _branch_layers(mixer)
    n = len(layers)
    proj = mixer.proj
    cache = _inference_cache(mixer, [t for fc in (*layers, proj) for t in (fc.weight, fc.bias) if t is not None])
    if getattr(mixer, "int8", False):
        return _mixer_int8(mixer, layers, x, residual, cache)
    form = cache.get("branches")
    if form is None:
        form = cache["branches"] = _branch_form(layers)
    weight, bias, stacked, biases, offsets = form
    parts = [_shifted(x, o).view(batch, positions, dim) for o in offsets]
    res = None if residual is None else residual.reshape(rows, dim)
    mk = torch.ops.mkldnn
    if dim <= _FOLD_MAX_DIM:
        pooled = F.linear(torch.cat([part.mean(dim=1) for part in parts], dim=1), weight, _bias_sum(cache, bias))
        a = _coefficients(mixer.reweight, pooled, n)
        if batch > 1:
            out = _mix_parts(parts, a, weight, bias, True)
            return _linear(out.view(batch, height, width, dim), proj, residual=residual, onednn=True,
                           weight=_packed(cache, "proj", proj.weight, rows))
        coefficients = a[0]  # (C, n)
        folded = torch.matmul(proj.weight, stacked * coefficients.t().unsqueeze(-1))  # (n, C, C): P diag(a_k) W_k
        folded_bias = (coefficients * bias).sum(dim=-1)
        folded_bias = proj.weight @ folded_bias if proj.bias is None else torch.addmv(proj.bias, proj.weight,
                                                                                    folded_bias)
        out = res
        for k, part in enumerate(parts):
            rows_k, b = part.view(rows, dim), folded_bias if k == 0 else None
            if out is None:
                out = mk._linear_pointwise(rows_k, folded[k], b, "none", [], "")
            else:
                out = mk._linear_pointwise.binary(rows_k, out, folded[k], b, "add")
        return out.view(batch, height, width, dim)
    products = [_packed(cache, f"branch{k}", stacked[k], rows) for k in range(n)]
    if batch > 1:
        pooled = F.linear(torch.cat([part.mean(dim=1) for part in parts], dim=1), weight, _bias_sum(cache, bias))
        a = _coefficients(mixer.reweight, pooled, n)
        out = None
        for k, part in enumerate(parts):
            y = mk._linear_pointwise(part.view(rows, dim), products[k], biases[k], "none", [], "")
            scale = a[:, None, :, k]
            y = y.view(batch, positions, dim)
            out = y.mul_(scale) if out is None else out.addcmul_(y, scale)
    else:
        ys = [mk._linear_pointwise(part.view(rows, dim), products[k], biases[k], "none", [], "")
              for k, part in enumerate(parts)]
        total = ys[0]
        for y in ys[1:]:
            total = total + y
        a = _coefficients(mixer.reweight, total.mean(dim=0, keepdim=True), n)[0]  # (C, n)
        out = ys[0].mul_(a[:, 0])
        for k in range(1, n):
            out.addcmul_(ys[k], a[:, k])
    return _linear(out.view(batch, height, width, dim), proj, residual=residual, onednn=True,
                   weight=_packed(cache, "proj", proj.weight, rows))


def _mixer_int8(
    mixer: nn.Module, layers: list[nn.Module], x: torch.Tensor, residual: torch.Tensor | None, cache: dict
) -> torch.Tensor:
    """:func:`_mixer_inference` with int8 products (the branches and the projection; the small
    reweighting MLP stays float32). The branch outputs first at every width and batch (folded
    weights would be packed anew on every call); the pooled mean, the coefficients and the weighted
    sum in float32 from them; the residual added after the projection."""
    batch, height, width, dim = x.shape
    rows = batch * height * width
    form = cache.get("int8")
    if form is None:
        form = cache["int8"] = ([_int8_packed(fc) for fc in layers], _int8_packed(mixer.proj))
    branches, proj = form
    ys = [_linear_int8(_shifted(x, fc.offsets if isinstance(fc, CycleFC) else None).reshape(rows, dim),
                       packed).view(batch, height * width, dim) for fc, packed in zip(layers, branches)]
    pooled = ys[0].mean(dim=1)
    for y in ys[1:]:
        pooled += y.mean(dim=1)
    a = _coefficients(mixer.reweight, pooled, len(ys))  # (B, C, n)
    out = ys[0].mul_(a[:, None, :, 0])
    for k in range(1, len(ys)):
        out.addcmul_(ys[k], a[:, None, :, k])
    out = _linear_int8(out.view(rows, dim), proj)
    if residual is not None:
        out += residual.reshape(rows, dim)
    return out.view(batch, height, width, dim)


def _branch_form(layers: list[nn.Module]) -> tuple:
    """The branch weights side by side (C, n*C), their biases (C, n), stacked (n, C, C), one by one
    (contiguous) and the shifts' offsets (None for the channel FC)."""
    stacked = torch.stack([fc.weight.detach() for fc in layers])
    weight = stacked.permute(1, 0, 2).reshape(stacked.shape[1], -1)
    biases = [fc.bias.detach() if fc.bias is not None else stacked.new_zeros(stacked.shape[1]) for fc in layers]
    offsets = tuple(fc.offsets if isinstance(fc, CycleFC) else None for fc in layers)
    return weight, torch.stack(biases, dim=1), stacked, biases, offsets


def _bias_sum(cache: dict, bias: torch.Tensor) -> torch.Tensor:
    total = cache.get("bias_sum")
    if total is None:
        total = cache["bias_sum"] = bias.sum(dim=1)
    return total


def _shifted(x: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    return x if offsets is None else _fused_shift(x, offsets)


def _folded(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image weights ``a_k[o] * W_k[o, i]`` (B, C, n*C) and biases ``sum_k a_k b_k`` (B, 1, C)."""
    batch = a.shape[0]
    dim, n = bias.shape
    mixed_weight = (weight.view(1, dim, n, dim) * a.unsqueeze(-1)).view(batch, dim, n * dim)
    return mixed_weight, (a * bias).sum(dim=-1).unsqueeze(1)


def _mix_parts(
    parts: list[torch.Tensor], a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, fold: bool
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
        y = F.linear(rows, w, b).view(batch, positions, dim)
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
    mlp: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None, onednn: bool = False,
    cache: dict | None = None,
) -> torch.Tensor:
    """``mlp.fc2(GELU(mlp.fc1(x)))`` (timm's ``Mlp`` without dropout or norm) plus ``residual``;
    ``cache``: an inference cache to keep the oneDNN layouts of the weights in."""
    rows = x.reshape(-1, x.shape[-1])
    fc1, fc2 = mlp.fc1, mlp.fc2
    if onednn:
        res = None if residual is None else residual.reshape(-1, residual.shape[-1])
        step = _mlp_chunk_rows(rows.shape[0], fc1.out_features)
        w1 = w2 = None
        if cache is not None:
            size = min(step, rows.shape[0])
            w1, w2 = _packed(cache, "fc1", fc1.weight, size), _packed(cache, "fc2", fc2.weight, size)
        if rows.shape[0] <= step:
            out = _linear(_linear(rows, fc1, gelu=True, onednn=True, weight=w1), fc2, residual=res, onednn=True,
                          weight=w2)
        else:
            out = rows.new_empty(rows.shape[0], fc2.out_features)
            for start in range(0, rows.shape[0], step):
                chunk = slice(start, start + step)
                out[chunk] = _linear(_linear(rows[chunk], fc1, gelu=True, onednn=True, weight=w1), fc2,
                                     residual=None if res is None else res[chunk], onednn=True, weight=w2)
        return out.view(*x.shape[:-1], fc2.out_features)
    if torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
        out = _ChunkedMlp.apply(rows, fc1.weight, fc1.bias, fc2.weight, fc2.bias).view(*x.shape[:-1], -1)
    else:
        out = mlp(x)
    return out if residual is None else residual + out


def _channel_mlp_int8(mlp: nn.Module, x: torch.Tensor, residual: torch.Tensor, cache: dict) -> torch.Tensor:
    """:func:`_channel_mlp` in CPU float32 inference with int8 products (see :func:`_int8_packed`);
    the exact GELU and the residual add run after them, in place."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    form = cache.get("int8")
    if form is None:
        form = cache["int8"] = (_int8_packed(fc1), _int8_packed(fc2))
    rows, res = x.reshape(-1, x.shape[-1]), residual.reshape(-1, residual.shape[-1])
    step = _mlp_chunk_rows(rows.shape[0], fc1.out_features)
    if rows.shape[0] <= step:
        out = _linear_int8(torch.ops.aten.gelu_(_linear_int8(rows, form[0])), form[1]).add_(res)
    else:
        out = rows.new_empty(rows.shape[0], fc2.out_features)
        for start in range(0, rows.shape[0], step):
            chunk = slice(start, start + step)
            hidden = torch.ops.aten.gelu_(_linear_int8(rows[chunk], form[0]))
            torch.add(res[chunk], _linear_int8(hidden, form[1]), out=out[chunk])
    return out.view(*x.shape[:-1], fc2.out_features)


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
