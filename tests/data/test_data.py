"""Datasets and loaders: Fashion-MNIST from its IDX files, image folders with bad content."""

from __future__ import annotations

import gzip
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import ImageNetInfo
from train_utils import foolbox_imagenet, imagenet_folder

from cyclemlp.data import (
    CachedLoader,
    CorruptImageError,
    FashionMNIST,
    ImageFolder,
    build_dataset,
    build_loader,
    build_sampler,
    build_transform,
    cache_images,
    cacheable,
    collate_skip,
    fashion_mnist,
    find_fashion_mnist,
    read_idx,
    static_part,
)


def test_fashion_mnist_reads_the_real_files():
    train = FashionMNIST(split="train")
    test = FashionMNIST(split="val")  # alias of test
    assert len(train) == 60000 and len(test) == 10000
    assert torch.bincount(train.targets).tolist() == [6000] * 10
    image, target = test[0]
    assert image.mode == "L" and image.size == (28, 28) and target == 9  # the first test image is an ankle boot
    rgb, _ = FashionMNIST(split="test", mode="RGB")[0]
    assert rgb.mode == "RGB"
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        FashionMNIST(split="holdout")


def test_read_idx_rejects_bad_files(tmp_path):
    good = np.arange(12, dtype=np.uint8).reshape(3, 4)
    header = bytes([0, 0, 8, 2]) + (3).to_bytes(4, "big") + (4).to_bytes(4, "big")
    (tmp_path / "ok.gz").write_bytes(gzip.compress(header + good.tobytes()))
    assert np.array_equal(read_idx(tmp_path / "ok.gz"), good)
    (tmp_path / "short.gz").write_bytes(gzip.compress(header + good.tobytes()[:-1]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "text.gz").write_bytes(gzip.compress(b"hello world"))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "text.gz")
    (tmp_path / "broken.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match="cannot read IDX file"):
        read_idx(tmp_path / "broken.gz")


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setattr(fashion_mnist, "CACHE_DIR", tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        find_fashion_mnist(download=False)

    def offline(url, root, filename=None, md5=None):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.datasets.utils.download_url", offline)
    with pytest.raises(FileNotFoundError, match=r"downloading it from http.*failed.*apt-get"):
        find_fashion_mnist()
    with pytest.raises(FileNotFoundError, match="not found in"):
        find_fashion_mnist(tmp_path / "empty", download=False)


def test_subset_is_spread_over_the_classes():
    ds = build_dataset("fashion-mnist", split="test", subset=200, in_chans=1)
    assert len(ds) == 200 and len(set(ds.targets)) == 10
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("cifar-11")
    with pytest.raises(ValueError, match="no dataset given"):
        build_dataset()


def test_image_folder_maps_synsets_and_classes(tmp_path):
    root = imagenet_folder(tmp_path)
    train = ImageFolder(root, "train")
    assert len(train) == 20 and len(train.classes) == 19  # two photos share class 609
    synsets = list(ImageNetInfo().label_names())
    imagenet = ImageFolder(root, "val", classes=synsets)
    for (path, target) in imagenet.samples:  # the label in each file name is its ImageNet index
        assert target == int(path.rsplit("_", 1)[1].split(".")[0])
    image, _ = imagenet[0]
    assert image.mode == "RGB"
    (root / "val" / "n99999999").mkdir()
    (root / "val" / "n99999999" / "x.jpg").write_bytes(foolbox_imagenet()[0].read_bytes())
    with pytest.raises(ValueError, match="training classes lack"):
        ImageFolder(root, "val", classes=train.classes)


def test_empty_class_folder_and_missing_dataset_are_clear_errors(tmp_path):
    root = imagenet_folder(tmp_path)
    (root / "train" / "n00000000").mkdir()
    with pytest.raises(ValueError, match=r"1 class folder\(s\) .* hold no images \(n00000000\)"):
        ImageFolder(root, "train")
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        ImageFolder(tmp_path / "nowhere", "train")
    (tmp_path / "flat" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolder(tmp_path / "flat", "train")


def _corrupt_tree(tmp_path):
    root = imagenet_folder(tmp_path)
    first = sorted((root / "val").iterdir())[0]
    (first / "zero.jpg").write_bytes(b"")
    good = foolbox_imagenet()[0].read_bytes()
    (first / "cut.jpg").write_bytes(good[: len(good) // 3])
    return root


def test_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    root = _corrupt_tree(tmp_path)
    cfg = dict(input_size=(3, 32, 32), interpolation="bilinear", crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = ImageFolder(root, "val", build_transform(cfg, False))
    loader = build_loader(ds, batch_size=8, training=False, workers=0)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert sum(b[2] for b in batches) == 2
    assert sum(len(b[1]) for b in batches if b[1] is not None) == 20
    assert "zero.jpg" in caplog.text and "cut.jpg" in caplog.text


def test_strict_mode_names_the_corrupt_file(tmp_path):
    root = _corrupt_tree(tmp_path)
    ds = ImageFolder(root, "val", strict=True)
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("cut.jpg")][0]
    with pytest.raises(CorruptImageError, match=r"cannot read image .*cut\.jpg"):
        ds[bad]


def test_collate_drops_unreadable_items():
    images, targets, skipped = collate_skip([None, (torch.zeros(1, 2, 2), 3), None])
    assert images.shape == (1, 1, 2, 2) and targets.tolist() == [3] and skipped == 2
    assert collate_skip([None, None]) == (None, None, 2)


def test_training_loader_is_seeded_and_sharded():
    ds = build_dataset("fashion-mnist", split="test", subset=64, in_chans=1)
    cfg = dict(input_size=(1, 28, 28), interpolation="bilinear", crop_pct=1.0, mean=(0.5,), std=(0.5,))
    ds.dataset.transform = build_transform(cfg, False)

    def order(seed, rank=0, world=1, epoch=0):
        loader = build_loader(ds, 8, True, rank, world, seed=seed, workers=0)
        loader.sampler.set_epoch(epoch)
        return torch.cat([t for _, t, _ in loader]).tolist()

    assert order(1) == order(1) and order(1) != order(2) and order(1) != order(1, epoch=1)
    halves = order(1, 0, 2) + order(1, 1, 2)
    assert sorted(halves) == sorted(order(1))
    with pytest.raises(ValueError, match="fewer than one batch"):
        build_loader(ds, 128, True)


FLIP_ONLY = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.5, color_jitter=0.0, auto_augment=None, re_prob=0.0)
FMNIST_32 = dict(input_size=(1, 32, 32), interpolation="bilinear", crop_pct=1.0, mean=(0.286,), std=(0.353,))


def test_cached_images_are_timms_transform_pixel_for_pixel():
    ds = build_dataset("fashion-mnist", split="test", in_chans=1, subset=64)
    train_x, train_y = cache_images(ds, build_transform(FMNIST_32, True, **{**FLIP_ONLY, "hflip": 0.0}))
    eval_x, _ = cache_images(ds, build_transform(FMNIST_32, False))
    never = build_transform(FMNIST_32, True, **{**FLIP_ONLY, "hflip": 0.0})
    always = build_transform(FMNIST_32, True, **{**FLIP_ONLY, "hflip": 1.0})
    base = ds.dataset
    for k, i in enumerate(ds.indices[:16]):
        image = Image.fromarray(base.images[i])
        assert torch.equal(train_x[k], never(image)) and torch.equal(train_x[k].flip(-1), always(image))
        assert torch.equal(eval_x[k], build_transform(FMNIST_32, False)(image))
    assert train_y.tolist() == [int(base.targets[i]) for i in ds.indices]
    assert train_x.shape == (64, 1, 32, 32) and ds.dataset.transform is None  # the dataset is left as it was


def test_cached_loader_flips_each_image_with_the_transforms_probability():
    ds = build_dataset("fashion-mnist", split="test", in_chans=1, subset=512)
    images, targets = cache_images(ds, build_transform(FMNIST_32, False))
    sampler = build_sampler(ds, 64, True, seed=5)
    loader = CachedLoader(ds, images, targets, sampler, 64, True, hflip=0.5)
    assert len(loader) == 8
    torch.manual_seed(0)
    order = list(iter(sampler))
    flipped = kept = 0
    for b, (x, y, skipped) in enumerate(loader):
        index = order[b * 64:(b + 1) * 64]
        assert skipped == 0 and torch.equal(y, targets[index])
        same = (x == images[index]).flatten(1).all(1)
        mirrored = (x == images[index].flip(-1)).flatten(1).all(1)
        assert bool((same | mirrored).all())
        flipped += int((mirrored & ~same).sum())
        kept += int((same & ~mirrored).sum())
    assert 150 < flipped < 350 and 150 < kept < 350  # about half of 512
    assert torch.equal(images, cache_images(ds, build_transform(FMNIST_32, False))[0])  # the cache is untouched
    torch.manual_seed(0)
    again = torch.cat([x for x, _, _ in loader])
    torch.manual_seed(0)
    assert torch.equal(again, torch.cat([x for x, _, _ in loader]))  # flips follow torch's generator
    eval_loader = CachedLoader(ds, images, targets, build_sampler(ds, 100, False), 100, False)
    assert len(eval_loader) == 6 and torch.equal(torch.cat([x for x, _, _ in eval_loader]), images)


def _windows(image: torch.Tensor, pad: int, fill: float) -> list[torch.Tensor]:
    """Every crop of ``image``'s size from ``image`` padded by ``pad`` with ``fill``."""
    h, w = image.shape[-2:]
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad), value=fill)
    return [padded[..., t:t + h, left:left + w] for t in range(2 * pad + 1) for left in range(2 * pad + 1)]


def test_pad_crop_translates_like_torchvisions_random_crop():
    ds = build_dataset("fashion-mnist", split="test", in_chans=1, subset=256)
    black = -FMNIST_32["mean"][0] / FMNIST_32["std"][0]
    clean = build_transform(FMNIST_32, True, **{**FLIP_ONLY, "hflip": 0.0})
    shifted = build_transform(FMNIST_32, True, **{**FLIP_ONLY, "hflip": 0.0, "pad_crop": 3})
    assert "RandomCrop" in repr(shifted) and "RandomCrop" not in repr(clean)
    assert "RandomCrop" not in repr(build_transform(FMNIST_32, False, pad_crop=3))  # training only
    with pytest.raises(ValueError, match="pad_crop must be"):
        build_transform(FMNIST_32, True, pad_crop=-1)
    base = ds.dataset
    torch.manual_seed(0)
    moved = 0
    for i in ds.indices[:12]:  # the per-image pipeline: one of the 49 windows of the padded image
        image = Image.fromarray(base.images[i])
        out, reference = shifted(image), clean(image)
        hits = [k for k, window in enumerate(_windows(reference, 3, black)) if torch.allclose(out, window, atol=1e-6)]
        assert hits, "a translated image is no window of the padded image"
        moved += 24 not in hits  # 24: the centre window, no shift
    assert moved >= 6

    images, targets = cache_images(ds, build_transform(FMNIST_32, True, **static_part({**FLIP_ONLY, "pad_crop": 3})))
    assert torch.equal(images, cache_images(ds, clean)[0])  # the cache holds the untranslated images
    loader = CachedLoader(ds, images, targets, build_sampler(ds, 64, True, seed=1), 64, True, hflip=0.5, pad_crop=3,
                          fill=(black,))
    torch.manual_seed(0)
    order = list(iter(loader.sampler))
    offsets = set()
    for b, (x, y, _) in enumerate(loader):
        assert x.shape == (64, 1, 32, 32) and torch.equal(y, targets[order[b * 64:(b + 1) * 64]])
        for k, i in enumerate(order[b * 64:(b + 1) * 64]):
            windows = _windows(images[i], 3, black)
            hits = [n for n, w in enumerate(windows) if torch.equal(x[k], w) or torch.equal(x[k], w.flip(-1))]
            assert hits, "a cached batch image is no (flipped) window of the padded image"
            offsets.update(hits)
    assert len(offsets) >= 40  # offsets drawn over the whole 7 x 7 range
    torch.manual_seed(0)
    again = torch.cat([x for x, _, _ in loader])
    torch.manual_seed(0)
    assert torch.equal(again, torch.cat([x for x, _, _ in loader]))
    with pytest.raises(ValueError, match="pad_crop must be"):
        CachedLoader(ds, images, targets, build_sampler(ds, 64, False), 64, False, pad_crop=-2)


def test_cached_loader_erases_with_timms_random_erasing():
    from timm.data.random_erasing import RandomErasing

    ds = build_dataset("fashion-mnist", split="test", in_chans=1, subset=512)
    images, targets = cache_images(ds, build_transform(FMNIST_32, False))
    sampler = build_sampler(ds, 64, False)
    erase = RandomErasing(0.25, mode="pixel", device="cpu")
    loader = CachedLoader(ds, images, targets, sampler, 64, False, erasing=erase)
    random.seed(0)
    torch.manual_seed(0)
    out = torch.cat([x for x, _, _ in loader])
    changed = (out != images).flatten(1)
    erased = changed.any(1)
    assert 80 < int(erased.sum()) < 180  # about a quarter of 512
    for k in torch.nonzero(erased).flatten().tolist():  # each change is one rectangle
        rows, cols = changed[k].view(32, 32).nonzero(as_tuple=True)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert len(rows) > 0.9 * box
    assert torch.equal(images, cache_images(ds, build_transform(FMNIST_32, False))[0])  # the cache is untouched
    random.seed(0)
    torch.manual_seed(0)
    assert torch.equal(out, torch.cat([x for x, _, _ in loader]))  # Python's and torch's generators decide


def test_caching_is_refused_with_the_reason(tmp_path):
    fmnist = build_dataset("fashion-mnist", split="test", in_chans=1, subset=8)
    assert cacheable(fmnist, FLIP_ONLY) is None and cacheable(fmnist, dict(no_aug=True)) is None
    assert cacheable(fmnist, {**FLIP_ONLY, "re_prob": 0.25, "pad_crop": 2}) is None  # drawn per batch
    assert "more than flips, translation and random erasing" in cacheable(fmnist, {**FLIP_ONLY, "scale": (0.08, 1.0)})
    assert "more than flips" in cacheable(fmnist, {**FLIP_ONLY, "color_jitter": 0.4})
    assert cacheable(fmnist, FLIP_ONLY, (1, 32, 32)) is None
    too_big = cacheable(fmnist, FLIP_ONLY, (3, 224, 224), max_bytes=8 * 3 * 224 * 224 * 4 - 1)
    assert "8 images of (3, 224, 224) would take" in too_big
    fits = 8 * 3 * 224 * 224 * 4
    assert cacheable(fmnist, FLIP_ONLY, (3, 224, 224), max_bytes=fits) is None
    # with the padded copy
    assert "would take" in cacheable(fmnist, {**FLIP_ONLY, "pad_crop": 4}, (3, 224, 224), max_bytes=fits)
    folder = build_dataset(data=imagenet_folder(tmp_path), split="train")
    assert "not an in-memory dataset" in cacheable(folder, FLIP_ONLY)
    with pytest.raises(ValueError, match="differ in length"):
        CachedLoader(fmnist, torch.zeros(7, 1, 4, 4), torch.zeros(7), build_sampler(fmnist, 4, False), 4, False)
