"""CPU inference of the fused kernels: the inference form of the weights (cached, reordered for
oneDNN) and the one-image mixing orders give the readable forward's outputs, and the cache never
serves weights that changed.

Tolerance: the mixing orders, the folded projection and the convolution kernels oneDNN picks for
reordered weights change only the order of float32 roundings, so outputs agree with the readable
form to atol 1e-5, rtol 1e-4 (as the other fused tests)."""

import copy
import io
import pickle

import pytest
import timm
import torch
from deform_reference import deform_model

import cyclemlp
from cyclemlp import BRANCHES, CycleMixer, CycleMLP
from cyclemlp.layers import kernels

TOL = dict(atol=1e-5, rtol=1e-4)


def _set_fused(model: torch.nn.Module, fused: bool) -> None:
    for module in model.modules():
        if hasattr(module, "fused"):
            module.fused = fused


def _readable(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(model)
    _set_fused(ref, False)
    with torch.no_grad():
        return ref(x)


def _small_model(**kwargs) -> CycleMLP:
    # stages 1-3 mix by folded weights (C <= 128), stage 4 by branch outputs (C = 160)
    return CycleMLP(depths=(1, 1, 2, 1), dims=(16, 32, 48, 160), num_classes=5, drop_path_rate=0.0, **kwargs)


def _perturbed(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    with torch.no_grad():  # non-trivial biases and norms everywhere
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def _cache_of(module: torch.nn.Module):
    return module.__dict__.get("_inference_cache")


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("pack_rows", [4096, 0])  # oneDNN-reordered Linear weights, and plain ones
@pytest.mark.parametrize("layout", ["pvt", "swin"])
def test_inference_matches_readable(batch, pack_rows, layout, monkeypatch):
    monkeypatch.setattr(kernels, "_PACK_MAX_ROWS", pack_rows)
    model = _perturbed(_small_model(layout=layout)).eval()
    for size in ((64, 64), (52, 44), (97, 33)):
        x = torch.randn(batch, 3, *size)
        with torch.no_grad():
            fused = model(x)
            again = model(x)  # from the cache
        torch.testing.assert_close(fused, _readable(model, x), **TOL)
        assert torch.equal(fused, again)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), fused, **TOL)


@pytest.mark.parametrize("dim", [24, 160])  # folded weights, branch outputs
@pytest.mark.parametrize("branches", [BRANCHES, ("width", "channel"), ("height",)])
@pytest.mark.parametrize("residual", [False, True])
def test_one_image_mixer_matches_readable(dim, branches, residual):
    """The one-image mixing orders of :func:`kernels._mixer_inference`, with and without the
    residual inside, for every subset of branches (the mixer alone also takes the inference path)."""
    mixer = _perturbed(CycleMixer(dim, stepsize=3, branches=branches)).eval()
    x = torch.randn(1, 7, 9, dim)
    res = torch.randn_like(x) if residual else None
    with torch.no_grad():
        got = kernels.cycle_mixer(mixer, x, res)
        alone = mixer(x)
        mixer.fused = False
        want = mixer(x)
    torch.testing.assert_close(got, want if res is None else res + want, **TOL)
    torch.testing.assert_close(alone, want, **TOL)


def test_one_image_matches_authors_network():
    ref = deform_model("cyclemlp_b1").eval()
    model = timm.create_model("cyclemlp_b1").eval()
    model.load_state_dict(cyclemlp.models.checkpoint.convert_state_dict(ref.state_dict(), model))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["pvt", "swin"])
def test_reordered_convolutions_match_readable(layout):
    from cyclemlp.models.cyclemlp import ConvEmbed

    model = _small_model(layout=layout).eval()
    embeds = [m for m in model.modules() if isinstance(m, ConvEmbed)]
    assert len(embeds) == (4 if layout == "pvt" else 1)
    for batch, height, width in ((1, 64, 64), (2, 64, 64), (1, 45, 71), (1, 64, 64)):
        for embed in embeds:
            channels = embed.proj.in_channels
            if embed.channels_last_input:
                x = torch.randn(batch, height // 4, width // 4, channels)
            else:
                x = torch.randn(batch, channels, height, width)
            with torch.no_grad():
                fused = embed(x)
                embed.fused = False
                torch.testing.assert_close(fused, embed(x), atol=1e-5, rtol=1e-5)
                embed.fused = True
        assert all(_cache_of(embed) is not None for embed in embeds)


# --- one image, one native operator per block ----------------------------------------------------------

native_only = pytest.mark.skipif(not kernels.native.available(), reason="the native kernels are not built")


def _python_path(monkeypatch, model, x):
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "_native_block", lambda *args: None)
        return copy.deepcopy(model)(x)


@native_only
@pytest.mark.parametrize("layout", ["pvt", "swin"])
def test_native_block_equals_the_python_path(layout, monkeypatch):
    """``torch.ops.cyclemlp.block_inference`` makes the Python path's calls: equal bitwise, for the
    folded mixing (stages 1-3) and the branch outputs (stage 4), at several sizes."""
    model = _perturbed(_small_model(layout=layout)).eval()
    blocks = [b for stage in model.stages for b in stage.blocks]
    for size in ((64, 64), (52, 44), (97, 33)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            native = model(x)
            for block in blocks:
                entry = _cache_of(block).entries["native"]
                assert entry[1] is not None and entry[1][-1] == (block.mixer.dim <= kernels._FOLD_MAX_DIM)
            want = _python_path(monkeypatch, model, x)
        assert torch.equal(native, want)
        torch.testing.assert_close(native, _readable(model, x), **TOL)


@native_only
def test_native_block_equals_the_python_path_at_b1_widths(monkeypatch):
    for dim, size in ((64, 56), (320, 14), (512, 7)):
        block = _perturbed(cyclemlp.CycleBlock(dim)).eval()
        x = torch.randn(1, size, size, dim)
        with torch.no_grad():
            assert torch.equal(block(x), _python_path(monkeypatch, block, x))
            assert _cache_of(block).entries["native"][1] is not None


def _no_proj_bias(block):
    block.mixer.proj.bias = None


@native_only
@pytest.mark.parametrize("variant", ["int8", "mixer_int8", "two_branches", "no_proj_bias", "mixer_not_fused",
                                     "hidden_too_large"])
def test_native_block_steps_aside_where_it_does_not_apply(variant, monkeypatch):
    branches = ("width", "channel") if variant == "two_branches" else BRANCHES
    block = _perturbed(cyclemlp.CycleBlock(160, branches=branches)).eval()
    if variant == "int8":
        block.int8 = True
    elif variant == "mixer_int8":
        block.mixer.int8 = True
    elif variant == "no_proj_bias":
        _no_proj_bias(block)
    elif variant == "mixer_not_fused":
        block.mixer.fused = False
    elif variant == "hidden_too_large":
        monkeypatch.setattr(kernels, "_MLP_WHOLE_MAX_ELEMENTS", 160 * 4 * 6 * 6)
    x = torch.randn(1, 7, 7, 160)
    with torch.no_grad():
        got = block(x)
        cache = _cache_of(block)
        assert cache is not None and cache.entries.get("native", (None, None))[1] is None
        assert torch.equal(got, _python_path(monkeypatch, block, x))
    if "int8" not in variant:  # int8 products: tests/models/test_int8.py
        torch.testing.assert_close(got, _readable(block, x), **TOL)


def test_model_built_under_inference_mode_runs_and_follows_its_weights():
    """Parameters made under ``torch.inference_mode`` have no version counter: no cache, and a
    load of other weights is seen at once."""
    reference = _perturbed(_small_model()).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model = _small_model().eval()
        model(x)
        model.load_state_dict(reference.state_dict())
        got = model(x)
    assert all(_cache_of(m) is None for m in model.modules())
    with torch.no_grad():
        assert torch.equal(got, reference(x))


# --- the cache follows the weights -------------------------------------------------------------------


def _step(model, x, optimizer):
    """One optimizer step on a model left in eval mode (the cache is not dropped by a mode switch)."""
    optimizer.zero_grad()
    model(x).square().sum().backward()
    optimizer.step()


def _copy_data(model):
    other = _perturbed(_small_model(), 0.5)
    for p, q in zip(model.parameters(), other.parameters()):
        p.data.copy_(q)  # bypasses the version counter
    model.eval()  # the documented refresh


def _assign_data(model):
    other = _perturbed(_small_model(), 0.5)
    for p, q in zip(model.parameters(), other.parameters()):
        p.data = q.detach().clone()


def _replace_layers(model):
    """New Linear modules in place of the blocks' first MLP layers and reweighting outputs."""
    for block in (b for stage in model.stages for b in stage.blocks):
        for owner, name in ((block.mlp, "fc1"), (block.mixer.reweight, "fc2")):
            old = getattr(owner, name)
            new = torch.nn.Linear(old.in_features, old.out_features)
            with torch.no_grad():
                new.weight.copy_(old.weight * 1.5)
                new.bias.copy_(old.bias + 0.5)
            setattr(owner, name, new)


CHANGES = {
    "load_state_dict": lambda m, x: m.load_state_dict(_perturbed(_small_model(), 0.5).state_dict()),
    "load_state_dict_assign": lambda m, x: m.load_state_dict(_perturbed(_small_model(), 0.5).state_dict(),
                                                             assign=True),
    "sgd_step": lambda m, x: _step(m, x, torch.optim.SGD(m.parameters(), lr=1.0)),
    "adamw_foreach_step": lambda m, x: _step(m, x, torch.optim.AdamW(m.parameters(), lr=0.1, foreach=True)),
    "adamw_fused_step": lambda m, x: _step(m, x, torch.optim.AdamW(m.parameters(), lr=0.1, fused=True)),
    "in_place_no_grad": lambda m, x: [p.mul_(1.5) for p in m.parameters()] and None,
    "biases_only": lambda m, x: [p.add_(0.5) for n, p in m.named_parameters() if n.endswith(".bias")] and None,
    "dtype_round_trip": lambda m, x: (m.double(), _perturbed(m, 0.5), m.float()),
    "param_data_assign": lambda m, x: _assign_data(m),
    "replace_layers": lambda m, x: _replace_layers(m),
    "train_then_eval": lambda m, x: (m.train(), _step(m, x, torch.optim.SGD(m.parameters(), lr=1.0)), m.eval()),
    "data_copy_then_eval": lambda m, x: _copy_data(m),
}


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("change", list(CHANGES))
def test_cache_follows_weight_changes(change, int8):
    """With ``int8`` the blocks of stages 2-4 keep int8 forms too (tests/models/test_int8.py); a
    copy, which packs them anew, gives the same output bitwise."""
    model = _perturbed(_small_model()).eval()
    if int8:
        cyclemlp.quantize_int8(model, min_dim=32)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    assert _cache_of(model.stages[0].blocks[0]) is not None
    if int8:
        assert "int8" in _cache_of(model.stages[1].blocks[0]).entries
    if change in ("in_place_no_grad", "biases_only"):
        with torch.no_grad():
            CHANGES[change](model, x)
    else:
        CHANGES[change](model, x)
    assert not model.training
    with torch.no_grad():
        after = model(x)
        want = copy.deepcopy(model)(x) if int8 else _readable(model, x)
    assert not torch.allclose(want, before, atol=1e-3)  # the change matters
    if int8:
        assert torch.equal(after, want)
    else:
        torch.testing.assert_close(after, want, **TOL)


def test_mode_switches_drop_the_cache_and_copies_leave_it_behind():
    model = _perturbed(_small_model()).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    cached = [m for m in model.modules() if _cache_of(m) is not None]
    # every block, every mixer and every convolution keeps one
    assert len(cached) == 2 * sum(model.depths) + len(model.depths)
    twin = copy.deepcopy(model)
    assert all(_cache_of(m) is None or not _cache_of(m).entries for m in twin.modules())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    revived = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        for other in (twin, loaded, revived):
            assert torch.equal(other(x), out)
    model.train()
    assert all(_cache_of(m) is None for m in model.modules())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), out)
    # training-mode and gradient-enabled calls never fill it
    model.train()
    model(x).sum().backward()
    with torch.no_grad():
        model(x)
    assert all(_cache_of(m) is None for m in model.modules())


def test_graph_modes_and_switch_skip_the_inference_form():
    """Traced graphs and the readable forward never read the cache (nor fill it)."""
    model = _perturbed(_small_model()).eval()
    _set_fused(model, False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
    assert all(_cache_of(m) is None for m in model.modules())
    _set_fused(model, True)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
    assert all(_cache_of(m) is None for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), **TOL)
