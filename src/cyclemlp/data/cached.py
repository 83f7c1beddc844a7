"""Batches cut from images transformed once and held in memory.

For a small in-memory dataset whose training augmentation changes images only in ways that can be
applied to a batch (the ``fashion-mnist`` recipe: horizontal flips, random translation by
zero-padding and cropping, random erasing), timm's per-image transform (PIL resize, to-tensor,
normalise) is deterministic apart from those, yet it runs again for every image of every epoch.
On a two-core machine that work competes with the training step itself. :class:`CachedLoader`
applies the same timm transform (without the random parts) once per image, keeps the float
tensors, and serves batches by indexing them, then draws the random parts per image with the
transform's probabilities:

- translation (``pad_crop``): the same window torchvision's ``RandomCrop(padding=N)`` cuts, from
  the image padded with the normalised value of black;
- flip: each image with the transform's probability;
- random erasing: timm's own ``RandomErasing`` applied to the normalised batch, as timm's
  ``PrefetchLoader`` applies it.

The images a model sees have the same distribution as through the per-image pipeline (tests
compare them pixel for pixel for fixed draws); flips and translations come from a generator seeded
from torch's global generator at the start of every epoch, as DataLoader seeds its workers, and
erasing draws from Python's and torch's global generators, so a run resumed from a saved random
state sees the same images.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["CACHE_MAX_BYTES", "CachedLoader", "batch_augmentable", "cache_images", "cacheable", "static_part"]


def batch_augmentable(aug: Mapping[str, Any]) -> bool:
    """Whether the augmentation settings (``build_transform``'s keywords) change images only in ways
    :class:`CachedLoader` draws per batch: full-image crops of a fixed aspect, no colour jitter,
    AutoAugment or vertical flip (horizontal flip, ``pad_crop`` translation and random erasing are
    fine)."""
    if aug.get("no_aug"):
        return True
    return (
        tuple(aug.get("scale", ())) == (1.0, 1.0)
        and tuple(aug.get("ratio", ())) == (1.0, 1.0)
        and not aug.get("color_jitter")
        and not aug.get("auto_augment")
        and not aug.get("vflip")
    )


def static_part(aug: Mapping[str, Any]) -> dict[str, Any]:
    """``aug`` without the parts :class:`CachedLoader` draws per batch: the transform to cache."""
    return {**aug, "hflip": 0.0, "re_prob": 0.0, "pad_crop": 0}


# Largest cache (float32 images) built without being asked: Fashion-MNIST at 32x32 grey is 0.25 GB;
# at 224x224 RGB it would be 36 GB.
CACHE_MAX_BYTES = 2 * 1024**3


def cacheable(
    dataset: Dataset,
    aug: Mapping[str, Any],
    input_size: Sequence[int] | None = None,
    max_bytes: int | None = CACHE_MAX_BYTES,
) -> str | None:
    """None when ``dataset`` can be served by :class:`CachedLoader` under ``aug`` (and, given the
    model's ``input_size`` (C, H, W), within ``max_bytes`` of memory); otherwise the reason it
    cannot (for an error message)."""
    base = getattr(dataset, "dataset", dataset)  # through a Subset
    if getattr(base, "images", None) is None or getattr(base, "native_size", None) is None:
        return "the data is not an in-memory dataset of square images (built-in datasets only)"
    if input_size is not None and max_bytes is not None:
        need = len(dataset) * math.prod(input_size) * 4
        pad = 0 if aug.get("no_aug") else int(aug.get("pad_crop") or 0)
        if pad:  # CachedLoader also keeps a padded copy to cut translated windows from
            c, h, w = input_size
            need += len(dataset) * c * (h + 2 * pad) * (w + 2 * pad) * 4
        if need > max_bytes:
            return (f"{len(dataset)} images of {tuple(input_size)} would take {need / 1024**3:.1f} GiB as float32 "
                    f"(more than {max_bytes / 1024**3:.1f} GiB)")
    if not batch_augmentable(aug):
        return ("the training augmentation is more than flips, translation and random erasing (random-resized "
                "crops, colour jitter or AutoAugment change every image every epoch)")
    return None


def cache_images(
    dataset: Dataset, transform: Callable, workers: int = 0, batch_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``transform`` once to every image of ``dataset``: ``(images, targets)`` tensors."""
    from . import collate_skip  # the package's collate (no circular import at load time)

    base = getattr(dataset, "dataset", dataset)
    previous = base.transform
    base.transform = transform
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                            collate_fn=collate_skip)
        images, targets = [], []
        for batch, target, skipped in loader:
            if skipped:  # in-memory datasets have no unreadable images; keep indices aligned regardless
                raise RuntimeError(f"{skipped} image(s) could not be transformed while caching")
            images.append(batch)
            targets.append(target)
    finally:
        base.transform = previous
    return torch.cat(images), torch.cat(targets)


class CachedLoader:
    """Batches ``(images, targets, 0)`` indexed from cached tensors in ``sampler``'s order.

    Mirrors the DataLoader interface the training and evaluation loops use: ``dataset``,
    ``sampler`` (``set_epoch`` goes to it), ``batch_size``, ``drop_last`` and ``len()``.
    """

    def __init__(
        self,
        dataset: Dataset,
        images: torch.Tensor,
        targets: torch.Tensor,
        sampler: torch.utils.data.Sampler[int],
        batch_size: int,
        drop_last: bool,
        hflip: float = 0.0,
        pad_crop: int = 0,
        fill: Sequence[float] = (0.0,),
        erasing: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if len(images) != len(targets) or len(images) != len(dataset):
            raise ValueError(f"cached images ({len(images)}), targets ({len(targets)}) and dataset "
                             f"({len(dataset)}) differ in length")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability; got {hflip}")
        if pad_crop < 0:
            raise ValueError(f"pad_crop must be a number of pixels >= 0; got {pad_crop}")
        self.dataset, self.images, self.targets = dataset, images, targets
        self.sampler, self.batch_size, self.drop_last, self.hflip = sampler, batch_size, drop_last, hflip
        self.pad_crop, self.erasing = pad_crop, erasing
        if pad_crop:  # padded once; ``fill`` is black after normalisation, per channel
            n, c, h, w = images.shape
            fill_value = torch.as_tensor(fill, dtype=images.dtype).reshape(-1, 1, 1).expand(c, 1, 1)
            padded = fill_value.expand(c, h + 2 * pad_crop, w + 2 * pad_crop).repeat(n, 1, 1, 1)
            padded[:, :, pad_crop:pad_crop + h, pad_crop:pad_crop + w] = images
            self.padded = padded

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        # one draw from the global generator per epoch, as DataLoader draws its workers' base seed
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        generator = torch.Generator().manual_seed(seed)
        order = torch.as_tensor(list(iter(self.sampler)), dtype=torch.int64)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start: start + self.batch_size]
            if self.pad_crop:
                images = self._translated(index, generator)
            else:
                images = self.images[index]  # a fresh tensor: changing it leaves the cache intact
            if self.hflip > 0:
                flip = torch.rand(len(index), generator=generator) < self.hflip
                if flip.any():
                    images[flip] = images[flip].flip(-1)
            if self.erasing is not None:
                images = self.erasing(images)
            yield images, self.targets[index], 0

    def _translated(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Windows of the padded images at offsets drawn uniformly in [0, 2 * pad_crop] (as
        ``RandomCrop(padding=pad_crop)``): row offsets first, then column offsets."""
        h, w = self.images.shape[-2:]
        top = torch.randint(0, 2 * self.pad_crop + 1, (len(index),), generator=generator)
        left = torch.randint(0, 2 * self.pad_crop + 1, (len(index),), generator=generator)
        rows = (top[:, None] + torch.arange(h))[:, None, :, None]
        cols = (left[:, None] + torch.arange(w))[:, None, None, :]
        channels = torch.arange(self.images.shape[1])[None, :, None, None]
        return self.padded[index[:, None, None, None], channels, rows, cols]
