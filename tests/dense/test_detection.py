"""Detectors on CycleMLP backbones: builders, backbone loading, COCO data checks, evaluation, training."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from dense_utils import make_coco
from PIL import Image

from cyclemlp.dense.detection import cyclemlp_fpn, mask_rcnn, retinanet
from cyclemlp.dense.detection.data import CocoDataset, collate
from cyclemlp.dense.detection.evaluate import coco_evaluate, coco_results
from cyclemlp.dense.detection.train import (
    DetectionRecipe,
    detection_lr,
    load_detector,
    predict_detections,
    train_detector,
)
from cyclemlp.io import CheckpointMismatchError, save_weights
from cyclemlp.training import engine

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")

TINY = dict(depths=(1, 1, 1, 1), dims=(32, 64, 96, 128))  # one narrow block per stage: fast tests


def _tiny(build, name="cyclemlp_b1", num_classes=3, channels=32, **kwargs):
    """A detector with a one-block-per-stage backbone and a narrow FPN."""
    indices, extra = ((1, 2, 3), "p6p7") if build is retinanet else ((0, 1, 2, 3), "maxpool")
    body, _ = cyclemlp_fpn(name, indices, extra, out_channels=channels, **TINY)
    return build(body, num_classes=num_classes, **kwargs)


def _edit(ann: Path, change) -> Path:
    data = json.loads(ann.read_text())
    change(data)
    ann.write_text(json.dumps(data))
    return ann


# --- builders -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cyclemlp_b1", "cyclemlp_t"])
@pytest.mark.parametrize("size", [(64, 96), (72, 40)])
def test_pyramid_levels_at_non_square_sizes(name, size):
    necks = (((1, 2, 3), "p6p7", (8, 16, 32, 64, 128)), ((0, 1, 2, 3), "maxpool", (4, 8, 16, 32, 64)))
    for indices, extra, strides in necks:
        body, report = cyclemlp_fpn(name, indices, extra, out_channels=16, **TINY)
        assert report is None
        feats = body(torch.randn(1, 3, *size))
        assert len(feats) == len(strides)
        for feat, stride in zip(feats.values(), strides):
            assert feat.shape[:2] == (1, 16)
            assert feat.shape[2] == pytest.approx(size[0] / stride, abs=1.01)
            assert feat.shape[3] == pytest.approx(size[1] / stride, abs=1.01)


def _targets(sizes):
    targets = []
    for h, w in sizes:
        masks = torch.zeros(1, h, w, dtype=torch.uint8)
        masks[0, h // 4: h // 2, w // 4: w // 2] = 1
        boxes = torch.tensor([[w / 4, h / 4, w / 2, h / 2]])
        targets.append({"boxes": boxes, "labels": torch.tensor([1]), "masks": masks})
    return targets


@pytest.mark.parametrize(
    "build,name", [(retinanet, "cyclemlp_b1"), (mask_rcnn, "cyclemlp_b1"), (retinanet, "cyclemlp_t")]
)
def test_detector_forward_backward_non_square(build, name):
    model = _tiny(build, name, min_size=64, max_size=160, detections_per_img=5)
    sizes = [(64, 96), (96, 64), (80, 112)]
    images = [torch.rand(3, *s) for s in sizes]
    losses = model(images, _targets(sizes))
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad), "parameters without gradient"
    assert any("body.model.stages" in n for n in trainable)
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 3
    for out, (h, w) in zip(outputs, sizes):
        assert out["boxes"].shape[1] == 4
        if "masks" in out:
            assert out["masks"].shape[-2:] == (h, w)


def test_full_size_retinanet_b1_matches_recipe_neck():
    model = retinanet("cyclemlp_b1", num_classes=2, min_size=64, max_size=96)
    assert model.backbone.out_channels == 256
    assert [m[0].in_channels for m in model.backbone.fpn.inner_blocks] == [128, 320, 512]  # strides 8-32
    assert model.backbone.fpn.extra_blocks.p6.in_channels == 512  # P6 from the last stage (on input)
    assert model.anchor_generator.num_anchors_per_location() == [9] * 5
    unused = model.backbone.body.model.stage_norms[0]
    assert isinstance(unused, torch.nn.Identity)  # no parameter without gradient (DDP)


def test_mask_rcnn_uses_all_four_stages():
    model = mask_rcnn("cyclemlp_b1", num_classes=2)
    assert [m[0].in_channels for m in model.backbone.fpn.inner_blocks] == [64, 128, 320, 512]
    assert model.roi_heads.has_mask()


def test_resnet_baseline_builds_with_same_neck():
    model = retinanet("resnet18", num_classes=2, min_size=64, max_size=96)
    assert [m[0].in_channels for m in model.backbone.fpn.inner_blocks] == [128, 256, 512]
    losses = model([torch.rand(3, 64, 96)], _targets([(64, 96)]))
    assert torch.isfinite(sum(losses.values()))


# --- backbone initialisation ------------------------------------------------------------------


def test_backbone_weights_from_classification_checkpoint(tmp_path):
    classifier = timm.create_model("cyclemlp_b1", num_classes=1000, **TINY)
    path = save_weights(classifier, tmp_path / "cls.safetensors")
    model = retinanet("cyclemlp_b1", num_classes=3, weights=path, **TINY)
    report = model.backbone_load_report
    assert report is not None and report.loaded > 0
    assert any("stage_norms" in k for k in report.missing)  # dense norms stay at initialisation
    body = model.backbone.body.model
    assert torch.equal(body.stem.proj.weight, classifier.stem.proj.weight)
    assert torch.equal(body.stages[3].blocks[0].mixer.proj.weight, classifier.stages[3].blocks[0].mixer.proj.weight)


def test_backbone_weights_that_do_not_fit_are_refused(tmp_path):
    other = timm.create_model("cyclemlp_b5", depths=(1, 1, 1, 1))
    path = save_weights(other, tmp_path / "b5.safetensors")
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        mask_rcnn("cyclemlp_b1", num_classes=3, weights=path, **TINY)
    unrelated = save_weights({"fc.weight": torch.zeros(2, 2)}, tmp_path / "unrelated.safetensors")
    with pytest.raises(CheckpointMismatchError, match="no backbone weight"):
        retinanet("cyclemlp_b1", num_classes=3, weights=unrelated, **TINY)


# --- COCO data checks ---------------------------------------------------------------------------


def test_coco_dataset_items(tmp_path):
    ann, images = make_coco(tmp_path, [(48, 64), (64, 40)])
    ds = CocoDataset(ann, images, masks=True)
    assert ds.categories == ["red", "blue"] and ds.label_to_category == {1: 7, 2: 9}
    image, target = ds[1]
    assert image.shape == (3, 64, 40) and image.dtype == torch.float32 and image.max() <= 1
    assert target["boxes"].shape == (2, 4) and target["masks"].shape == (2, 64, 40)
    assert set(target["labels"].tolist()) <= {1, 2}
    # the mask and the box describe the same rectangle
    x0, y0, x1, y1 = target["boxes"][0].tolist()
    ys, xs = torch.nonzero(target["masks"][0], as_tuple=True)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)


def test_degenerate_boxes_are_dropped_and_counted(tmp_path):
    ann, images = make_coco(tmp_path, [(48, 64), (48, 64)])

    def flatten(data):
        data["annotations"][0]["bbox"][2] = 0  # zero width
        data["annotations"][3]["bbox"] = [70, 10, 5, 5]  # entirely right of the 64-pixel image

    _edit(ann, flatten)
    ds = CocoDataset(ann, images)
    assert len(ds.summary.degenerate) == 2
    assert "train/0.png (annotation 1)" in str(ds.summary) and "train/1.png (annotation 4)" in str(ds.summary)
    assert len(ds[0][1]["boxes"]) == 1


def test_images_without_annotations_skipped_in_training_kept_in_evaluation(tmp_path):
    ann, images = make_coco(tmp_path, [(48, 64), (48, 64), (48, 64)])
    _edit(ann, lambda d: d.update(annotations=[a for a in d["annotations"] if a["image_id"] != 2]))
    train = CocoDataset(ann, images, train=True)
    evaluation = CocoDataset(ann, images)
    assert len(train) == 2 and len(evaluation) == 3
    assert train.summary.empty_images == ["train/1.png"] and "skipped" in str(train.summary)
    assert "kept" in str(evaluation.summary)
    assert len(evaluation[1][1]["boxes"]) == 0


def test_label_outside_class_list_names_the_file(tmp_path):
    ann, images = make_coco(tmp_path, [(48, 64)])
    _edit(ann, lambda d: d["annotations"][1].update(category_id=3))
    message = r"annotation 2 of train/0.png has category id 3.*not in the category list \[7, 9\]"
    with pytest.raises(ValueError, match=message):
        CocoDataset(ann, images)


def test_missing_unreadable_and_resized_images(tmp_path):
    ann, images = make_coco(tmp_path, [(48, 64), (48, 64)])
    (images / "train" / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match="1.png"):
        CocoDataset(ann, images)
    (images / "train" / "1.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"cannot be read: .*1.png"):
        CocoDataset(ann, images)
    Image.new("RGB", (50, 48)).save(images / "train" / "1.png")
    with pytest.raises(ValueError, match=r"size mismatch.*1.png is 50x48, the json says 64x48"):
        CocoDataset(ann, images)


def test_truncated_image_is_named_when_decoded(tmp_path):
    ann, images = make_coco(tmp_path, [(48, 64)])
    path = images / "train" / "0.png"
    path.write_bytes(path.read_bytes()[:60])  # the header survives, the pixels do not
    ds = CocoDataset(ann, images)
    with pytest.raises(ValueError, match="cannot decode image .*0.png"):
        ds[0]


def test_mask_of_another_size_names_the_file(tmp_path):
    ann, images = make_coco(tmp_path, [(48, 64)])
    _edit(ann, lambda d: d["annotations"][0]["segmentation"].update(size=[40, 64]))
    with pytest.raises(ValueError, match=r"mask of annotation 1 is 64x40 but its image train/0.png is 64x48"):
        CocoDataset(ann, images, masks=True)


def test_bad_annotation_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoDataset(bad, tmp_path)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="no categories"):
        CocoDataset(bad, tmp_path)
    with pytest.raises(FileNotFoundError):
        CocoDataset(tmp_path / "absent.json", tmp_path)


# --- COCO evaluation --------------------------------------------------------------------------


def _ground_truth_results(ds, shuffle_boxes=False):
    results, boxes = [], []
    for i in range(len(ds)):
        _, target = ds[i]
        output = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(len(target["labels"]))}
        if "masks" in target:
            output["masks"] = target["masks"][:, None].float()
        results += coco_results(target["image_id"], output, ds.label_to_category)
    if shuffle_boxes:
        boxes = [r["bbox"] for r in results]
        random.Random(0).shuffle(boxes)
        results = [{k: v for k, v in dict(r, bbox=b).items() if k != "segmentation"} for r, b in zip(results, boxes)]
    return results


def test_coco_eval_of_ground_truth_is_perfect_and_of_shuffled_boxes_is_low(tmp_path):
    ann, images = make_coco(tmp_path, [(96, 128)] * 6, boxes_per_image=3)
    ds = CocoDataset(ann, images, masks=True)
    metrics, text = coco_evaluate(ds.coco, _ground_truth_results(ds), ("bbox", "segm"))
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75"):
        assert metrics[key] == pytest.approx(1.0)
    assert "Average Precision" in text
    shuffled, _ = coco_evaluate(ds.coco, _ground_truth_results(ds, shuffle_boxes=True), ("bbox",))
    assert shuffled["bbox_AP"] < 0.2


def test_coco_eval_without_detections_is_zero(tmp_path):
    ann, images = make_coco(tmp_path, [(48, 64)])
    metrics, text = coco_evaluate(CocoDataset(ann, images).coco, [], ("bbox",))
    assert metrics["bbox_AP"] == 0.0 and "no detections" in text


# --- training -----------------------------------------------------------------------------------


def test_detection_lr_warmup_and_steps():
    recipe = DetectionRecipe(warmup_iters=10, warmup_ratio=0.001, milestones=(8, 11))
    assert detection_lr(recipe, 1e-4, 0, 0) == pytest.approx(1e-7)
    assert detection_lr(recipe, 1e-4, 0, 5) == pytest.approx(1e-4 * (0.001 + 0.999 * 0.5))
    assert detection_lr(recipe, 1e-4, 7, 100) == pytest.approx(1e-4)
    assert detection_lr(recipe, 1e-4, 8, 100) == pytest.approx(1e-5)
    assert detection_lr(recipe, 1e-4, 11, 200) == pytest.approx(1e-6)


@pytest.mark.parametrize("build", [retinanet, pytest.param(mask_rcnn, marks=pytest.mark.slow)])
def test_a_few_iterations_lower_the_loss(tmp_path, build):
    ann, images = make_coco(tmp_path, [(64, 96), (96, 64)])
    ds = CocoDataset(ann, images, masks=build is mask_rcnn)
    batch_images, targets = collate([ds[0], ds[1]])
    model = _tiny(build, num_classes=ds.num_classes, min_size=64, max_size=96)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    losses = []
    for _ in range(10):
        loss = sum(model(batch_images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert max(losses[-2:]) < 0.97 * losses[0], losses


def _recipe(epochs):
    return DetectionRecipe(epochs=epochs, lr=2e-4, batch_size=2, warmup_iters=2, milestones=(1,), min_size=64,
                           max_size=96, workers=0)


def _interrupt_at_epoch(monkeypatch, stop_epoch):
    real_check = engine.check_finite

    def check(loss, epoch, step, checkpoint=None):
        if epoch == stop_epoch:
            raise KeyboardInterrupt
        real_check(loss, epoch, step, checkpoint)

    monkeypatch.setattr(engine, "check_finite", check)
    return lambda: monkeypatch.setattr(engine, "check_finite", real_check)


def test_train_then_eval_and_predict_from_the_run(tmp_path):
    ann, images = make_coco(tmp_path, [(64, 96), (96, 64)])
    train_set, val_set = CocoDataset(ann, images, train=True), CocoDataset(ann, images)
    rows = train_detector("retinanet", "cyclemlp_b1", train_set, val_set, tmp_path / "run", _recipe(1),
                          backbone_kwargs=TINY, device="cpu")
    assert rows[0]["epoch"] == 0 and np.isfinite(rows[0]["train_loss"]) and "val_bbox_AP50" in rows[0]
    assert {"last.pth", "best.pth", "metrics.csv", "metrics.json"} <= {p.name for p in (tmp_path / "run").iterdir()}
    with pytest.raises(ValueError, match="already holds a training run"):
        train_detector("retinanet", "cyclemlp_b1", train_set, val_set, tmp_path / "run", _recipe(1),
                       backbone_kwargs=TINY)
    with pytest.raises(ValueError, match="(?s)cannot resume .*model: recorded 'retinanet', given 'mask_rcnn'.*"
                                         "recipe.epochs: recorded 1, given 2"):
        train_detector("mask_rcnn", "cyclemlp_b1", train_set, val_set, tmp_path / "run", _recipe(2),
                       resume=tmp_path / "run", backbone_kwargs=TINY)

    model, config, path = load_detector(tmp_path / "run")
    assert config["categories"] == ["red", "blue"] and path.name == "best.pth"
    records = predict_detections(model, [images / "train" / "0.png"], tmp_path / "pred", config["categories"], 0.0)
    assert Image.open(records[0]["output"]).size == (96, 64)
    assert all(d["label"] in ("red", "blue") for d in records[0]["detections"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    records = predict_detections(model, [bad, images / "train" / "0.png"], tmp_path / "pred", config["categories"])
    assert records[0]["file"] == str(bad) and records[0]["error"].startswith("cannot read the image")
    assert "detections" in records[1]


@pytest.mark.slow
def test_resume_is_exact(tmp_path, monkeypatch):
    ann, images = make_coco(tmp_path, [(64, 96), (96, 64)])
    train_set, val_set = CocoDataset(ann, images, train=True), CocoDataset(ann, images)
    kwargs = dict(backbone_kwargs=TINY, device="cpu")
    train_detector("retinanet", "cyclemlp_b1", train_set, val_set, tmp_path / "straight", _recipe(2), **kwargs)
    restore = _interrupt_at_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train_detector("retinanet", "cyclemlp_b1", train_set, val_set, tmp_path / "stopped", _recipe(2), **kwargs)
    restore()
    train_detector("retinanet", "cyclemlp_b1", train_set, val_set, tmp_path / "stopped", _recipe(2),
                   resume=tmp_path / "stopped", **kwargs)
    straight = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "stopped" / "last.pth", weights_only=True)["model"]
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert len(json.loads((tmp_path / "stopped" / "metrics.json").read_text())) == 2
