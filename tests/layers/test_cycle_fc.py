"""Cycle FC: offsets, equivalence with the authors' deform_conv2d formulation, the native and the
readable shift, gradients, tracing, scripting."""

import importlib
import importlib.util

import pytest
import torch
from deform_reference import DeformCycleFC
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclemlp import CycleFC, cycle_fc, cycle_offsets, cycle_shift

_shift = importlib.import_module("cyclemlp.layers.cycle_fc")
_config = importlib.import_module("cyclemlp.layers.config")


@pytest.fixture(params=["native", "readable"])
def kernel(request, monkeypatch):
    """Build the layers of a test with the native shift kernel (``fused``) or with the readable
    gather of :func:`cycle_shift`."""
    if request.param == "native" and not _shift.native.available():
        pytest.skip(f"native shift kernel not built: {_shift.native.build_error()}")
    monkeypatch.setattr(_config, "_USE_FUSED", request.param == "native")
    return request.param


def _pair_from_deform(ref: DeformCycleFC, out_features: int, in_features: int) -> CycleFC:
    layer = CycleFC(in_features, out_features, ref.stepsize, ref.pattern)
    with torch.no_grad():
        layer.weight.copy_(ref.weight.flatten(1))
        layer.bias.copy_(ref.bias)
    return layer


def _deform(cin, cout, stepsize, pattern):
    ref = DeformCycleFC(cin, cout, stepsize, pattern)
    ref.stepsize, ref.pattern = stepsize, pattern
    return ref


def test_official_offsets_match_released_code():
    assert cycle_offsets(7, (1, 3))[:, 1].tolist() == [0, 1, -1, 0, 1, -1, 0]
    assert cycle_offsets(7, (1, 3))[:, 0].tolist() == [0] * 7
    assert cycle_offsets(8, (1, 7))[:, 1].tolist() == [0, 1, 2, 3, -3, -2, -1, 0]
    assert cycle_offsets(4, (3, 1))[:, 0].tolist() == [0, 1, -1, 0]
    assert cycle_offsets(4, (3, 1))[:, 1].tolist() == [0, 0, 0, 0]


def test_paper_offsets_follow_formula():
    table = cycle_offsets(9, (3, 3), "paper").tolist()
    assert table == [[dy, dx] for dx in (-1, 0, 1) for dy in (-1, 0, 1)]
    assert cycle_offsets(5, (1, 1), "paper").abs().sum() == 0
    # stepsize 3 along W: the printed formula (offset - 1)
    assert cycle_offsets(4, (1, 3), "paper")[:, 1].tolist() == [-1, 0, 1, -1]


@pytest.mark.parametrize("bad", [(3, 3), (2, 5)])
def test_official_rejects_2d_stepsize(bad):
    with pytest.raises(ValueError, match="official"):
        cycle_offsets(8, bad, "official")


@pytest.mark.parametrize("bad", [0, (0, 3), (1, -1), (1, 2, 3), "3", 2.0])
def test_bad_stepsize(bad):
    with pytest.raises((ValueError, TypeError)):
        CycleFC(4, 4, bad)


def test_unknown_pattern():
    with pytest.raises(ValueError, match="pattern"):
        CycleFC(4, 4, (1, 3), pattern="spiral")


CASES = [
    # (batch, H, W, C_in, C_out, stepsize, pattern)
    (2, 7, 9, 16, 8, (1, 3), "official"),
    (1, 5, 4, 13, 13, (3, 1), "official"),
    (3, 8, 8, 10, 6, (1, 7), "official"),
    (2, 3, 2, 12, 5, (7, 1), "official"),  # map smaller than the stepsize
    (1, 1, 1, 6, 6, (1, 3), "official"),
    (2, 6, 5, 18, 9, (3, 3), "paper"),
    (1, 4, 7, 11, 4, (1, 1), "paper"),
    (2, 5, 3, 20, 7, (9, 9), "paper"),  # stepsize larger than the map
    (1, 2, 9, 8, 3, (2, 5), "paper"),  # even stepsizes
]


@pytest.mark.parametrize("batch,h,w,cin,cout,stepsize,pattern", CASES)
def test_matches_deform_conv(batch, h, w, cin, cout, stepsize, pattern, kernel):
    ref = _deform(cin, cout, stepsize, pattern)
    layer = _pair_from_deform(ref, cout, cin)
    x = torch.randn(batch, h, w, cin)
    torch.testing.assert_close(layer(x), ref(x), atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    cin=st.integers(1, 24),
    cout=st.integers(1, 12),
    k=st.integers(1, 11),
    axis=st.sampled_from(["h", "w"]),
    pattern=st.sampled_from(["official", "paper"]),
    second=st.integers(1, 5),
)
def test_matches_deform_conv_property(batch, h, w, cin, cout, k, axis, pattern, second):
    if pattern == "official":
        stepsize = (1, k) if axis == "w" else (k, 1)
    else:
        stepsize = (second, k) if axis == "w" else (k, second)
    ref = _deform(cin, cout, stepsize, pattern)
    layer = _pair_from_deform(ref, cout, cin)
    x = torch.randn(batch, h, w, cin)
    torch.testing.assert_close(layer(x), ref(x), atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    channels=st.integers(1, 40),
    step=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    pattern=st.sampled_from(["official", "paper"]),
)
def test_native_and_readable_shifts_agree(batch, h, w, channels, step, pattern):
    """The native kernel and the gather give the same bits, forward and backward."""
    if not _shift.native.available():
        pytest.skip(f"native shift kernel not built: {_shift.native.build_error()}")
    if pattern == "official":
        step = (1, step[1]) if step[0] <= step[1] else (step[0], 1)
    offsets = cycle_offsets(channels, step, pattern)
    x = torch.randn(batch, h, w, channels)
    x[x.abs() < 0.1] = -0.0
    outs, grads = [], []
    for shift in (_shift._fused_shift, cycle_shift):
        xg = x.clone().requires_grad_()
        out = shift(xg, offsets)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view_as(out))
        outs.append(out.detach().view(torch.int32))
        grads.append(xg.grad)
    assert torch.equal(*outs)
    assert torch.equal(*grads)


def test_shift_reads_zero_outside():
    x = torch.ones(1, 4, 5, 3)
    out = cycle_shift(x, [(0, 0), (0, 1), (0, -1)])
    assert out[0, :, :, 0].eq(1).all()
    assert out[0, :, -1, 1].eq(0).all() and out[0, :, :-1, 1].eq(1).all()
    assert out[0, :, 0, 2].eq(0).all() and out[0, :, 1:, 2].eq(1).all()
    # not a roll: values never wrap around
    ramp = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 2, 5, 1).contiguous()
    assert cycle_shift(ramp, [(0, 2)])[0, 0, :, 0].tolist() == [2, 3, 4, 0, 0]
    assert cycle_shift(ramp, [(0, 9)]).abs().sum() == 0


def test_functional_matches_module(kernel):
    layer = CycleFC(12, 7, (1, 5))
    x = torch.randn(2, 6, 6, 12)
    torch.testing.assert_close(cycle_fc(x, layer.weight, layer.bias, (1, 5)), layer(x))
    assert torch.equal(layer.offsets, cycle_offsets(12, (1, 5)))
    assert "offsets" not in layer.state_dict()  # they follow from stepsize and pattern


def test_gradcheck_float64(kernel):
    layer = CycleFC(5, 3, (3, 3), pattern="paper").double()
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    assert torch.autograd.gradcheck(
        lambda x, w, b: cycle_fc(x, w, b, (3, 3), "paper"), (x, layer.weight, layer.bias)
    )
    y = torch.randn(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, w: cycle_fc(y, w, None, (1, 3)), (y, w))


def test_gradients_match_deform_conv(kernel):
    ref = _deform(10, 6, (1, 3), "official")
    layer = _pair_from_deform(ref, 6, 10)
    x1 = torch.randn(2, 5, 7, 10, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = torch.randn(2, 5, 7, 6)
    (ref(x1) * g).sum().backward()
    (layer(x2) * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad.flatten(1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shape,match", [((2, 3, 4), "channels-last"), ((1, 4, 4, 5), "6 channels")])
def test_bad_input_shapes(shape, match, kernel):
    with pytest.raises(ValueError, match=match):
        CycleFC(6, 6)(torch.randn(*shape))


def test_fx_symbolic_trace():
    layer = CycleFC(8, 4, (1, 3))
    graph = torch.fx.symbolic_trace(layer)
    x = torch.randn(2, 5, 6, 8)
    torch.testing.assert_close(graph(x), layer(x))


def test_torchscript():
    layer = CycleFC(8, 4, (3, 3), "paper")
    scripted = torch.jit.script(layer)
    x = torch.randn(2, 5, 6, 8)
    torch.testing.assert_close(scripted(x), layer(x))


def test_meta_device_and_non_persistent_offsets():
    """Built on the meta device, the offsets are filled by timm's hook once memory exists."""
    layer = CycleFC(6, 4, (3, 1), device="meta")
    assert layer.offsets.is_meta and layer.weight.is_meta
    assert layer(torch.empty(2, 3, 3, 6, device="meta")).shape == (2, 3, 3, 4)
    layer.to_empty(device="cpu")
    layer.init_non_persistent_buffers()
    assert torch.equal(layer.offsets, cycle_offsets(6, (3, 1)))


def test_torch_export_dynamic_shapes():
    layer = CycleFC(8, 4, (3, 1))
    batch, height, width = (torch.export.Dim(n, min=2, max=64) for n in ("batch", "height", "width"))
    program = torch.export.export(
        layer, (torch.randn(2, 6, 7, 8),), dynamic_shapes={"x": {0: batch, 1: height, 2: width}}
    )
    for shape in [(2, 6, 7, 8), (3, 11, 4, 8), (5, 2, 2, 8)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(program.module()(x), layer(x))


def test_torch_compile():
    layer = CycleFC(8, 4, (1, 3))
    compiled = torch.compile(layer, dynamic=False)
    x = torch.randn(2, 5, 6, 8)
    torch.testing.assert_close(compiled(x), layer(x), atol=1e-5, rtol=1e-5)


# --- the native kernel ----------------------------------------------------------------------------


def _definition(x: torch.Tensor, table) -> torch.Tensor:
    """The shift written out from its definition, one channel and one output pixel at a time."""
    out = torch.zeros_like(x)
    _, height, width, _ = x.shape
    for channel, (dy, dx) in enumerate(table):
        for y in range(height):
            for col in range(width):
                if 0 <= y + dy < height and 0 <= col + dx < width:
                    out[:, y, col, channel] = x[:, y + dy, col + dx, channel]
    return out


def test_native_kernel_is_built_where_a_compiler_is():
    import shutil

    if _shift.native.enabled() and shutil.which("c++") and (shutil.which("ninja") or importlib.util.find_spec("ninja")):
        assert _shift.native.available(), _shift.native.build_error()
        x = torch.randn(2, 3, 4, 6)
        assert isinstance(_shift._fused_shift(x, cycle_offsets(6, (1, 3))), torch.Tensor)
    else:
        pytest.skip("no C++ compiler / ninja here, or CYCLEMLP_NATIVE=0")


needs_native = pytest.mark.skipif(not _shift.native.available(), reason="native shift kernel not built")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64,
                                   torch.uint8])
@pytest.mark.parametrize("step,pattern", [((1, 3), "official"), ((3, 1), "official"), ((1, 7), "official"),
                                          ((3, 3), "paper"), ((5, 5), "paper"), ((2, 4), "paper")])
def test_native_shift_follows_the_definition(step, pattern, dtype):
    for height, width, channels in ((5, 7, 6), (1, 1, 4), (3, 9, 13), (2, 2, 30)):
        offsets = cycle_offsets(channels, step, pattern)
        x = (torch.randn(2, height, width, channels) * 50).to(dtype)
        expected = _definition(x, offsets.tolist())
        got = torch.ops.cyclemlp.shift(x, offsets)
        assert got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got, expected), (height, width, channels)
        assert torch.equal(cycle_shift(x, offsets), expected), (height, width, channels)


@needs_native
def test_native_shift_moves_bits_and_takes_any_layout():
    # signed zeros and non-finite values arrive unchanged, and nothing leaks into their neighbours
    x = torch.tensor([float("nan"), float("inf"), -0.0, 1.0] * 3).reshape(1, 1, 3, 4).repeat(2, 3, 1, 1)
    offsets = cycle_offsets(4, (1, 3))
    expected = _definition(x, offsets.tolist()).view(torch.int32)
    assert torch.equal(_shift._fused_shift(x, offsets).view(torch.int32), expected)
    assert torch.equal(cycle_shift(x, offsets).view(torch.int32), expected)
    # a non-contiguous input (a transposed view) is read as the values it holds
    y = torch.randn(2, 8, 6, 10).transpose(1, 2)
    offsets = cycle_offsets(10, (3, 1))
    assert torch.equal(_shift._fused_shift(y, offsets), _definition(y.contiguous(), offsets.tolist()))
    # more distinct offsets than the unrolled kernels handle, and an empty batch
    offsets = cycle_offsets(49, (7, 7), "paper")
    z = torch.randn(1, 9, 8, 49)
    assert torch.equal(_shift._fused_shift(z, offsets), _definition(z, offsets.tolist()))
    assert _shift._fused_shift(torch.randn(0, 3, 3, 49), offsets).shape == (0, 3, 3, 49)


@needs_native
def test_native_shift_gradients_and_errors():
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: _shift.native.shift(v, cycle_offsets(6, (3, 3), "paper")), (x,))
    assert torch.autograd.gradgradcheck(lambda v: _shift.native.shift(v, cycle_offsets(6, (1, 3))), (x,))
    offsets = cycle_offsets(6, (1, 3))
    with pytest.raises(RuntimeError, match=r"one \(dy, dx\) offset per channel, a \(5, 2\) tensor"):
        torch.ops.cyclemlp.shift(torch.randn(1, 2, 2, 5), offsets)
    with pytest.raises(RuntimeError, match=r"channels-last \(B, H, W, C\) tensor; got 3-D"):
        torch.ops.cyclemlp.shift(torch.randn(2, 2, 6), offsets)


def test_without_the_native_kernel_the_fallbacks_give_the_same_model(tmp_path):
    """CYCLEMLP_NATIVE=0 (or a failed build) leaves the gather: same outputs and gradients."""
    import subprocess
    import sys

    from train_utils import ROOT, cli_env

    script = (
        "import sys, torch, cyclemlp, timm, importlib\n"
        "n = importlib.import_module('cyclemlp.layers.native')\n"
        "print('native', n.available(), n.build_error())\n"
        "torch.manual_seed(0)\n"
        "m = timm.create_model('cyclemlp_b1', dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_classes=5)\n"
        "x = torch.randn(2, 3, 64, 48, requires_grad=True)\n"
        "out = m(x); out.square().sum().backward()\n"
        "torch.save((out.detach(), x.grad), sys.argv[1])\n"
    )
    results = {}
    for setting in ("1", "0"):
        env = dict(cli_env(), CYCLEMLP_NATIVE=setting)
        saved = tmp_path / f"native{setting}.pt"
        done = subprocess.run([sys.executable, "-c", script, str(saved)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        results[setting] = torch.load(saved)
        if setting == "0":
            assert "native False turned off by CYCLEMLP_NATIVE=0" in done.stdout
        elif _shift.native.available():
            assert "native True None" in done.stdout
    torch.testing.assert_close(results["1"], results["0"], rtol=0, atol=0)


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    native = _shift.native
    monkeypatch.setattr(native, "_state", {"tried": False, "ok": False, "error": None})
    monkeypatch.setattr(native, "_op_registered", lambda: False)

    def broken() -> None:
        raise OSError("no compiler found\ncommand 'c++' not found")

    monkeypatch.setattr(native, "_build", broken)
    with pytest.warns(RuntimeWarning, match=r"could not be built \(OSError: command 'c\+\+' not found\)"):
        assert not native.available()
    assert native.build_error() == "OSError: command 'c++' not found"
    assert not native.available()  # asked again: no second build, no second warning
    with pytest.raises(RuntimeError, match="native shift kernel is not available: OSError"):
        native.shift(torch.randn(1, 2, 2, 3), torch.zeros(3, 2, dtype=torch.int32))
    x = torch.randn(2, 4, 5, 6)
    offsets = cycle_offsets(6, (1, 3))
    assert torch.equal(_shift._fused_shift(x, offsets), _definition(x, offsets.tolist()))
