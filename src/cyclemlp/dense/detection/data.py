"""COCO-format detection / instance-segmentation datasets for torchvision's detectors.

A dataset is an annotation json (COCO's ``images``, ``annotations``, ``categories``) plus the
folder its ``file_name`` entries are relative to. Everything that can be checked without decoding
pixels is checked when the dataset is built, and reported in :class:`CocoSummary`:

* annotations whose category is not in ``categories``, or that point to an unknown image, and
  images that are missing, unreadable or whose size differs from the json (masks are decoded at
  the json's size): ``ValueError`` / ``FileNotFoundError`` naming the files;
* boxes with zero width or height (after clipping to the image) and empty masks: dropped and
  counted, naming the files;
* crowd annotations: not used as training targets (COCO evaluation treats them as "ignore");
* images without annotations: skipped in training (counted), kept for evaluation.

Labels are contiguous, ``1..K`` in the order of the category ids; 0 is torchvision's background.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..run import short_list

__all__ = ["CocoDataset", "CocoSummary", "collate", "load_coco_json"]


def load_coco_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read and structurally check a COCO annotation file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a COCO annotation file (top level is not an object)")
    missing = [k for k in ("images", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise ValueError(f"{path} is not a COCO annotation file: no {' / '.join(missing)} list")
    if not data["categories"]:
        raise ValueError(f"{path} lists no categories")
    data.setdefault("annotations", [])
    return data


@dataclass
class CocoSummary:
    """What :class:`CocoDataset` found and did with an annotation file."""

    ann_file: str
    images: int
    annotations: int
    categories: list[str]
    used_images: int = 0
    degenerate: list[str] = field(default_factory=list)
    crowd: int = 0
    empty_images: list[str] = field(default_factory=list)
    skipped_empty: bool = False

    def __str__(self) -> str:
        lines = [
            f"{self.ann_file}: {self.images} images, {self.annotations} annotations, "
            f"{len(self.categories)} categories; {self.used_images} images used"
        ]
        if self.degenerate:
            lines.append(f"  dropped {len(self.degenerate)} degenerate annotations (zero width/height "
                         f"or empty mask): {short_list(self.degenerate)}")
        if self.crowd:
            lines.append(f"  {self.crowd} crowd annotations not used as training targets")
        if self.empty_images:
            what = "skipped" if self.skipped_empty else "kept (negatives)"
            lines.append(f"  {len(self.empty_images)} images without annotations {what}: "
                         f"{short_list(self.empty_images)}")
        return "\n".join(lines)


def _check_images(images: list[dict], image_dir: Path, ann_file: Path) -> None:
    missing, unreadable, mismatched = [], [], []
    for image in images:
        path = image_dir / image["file_name"]
        if not path.is_file():
            missing.append(str(path))
            continue
        try:
            with Image.open(path) as handle:
                width, height = handle.size
        except (UnidentifiedImageError, OSError) as err:
            unreadable.append(f"{path} ({type(err).__name__})")
            continue
        if (width, height) != (image["width"], image["height"]):
            mismatched.append(
                f"{path} is {width}x{height}, the json says {image['width']}x{image['height']}"
            )
    if missing:
        raise FileNotFoundError(f"{len(missing)} images listed in {ann_file} do not exist: {short_list(missing)}")
    if unreadable:
        raise ValueError(f"{len(unreadable)} images listed in {ann_file} cannot be read: {short_list(unreadable)}")
    if mismatched:
        raise ValueError(
            f"image/annotation size mismatch in {ann_file} (boxes and masks would not fit): "
            + "; ".join(mismatched[:8]) + (f"; ... (+{len(mismatched) - 8} more)" if len(mismatched) > 8 else "")
        )


class CocoDataset(Dataset):
    """A COCO-format dataset yielding ``(image, target)`` for torchvision's detectors.

    Args:
        ann_file: COCO annotation json.
        image_dir: folder the images' ``file_name`` entries are relative to.
        masks: also return instance masks (``target["masks"]``, uint8 ``(N, H, W)``).
        train: random horizontal flips, crowd boxes left out of the targets, and (with
            ``skip_empty``) images without annotations skipped.
        skip_empty: skip images without (usable) annotations; default: ``train``.
        verify_images: open every image's header once to check that it exists, is readable and
            has the size the json states.

    Items: ``image`` float tensor ``(3, H, W)`` in [0, 1]; ``target`` with ``boxes`` (x0, y0, x1,
    y1, float), ``labels`` (int64, 1..K), ``image_id`` and, with ``masks``, ``masks``.
    Attributes: ``categories`` (names in label order), ``label_to_category`` (label -> json id),
    ``summary`` (:class:`CocoSummary`), ``coco`` (a pycocotools COCO of the cleaned annotations,
    for evaluation).
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        masks: bool = False,
        train: bool = False,
        skip_empty: bool | None = None,
        verify_images: bool = True,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.masks = masks
        self.train = train
        data = load_coco_json(self.ann_file)
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.categories = [str(c.get("name", c["id"])) for c in cats]
        self.label_to_category = {i + 1: int(c["id"]) for i, c in enumerate(cats)}
        category_to_label = {v: k for k, v in self.label_to_category.items()}

        try:
            images = {int(im["id"]): im for im in data["images"]}
            for im in images.values():
                im["file_name"], im["width"], im["height"] = str(im["file_name"]), int(im["width"]), int(im["height"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{self.ann_file}: every image needs id, file_name, width and height ({err!r})") from err
        if verify_images:
            _check_images(list(images.values()), self.image_dir, self.ann_file)

        summary = CocoSummary(str(self.ann_file), len(images), len(data["annotations"]), self.categories)
        per_image: dict[int, list[dict]] = {i: [] for i in images}
        kept = []
        for ann in data["annotations"]:
            image = images.get(ann.get("image_id"))
            if image is None:
                raise ValueError(
                    f"{self.ann_file}: annotation {ann.get('id')} refers to unknown image id {ann.get('image_id')!r}"
                )
            if ann.get("category_id") not in category_to_label:
                raise ValueError(
                    f"{self.ann_file}: annotation {ann.get('id')} of {image['file_name']} has category id "
                    f"{ann.get('category_id')!r}, which is not in the category list "
                    f"{sorted(category_to_label)}"
                )
            if not isinstance(ann.get("bbox"), (list, tuple)) or len(ann["bbox"]) != 4:
                raise ValueError(
                    f"{self.ann_file}: annotation {ann.get('id')} of {image['file_name']} has no [x, y, w, h] bbox"
                )
            if masks and "segmentation" not in ann:
                raise ValueError(
                    f"{self.ann_file}: annotation {ann.get('id')} of {image['file_name']} has no segmentation "
                    "(instance masks were requested)"
                )
            x, y, w, h = (float(v) for v in ann["bbox"])
            x0, y0 = max(0.0, x), max(0.0, y)
            x1, y1 = min(float(image["width"]), x + w), min(float(image["height"]), y + h)
            if x1 - x0 <= 0 or y1 - y0 <= 0 or (masks and _mask_is_empty(ann, image, self.ann_file)):
                summary.degenerate.append(f"{image['file_name']} (annotation {ann.get('id')})")
                continue
            ann = {**ann, "_box": [x0, y0, x1, y1], "_label": category_to_label[ann["category_id"]]}
            kept.append(ann)
            if ann.get("iscrowd", 0):
                summary.crowd += 1
                if train:
                    continue
            per_image[image["id"]].append(ann)

        skip = train if skip_empty is None else skip_empty
        summary.skipped_empty = skip
        summary.empty_images = [images[i]["file_name"] for i, anns in per_image.items() if not anns]
        self.ids = [i for i, anns in per_image.items() if anns or not skip]
        summary.used_images = len(self.ids)
        if not self.ids:
            raise ValueError(f"{self.ann_file}: no image with usable annotations\n{summary}")
        self.images = images
        self.per_image = per_image
        self.summary = summary
        self._coco_data = {
            "images": list(images.values()),
            "annotations": [{k: v for k, v in a.items() if not k.startswith("_")} for a in kept],
            "categories": cats,
        }
        self._coco = None
        self.transform = v2.RandomHorizontalFlip(0.5) if train else None

    @property
    def coco(self) -> Any:
        """pycocotools ``COCO`` of the cleaned annotations (what evaluation compares against)."""
        if self._coco is None:
            from pycocotools.coco import COCO

            coco = COCO()
            coco.dataset = {k: list(v) for k, v in self._coco_data.items()}
            for ann in coco.dataset["annotations"]:
                ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
                ann.setdefault("iscrowd", 0)
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco

    @property
    def num_classes(self) -> int:
        """Categories plus background: the ``num_classes`` of torchvision's detectors."""
        return len(self.categories) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.images[self.ids[index]]["file_name"]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        info = self.images[image_id]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as handle:
                pil = handle.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot decode image {path}: {err}") from err
        if pil.size != (info["width"], info["height"]):
            raise ValueError(
                f"{path} is {pil.size[0]}x{pil.size[1]}, {self.ann_file} says {info['width']}x{info['height']}"
            )
        anns = self.per_image[image_id]
        size = (info["height"], info["width"])
        image = tv_tensors.Image(v2.functional.pil_to_tensor(pil))
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor([a["_box"] for a in anns], dtype=torch.float32).reshape(-1, 4),
                format="XYXY", canvas_size=size,
            ),
            "labels": torch.tensor([a["_label"] for a in anns], dtype=torch.int64),
            "image_id": image_id,
        }
        if self.masks:
            stack = [_decode_mask(a, info, self.ann_file) for a in anns]
            target["masks"] = tv_tensors.Mask(
                torch.from_numpy(np.stack(stack)) if stack else torch.zeros((0, *size), dtype=torch.uint8)
            )
        if self.transform is not None:
            image, target = self.transform(image, target)
        image = v2.functional.to_dtype(image, torch.float32, scale=True)
        return image.as_subclass(torch.Tensor), {
            k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in target.items()
        }


def _rle(ann: dict, image: dict, ann_file: Path) -> Any:
    from pycocotools import mask as mask_utils

    segm = ann["segmentation"]
    height, width = image["height"], image["width"]
    if isinstance(segm, list):
        polygons = [p for p in segm if len(p) >= 6]
        if not polygons:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if [int(v) for v in segm["size"]] != [height, width]:
            raise ValueError(
                f"{ann_file}: mask of annotation {ann.get('id')} is {segm['size'][1]}x{segm['size'][0]} "
                f"but its image {image['file_name']} is {width}x{height}"
            )
        if isinstance(segm["counts"], list):
            return mask_utils.frPyObjects(segm, height, width)
        counts = segm["counts"].encode() if isinstance(segm["counts"], str) else segm["counts"]
        return {"size": segm["size"], "counts": counts}
    raise ValueError(f"{ann_file}: annotation {ann.get('id')} of {image['file_name']} has an unreadable segmentation")


def _mask_is_empty(ann: dict, image: dict, ann_file: Path) -> bool:
    from pycocotools import mask as mask_utils

    rle = _rle(ann, image, ann_file)
    return rle is None or float(mask_utils.area(rle)) == 0


def _decode_mask(ann: dict, image: dict, ann_file: Path) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode(_rle(ann, image, ann_file)).astype(np.uint8)


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection batches are lists: images differ in size and targets in length."""
    images, targets = zip(*batch)
    return list(images), list(targets)
