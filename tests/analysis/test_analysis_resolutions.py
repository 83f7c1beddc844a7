"""Resolution scaling: linear cost of CycleMLP, fixed-size failures recorded, memory measurement."""

import argparse
import json
import sys

import pytest
import torch
from PIL import Image

from cyclemlp.analysis.memory import cpu_peak_supported, peak_memory
from cyclemlp.analysis.resolutions import loglog_slope, measure_size, run_resolutions
from cyclemlp.cli import main
from cyclemlp.cli._args import parse_size


def test_cyclemlp_gmacs_grow_linearly_in_pixels_and_fixed_size_model_fails(tmp_path):
    sizes = [(64, 64), (128, 128), (64, 256), (256, 256)]
    results = run_resolutions(["cyclemlp_b1", "mixer_s32_224"], sizes + [(224, 224)], repeats=1, out_dir=tmp_path)
    cycle = {(r.height, r.width): r for r in results if r.model == "cyclemlp_b1"}
    base = cycle[(64, 64)]
    for size in sizes[1:]:
        r = cycle[size]
        assert r.error is None and r.latency_ms > 0
        assert r.gmacs / base.gmacs == pytest.approx(r.pixels / base.pixels, rel=0.02)
    slope = loglog_slope([r.pixels for r in cycle.values()], [r.gmacs for r in cycle.values()])
    assert slope == pytest.approx(1, abs=0.01)

    mixer = {(r.height, r.width): r for r in results if r.model == "mixer_s32_224"}
    assert mixer[(224, 224)].error is None and mixer[(224, 224)].gmacs > 0
    for size in sizes:
        assert mixer[size].gmacs is None and "doesn't match model (224)" in mixer[size].error

    saved = json.loads((tmp_path / "resolutions.json").read_text())
    assert len(saved["rows"]) == 10 and saved["meta"]["gmacs_loglog_slope"]["cyclemlp_b1"] == pytest.approx(1, abs=0.01)
    assert (tmp_path / "resolutions.csv").read_text().startswith("model,height,width,pixels")
    assert Image.open(tmp_path / "resolutions.png").format == "PNG"


@pytest.mark.skipif(not sys.platform.startswith("linux") or not cpu_peak_supported(),
                    reason="needs /proc/self/clear_refs")
def test_cpu_peak_memory_sees_torch_allocations():
    size = 64 * 2**20

    def allocate():
        return torch.ones(size // 4).sum()  # 64 MiB of float32, touched

    measured = peak_memory(allocate)
    assert 0.9 * size <= measured <= 1.6 * size
    assert peak_memory(lambda: None) < 0.25 * size


@pytest.mark.skipif(not sys.platform.startswith("linux") or not cpu_peak_supported(),
                    reason="needs /proc/self/clear_refs")
def test_peak_memory_is_the_pass_not_what_the_model_keeps():
    # CycleMLP keeps its weights' inference form (about one more copy of them) from its first eval
    # call on: the warm-up pass builds it, so a 64x64 pass's peak is its activations alone
    import timm

    model = timm.create_model("cyclemlp_b1").eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    result = measure_size(model, "cyclemlp_b1", (64, 64), repeats=1)
    assert result.error is None and result.peak_mem_mb * 2**20 < 0.25 * weights


def test_loglog_slope():
    assert loglog_slope([1, 10, 100], [3, 30, 300]) == pytest.approx(1)
    assert loglog_slope([1, 10, 100], [2, 200, 20000]) == pytest.approx(2)


def test_parse_size_and_cli_errors(capsys):
    assert parse_size("512") == (512, 512) and parse_size("224x448") == (224, 448)
    for bad in ("0", "axb", "1x2x3", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="input size"):
            parse_size(bad)
    with pytest.raises(SystemExit):
        main(["resolutions", "cyclemlp_b1", "--sizes", "64x"])
    assert "cyclemlp resolutions: error: argument --sizes: an input size" in capsys.readouterr().err
    assert main(["resolutions", "cyclemlp_b1", "--repeats", "0"]) == 2
