"""Semantic segmentation heads on CycleMLP backbones, built with segmentation_models_pytorch.

A registered CycleMLP is a timm model, so smp uses it as the encoder ``tu-cyclemlp_b1``: smp
builds it with ``features_only=True`` and receives the four per-stage-normalised NCHW maps
(strides 4-32) of docs/design.md, section 2. Both of the paper's heads exist in smp and are used as they are:

* Semantic FPN (Kirillov et al. 2019; the paper's head for B1-B5) = ``smp.FPN``: a 256-channel
  top-down pyramid, each level brought to stride 4 by 3x3 conv + GroupNorm + ReLU + 2x upsampling
  stages (128 channels), summed, dropout, 1x1 classifier, 4x bilinear upsampling.
* UperNet (Xiao et al. 2018; the paper's head for T/S/B, following Swin) = ``smp.UPerNet``: a PPM
  on the last stage plus an FPN fusing all four, 512 channels as in Swin's setting.

Outputs are logits at the input resolution; inputs must be multiples of 32 (inference pads).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ...models.checkpoint import LoadReport, load_checkpoint
from ...models.cyclemlp import MODEL_CONFIGS
from ...models.factory import check_model_arguments

__all__ = ["SEGMENTERS", "semantic_fpn", "upernet", "load_backbone"]


def _encoder_name(backbone: str, backbone_kwargs: dict[str, Any]) -> str:
    """smp's name of a CycleMLP encoder (through timm); checks the backbone and its arguments."""
    if backbone not in MODEL_CONFIGS:
        raise ValueError(f"unknown CycleMLP backbone {backbone!r}; known: {', '.join(MODEL_CONFIGS)}")
    check_model_arguments(backbone, backbone_kwargs)
    return f"tu-{backbone}"


def load_backbone(model: nn.Module, weights: str | os.PathLike) -> LoadReport:
    """Load a classification checkpoint (the project's or the authors') into an smp model's
    CycleMLP encoder, with :func:`cyclemlp.load_checkpoint` (``strict=False, reset_head=True``);
    it raises when no backbone weight matches. The report is also kept as
    ``model.backbone_load_report``."""
    report = load_checkpoint(model.encoder.model, weights, strict=False, reset_head=True, adapt_in_chans=True)
    model.backbone_load_report = report
    return report


def semantic_fpn(
    backbone: str = "cyclemlp_b1",
    num_classes: int = 150,
    weights: str | os.PathLike | None = None,
    pyramid_channels: int = 256,
    segmentation_channels: int = 128,
    dropout: float = 0.1,
    **backbone_kwargs: Any,
) -> nn.Module:
    """Semantic FPN (``smp.FPN``) on a CycleMLP encoder.

    Args:
        backbone: a registered CycleMLP (B1-B5 in the paper).
        num_classes: output classes (150 for ADE20K).
        weights: classification checkpoint for the backbone (see :func:`load_backbone`).
        pyramid_channels, segmentation_channels: FPN and head widths (256 / 128, as the paper's).
        dropout: dropout before the classifier (0.1 as in the mmseg head the authors used).
        **backbone_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``).
    """
    import segmentation_models_pytorch as smp

    model = smp.FPN(
        encoder_name=_encoder_name(backbone, backbone_kwargs), encoder_weights=None, classes=num_classes,
        decoder_pyramid_channels=pyramid_channels, decoder_segmentation_channels=segmentation_channels,
        decoder_dropout=dropout, **backbone_kwargs,
    )
    model.backbone_load_report = load_backbone(model, weights) if weights else None
    return model


def upernet(
    backbone: str = "cyclemlp_t",
    num_classes: int = 150,
    weights: str | os.PathLike | None = None,
    channels: int = 512,
    **backbone_kwargs: Any,
) -> nn.Module:
    """UperNet (``smp.UPerNet``) on a CycleMLP encoder (T/S/B in the paper).

    Args:
        channels: decoder width (512 in Swin's UperNet setting).
        Others as in :func:`semantic_fpn`.
    """
    import segmentation_models_pytorch as smp

    model = smp.UPerNet(
        encoder_name=_encoder_name(backbone, backbone_kwargs), encoder_weights=None, classes=num_classes,
        decoder_channels=channels, **backbone_kwargs,
    )
    model.backbone_load_report = load_backbone(model, weights) if weights else None
    return model


SEGMENTERS = {"semantic_fpn": semantic_fpn, "upernet": upernet}
