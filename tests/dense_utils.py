"""Small datasets made on the fly for the dense-prediction tests: coloured rectangles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def make_coco(root: Path, sizes, boxes_per_image=2, seed=0, split="train") -> tuple[Path, Path]:
    """COCO json + images: each image holds rectangles of category 7 ("red") or 9 ("blue")."""
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    (images_dir / split).mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 7, "name": "red"}, {"id": 9, "name": "blue"}]}
    from pycocotools import mask as mask_utils

    for i, (h, w) in enumerate(sizes):
        image = np.full((h, w, 3), 30, dtype=np.uint8)
        name = f"{split}/{i}.png"
        coco["images"].append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for _ in range(boxes_per_image):
            bw, bh = int(rng.integers(w // 5, w // 2)), int(rng.integers(h // 5, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            cat = int(rng.choice([7, 9]))
            image[y:y + bh, x:x + bw] = (220, 40, 40) if cat == 7 else (40, 40, 220)
            mask = np.zeros((h, w), dtype=np.uint8)
            mask[y:y + bh, x:x + bw] = 1
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode()
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": cat,
                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0, "segmentation": rle,
            })
        Image.fromarray(image).save(images_dir / name)
    ann = root / f"{split}.json"
    ann.write_text(json.dumps(coco))
    return ann, images_dir


def make_ade(root: Path, sizes, num_classes=3, seed=0, zero_is_other=False) -> Path:
    """ADE20K-layout folder of coloured rectangles: class c is painted with colour c."""
    rng = np.random.default_rng(seed)
    colours = np.array([(20, 20, 20), (230, 40, 40), (40, 40, 230), (40, 230, 40)], dtype=np.uint8)
    for split, split_sizes in (("training", sizes), ("validation", sizes[:2])):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(split_sizes):
            label = np.zeros((h, w), dtype=np.uint8)
            for c in range(1, num_classes):
                y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
                label[y:y + h // 3, x:x + w // 3] = c
            Image.fromarray(colours[label]).save(root / "images" / split / f"{i}.png")
            Image.fromarray(label + (1 if zero_is_other else 0)).save(root / "annotations" / split / f"{i}.png")
    return root
