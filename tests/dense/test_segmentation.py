"""Semantic segmentation on CycleMLP encoders: smp heads, ADE20K-layout data, metrics, inference, training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from dense_utils import make_ade
from PIL import Image

from cyclemlp.dense.segmentation.data import IGNORE_INDEX, SegmentationDataset, rescale_size, train_transform
from cyclemlp.dense.segmentation.metrics import confusion_matrix, segmentation_metrics
from cyclemlp.dense.segmentation.models import semantic_fpn, upernet
from cyclemlp.dense.segmentation.train import (
    SegmentationRecipe,
    infer,
    load_segmenter,
    poly_lr,
    predict_segmentation,
    train_segmenter,
)
from cyclemlp.io import CheckpointMismatchError, save_weights
from cyclemlp.training import engine

TINY = dict(depths=(1, 1, 1, 1), dims=(32, 64, 96, 128))


# --- models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("build,name", [(semantic_fpn, "cyclemlp_b1"), (upernet, "cyclemlp_t")])
@pytest.mark.parametrize("size", [(64, 96), (160, 64)])
def test_forward_backward_non_square(build, name, size):
    model = build(name, num_classes=5, **TINY)
    x = torch.randn(2, 3, *size)
    out = model(x)
    assert out.shape == (2, 5, *size)
    out.mean().backward()
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)


def test_encoder_is_the_projects_cyclemlp_with_dense_norms():
    model = semantic_fpn("cyclemlp_b1", num_classes=3)
    assert model.encoder.out_channels[-4:] == [64, 128, 320, 512]
    assert model.encoder.model.model.stage_norms is not None  # the per-stage LayerNorms of the dense backbone


def test_backbone_weights_loaded_and_reported(tmp_path):
    classifier = timm.create_model("cyclemlp_t", num_classes=10, **TINY)
    path = save_weights(classifier, tmp_path / "t.safetensors")
    model = upernet("cyclemlp_t", num_classes=4, weights=path, **TINY)
    assert model.backbone_load_report.loaded > 0
    network = model.encoder.model.model
    assert torch.equal(network.stages[2].blocks[0].mlp.fc1.weight, classifier.stages[2].blocks[0].mlp.fc1.weight)
    with pytest.raises(CheckpointMismatchError):
        semantic_fpn("cyclemlp_b1", num_classes=4, weights=path, **TINY)


# --- metrics ------------------------------------------------------------------------------------


def test_miou_of_ground_truth_is_one_and_ignore_is_ignored():
    label = torch.randint(0, 4, (2, 30, 40))
    label[:, :5] = IGNORE_INDEX
    matrix = confusion_matrix(label.clamp(max=3), label, 4)
    result = segmentation_metrics(matrix, ["a", "b", "c", "d"])
    assert result["mIoU"] == result["mAcc"] == result["aAcc"] == 1.0
    assert sum(c["pixels"] for c in result["per_class"]) == int((label != IGNORE_INDEX).sum())


def test_metrics_against_hand_computed_values():
    label = torch.tensor([0, 0, 0, 1, 1, 2, 255])
    pred = torch.tensor([0, 0, 1, 1, 0, 0, 2])
    result = segmentation_metrics(confusion_matrix(pred, label, 4))
    per = {c["class"]: c for c in result["per_class"]}
    # class 0: TP 2, FP 2, FN 1; class 1: TP 1, FP 1, FN 1; class 2: TP 0, FN 1; class 3 absent
    assert per["0"]["IoU"] == pytest.approx(2 / 5) and per["0"]["Acc"] == pytest.approx(2 / 3)
    assert per["1"]["IoU"] == pytest.approx(1 / 3) and per["2"]["IoU"] == 0.0
    assert np.isnan(per["3"]["IoU"])
    assert result["mIoU"] == pytest.approx((2 / 5 + 1 / 3 + 0) / 3)
    assert result["aAcc"] == pytest.approx(3 / 6)


# --- data ---------------------------------------------------------------------------------------


def test_dataset_items_and_reduce_zero_label(tmp_path):
    root = make_ade(tmp_path, [(48, 64), (64, 40)], num_classes=3, zero_is_other=True)
    ds = SegmentationDataset(root, "train", 3, reduce_zero_label=True)
    image, label = ds[1]
    assert image.shape == (3, 64, 40) and label.shape == (64, 40) and label.dtype == torch.int64
    raw = np.asarray(Image.open(root / "annotations" / "training" / "1.png"))
    assert torch.equal(label, torch.from_numpy(raw.astype(np.int64) - 1))
    with pytest.raises(ValueError, match=r"1.png holds classes \[3\] outside 0..2.*--reduce-zero-label"):
        SegmentationDataset(root, "train", 3)[1]


def test_reduce_zero_label_maps_zero_to_ignore(tmp_path):
    root = make_ade(tmp_path, [(32, 32)], num_classes=2)
    ds = SegmentationDataset(root, "training", 2, reduce_zero_label=True)
    raw = np.asarray(Image.open(root / "annotations" / "training" / "0.png"))
    _, label = ds[0]
    assert (label[torch.from_numpy(raw == 0)] == IGNORE_INDEX).all()
    assert (label[torch.from_numpy(raw == 1)] == 0).all()


def test_bad_segmentation_data_names_the_files(tmp_path):
    root = make_ade(tmp_path, [(48, 64), (48, 64), (48, 64)])
    (root / "annotations" / "training" / "2.png").unlink()
    with pytest.raises(FileNotFoundError, match="have no label map.*2.png"):
        SegmentationDataset(root, "training", 3)
    Image.new("L", (60, 48)).save(root / "annotations" / "training" / "2.png")
    with pytest.raises(ValueError, match=r"size mismatch.*2.png 64x48 vs label 60x48"):
        SegmentationDataset(root, "training", 3)
    Image.new("RGB", (64, 48)).save(root / "annotations" / "training" / "2.png")
    with pytest.raises(ValueError, match="mode 'RGB'"):
        SegmentationDataset(root, "training", 3)[2]
    (root / "images" / "training" / "2.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match="cannot be read: 2.png"):
        SegmentationDataset(root, "training", 3)
    with pytest.raises(FileNotFoundError, match="ADE20K layout"):
        SegmentationDataset(root, "test", 3)


def test_train_transform_crops_pads_with_ignore_and_keeps_labels(tmp_path):
    root = make_ade(tmp_path, [(40, 56)])
    ds = SegmentationDataset(root, "training", 3, transform=train_transform(64, (256, 64)))
    seen_ignore = False
    for _ in range(6):
        image, label = ds[0]
        assert image.shape == (3, 64, 64) and label.shape == (64, 64)
        assert set(label.unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}
        seen_ignore |= bool((label == IGNORE_INDEX).any())
    assert seen_ignore  # scales below 64/40 leave padding, labelled ignore


def test_rescale_size_is_orientation_free():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(683, 512, (2048, 512)) == (683, 512)
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)


# --- inference ------------------------------------------------------------------------------


def test_whole_and_slide_inference_at_odd_sizes():
    model = semantic_fpn("cyclemlp_b1", num_classes=3, **TINY).eval()
    image = torch.randn(3, 70, 100)
    whole = infer(model, image, 3, "whole")
    assert whole.shape == (3, 70, 100)
    one_window = infer(model, image, 3, "slide", crop_size=128, stride=64)
    torch.testing.assert_close(one_window, whole)  # a window covering the image = whole inference
    slide = infer(model, image, 3, "slide", crop_size=64, stride=48)
    assert slide.shape == (3, 70, 100) and torch.isfinite(slide).all()
    rescaled = infer(model, image, 3, "whole", scale=(256, 64))
    assert rescaled.shape == (3, 70, 100)


def test_poly_lr_with_and_without_warmup():
    fpn = SegmentationRecipe(iters=100).resolved("semantic_fpn")
    assert poly_lr(fpn, 0) == pytest.approx(2e-4)
    assert poly_lr(fpn, 50) == pytest.approx(2e-4 * 0.5**0.9)
    assert poly_lr(fpn, 100) == 0.0
    uper = SegmentationRecipe(iters=100, warmup_iters=10).resolved("upernet")
    assert uper.lr == 6e-5 and uper.weight_decay == 0.01 and uper.power == 1.0
    assert poly_lr(uper, 0) == pytest.approx(6e-5 * 1e-6)
    assert poly_lr(uper, 10) == pytest.approx(6e-5 * 0.9)


# --- training ------------------------------------------------------------------------------------


def test_a_few_iterations_lower_the_loss(tmp_path):
    root = make_ade(tmp_path, [(64, 64)] * 2)
    ds = SegmentationDataset(root, "training", 3)
    images = torch.stack([ds[i][0] for i in range(2)])
    labels = torch.stack([ds[i][1] for i in range(2)])
    model = semantic_fpn("cyclemlp_b1", num_classes=3, **TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(images), labels, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert max(losses[-2:]) < 0.7 * losses[0], losses


def _recipe():
    return SegmentationRecipe(iters=4, eval_interval=2, batch_size=2, crop_size=64, scale=(256, 64), workers=0)


def _run(tmp_path, out, **kwargs):
    root = make_ade(tmp_path / "data", [(64, 64), (48, 80), (80, 48)])
    train_set = SegmentationDataset(root, "training", 3, transform=train_transform(64, (256, 64)))
    val_set = SegmentationDataset(root, "validation", 3)
    rows = train_segmenter("semantic_fpn", "cyclemlp_b1", train_set, val_set, ["background", "red", "blue"],
                           tmp_path / out, _recipe(), backbone_kwargs=TINY, device="cpu", **kwargs)
    return root, rows


def test_train_then_eval_and_predict_from_the_run(tmp_path):
    root, rows = _run(tmp_path, "run")
    assert [r["iteration"] for r in rows] == [2, 4] and 0 <= rows[-1]["val_mIoU"] <= 1
    model, config, _ = load_segmenter(tmp_path / "run")
    assert config["classes"] == ["background", "red", "blue"]
    records = predict_segmentation(model, [root / "images" / "validation" / "1.png"], tmp_path / "pred", config)
    overlay, label = Image.open(records[0]["overlay"]), Image.open(records[0]["label"])
    assert overlay.size == label.size == (80, 48) and label.mode == "P"
    assert sum(records[0]["fractions"].values()) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow
def test_resume_is_exact(tmp_path, monkeypatch):
    _, rows = _run(tmp_path, "straight")
    real_check = engine.check_finite

    def interrupt(loss, epoch, step, checkpoint=None):
        if step == 2:  # the first iteration of the second round
            raise KeyboardInterrupt
        real_check(loss, epoch, step, checkpoint)

    monkeypatch.setattr(engine, "check_finite", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "stopped")
    monkeypatch.setattr(engine, "check_finite", real_check)
    _run(tmp_path, "stopped", resume=tmp_path / "stopped")
    straight = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    resumed = torch.load(tmp_path / "stopped" / "last.pth", weights_only=True)
    assert resumed["iteration"] == 4
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    resumed_rows = json.loads((tmp_path / "stopped" / "metrics.json").read_text())
    assert resumed_rows[-1]["val_mIoU"] == pytest.approx(rows[-1]["val_mIoU"])
