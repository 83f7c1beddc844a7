"""count_cost: conventions and coverage of the operators peers use; the stock counters (fvcore,
torch's FlopCounterMode, thop, ptflops) on the default timm models."""

import io

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cyclemlp import count_cost
from cyclemlp.layers import fused_applies
from cyclemlp.tools.flops import PTFLOPS_CUSTOM_HOOKS, THOP_CUSTOM_OPS


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


# --- stock counters on the default timm models ------------------------------------------------------

PUBLISHED_GMACS = {"cyclemlp_b1": 2.131, "cyclemlp_b2": 3.890}  # the authors' table (fvcore)


@pytest.fixture(scope="module", params=list(PUBLISHED_GMACS))
def default_model(request):
    return request.param, timm.create_model(request.param).eval()


def test_fvcore_counts_the_published_gmacs(default_model):
    """The authors' own counter traces the model: it sees the readable forward, every branch a Linear."""
    fvcore_nn = pytest.importorskip("fvcore.nn")
    name, model = default_model
    counter = fvcore_nn.FlopCountAnalysis(model, torch.zeros(1, 3, 224, 224))
    counter.unsupported_ops_warnings(False)
    counter.uncalled_modules_warnings(False)
    assert counter.total() / 1e9 == pytest.approx(PUBLISHED_GMACS[name], rel=0.005)
    assert counter.total() == count_cost(model).macs


def test_torch_flop_counter_counts_the_published_products(default_model):
    name, model = default_model
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 224, 224))
    assert counter.get_total_flops() == count_cost(model).flops
    # no LayerNorm in torch's convention: the products alone, within 0.5 % of the published MACs
    assert counter.get_total_flops() / 2e9 == pytest.approx(PUBLISHED_GMACS[name], rel=0.005)


def test_hook_based_counters_with_the_cycle_fc_rule():
    thop = pytest.importorskip("thop")
    ptflops = pytest.importorskip("ptflops")
    model = timm.create_model("cyclemlp_b1").eval()
    x = torch.zeros(1, 3, 224, 224)
    macs, _ = thop.profile(model, inputs=(x,), custom_ops=THOP_CUSTOM_OPS, verbose=False)
    assert macs / 1e9 == pytest.approx(2.131, rel=0.005)
    for kwargs in (dict(custom_modules_hooks=PTFLOPS_CUSTOM_HOOKS), dict(backend="aten")):
        macs, _ = ptflops.get_model_complexity_info(model, (3, 224, 224), as_strings=False,
                                                    print_per_layer_stat=False, ost=io.StringIO(), **kwargs)
        assert macs / 1e9 == pytest.approx(2.131, rel=0.005), kwargs
    # no switch was needed, and with the counters' hooks gone the fused kernels run again
    assert all(m.fused for m in model.modules() if hasattr(m, "fused"))
    assert fused_applies(model.stages[0].blocks[0], torch.zeros(1, 56, 56, 64))
