"""count_cost: conventions and coverage of the operators peers use."""

import torch
import torch.nn.functional as F
from torch import nn

from cyclemlp import count_cost


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = k = v = x.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1 head, HW, C)
        return F.scaled_dot_product_attention(q, k, v) * self.scale


def test_fused_attention_is_counted_on_cpu():
    # (HW x C) @ (C x HW) then (HW x HW) @ (HW x C): 2 * HW * HW * C multiply-adds
    cost = count_cost(_Attention(), (4, 5), in_chans=8)
    assert cost.macs == 2 * 20 * 20 * 8
    assert cost.flops == 2 * cost.macs
