"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017): 60,000 training and 10,000 test images of
28x28 grey clothing photos in 10 classes, MIT licence.

The four gzipped IDX files are looked for in ``root`` (if given), in the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) and in the user cache
(``~/.cache/cyclemlp/fashion-mnist``); when absent they are downloaded from the canonical source
into the cache (checked against the published MD5 sums).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["FASHION_MNIST_CLASSES", "FashionMNIST", "find_fashion_mnist", "read_idx"]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Mean and standard deviation of the training pixels scaled to [0, 1].
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path.home() / ".cache" / "cyclemlp" / "fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
# MD5 of the files as published (the Debian package recompresses them, so only downloads are checked).
MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
HOW_TO_GET = (
    "install the Debian package ('sudo apt-get install dataset-fashion-mnist', which 'bash setup.sh' "
    f"does), or put the four files {sorted(MD5)} from {URL} in a folder and pass it as the data root"
)


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in MD5)


def find_fashion_mnist(root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The folder holding the four IDX files, downloading them into the cache if needed.

    Raises FileNotFoundError saying how to get the data when they are missing and cannot be
    downloaded (no internet).
    """
    if root is not None:
        root = Path(root)
        if _complete(root):
            return root
        if not download:
            raise FileNotFoundError(f"Fashion-MNIST files not found in {root}; {HOW_TO_GET}")
    for folder in (DEBIAN_DIR, CACHE_DIR):
        if root is None and _complete(folder):
            return folder
    target = root if root is not None else CACHE_DIR
    if not download:
        raise FileNotFoundError(f"Fashion-MNIST not found (looked in {DEBIAN_DIR} and {CACHE_DIR}); {HOW_TO_GET}")
    from torchvision.datasets.utils import download_url

    try:
        for name, md5 in MD5.items():
            if not (target / name).is_file():
                download_url(URL + name, str(target), filename=name, md5=md5)
    except (OSError, RuntimeError) as err:  # no network, refused, checksum mismatch
        raise FileNotFoundError(
            f"Fashion-MNIST is not installed and downloading it from {URL} failed ({err}); {HOW_TO_GET}"
        ) from err
    return target


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes into an array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read IDX file {path}: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, payload has {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


class FashionMNIST(Dataset):
    """Fashion-MNIST as PIL grey images (mode ``L``) for timm/torchvision transforms.

    Args:
        root: folder with the IDX files (default: searched, see the module docstring).
        split: ``"train"`` (60,000) or ``"test"`` (10,000); ``"val"`` is an alias of ``"test"``.
        transform: applied to each PIL image.
        download: allow downloading into the cache when the files are missing.
        mode: PIL mode of the returned images, ``"L"`` (native) or ``"RGB"`` (grey replicated).
    """

    classes = FASHION_MNIST_CLASSES
    in_chans = 1
    mean = FASHION_MNIST_MEAN
    std = FASHION_MNIST_STD
    native_size = 28

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        transform: Callable | None = None,
        mode: str = "L",
        download: bool = True,
    ) -> None:
        split = "test" if split in ("val", "validation") else split
        if split not in FILES:
            raise ValueError(f"Fashion-MNIST has splits 'train' and 'test' (alias 'val'); got {split!r}")
        folder = find_fashion_mnist(root, download)
        image_file, label_file, count = FILES[split]
        images, labels = read_idx(folder / image_file), read_idx(folder / label_file)
        if images.shape != (count, 28, 28) or labels.shape != (count,) or labels.max() >= 10:
            raise ValueError(
                f"unexpected Fashion-MNIST {split} files in {folder}: images {images.shape}, labels "
                f"{labels.shape} (expected ({count}, 28, 28) and ({count},) with labels 0-9)"
            )
        if mode not in ("L", "RGB"):
            raise ValueError(f"mode must be 'L' or 'RGB'; got {mode!r}")
        self.split = split
        self.images = images
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[object, int]:
        image = Image.fromarray(self.images[index])  # uint8 (28, 28): mode "L"
        if self.mode != "L":
            image = image.convert(self.mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])
