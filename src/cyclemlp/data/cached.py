"""Batches cut from images transformed once and held in memory.

For a small in-memory dataset whose training augmentation is a horizontal flip and nothing else
(the ``fashion-mnist`` recipe), timm's per-image transform (PIL resize, to-tensor, normalise) is
deterministic apart from the flip, yet it runs again for every image of every epoch. On a
two-core machine that work competes with the training step itself. :class:`CachedLoader` applies
the same timm transform (without its flip) once per image, keeps the float tensors, and serves
batches by indexing them, flipping each image with the transform's probability. The images a
model sees have the same distribution as through the per-image pipeline (tests compare them pixel
for pixel); the flips come from a generator seeded from torch's global generator at the start of
every epoch, as DataLoader seeds its workers, so a run resumed from a saved random state flips the
same images.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["CACHE_MAX_BYTES", "CachedLoader", "cache_images", "cacheable", "flip_only"]


def flip_only(aug: Mapping[str, Any]) -> bool:
    """Whether the augmentation settings (``build_transform``'s keywords) leave only a random
    horizontal flip: full-image crops of a fixed aspect, no colour jitter, AutoAugment or erasing."""
    if aug.get("no_aug"):
        return True
    return (
        tuple(aug.get("scale", ())) == (1.0, 1.0)
        and tuple(aug.get("ratio", ())) == (1.0, 1.0)
        and not aug.get("color_jitter")
        and not aug.get("auto_augment")
        and not aug.get("re_prob")
        and not aug.get("vflip")
    )


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
        if need > max_bytes:
            return (f"{len(dataset)} images of {tuple(input_size)} would take {need / 1024**3:.1f} GiB as float32 "
                    f"(more than {max_bytes / 1024**3:.1f} GiB)")
    if not flip_only(aug):
        return ("the training augmentation is more than a horizontal flip (random-resized crops, colour "
                "jitter, AutoAugment or random erasing change every image every epoch)")
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
    ) -> None:
        if len(images) != len(targets) or len(images) != len(dataset):
            raise ValueError(f"cached images ({len(images)}), targets ({len(targets)}) and dataset "
                             f"({len(dataset)}) differ in length")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability; got {hflip}")
        self.dataset, self.images, self.targets = dataset, images, targets
        self.sampler, self.batch_size, self.drop_last, self.hflip = sampler, batch_size, drop_last, hflip

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
            images = self.images[index]  # a fresh tensor: flipping it leaves the cache intact
            if self.hflip > 0:
                flip = torch.rand(len(index), generator=generator) < self.hflip
                if flip.any():
                    images[flip] = images[flip].flip(-1)
            yield images, self.targets[index], 0
