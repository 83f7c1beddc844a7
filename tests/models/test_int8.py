"""Opt-in int8 CPU inference (:func:`cyclemlp.quantize_int8`): the int8 products compute what
PyTorch's own dynamic quantization of the readable forward computes, the model stays close to its
float32 outputs, and everything outside int8 inference (narrow blocks, training, autograd, other
dtypes, the readable forward, the switch turned off) is the float32 function exactly. That the
int8 forms follow every weight change is tested with the other inference forms
(tests/models/test_inference.py).

Tolerances, relative error ``|a - b| / |b|`` over a whole output:

* against ``quantize_dynamic``'s Linears in the readable forward, ``INT8_TOL`` = 2e-3: both round
  the same products; only float32 rounding orders upstream of a quantization differ, which moves
  an input's rounding by one step now and then (at most 2e-4 seen). Int8's own error is 4x the
  bound or more (the float32 block misses it), so a wrong scale, bias or branch fails it.
* against float32, for the whole small model, ``MODEL_TOL`` = 0.06 and top-1 agreement >= 90 %
  on random images: int8 stays within 2-2.5 % (agreement 97-100 %); a missing bias or an unshifted
  branch is 19 % or more off.
"""

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

import cyclemlp
from cyclemlp import BRANCHES, CycleBlock, CycleMixer, CycleMLP
from cyclemlp.layers import kernels
from cyclemlp.layers.cycle_fc import cycle_shift

INT8_TOL = 2e-3
MODEL_TOL = 0.06


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _perturbed(model: nn.Module, scale: float = 0.05) -> nn.Module:
    with torch.no_grad():  # non-trivial biases and norms everywhere
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def _model(dims=(16, 32, 48, 160), **kwargs) -> CycleMLP:
    # stage 3 mixes by folded weights in float32 (C <= 128), stage 4 by branch outputs (C > 128)
    return _perturbed(CycleMLP(depths=(1, 1, 2, 1), dims=dims, num_classes=10, drop_path_rate=0.0, **kwargs)).eval()


def _cache_of(module: nn.Module) -> dict:
    cache = module.__dict__.get("_inference_cache")
    return {} if cache is None else cache.entries


@contextlib.contextmanager
def _engine():
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = kernels._INT8_ENGINE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.quantized.engine = before


class _ShiftedLinear(nn.Module):
    """A Cycle FC as its shift and an ``nn.Linear`` of the same weights, for ``quantize_dynamic``."""

    def __init__(self, fc: nn.Module) -> None:
        super().__init__()
        self.offsets = fc.offsets
        self.linear = nn.Linear(fc.weight.shape[1], fc.weight.shape[0], bias=fc.bias is not None)
        self.linear.load_state_dict({k: v for k, v in fc.state_dict().items() if k in ("weight", "bias")})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(cycle_shift(x, self.offsets))


def _reference(block: CycleBlock) -> CycleBlock:
    """The readable forward of ``block`` with PyTorch's per-channel dynamic quantization of every
    product that int8 inference quantizes (not the reweighting MLP)."""
    ref = copy.deepcopy(block)
    ref.fused = ref.mixer.fused = False
    names = ["mixer.proj", "mlp.fc1", "mlp.fc2"]
    for branch in ("width_fc", "height_fc"):
        if getattr(ref.mixer, branch) is not None:
            setattr(ref.mixer, branch, _ShiftedLinear(getattr(ref.mixer, branch)))
            names.append(f"mixer.{branch}.linear")
    if ref.mixer.channel_fc is not None:
        names.append("mixer.channel_fc")
    with _engine():
        return quantize_dynamic(ref, {name: per_channel_dynamic_qconfig for name in names})


@pytest.mark.parametrize("dim", [48, 160])  # float32 mixes by folded weights at 48; int8 never does
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("branches", [BRANCHES, ("width", "channel")])
def test_block_matches_dynamic_quantization_of_the_readable_form(dim, batch, branches):
    block = _perturbed(CycleBlock(dim, branches=branches)).eval()
    x = torch.randn(batch, 7, 9, dim)
    with torch.no_grad():
        fp32, fp32_mixer = block(x), block.mixer(x)
        cyclemlp.quantize_int8(block, min_dim=dim)
        got, got_mixer = block(x), block.mixer(x)
        ref = _reference(block)
        want, want_mixer = ref(x), ref.mixer(x)
    assert _rel(got, want) <= INT8_TOL and _rel(got_mixer, want_mixer) <= INT8_TOL
    # the bound sees int8's own error: float32 misses it
    assert _rel(fp32, want) > 4 * INT8_TOL and _rel(fp32_mixer, want_mixer) > 4 * INT8_TOL
    assert set(_cache_of(block)) == {"int8"} and "int8" in _cache_of(block.mixer)


def _without_bias(pack):
    def packed(layer):
        stripped = nn.Linear(layer.weight.shape[1], layer.weight.shape[0], bias=False)
        stripped.weight = layer.weight
        return pack(stripped)
    return packed


CORRUPTIONS = {
    "no_bias": lambda monkeypatch: monkeypatch.setattr(kernels, "_int8_packed", _without_bias(kernels._int8_packed)),
    "unshifted_branches": lambda monkeypatch: monkeypatch.setattr(kernels, "_shifted", lambda x, offsets: x),
}


@pytest.mark.parametrize("corruption", [None, *CORRUPTIONS])
def test_model_stays_close_to_float32(corruption, monkeypatch):
    model = _model()
    x = torch.randn(32, 3, 64, 64)
    with torch.no_grad():
        fp32 = model(x)
        if corruption:
            CORRUPTIONS[corruption](monkeypatch)
        got = cyclemlp.quantize_int8(model, min_dim=32)(x)
    error, agreement = _rel(got, fp32), (got.argmax(1) == fp32.argmax(1)).float().mean().item()
    if corruption is None:
        assert error <= MODEL_TOL and agreement >= 0.9, (error, agreement)
        assert error > 1e-3  # int8 did run
    else:
        assert error > MODEL_TOL, error


def test_narrow_blocks_stay_float32_bitwise():
    model = _model(dims=(16, 64, 128, 160))
    twin = copy.deepcopy(model)
    assert cyclemlp.quantize_int8(model) is model
    assert [b.int8 for s in model.stages for b in s.blocks] == [False, False, True, True, True]
    assert [m.int8 for m in model.modules() if isinstance(m, CycleMixer)] == [False, False, True, True, True]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = model.forward_intermediates(x, intermediates_only=True)
        want = twin.forward_intermediates(x, intermediates_only=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.allclose(got[2], want[2], atol=1e-4)
    assert all("int8" not in _cache_of(m) for s in model.stages[:2] for m in s.modules())


def test_turning_it_off_restores_float32_bitwise():
    model = _model()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fp32 = model(x)
        int8 = cyclemlp.quantize_int8(model, min_dim=32)(x)
        assert not torch.allclose(int8, fp32, atol=1e-4)
        assert torch.equal(cyclemlp.quantize_int8(model, enabled=False)(x), fp32)
    assert not any(getattr(m, "int8", False) for m in model.modules())
    assert all("int8" not in _cache_of(m) for m in model.modules())


def _train_output(model, x):
    model.train()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def test_exact_outside_float32_cpu_inference():
    """Training, autograd, other dtypes and the readable forward never use the int8 products."""
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    int8 = cyclemlp.quantize_int8(copy.deepcopy(model), min_dim=32)
    with torch.no_grad():
        assert not torch.allclose(int8(x), model(x), atol=1e-4)
    assert torch.equal(int8(x), model(x))  # gradients enabled
    for dtype in (torch.float64, torch.bfloat16):
        with torch.no_grad():
            assert torch.equal(copy.deepcopy(int8).to(dtype)(x.to(dtype)), copy.deepcopy(model).to(dtype)(x.to(dtype)))
    for m in (int8, model):
        for module in m.modules():
            if hasattr(module, "fused"):
                module.fused = False
    with torch.no_grad():
        assert torch.equal(int8(x), model(x))
    for m in (int8, model):
        for module in m.modules():
            if hasattr(module, "fused"):
                module.fused = True
    got, got_grads = _train_output(int8, x)
    want, want_grads = _train_output(model, x)
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))
    assert not any(_cache_of(m) for m in int8.modules())


def test_mistakes_are_clear(monkeypatch):
    with pytest.raises(ValueError, match="holds no CycleMLP block"):
        cyclemlp.quantize_int8(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="min_dim must be a positive integer"):
        cyclemlp.quantize_int8(_model(), min_dim=0)
    monkeypatch.setattr(kernels, "_INT8_ENGINE", None)
    with pytest.raises(RuntimeError, match="needs PyTorch's FBGEMM quantized engine"):
        cyclemlp.quantize_int8(_model())
    cyclemlp.quantize_int8(_model(), enabled=False)  # turning it off needs no engine
