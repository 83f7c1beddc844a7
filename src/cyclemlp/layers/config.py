"""The switch between CycleMLP's readable forward passes and its fused kernels.

Every module with a fast path (:class:`~cyclemlp.layers.cycle_fc.CycleFC`,
:class:`~cyclemlp.models.cyclemlp.CycleMixer`, :class:`~cyclemlp.models.cyclemlp.CycleBlock`)
has a boolean attribute ``fused``, set at construction from the package default below, and a
forward with one branch: the fused kernels of :mod:`cyclemlp.layers.kernels` when ``fused`` is
set and :func:`fused_applies` agrees, else the paper's formulas written out. Both compute the same
function.

The default is on. ``CYCLEMLP_FUSED=0`` in the environment, or ``set_fused(False)`` before
building a model, turns it off for the modules built afterwards; ``module.fused = False`` turns
it off for one module.
"""

from __future__ import annotations

import os

import torch
import torch.fx
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["ENV_VAR", "fused_applies", "set_fused", "use_fused"]

ENV_VAR = "CYCLEMLP_FUSED"

_USE_FUSED = os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def use_fused() -> bool:
    """The default of the ``fused`` attribute of newly built modules."""
    return _USE_FUSED


def set_fused(enable: bool = True) -> None:
    """Set the default of the ``fused`` attribute of modules built from now on."""
    global _USE_FUSED
    _USE_FUSED = bool(enable)


def _hooked_below(module: nn.Module) -> bool:
    """Whether a submodule of ``module`` (at any depth, not ``module`` itself) has a hook."""
    for child in module._modules.values():
        if child is not None and (child._forward_hooks or child._forward_pre_hooks or child._backward_hooks
                                  or child._backward_pre_hooks or _hooked_below(child)):
            return True
    return False


def fused_applies(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether the fused forward of ``module`` (whose ``fused`` is set) may run on ``x`` now.

    Only eagerly on real data: tracing (``torch.jit.trace``, ``torch.fx``), compiling, exporting,
    dispatch modes (``FlopCounterMode``, fake tensors) and meta tensors see the readable forward,
    which is the graph that export formats and FLOP counters understand. And only while no hook
    is registered on a submodule of ``module``: the fused kernels read the submodules' parameters
    without calling them, so a hook (a FLOP counter's, a feature extractor's) would never fire.
    """
    if (
        isinstance(x, torch.fx.Proxy)
        or x.is_meta
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or _get_current_dispatch_mode() is not None
    ):
        return False
    return not _hooked_below(module)
