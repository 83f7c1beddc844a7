"""Image folders in the ImageNet layout: ``ROOT/<split>/<class>/<image>``.

Class indices follow the sorted class-folder names of the training split, and every split uses
that same mapping. Unreadable or corrupt images are skipped with a warning and counted (the
loader's collate function drops them), or stop the run naming the file when ``strict``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, UnidentifiedImageError
from timm.data import get_img_extensions
from torch.utils.data import Dataset

__all__ = ["CorruptImageError", "ImageFolder", "find_classes", "find_images", "image_inputs"]

logger = logging.getLogger(__name__)


class CorruptImageError(ValueError):
    """An image file cannot be read (raised in strict mode)."""


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in get_img_extensions()


def image_inputs(items: Sequence[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files a command was given: files named directly, and the images inside named
    folders (sorted by name); plus ``(item, problem)`` for each item that yields none."""
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and _is_image(p.name))
            if not found:
                problems.append((str(item), "a folder without images"))
            files += found
        elif item.is_file():
            files.append(item)
        else:
            problems.append((str(item), "no such file or folder"))
    return files, problems


def find_classes(split_dir: str | os.PathLike) -> list[str]:
    """Sorted class-folder names of ``split_dir``; clear errors for a missing or empty folder."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {split_dir}")
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ValueError(
            f"{split_dir} has no class folders; expected the ImageNet layout {split_dir}/<class>/<image>"
        )
    return classes


def find_images(split_dir: str | os.PathLike, classes: Sequence[str]) -> list[tuple[str, int]]:
    """``(path, class index)`` of every image file under ``split_dir/<class>/`` (recursively)."""
    split_dir = Path(split_dir)
    samples: list[tuple[str, int]] = []
    empty = []
    for index, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        found = [
            os.path.join(dirpath, f)
            for dirpath, _, files in os.walk(folder, followlinks=True)
            for f in files
            if _is_image(f)
        ]
        if not found:
            empty.append(name)
        samples += [(path, index) for path in sorted(found)]
    if empty:
        raise ValueError(
            f"{len(empty)} class folder(s) in {split_dir} hold no images ({', '.join(empty[:10])}"
            f"{', ...' if len(empty) > 10 else ''}); remove them or add images "
            f"(recognised extensions: {', '.join(sorted(get_img_extensions()))})"
        )
    return samples


class ImageFolder(Dataset):
    """One split of an ImageNet-layout folder.

    Args:
        root: the dataset root (holding ``train/``, ``val/``, ...), or directly a split folder when
            ``split`` is None.
        split: split folder name.
        transform: applied to each PIL image.
        classes: class names fixing the index mapping (default: this split's sorted folders); a
            split folder absent from ``classes`` is an error.
        mode: PIL mode images are converted to (``"RGB"`` or ``"L"``).
        strict: raise :class:`CorruptImageError` on an unreadable image instead of skipping it.

    ``__getitem__`` returns ``(image, target)``, or None for an unreadable image (skipped by
    :func:`cyclemlp.data.collate_skip`), after logging a warning naming the file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = "train",
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        mode: str = "RGB",
        strict: bool = False,
    ) -> None:
        self.root = Path(root) / split if split else Path(root)
        found = find_classes(self.root)
        if classes is None:
            classes = found
        else:
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise ValueError(
                    f"{self.root} has class folders that the training classes lack: {unknown[:10]}"
                )
        self.classes = list(classes)
        self.samples = find_images(self.root, self.classes)
        if not self.samples:
            raise ValueError(f"no images found in {self.root}")
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.mode = mode
        self.strict = strict
        self.in_chans = 1 if mode == "L" else 3

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[object, int] | None:
        path, target = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
            message = f"cannot read image {path}: {type(err).__name__}: {err}"
            if self.strict:
                raise CorruptImageError(message) from err
            logger.warning("skipping unreadable image %s (%s)", path, err)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, target
