"""Corruptions: every one of the 15 runs on current libraries, keeps size and mode, severity 0 is
the clean image, results are reproducible."""

import numpy as np
import pytest
from PIL import Image

from cyclemlp.analysis.corruptions import CORRUPTIONS, Corruption, corrupt_image, imagecorruptions_module


@pytest.fixture(scope="module")
def garment():
    # a real Fashion-MNIST-like test image: the foolbox carrier ships 20 real Fashion-MNIST photos
    from cyclemlp.analysis.images import _package_dir

    return Image.open(_package_dir("foolbox") / "data" / "fashionMNIST_00_9.png").convert("L")


def test_names_match_the_package():
    imagecorruptions_module()
    import imagecorruptions

    assert list(CORRUPTIONS) == imagecorruptions.get_corruption_names("common")


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_corruption_changes_grey_28px_image_and_keeps_its_form(name, garment):
    assert garment.size == (28, 28)
    clean = np.asarray(garment, dtype=np.float64)
    assert Corruption(name, 0)(garment) is garment
    out = Corruption(name, 3)(garment)
    assert out.mode == "L" and out.size == (28, 28)
    assert np.abs(np.asarray(out, dtype=np.float64) - clean).mean() > 0.5


def test_severity_grows_and_results_repeat(garment):
    clean = np.asarray(garment, dtype=np.float64)
    change = [np.abs(np.asarray(Corruption("gaussian_noise", s)(garment), dtype=np.float64) - clean).mean()
              for s in (1, 3, 5)]
    assert change == sorted(change)
    a = np.asarray(Corruption("shot_noise", 2, seed=1)(garment))
    np.random.seed(123)  # the global state before the call does not matter
    b = np.asarray(Corruption("shot_noise", 2, seed=1)(garment))
    c = np.asarray(Corruption("shot_noise", 2, seed=2)(garment))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_rgb_images_keep_mode_and_bad_arguments_are_named():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    out = Corruption("fog", 2)(rgb)
    assert out.mode == "RGB" and out.size == (50, 40)
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        Corruption("rain", 1)
    with pytest.raises(ValueError, match="severity"):
        Corruption("fog", 6)
    with pytest.raises(ValueError, match="severity"):
        corrupt_image(np.zeros((32, 32, 3), np.uint8), "fog", 0)
