"""The eight CycleMLP models: configurations, timm interface, sizes, equivalence with the authors'."""

import pytest
import timm
import torch
from deform_reference import deform_model

import cyclemlp
from cyclemlp import BRANCHES, MODEL_CONFIGS, CycleMixer, CycleMLP, count_cost

# docs/design.md, section 2 (B1-B5: the authors' table and fvcore count) and 3 (T/S/B, derived).
EXPECTED = {
    "cyclemlp_b1": (15.2, 2.131),
    "cyclemlp_b2": (26.8, 3.890),
    "cyclemlp_b3": (38.4, 6.853),
    "cyclemlp_b4": (51.8, 10.059),
    "cyclemlp_b5": (75.7, 12.267),
    "cyclemlp_t": (30.4, 4.37),
    "cyclemlp_s": (53.5, 8.54),
    "cyclemlp_b": (94.7, 15.17),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_params_and_gmacs_reproduce_spec(name):
    params_m, gmacs = EXPECTED[name]
    cost = count_cost(timm.create_model(name))
    assert abs(cost.params_m - params_m) <= 0.1
    assert abs(cost.gmacs - gmacs) <= (0.0015 if name[-2] == "b" and name[-1].isdigit() else 0.01)
    assert cost.flops > 0 and cost.macs > cost.flops / 2  # LayerNorm adds to MACs only


def test_gmacs_grow_linearly_with_pixels():
    model = timm.create_model("cyclemlp_b1")
    small, big = count_cost(model, 256), count_cost(model, 512)
    assert big.macs / small.macs == pytest.approx(4.0, rel=0.01)


def test_all_registered_in_timm():
    for name in MODEL_CONFIGS:
        assert timm.is_model(name)
        cfg = timm.get_pretrained_cfg(name).to_dict()
        assert cfg["url"].startswith("https://github.com/ShoufaChen/CycleMLP/releases/download/v0.1/")
        assert cfg["input_size"] == (3, 224, 224)
        assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
        assert cfg["license"] == "mit"


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_create_model_kwargs_and_odd_sizes(name):
    model = timm.create_model(name, num_classes=7, in_chans=1, drop_path_rate=0.05).eval()
    assert model.head.out_features == 7 and model.stem.proj.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(1, 1, 97, 161)).shape == (1, 7)


def test_drop_path_schedule():
    model = timm.create_model("cyclemlp_b1", drop_path_rate=0.3)
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0
             for s in model.stages for b in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3) and len(rates) == 10
    assert rates == sorted(rates)


def test_non_square_large_input():
    model = timm.create_model("cyclemlp_b1", features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 512, 1024))
    assert [tuple(f.shape[2:]) for f in feats] == [(128, 256), (64, 128), (32, 64), (16, 32)]


@pytest.mark.parametrize("name", ["cyclemlp_b1", "cyclemlp_t"])
def test_features_only(name):
    model = timm.create_model(name, features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(2, 3, 97, 161)
    with torch.no_grad():
        feats = model(x)
    assert len(feats) == 4
    for f, c in zip(feats, model.feature_info.channels()):
        assert f.shape[:2] == (2, c)
    sub = timm.create_model(name, features_only=True, out_indices=(1, 3))
    assert sub.feature_info.channels() == [model.feature_info.channels()[1], model.feature_info.channels()[3]]
    with torch.no_grad():
        assert [f.shape[1] for f in sub(x)] == sub.feature_info.channels()


def test_forward_api():
    model = timm.create_model("cyclemlp_b1", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 2, 3, 512)  # NHWC
        assert model.forward_head(feats, pre_logits=True).shape == (2, 512)
        logits = model.forward_head(feats)
        torch.testing.assert_close(logits, model(x))
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, feats)
        assert [t.shape[1] for t in inter] == [64, 128, 320, 512]
        assert len(model.forward_intermediates(x, indices=2, intermediates_only=True)) == 2
        nhwc = model.forward_intermediates(x, indices=[0], output_fmt="NHWC", intermediates_only=True)
        assert nhwc[0].shape == (2, 16, 24, 64)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 512)
    assert model.get_classifier() is model.head


def test_grad_checkpointing_same_result():
    model = timm.create_model("cyclemlp_b1", num_classes=4, drop_path_rate=0.0)
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    ref.sum().backward()
    grad = model.stem.proj.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(model.stem.proj.weight.grad, grad, atol=1e-5, rtol=1e-4)


def test_custom_variant_and_ablation_options():
    model = CycleMLP(
        depths=(1, 1), dims=(16, 32), mlp_ratios=(2, 2), stepsize=(3, 3), pattern="paper",
        branches=("width", "channel"), in_chans=2, num_classes=3, drop_path_rate=0.0,
    )
    assert model(torch.randn(2, 2, 40, 24)).shape == (2, 3)
    assert model.stages[0].blocks[0].mixer.height_fc is None
    assert model.stages[0].blocks[0].mixer.reweight.fc2.out_features == 32
    with pytest.raises(ValueError, match="branches"):
        CycleMLP(branches=("width", "spatial"))
    with pytest.raises(ValueError, match="one entry per stage"):
        CycleMLP(depths=(1, 1), dims=(8,))
    with pytest.raises(ValueError, match="layout"):
        CycleMLP(layout="convnext")


@pytest.mark.parametrize("layout", ["pvt", "swin"])
def test_stem_stride_keeps_resolution_and_weights(layout):
    """A stride-2 stem doubles every stage's grid; its weights have the paper stem's shape, so a
    stride-4 model's state dict loads into it unchanged."""
    kwargs = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), layout=layout, in_chans=1, num_classes=3)
    paper = CycleMLP(**kwargs)
    fine = CycleMLP(stem_stride=2, **kwargs)
    if layout == "pvt":
        fine.load_state_dict(paper.state_dict())
    x = torch.randn(2, 1, 32, 32)
    grids = [f.shape[-1] for f in fine.forward_intermediates(x, intermediates_only=True)]
    assert grids == [16, 8, 4, 2]
    assert [f.shape[-1] for f in paper.forward_intermediates(x, intermediates_only=True)] == [8, 4, 2, 1]
    assert [info["reduction"] for info in fine.feature_info] == [2, 4, 8, 16]
    assert fine(x).shape == (2, 3)
    for bad in (3, 2.0):
        with pytest.raises(ValueError, match="stem_stride"):
            CycleMLP(stem_stride=bad)
    if layout == "swin":  # its 2x2 patches cannot take the paper's 4x4 stem weights
        with pytest.raises(RuntimeError, match="stem.proj.weight"):
            fine.load_state_dict(paper.state_dict())


@pytest.mark.parametrize("shape,match", [((3, 224, 224), "images of shape"), ((1, 1, 64, 64), "images of shape"),
                                         ((1, 3, 2, 64), "at least")])
def test_bad_image_shapes(shape, match):
    model = timm.create_model("cyclemlp_b1")
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


def test_tiny_inputs_work():
    model = timm.create_model("cyclemlp_b1").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 3, 5)).shape == (1, 1000)
    swin = timm.create_model("cyclemlp_t").eval()
    with torch.no_grad():
        assert swin(torch.randn(1, 3, 4, 9)).shape == (1, 1000)


@pytest.mark.parametrize("name,size", [("cyclemlp_b1", (224, 224)), ("cyclemlp_b1", (97, 161)),
                                       ("cyclemlp_b2", (64, 80))])
def test_matches_authors_network(name, size):
    ref = deform_model(name).eval()
    model = timm.create_model(name).eval()
    sd = cyclemlp.models.checkpoint.convert_state_dict(ref.state_dict(), model)
    model.load_state_dict(sd)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)


def test_dense_backbone_matches_authors():
    ref = deform_model("cyclemlp_b1", dense=True).eval()
    model = timm.create_model("cyclemlp_b1", features_only=True).eval()
    inner = model.model
    inner.load_state_dict(cyclemlp.models.checkpoint.convert_state_dict(ref.state_dict(), inner), strict=False)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        for a, b in zip(model(x), ref(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_fx_trace_whole_model():
    model = timm.create_model("cyclemlp_b1", num_classes=3).eval()
    graph = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 3, 64, 96)
    torch.testing.assert_close(graph(x), model(x))


def _set_fused(model: torch.nn.Module, fused: bool) -> None:
    for module in model.modules():
        if hasattr(module, "fused"):
            module.fused = fused


def _outputs_and_grads(model, x, grad):
    x = x.clone().requires_grad_()
    model.zero_grad()
    out = model(x)
    out.backward(grad)
    return [out.detach(), x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("fold_max_dim", [0, 10**6])
@pytest.mark.parametrize("size", [(5, 7), (9, 8)])  # backward per branch (35 positions) / per image (72)
@pytest.mark.parametrize("branches", [BRANCHES, ("width", "channel")])
def test_fused_mixer_matches_readable(fold_max_dim, size, branches, monkeypatch):
    """The fused token mixer computes the readable one's output and gradients, by either forward
    (per-image folded weights or per-branch products) and either backward strategy."""
    from cyclemlp.layers import kernels

    monkeypatch.setattr(kernels, "_FOLD_MAX_DIM", fold_max_dim)
    mixer = CycleMixer(24, stepsize=3, branches=branches)
    with torch.no_grad():  # non-trivial biases everywhere
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, grad = torch.randn(3, *size, 24), torch.randn(3, *size, 24)
    assert mixer.fused
    fused = _outputs_and_grads(mixer, x, grad)
    mixer.fused = False
    readable = _outputs_and_grads(mixer, x, grad)
    for a, b in zip(fused, readable):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(kernels.cycle_mixer(mixer, x), mixer(x), atol=1e-5, rtol=1e-4)


def _small_model(**kwargs) -> CycleMLP:
    return CycleMLP(depths=(1, 1, 1, 1), dims=(16, 32, 48, 160), num_classes=5, drop_path_rate=0.0, **kwargs)


@pytest.mark.parametrize("precision", ["float32", "float32-chunked", "bfloat16"])
def test_fused_network_matches_readable(precision, monkeypatch):
    """Whole networks, fused against readable: inference (oneDNN kernels with the residual adds
    inside, in float32) and a training step (custom backward passes). ``float32-chunked``: every
    MLP runs in row chunks of 64 rows, the last one ragged. ``bfloat16``: bfloat16 weights for
    inference and bfloat16 autocast for training, equal to bfloat16 precision."""
    from cyclemlp.layers import kernels

    if precision == "float32-chunked":
        monkeypatch.setattr(kernels, "_MLP_WHOLE_MAX_ELEMENTS", 0)
        monkeypatch.setattr(kernels, "_MLP_CHUNK_ELEMENTS", 64 * 64)
    low = precision == "bfloat16"
    dtype = torch.bfloat16 if low else torch.float32
    model = _small_model()
    x, grad = torch.randn(2, 3, 52, 44), torch.randn(2, 5)
    results = {}
    for fused in (True, False):
        _set_fused(model, fused)
        with torch.no_grad():
            inference = model.to(dtype).eval()(x.to(dtype)).float()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            results[fused] = [inference] + _outputs_and_grads(model.float().train(), x, grad)
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a.float(), b.float(), **(dict(atol=0.05, rtol=0.05) if low else
                                                            dict(atol=1e-5, rtol=1e-4)))


def test_hooks_and_graph_modes_get_the_readable_forward():
    """A hook on a module that the fused kernels would skip makes the block and mixer run their
    readable forward, so the hook fires; tracing and dispatch modes get the readable forward too."""
    from torch.utils.flop_counter import FlopCounterMode

    from cyclemlp.layers import fused_applies

    model = _small_model().eval()
    block = model.stages[0].blocks[0]
    x = torch.randn(1, 3, 32, 32)
    seen = []
    handle = block.mixer.width_fc.register_forward_hook(lambda *args: seen.append(True))
    feature = torch.randn(1, 8, 8, 16)
    assert not fused_applies(block, feature) and not fused_applies(block.mixer, feature)
    assert fused_applies(block.mixer.width_fc, feature)  # its own hooks fire around its forward
    with torch.no_grad():
        model(x)
    assert seen == [True]
    handle.remove()
    assert fused_applies(block, feature)
    with FlopCounterMode(display=False):
        assert not fused_applies(block, feature)
    traced = []
    block.register_forward_pre_hook(lambda module, args: traced.append(fused_applies(module, args[0])))
    torch.jit.trace(block, feature, check_trace=False)
    assert traced == [False]


def test_fused_switch(monkeypatch):
    """``set_fused`` and ``CYCLEMLP_FUSED`` set the default of the modules built afterwards."""
    import subprocess
    import sys

    from train_utils import cli_env

    from cyclemlp.layers import set_fused, use_fused

    assert use_fused()
    monkeypatch.setattr("cyclemlp.layers.config._USE_FUSED", True)
    set_fused(False)
    assert not any(getattr(m, "fused", False) for m in _small_model().modules())
    set_fused(True)
    fused = [m.fused for m in _small_model().modules() if hasattr(m, "fused")]
    # per block: the block, its mixer, two Cycle FCs; per stage its convolution (stem or downsampling)
    assert len(fused) == 4 * 4 + 4 and all(fused)
    code = "import cyclemlp.layers as layers; print(layers.use_fused())"
    for value, expected in (("0", "False"), ("off", "False"), ("1", "True")):
        env = dict(cli_env(), CYCLEMLP_FUSED=value)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert done.stdout.strip() == expected


def test_torchscript_and_meta_device():
    model = timm.create_model("cyclemlp_t", num_classes=3).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), atol=1e-5, rtol=1e-4)
    meta = timm.create_model("cyclemlp_b1", device="meta", dtype=torch.bfloat16)
    assert all(t.is_meta for t in (*meta.parameters(), *meta.buffers()))
    assert meta.head.weight.dtype == torch.bfloat16
    assert meta(torch.empty(1, 3, 64, 64, device="meta", dtype=torch.bfloat16)).shape == (1, 1000)


@pytest.mark.parametrize("needs", [(True, True, True, True), (True, False, False, False), (False, True, False, True),
                                   (False, False, True, False), (False, False, False, True)])
def test_mix_backward_strategies_agree_for_any_wanted_gradients(needs):
    from cyclemlp.layers.kernels import _mix_backward_per_branch, _mix_backward_per_image

    g = torch.Generator().manual_seed(0)
    batch, positions, dim, n = 3, 70, 24, 3
    grad = torch.randn(batch, positions, dim, generator=g)
    parts = [torch.randn(batch, positions, dim, generator=g) for _ in range(n)]
    a = torch.rand(batch, dim, n, generator=g).softmax(-1)
    weight, bias = torch.randn(dim, n * dim, generator=g), torch.randn(dim, n, generator=g)
    image = _mix_backward_per_image(grad, parts, a, weight, bias, needs)
    branch = _mix_backward_per_branch(grad, parts, a, weight, bias, needs)
    for wanted, x, y in zip(needs, image, branch):
        if not wanted:  # not computed
            assert x is None and y is None
            continue
        xs, ys = (x, y) if isinstance(x, list) else ([x], [y])
        assert len(xs) == len(ys) == (n if isinstance(x, list) else 1)
        for u, v in zip(xs, ys):
            torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4)


def test_training_gradients_match_authors_network():
    ref = deform_model("cyclemlp_b1")
    model = timm.create_model("cyclemlp_b1", drop_path_rate=0.0)
    model.load_state_dict(cyclemlp.models.checkpoint.convert_state_dict(ref.state_dict(), model))
    x = torch.randn(2, 3, 64, 96)
    y = torch.tensor([3, 7])
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    ours = {k: v for k, v in model.named_parameters()}
    for key, param in ref.named_parameters():
        mapped = cyclemlp.models.checkpoint.convert_state_dict({key: param.grad}, model)
        (name, grad), = mapped.items()
        torch.testing.assert_close(ours[name].grad, grad, atol=2e-5, rtol=1e-3, msg=name)


def test_autocast_training_step():
    model = CycleMLP(depths=(1, 1, 1, 1), dims=(16, 32, 48, 160), num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(dim=1).mean()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("bias", [True, False])
def test_chunked_mlp_matches_plain(monkeypatch, bias):
    """The row-chunked MLP (ragged last chunk) gives the plain MLP's output and gradients, also
    when only some inputs want gradients, and its oneDNN inference form the same output."""
    from timm.layers import Mlp

    from cyclemlp.layers import kernels

    monkeypatch.setattr(kernels, "_MLP_WHOLE_MAX_ELEMENTS", 0)  # chunk even tiny layers
    monkeypatch.setattr(kernels, "_MLP_CHUNK_ELEMENTS", 48 * 64)  # 64 rows per chunk, 70 rows
    mlp = Mlp(12, 48, bias=bias).double()
    x = torch.randn(2, 5, 7, 12, dtype=torch.float64)
    residual = torch.randn_like(x)
    grad = torch.randn_like(x)
    assert kernels._mlp_chunk_rows(70, 48) == 64
    for wants_x, wants_params in ((True, True), (True, False), (False, True)):
        mlp.requires_grad_(wants_params)
        results = []
        for chunked in (True, False):
            mlp.zero_grad()
            xg = x.clone().requires_grad_(wants_x)
            out = kernels._channel_mlp(mlp, xg, residual) if chunked else residual + mlp(xg)
            out.backward(grad)
            params = [p.grad.clone() for p in mlp.parameters()] if wants_params else []
            results.append([out.detach()] + ([xg.grad] if wants_x else []) + params)
        for a, b in zip(*results):
            torch.testing.assert_close(a, b)
    mlp, x, residual = mlp.float(), x.float(), residual.float()
    with torch.no_grad():
        fused = kernels._channel_mlp(mlp, x, residual=residual, onednn=kernels._onednn_inference(x))
        torch.testing.assert_close(fused, residual + mlp(x), atol=1e-5, rtol=1e-5)


def test_chunked_mlp_refuses_a_second_derivative():
    from timm.layers import Mlp

    from cyclemlp.layers import kernels

    x = torch.randn(2, 3, 3, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(kernels._channel_mlp(Mlp(8, 32), x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()
