"""Ablations: the spatial-FC variant, variant models, and a tiny budget run end to end."""

import json

import pytest
import timm
import torch
from PIL import Image

from cyclemlp.analysis.ablate import VARIANTS, SpatialFCMixer, run_ablation, use_spatial_fc, variant_factory
from cyclemlp.models.cyclemlp import CycleMixer
from cyclemlp.models.factory import model_from_checkpoint

TINY = dict(dims=(16, 32, 64, 128))


def test_spatial_fc_mixes_every_position_and_is_tied_to_its_size():
    mixer = SpatialFCMixer(8, 4, 5)
    x = torch.zeros(1, 4, 5, 8, requires_grad=True)
    mixer(x)[0, 0, 0].sum().backward()
    assert (x.grad[0].abs().sum(-1) > 0).all()  # the corner output sees all 20 positions
    with pytest.raises(ValueError, match="built for 4x5"):
        mixer(torch.zeros(1, 5, 4, 8))


def test_use_spatial_fc_replaces_every_mixer_with_the_stage_size():
    model = use_spatial_fc(timm.create_model("cyclemlp_b1", in_chans=1, num_classes=10, **TINY), 56)
    mixers = [b.mixer for stage in model.stages for b in stage.blocks]
    assert all(isinstance(m, SpatialFCMixer) for m in mixers)
    assert not any(isinstance(m, CycleMixer) for m in model.modules())
    assert [(m.height, m.width) for m in mixers] == [(14, 14)] * 2 + [(7, 7)] * 2 + [(4, 4)] * 4 + [(2, 2)] * 2
    x = torch.randn(2, 1, 56, 56)
    assert model(x).shape == (2, 10)
    model.eval()  # CycleBlock's inference path hands the mixer the residual
    for stage in model.stages:
        for block in stage.blocks:
            block.drop_path = torch.nn.Identity()
    with torch.no_grad():
        fast = model(x)
        model.train()
        plain = model(x)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


def test_each_variant_builds_what_it_says():
    built = {v.name: variant_factory("cyclemlp_b1", v, 32, **TINY)(num_classes=10, in_chans=1) for v in VARIANTS}
    first = lambda m: m.stages[0].blocks[0].mixer  # noqa: E731
    assert first(built["cyclemlp"]).branches == ("width", "height", "channel")
    assert first(built["no_width"]).width_fc is None and first(built["no_height"]).height_fc is None
    assert first(built["no_channel"]).channel_fc is None
    assert first(built["stepsize_7"]).width_fc.stepsize == (1, 7)
    assert first(built["stepsize_3x3"]).width_fc.stepsize == (3, 3)
    assert first(built["pattern_paper"]).width_fc.pattern == "paper"
    assert isinstance(first(built["spatial_fc"]), SpatialFCMixer)
    for model in built.values():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)


def test_run_ablation_tiny_budget(tmp_path):
    budget = dict(img_size=32, epochs=1, warmup_epochs=0, train_subset=64, val_subset=32, batch_size=32,
                  workers=0, progress=False)
    chosen = [v for v in VARIANTS if v.name in ("cyclemlp", "stepsize_7", "spatial_fc")]
    results = run_ablation("cyclemlp_b1", chosen, budget, TINY, seeds=(0,), out_dir=tmp_path)
    assert [r.variant for r in results] == ["cyclemlp", "stepsize_7", "spatial_fc"]
    assert all(0 <= r.top1 <= 100 and r.params_m > 0 for r in results)
    saved = json.loads((tmp_path / "ablate.json").read_text())
    assert saved["meta"]["epochs"] == 1 and saved["meta"]["train_subset"] == 64
    assert Image.open(tmp_path / "ablate.png").format == "PNG"
    # timm-built variants record how to rebuild them
    model, run, _ = model_from_checkpoint(tmp_path / "runs" / "stepsize_7-seed0" / "model.safetensors")
    assert model.stages[0].blocks[0].mixer.width_fc.stepsize == (1, 7)
    # a second call reads the finished runs back instead of training again
    stamp = (tmp_path / "runs" / "cyclemlp-seed0" / "model.safetensors").stat().st_mtime_ns
    again = run_ablation("cyclemlp_b1", chosen[:1], budget, TINY, seeds=(0,), out_dir=tmp_path)
    assert again[0].top1 == results[0].top1
    assert (tmp_path / "runs" / "cyclemlp-seed0" / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="holds a run of 1 epochs, not 2"):
        run_ablation("cyclemlp_b1", chosen[:1], dict(budget, epochs=2), TINY, out_dir=tmp_path)
