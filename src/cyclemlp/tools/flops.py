"""Parameter and FLOP counts.

Two conventions are reported side by side:

* **GMACs, the authors' convention** (fvcore): one multiply-add counts 1, Cycle FC counts as the
  1x1 convolution it is, LayerNorm counts 5 per element, and biases, activations, softmax and
  means are free. The paper's tables use this.
* **FLOPs, PyTorch's convention** (``torch.utils.flop_counter``): 2 per multiply-add of matrix
  products and convolutions, LayerNorm not counted.

Counting dispatches the real forward pass, so it works for any ``nn.Module`` (timm peers too).

Stock counters count CycleMLP as the paper does: under a dispatch mode (``FlopCounterMode``,
ptflops' ``backend="aten"``), while tracing (fvcore's ``FlopCountAnalysis``) and while hooks are
registered on its layers (thop, ptflops' default backend) a CycleMLP runs its readable forward,
every branch a layer. The hook-based counters know nothing of Cycle FC by itself: give them its
rule, ``thop.profile(model, (x,), custom_ops=THOP_CUSTOM_OPS)`` or
``get_model_complexity_info(model, (3, 224, 224), custom_modules_hooks=PTFLOPS_CUSTOM_HOOKS)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..layers.cycle_fc import CycleFC

__all__ = ["PTFLOPS_CUSTOM_HOOKS", "THOP_CUSTOM_OPS", "Cost", "count_cost", "count_params"]

_LAYER_NORM_OPS = [torch.ops.aten.native_layer_norm]


# Fused attention kernels that torch's counter has no formula for (the CPU kernel is what
# F.scaled_dot_product_attention runs on CPU, e.g. in PVT-v2): without them attention is free.
_ATTENTION_OPS = [
    op for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable")
    if (op := getattr(torch.ops.aten, name, None)) is not None
]


def _layer_norm_macs(input_shape: Sequence[int], *args: Any, **kwargs: Any) -> int:
    return 5 * math.prod(input_shape)


def _attention_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int],
                     *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@dataclass(frozen=True)
class Cost:
    """Cost of one forward pass at one input size (per image)."""

    params: int
    macs: int  # the authors' convention (fvcore)
    flops: int  # PyTorch's convention

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_cost(model: nn.Module, img_size: int | Sequence[int] = 224, in_chans: int | None = None) -> Cost:
    """Count parameters, MACs (authors' convention) and FLOPs (PyTorch's) for one image."""
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    height, width = img_size
    if in_chans is None:
        in_chans = getattr(model, "in_chans", 3)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, in_chans, height, width, device=device)
    was_training = model.training
    model.eval()
    mapping = {op: _layer_norm_macs for op in _LAYER_NORM_OPS} | {op: _attention_flops for op in _ATTENTION_OPS}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    # under the counter's dispatch mode CycleMLP runs its readable forward (each branch a layer)
    try:
        with counter:
            model(x)
    finally:
        model.train(was_training)
    per_op = counter.get_flop_counts()["Global"]
    norm_macs = sum(count for op, count in per_op.items() if op in _LAYER_NORM_OPS)
    product_flops = sum(count for op, count in per_op.items() if op not in _LAYER_NORM_OPS)
    return Cost(params=count_params(model), macs=product_flops // 2 + norm_macs, flops=product_flops)


# --- rules for the hook-based counters ------------------------------------------------------------


def _cycle_fc_macs(module: CycleFC, output: torch.Tensor) -> int:
    """Cycle FC as the 1x1 convolution it is: one multiply-add per output element and input channel."""
    return output.numel() * module.in_features


def _thop_cycle_fc(module: CycleFC, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    module.total_ops += torch.tensor([_cycle_fc_macs(module, output)], dtype=torch.float64)


def _ptflops_cycle_fc(module: CycleFC, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    module.__flops__ += _cycle_fc_macs(module, output)


THOP_CUSTOM_OPS = {CycleFC: _thop_cycle_fc}
"""``custom_ops`` for ``thop.profile``: counts Cycle FC's multiply-adds."""

PTFLOPS_CUSTOM_HOOKS = {CycleFC: _ptflops_cycle_fc}
"""``custom_modules_hooks`` for ptflops' ``get_model_complexity_info``: counts Cycle FC's multiply-adds."""
