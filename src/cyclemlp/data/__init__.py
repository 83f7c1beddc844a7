"""Datasets, transforms and loaders for classification.

* ``fashion-mnist`` — the built-in dataset (:class:`FashionMNIST`), read from the Debian package
  or downloaded when online.
* ImageNet-layout folders (:class:`ImageFolder`): ``ROOT/train/<class>/*``, ``ROOT/val/<class>/*``.

Transforms are timm's (:func:`timm.data.create_transform`: random-resized crop, flip, RandAugment,
random erasing, ...); samplers are torch's ``DistributedSampler`` (seeded, also used with one
process so a run's batches depend only on the seed and epoch) or timm's ``RepeatAugSampler``.
Batches are ``(images, targets, n_skipped)``: unreadable images are dropped by :func:`collate_skip`
and counted. Small in-memory datasets trained with flips only can be served from images
transformed once (:mod:`.cached`).
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any, Callable, Sequence

import torch
from timm.data import create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.loader import _worker_init
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, default_collate
from torchvision import transforms

from .cached import CachedLoader, batch_augmentable, cache_images, cacheable, static_part
from .fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST, find_fashion_mnist, read_idx
from .folder import CorruptImageError, ImageFolder, find_classes, find_images

__all__ = [
    "BUILTIN_DATASETS",
    "CachedLoader",
    "CorruptImageError",
    "EpochSampler",
    "FASHION_MNIST_CLASSES",
    "FashionMNIST",
    "ImageFolder",
    "batch_augmentable",
    "build_dataset",
    "build_loader",
    "build_sampler",
    "build_transform",
    "cache_images",
    "cacheable",
    "collate_skip",
    "find_classes",
    "find_fashion_mnist",
    "find_images",
    "read_idx",
    "static_part",
]

BUILTIN_DATASETS = {"fashion-mnist": FashionMNIST}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "torch/fashion_mnist": "fashion-mnist"}


def builtin_name(name: str) -> str:
    """Canonical built-in dataset name; ValueError listing the known ones otherwise."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in BUILTIN_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; built-in datasets: {sorted(BUILTIN_DATASETS)} "
                         "(use --data DIR for an ImageNet-layout folder)")
    return key


def native_in_chans(dataset: str | None) -> int:
    """Channels of a built-in dataset's images (3 for image folders)."""
    return BUILTIN_DATASETS[builtin_name(dataset)].in_chans if dataset else 3


def default_splits(dataset: str | None) -> tuple[str, str]:
    """(training split, evaluation split) names."""
    return ("train", "test") if dataset else ("train", "val")


def build_dataset(
    dataset: str | None = None,
    data: str | os.PathLike | None = None,
    split: str = "train",
    transform: Callable | None = None,
    classes: Sequence[str] | None = None,
    in_chans: int = 3,
    strict: bool = False,
    subset: int | None = None,
) -> Dataset:
    """One split of a built-in dataset (``dataset``; ``data`` is then an optional folder with its
    files) or of an ImageNet-layout folder (``data``).

    Args:
        classes: class names fixing an image folder's index mapping (the training split's).
        in_chans: channels the model takes; images are read as grey (1) or RGB (3).
        strict: stop at the first unreadable image instead of skipping it.
        subset: keep ``subset`` images, evenly spread over the split (quick runs, tests).
    """
    if dataset is None and data is None:
        raise ValueError("no dataset given: pass --dataset NAME (built-in) or --data DIR (image folder)")
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3 for image datasets; got {in_chans}")
    mode = "L" if in_chans == 1 else "RGB"
    if dataset is not None:
        ds: Dataset = BUILTIN_DATASETS[builtin_name(dataset)](data, split, transform, mode=mode)
    else:
        ds = ImageFolder(data, split, transform, classes=classes, mode=mode, strict=strict)
    if subset is not None and subset < len(ds):
        if subset < 1:
            raise ValueError(f"subset must be a positive number of images; got {subset}")
        step = len(ds) / subset
        keep = [int(i * step) for i in range(subset)]
        sub = Subset(ds, keep)
        sub.classes = ds.classes  # type: ignore[attr-defined]
        sub.targets = [int(ds.targets[i]) for i in keep]  # type: ignore[attr-defined]
        return sub
    return ds


def build_transform(
    data_config: dict[str, Any],
    training: bool,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    vflip: float = 0.0,
    color_jitter: float = 0.4,
    auto_augment: str | None = None,
    re_prob: float = 0.0,
    re_mode: str = "pixel",
    re_count: int = 1,
    pad_crop: int = 0,
    no_aug: bool = False,
) -> Callable:
    """timm's transform for ``data_config`` (``input_size`` (C, H, W), ``interpolation``,
    ``crop_pct``, ``mean``, ``std``): training augmentation or the evaluation resize + centre crop.

    ``pad_crop`` N > 0 (training) adds a random translation: torchvision's ``RandomCrop`` of the
    input size from the image zero-padded by N pixels on every side, after the flip."""
    if pad_crop < 0:
        raise ValueError(f"pad_crop must be a number of pixels >= 0; got {pad_crop}")
    transform = create_transform(
        data_config["input_size"],
        is_training=training,
        no_aug=no_aug,
        scale=scale,
        ratio=ratio,
        hflip=hflip,
        vflip=vflip,
        color_jitter=color_jitter or None,
        auto_augment=auto_augment or None,
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        crop_pct=data_config["crop_pct"],
        re_prob=re_prob,
        re_mode=re_mode,
        re_count=re_count,
    )
    if training and pad_crop and not no_aug:
        steps = list(transform.transforms)
        at = next(i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__)  # the PIL stage ends there
        size = tuple(data_config["input_size"][-2:])
        steps.insert(at, transforms.RandomCrop(size, padding=pad_crop, fill=0))
        transform = transforms.Compose(steps)
    return transform


def collate_skip(batch: list[Any]) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """Collate ``(image, target)`` pairs, dropping unreadable ones (None): ``(images, targets,
    n_skipped)``; images and targets are None when the whole batch was unreadable."""
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, skipped
    images, targets = default_collate(kept)
    return images, targets, skipped


class ShardSampler(torch.utils.data.Sampler[int]):
    """Every ``world``-th index from ``rank``: evaluation shards without padding or repeats."""

    def __init__(self, length: int, rank: int, world: int) -> None:
        self.indices = range(rank, length, world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochSampler(torch.utils.data.Sampler[int]):
    """A fresh random draw of ``samples_per_epoch`` indices every epoch (seeded by ``seed`` and the
    epoch), sharded over ``world`` processes: epochs shorter (or longer) than the dataset."""

    def __init__(self, length: int, samples_per_epoch: int, rank: int = 0, world: int = 1, seed: int = 0) -> None:
        if samples_per_epoch < world:
            raise ValueError(f"samples_per_epoch ({samples_per_epoch}) must be at least the number of processes")
        self.length, self.total, self.rank, self.world, self.seed = length, samples_per_epoch, rank, world, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        repeats = -(-self.total // self.length)
        order = torch.cat([torch.randperm(self.length, generator=generator) for _ in range(repeats)])
        return iter(order[: self.total - self.total % self.world][self.rank :: self.world].tolist())

    def __len__(self) -> int:
        return self.total // self.world


def build_sampler(
    dataset: Dataset,
    batch_size: int,
    training: bool,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    aug_repeats: int = 0,
    samples_per_epoch: int | None = None,
) -> torch.utils.data.Sampler[int]:
    """The index order of one process (see :func:`build_loader`)."""
    if training:
        if samples_per_epoch is not None:
            if aug_repeats > 1:
                raise ValueError("samples_per_epoch cannot be combined with repeated augmentation")
            sampler: torch.utils.data.Sampler = EpochSampler(len(dataset), samples_per_epoch, rank, world_size, seed)
        elif aug_repeats > 1:
            sampler = RepeatAugSampler(
                dataset, num_replicas=world_size, rank=rank, shuffle=True, num_repeats=aug_repeats
            )
        else:
            sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                         drop_last=True)
        if len(sampler) < batch_size:
            raise ValueError(
                f"an epoch has {len(sampler)} images per process, fewer than one batch "
                f"({batch_size}); lower --batch-size"
            )
    else:
        sampler = ShardSampler(len(dataset), rank, world_size)
    return sampler


def build_loader(
    dataset: Dataset,
    batch_size: int,
    training: bool,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    workers: int = 2,
    aug_repeats: int = 0,
    pin_memory: bool = False,
    samples_per_epoch: int | None = None,
) -> DataLoader:
    """A DataLoader for one process of a (possibly one-process) run.

    Training shuffles with a sampler seeded by ``seed`` and the epoch (call
    ``loader.sampler.set_epoch(epoch)``) and drops the last incomplete batch; ``aug_repeats > 1``
    uses repeated augmentation; ``samples_per_epoch`` draws that many images per epoch instead of
    one pass over the data. Evaluation shards the data without padding. Workers are started
    afresh every epoch with seeds drawn from torch's generator, so a run resumed from a captured
    random state sees the same augmentations.
    """
    sampler = build_sampler(dataset, batch_size, training, rank, world_size, seed, aug_repeats, samples_per_epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skip,
        pin_memory=pin_memory,
        drop_last=training,
        persistent_workers=False,
        worker_init_fn=partial(_worker_init, worker_seeding="all") if workers > 0 else None,
    )
