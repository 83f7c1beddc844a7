"""The 15 ImageNet-C corruptions x 5 severities (Hendrycks and Dietterich, ICLR 2019) of the
``imagecorruptions`` package, as a PIL -> PIL transform for any evaluation set.

``imagecorruptions`` 1.1.2 (its latest release) was written against older libraries: it imports
``pkg_resources`` (removed from recent setuptools), calls scikit-image's ``gaussian`` with the
removed ``multichannel`` argument (glass blur) and uses NumPy's removed ``np.float_`` (fog).
:func:`imagecorruptions_module` bridges exactly those three points, inside that package only;
the corruption code itself is the package's.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import types
import warnings
import zlib
from typing import Any

import numpy as np
from PIL import Image

from .settings import CORRUPTIONS, SEVERITIES

__all__ = ["CORRUPTIONS", "MIN_SIZE", "SEVERITIES", "Corruption", "corrupt_image", "imagecorruptions_module"]

MIN_SIZE = 32  # the package refuses smaller images


class _NumpyWithFloat_(types.ModuleType):
    """NumPy as seen by imagecorruptions: everything delegated, plus the removed ``float_``."""

    float_ = np.float64

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def _gaussian_accepting_multichannel(gaussian: Any) -> Any:
    @functools.wraps(gaussian)
    def call(image: Any, *args: Any, multichannel: bool | None = None, **kwargs: Any) -> Any:
        if multichannel:
            kwargs.setdefault("channel_axis", -1)
        return gaussian(image, *args, **kwargs)

    return call


@functools.cache
def imagecorruptions_module() -> types.ModuleType:
    """``imagecorruptions.corruptions``, imported so that it runs on current libraries."""
    shim = None
    try:
        importlib.import_module("pkg_resources")
    except ImportError:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda package, resource: os.path.join(  # type: ignore[attr-defined]
            os.path.dirname(sys.modules[package].__file__), resource
        )
        sys.modules["pkg_resources"] = shim
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = importlib.import_module("imagecorruptions.corruptions")
    except ImportError as err:
        raise ImportError(
            f"the robustness analysis needs the imagecorruptions package (pip install 'cyclemlp[analysis]'): {err}"
        ) from err
    finally:
        if shim is not None and sys.modules.get("pkg_resources") is shim:
            del sys.modules["pkg_resources"]
    if not hasattr(np, "float_"):
        module.np = _NumpyWithFloat_("numpy")
    if "multichannel" not in inspect.signature(module.gaussian).parameters:
        module.gaussian = _gaussian_accepting_multichannel(module.gaussian)
    return module


def corrupt_image(image: np.ndarray, name: str, severity: int) -> np.ndarray:
    """Apply one corruption to an ``(H, W, 3)`` uint8 image of at least 32x32 pixels."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}; got {severity}")
    function = getattr(imagecorruptions_module(), name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package's own deprecation and precision warnings
        out = function(Image.fromarray(image), severity)
    return np.uint8(out)


class Corruption:
    """PIL image -> the same image corrupted, same size and mode (a torchvision-style transform).

    Args:
        name: one of :data:`CORRUPTIONS`.
        severity: 1-5; 0 returns the image unchanged (the clean set).
        seed: the random corruptions (noise, snow, ...) draw from NumPy's generator seeded with
            ``seed`` and the image's bytes, so a result does not depend on order or workers.

    Grey images are corrupted as RGB (the package's own rule) and turned back to grey. Images
    smaller than 32 pixels (the package's minimum; Fashion-MNIST is 28x28) are enlarged with
    bicubic interpolation to 32, corrupted, and brought back to their size.
    """

    def __init__(self, name: str, severity: int, seed: int = 0) -> None:
        if name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
        if severity not in (0, *SEVERITIES):
            raise ValueError(f"severity must be 0 (clean) or one of {SEVERITIES}; got {severity}")
        self.name, self.severity, self.seed = name, severity, seed

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.severity == 0:
            return image
        mode, size = image.mode, image.size
        rgb = image.convert("RGB")
        if min(size) < MIN_SIZE:
            scale = MIN_SIZE / min(size)
            rgb = rgb.resize((round(size[0] * scale), round(size[1] * scale)), Image.BICUBIC)
        array = np.asarray(rgb)
        np.random.seed((self.seed * 1_000_003 + zlib.crc32(array.tobytes())) % 2**32)
        out = Image.fromarray(corrupt_image(array, self.name, self.severity))
        if out.size != size:
            out = out.resize(size, Image.BICUBIC)
        return out.convert(mode)

    def __repr__(self) -> str:
        return f"Corruption({self.name!r}, severity={self.severity}, seed={self.seed})"
