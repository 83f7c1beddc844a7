"""Opt-in int8 CPU inference: post-training dynamic quantization of the CycleMLP blocks' products.

:func:`quantize_int8` sets the ``int8`` attribute of the blocks and token mixers at least
``min_dim`` channels wide. Their fused CPU float32 inference then multiplies by int8 weights
(FBGEMM; one scale per output channel, quantized once and kept with the module's other inference
forms) and int8 inputs (one scale per product, computed on every call): the channel MLP's two
Linears, the mixer's three branches (both Cycle FCs and the channel FC) and its projection.
Everything else stays float32: the narrow blocks, the reweighting MLP, the norms, GELU, the
coefficients and weighted sum of the branches, the residual adds, the convolutions and the head.

Outputs are close to the float32 model's, not equal to them: check the accuracy on your data
(``cyclemlp eval --int8``). Training mode, gradient-enabled calls, other devices and dtypes, and
modules whose ``fused`` is off compute the float32 function exactly as without it.
"""

from __future__ import annotations

from torch import nn

from ..layers.kernels import check_int8, drop_inference_cache
from .cyclemlp import CycleBlock, CycleMixer

__all__ = ["INT8_MIN_DIM", "quantize_int8"]

# The narrowest blocks quantized by default: B1-B5's first stage (64 channels at 56x56 for a 224px
# image) gains nothing from FBGEMM's int8 products on its many short rows.
INT8_MIN_DIM = 128


def quantize_int8(model: nn.Module, min_dim: int = INT8_MIN_DIM, enabled: bool = True) -> nn.Module:
    """Turn int8 CPU inference on (``enabled``) or off for the CycleMLP blocks of ``model`` that
    are at least ``min_dim`` channels wide; in place, returning ``model``.

    Sets the ``int8`` attribute of every :class:`~cyclemlp.models.cyclemlp.CycleBlock` and
    :class:`~cyclemlp.models.cyclemlp.CycleMixer` (True where wide enough, else False) and drops
    their inference forms, so the next call in eval mode packs the int8 weights. With
    ``enabled=False`` every block computes its float32 function again. Raises RuntimeError where
    PyTorch has no FBGEMM quantized engine (non-x86 builds), ValueError if ``model`` holds no
    CycleMLP block.
    """
    if enabled:
        check_int8()
    if isinstance(min_dim, bool) or not isinstance(min_dim, int) or min_dim < 1:
        raise ValueError(f"min_dim must be a positive integer; got {min_dim!r}")
    modules = [m for m in model.modules() if isinstance(m, (CycleBlock, CycleMixer))]
    if not modules:
        raise ValueError(f"{type(model).__name__} holds no CycleMLP block to quantize")
    for module in modules:
        dim = module.dim if isinstance(module, CycleMixer) else module.norm1.normalized_shape[-1]
        module.int8 = bool(enabled) and dim >= min_dim
        drop_inference_cache(module)
    return model
