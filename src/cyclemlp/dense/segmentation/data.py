"""ADE20K-layout semantic segmentation data and the paper's training pipeline (docs/design.md, section 6).

Layout: ``root/images/<split>/<name>.<jpg|png>`` with the label map
``root/annotations/<split>/<name>.png`` (one channel, class index per pixel, 255 = ignore). With
``reduce_zero_label`` (ADE20K's own files) label 0 ("other") becomes 255 and the rest shift down
by one.

Training pipeline (the mmseg pipeline of the authors' recipe, with torchvision's v2 transforms):
random rescale by 0.5-2.0 of the base scale (keep ratio), random crop (re-drawn up to 10 times while one class
covers more than 75 % of it), horizontal flip, photometric distortion (brightness, contrast,
saturation, hue, each with probability 0.5), normalisation, padding to the crop size with label
255.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..run import short_list

__all__ = [
    "IGNORE_INDEX", "SPLITS", "CatMaxCrop", "RandomRescale", "SegmentationDataset", "normalize", "read_label",
    "rescale_size", "train_transform",
]

IGNORE_INDEX = 255
SPLITS = {"train": "training", "val": "validation"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_label(path: Path) -> np.ndarray:
    """A label map as uint8 (H, W); refuses files that are not single-channel class maps."""
    try:
        with Image.open(path) as handle:
            if handle.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(
                    f"label map {path} has mode {handle.mode!r}; expected one channel of class indices "
                    "(mode L or P)"
                )
            label = np.asarray(handle)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read label map {path}: {err}") from err
    if label.max(initial=0) > 255:
        raise ValueError(f"label map {path} holds values above 255")
    return label.astype(np.uint8)


class SegmentationDataset(Dataset):
    """Images and label maps in the ADE20K layout.

    Args:
        root: dataset folder holding ``images/`` and ``annotations/``.
        split: sub-folder name (``training``/``validation``; ``train``/``val`` are accepted too).
        num_classes: classes after ``reduce_zero_label``; labels >= this (other than 255) raise an
            error naming the file.
        reduce_zero_label: ADE20K's convention (see the module docstring).
        transform: called as ``transform(image, label)`` on tv_tensors (``train_transform``);
            None: the image is only normalised (evaluation).

    Items: ``(image float (3, H, W) normalised, label int64 (H, W))``. Building the dataset checks
    that every image has a label map of the same size (headers only) and names the files that do
    not.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        num_classes: int,
        reduce_zero_label: bool = False,
        transform: Any = None,
    ) -> None:
        self.root = Path(root)
        split = SPLITS.get(split, split)
        self.split = split
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.transform = transform
        image_dir, label_dir = self.root / "images" / split, self.root / "annotations" / split
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"{folder} does not exist (expected the ADE20K layout images/{split}, annotations/{split})"
                )
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"no images in {image_dir}")
        missing, mismatched, unreadable = [], [], []
        self.items: list[tuple[Path, Path]] = []
        for image in images:
            label = label_dir / f"{image.stem}.png"
            if not label.is_file():
                missing.append(image.name)
                continue
            try:
                with Image.open(image) as a, Image.open(label) as b:
                    if a.size != b.size:
                        mismatched.append(f"{image.name} {a.size[0]}x{a.size[1]} vs label {b.size[0]}x{b.size[1]}")
            except (UnidentifiedImageError, OSError) as err:
                unreadable.append(f"{image.name} ({type(err).__name__})")
                continue
            self.items.append((image, label))
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} images in {image_dir} have no label map in {label_dir}: {short_list(missing)}"
            )
        if unreadable:
            raise ValueError(f"{len(unreadable)} files in {self.root} cannot be read: {short_list(unreadable)}")
        if mismatched:
            raise ValueError(f"image/label size mismatch in {self.root}: {short_list(mismatched)}")

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw image (uint8 (3, H, W)) and its label map (int64 (H, W), reduced, checked)."""
        image_path, label_path = self.items[index]
        try:
            with Image.open(image_path) as handle:
                image = torch.from_numpy(np.asarray(handle.convert("RGB")).copy()).permute(2, 0, 1)
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot decode image {image_path}: {err}") from err
        label = read_label(label_path).astype(np.int64)
        if self.reduce_zero_label:
            label = np.where(label == 0, IGNORE_INDEX, label - 1)
            label[label == IGNORE_INDEX - 1] = IGNORE_INDEX
        bad = np.unique(label[(label >= self.num_classes) & (label != IGNORE_INDEX)])
        if bad.size:
            raise ValueError(
                f"label map {label_path} holds classes {bad.tolist()[:10]} outside 0..{self.num_classes - 1} "
                f"(and {IGNORE_INDEX} = ignore)"
                + ("" if self.reduce_zero_label else "; ADE20K's own files need --reduce-zero-label")
            )
        return image, torch.from_numpy(label)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load(index)
        if self.transform is not None:
            image, label = self.transform(tv_tensors.Image(image), tv_tensors.Mask(label))
        return normalize(image), label.as_subclass(torch.Tensor).long()


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> ImageNet-normalised float."""
    image = v2.functional.to_dtype(image.as_subclass(torch.Tensor), torch.float32, scale=True)
    return v2.functional.normalize(image, list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))


class CatMaxCrop(torch.nn.Module):
    """Random crop of ``size`` (padded first if smaller: image 0, label 255), re-drawn up to
    ``tries`` times while one class covers more than ``cat_max_ratio`` of the labelled pixels."""

    def __init__(self, size: int, cat_max_ratio: float = 0.75, tries: int = 10) -> None:
        super().__init__()
        self.size = size
        self.cat_max_ratio = cat_max_ratio
        self.tries = tries
        self.crop = v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX})

    def forward(self, image: tv_tensors.Image, label: tv_tensors.Mask) -> tuple[Any, Any]:
        for _ in range(self.tries):
            cropped = self.crop(image, label)
            values = cropped[1][cropped[1] != IGNORE_INDEX]
            if values.numel() == 0 or self.cat_max_ratio >= 1:
                return cropped
            counts = torch.bincount(values.flatten())
            if len(counts[counts > 0]) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                return cropped
        return cropped


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long side <= ``scale[0]`` and short side
    <= ``scale[1]`` (orientation-free, e.g. (2048, 512) for ADE20K)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


class RandomRescale(torch.nn.Module):
    """Rescale to :func:`rescale_size` of ``scale`` times a ratio drawn from ``ratio_range``
    (bilinear for images, nearest for label maps)."""

    def __init__(self, scale: tuple[int, int], ratio_range: tuple[float, float] = (0.5, 2.0)) -> None:
        super().__init__()
        self.scale = scale
        self.ratio_range = ratio_range

    def forward(self, image: tv_tensors.Image, label: tv_tensors.Mask) -> tuple[Any, Any]:
        ratio = float(torch.empty(()).uniform_(*self.ratio_range))
        scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        size = list(rescale_size(image.shape[-2], image.shape[-1], scale))
        return v2.functional.resize(image, size, antialias=True), v2.functional.resize(label, size)


def train_transform(
    crop_size: int, scale: tuple[int, int], ratio_range: tuple[float, float] = (0.5, 2.0)
) -> v2.Compose:
    """The paper's augmentation: rescale (``scale`` = (long, short) base size, times a ratio in
    ``ratio_range``), crop, flip, photometric distortion. Brightness is scaled by up to +-32/255
    (torchvision's multiplicative jitter; mmseg adds up to +-32 grey levels)."""
    return v2.Compose([
        RandomRescale(scale, ratio_range),
        CatMaxCrop(crop_size),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomApply([v2.ColorJitter(brightness=32 / 255)], p=0.5),
        v2.RandomApply([v2.ColorJitter(contrast=(0.5, 1.5))], p=0.5),
        v2.RandomApply([v2.ColorJitter(saturation=(0.5, 1.5))], p=0.5),
        v2.RandomApply([v2.ColorJitter(hue=18 / 180)], p=0.5),
    ])
