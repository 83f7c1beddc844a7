"""What the analyses run unless told otherwise: the paper's comparisons, as data.

Kept apart from the analyses themselves (which need PyTorch), so that the command line can show
these defaults without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

# --- effective receptive field (the paper's Figure 5 compares these four) -------------------------
ERF_MODELS: tuple[str, ...] = ("cyclemlp_b2", "swin_tiny_patch4_window7_224", "pvt_v2_b2", "resnet50")
ERF_FRACTIONS: tuple[float, ...] = (0.2, 0.5, 0.99)

# --- cost against input size: CycleMLP against a fixed-size MLP, a pyramid transformer and Swin ----
RESOLUTION_MODELS: tuple[str, ...] = ("cyclemlp_b2", "mixer_s16_224", "pvt_v2_b2", "swin_tiny_patch4_window7_224")
RESOLUTION_SIZES: tuple[tuple[int, int], ...] = (
    (128, 128), (224, 224), (384, 384), (512, 512), (768, 768), (1024, 1024), (224, 448), (512, 1024),
)

# --- robustness: the 15 "common" corruptions of ImageNet-C in the imagecorruptions package's (and the
# paper's) order: noise, blur, weather, digital; five severities each
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)


# --- token-mixer ablations --------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One ablation: keyword arguments for the CycleMLP constructor, or the spatial-FC swap."""

    name: str
    description: str
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    spatial_fc: bool = False


VARIANTS: tuple[Variant, ...] = (
    Variant("cyclemlp", "three branches, stepsize 3 (1x3, 3x1), official pattern: the released model"),
    Variant("no_width", "without the width branch (Cycle FC 1x3)", dict(branches=("height", "channel"))),
    Variant("no_height", "without the height branch (Cycle FC 3x1)", dict(branches=("width", "channel"))),
    Variant("no_channel", "without the channel FC branch", dict(branches=("width", "height"))),
    Variant("stepsize_7", "stepsize 7 (1x7, 7x1)", dict(stepsize=7)),
    Variant("stepsize_3x3", "2-D stepsize 3x3 in both Cycle FC branches (paper pattern)",
            dict(stepsize=(3, 3), pattern="paper")),
    Variant("pattern_paper", "stepsize 3 with the paper's offset pattern", dict(pattern="paper")),
    Variant("spatial_fc", "Cycle FC mixer replaced by spatial FC (MLP-Mixer token mixing, fixed size)",
            spatial_fc=True),
)

# The ablations' budget: the fashion-mnist recipe's schedule shape at 56 px, 3 epochs on 5000
# training images, evaluated on 2000 test images, without random erasing (it pays only over
# longer schedules); B1's depths at half its widths.
ABLATION_TRAIN_CONFIG: dict[str, Any] = dict(
    recipe="fashion-mnist", dataset="fashion-mnist", img_size=56, epochs=3, train_subset=5000, val_subset=2000,
    reprob=0.0,
)
ABLATION_MODEL_KWARGS: dict[str, Any] = dict(dims=(32, 64, 128, 256))
