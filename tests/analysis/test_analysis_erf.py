"""Effective receptive field: exact supports of known networks, area scalars, the end-to-end tool."""

import csv
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

import cyclemlp
from cyclemlp.analysis.erf import contribution_area, effective_receptive_field, run_erf
from cyclemlp.analysis.images import load_images
from cyclemlp.analysis.models import build_model, last_stage_features


def test_erf_of_pointwise_network_is_the_centre_pixel():
    net = nn.Sequential(nn.Conv2d(3, 16, 1), nn.GELU(), nn.Conv2d(16, 32, 1)).eval()
    erf, feature_size = effective_receptive_field(net, torch.randn(3, 3, 15, 20))
    assert feature_size == (15, 20)
    nonzero = np.argwhere(erf > 0)
    assert nonzero.tolist() == [[7, 10]]
    for fraction in (0.2, 0.5, 0.99, 1.0):
        assert contribution_area(erf, fraction) == pytest.approx(1 / (15 * 20))


def test_erf_of_two_3x3_convs_is_a_5x5_square():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1)).eval()
    erf, _ = effective_receptive_field(net, torch.randn(2, 3, 17, 17))
    rows, cols = np.nonzero(erf)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (6, 10, 6, 10)


def test_contribution_area_counts_strongest_pixels_first():
    erf = np.zeros((10, 10))
    erf[0, 0], erf[5, 5], erf[9, 9] = 6.0, 3.0, 1.0  # 60 %, 30 %, 10 % of the total
    assert contribution_area(erf, 0.2) == pytest.approx(0.01)
    assert contribution_area(erf, 0.6) == pytest.approx(0.01)
    assert contribution_area(erf, 0.61) == pytest.approx(0.02)
    assert contribution_area(erf, 0.99) == pytest.approx(0.03)
    uniform = np.ones((8, 8))
    assert contribution_area(uniform, 0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="zero everywhere"):
        contribution_area(np.zeros((4, 4)), 0.5)
    with pytest.raises(ValueError, match="fraction"):
        contribution_area(uniform, 0.0)


def test_erf_leaves_model_state_alone():
    model = timm.create_model("cyclemlp_b1", num_classes=0).train()
    effective_receptive_field(model, torch.randn(1, 3, 64, 64))
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_last_stage_of_any_model():
    x = torch.randn(1, 3, 64, 96)
    for name in ("cyclemlp_b1", "resnet18"):
        feats = last_stage_features(build_model(name), x)
        assert feats.shape[-2:] == (2, 3)
    features_only = timm.create_model("cyclemlp_b1", features_only=True).eval()
    assert last_stage_features(features_only, x).shape == (1, 512, 2, 3)
    with pytest.raises(ValueError, match="4-D"):
        last_stage_features(nn.Flatten(), x)


def test_build_model_loads_given_weights(tmp_path):
    source = timm.create_model("cyclemlp_b1", num_classes=10)
    cyclemlp.save_weights(source, tmp_path / "b1.safetensors")
    loaded = build_model("cyclemlp_b1", tmp_path / "b1.safetensors", num_classes=10)
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="not found"):
        build_model("cyclemlp_b1", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("no_such_model")


def test_load_images_sources(tmp_path):
    assert len(load_images("skimage")) == 5
    assert len(load_images("foolbox", 3)) == 3
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.new("L", (40, 30)).save(tmp_path / "sub" / "b.jpg")
    images = load_images(tmp_path)
    assert [im.size for im in images] == [(40, 30), (40, 30)] and all(im.mode == "RGB" for im in images)
    (tmp_path / "c.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="c.png"):
        load_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither"):
        load_images(tmp_path / "nowhere")


def test_run_erf_writes_table_maps_and_figure(tmp_path):
    results = run_erf(["cyclemlp_b1", "resnet18"], source="skimage", num_images=2, img_size=64, out_dir=tmp_path)
    assert [r.model for r in results] == ["cyclemlp_b1", "resnet18"]
    for r in results:
        assert r.erf.shape == (64, 64) and r.num_images == 2 and r.weights == "random init"
        areas = list(r.areas.values())
        assert areas == sorted(areas) and 0 < areas[0] and areas[-1] <= 1
    with open(tmp_path / "erf.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["model"] for row in rows] == ["cyclemlp_b1", "resnet18"] and "area99_pct" in rows[0]
    meta = json.loads((tmp_path / "erf.json").read_text())["meta"]
    assert meta["num_images"] == 2 and meta["img_size"] == [64, 64]
    maps = np.load(tmp_path / "erf_maps.npz")
    np.testing.assert_allclose(maps["resnet18"], results[1].erf, rtol=1e-6)
    assert Image.open(tmp_path / "erf.png").format == "PNG"
    with pytest.raises(ValueError, match="not analysed"):
        run_erf(["resnet18"], weights={"resnet50": "x.pth"}, out_dir=tmp_path)


def test_build_model_loads_peer_weights_with_their_class_count(tmp_path):
    source = timm.create_model("resnet18", num_classes=7)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "r18.pth")
    loaded = build_model("resnet18", tmp_path / "r18.pth")
    assert torch.equal(loaded.fc.weight, source.fc.weight)
    with pytest.raises(cyclemlp.CheckpointMismatchError, match="does not fit"):
        build_model("resnet34", tmp_path / "r18.pth")
