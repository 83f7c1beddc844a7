"""Detectors on CycleMLP backbones: torchvision's RetinaNet and Mask R-CNN with a feature pyramid.

The backbone is timm's ``features_only`` CycleMLP: each stage output passes through its own
LayerNorm and leaves as NCHW at strides 4/8/16/32 (docs/design.md, section 2). The necks follow the PVT recipes the
authors pointed to (docs/design.md, section 6):

* RetinaNet: FPN over strides 8-32 (stages 2-4, "start level 1") with P6 computed from the last
  stage's input and P7 from P6, 256 channels: levels P3-P7.
* Mask R-CNN: FPN over all four stages plus a max-pooled P6 for the RPN, 256 channels: P2-P6.

``num_classes`` counts the background (torchvision's convention): a dataset with K categories
labelled 1..K needs ``num_classes=K + 1``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)

from ...models.checkpoint import LoadReport, load_checkpoint
from ...models.cyclemlp import MODEL_CONFIGS
from ...models.factory import check_model_arguments, create_model

__all__ = ["PyramidBackbone", "cyclemlp_fpn", "retinanet", "mask_rcnn", "resnet_fpn", "DETECTORS"]


class PyramidBackbone(nn.Module):
    """Any module returning a list of NCHW maps, followed by a torchvision FPN.

    Returns the ordered dict of pyramid levels that torchvision's detectors take, and exposes
    ``out_channels``. ``body`` is kept under that name so its weights read ``backbone.body.*``.
    """

    def __init__(
        self,
        body: nn.Module,
        in_channels: Sequence[int],
        out_channels: int = 256,
        extra_blocks: ExtraFPNBlock | None = None,
    ) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)
        if isinstance(feats, dict):
            feats = list(feats.values())
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def _extra_blocks(extra: str, last_channels: int, out_channels: int) -> ExtraFPNBlock | None:
    """Pyramid levels above the last stage: RetinaNet's P6/P7 (P6 from the last stage's output,
    mmdet's "on input") or Mask R-CNN's max-pooled level."""
    if extra == "maxpool":
        return LastLevelMaxPool()
    if extra == "p6p7":
        return LastLevelP6P7(last_channels, out_channels)
    if extra == "none":
        return None
    raise ValueError(f"extra must be 'maxpool', 'p6p7' or 'none'; got {extra!r}")


def _check_variant(name: str) -> None:
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown CycleMLP backbone {name!r}; known: {', '.join(MODEL_CONFIGS)}")


def cyclemlp_fpn(
    name: str,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    extra: str = "maxpool",
    out_channels: int = 256,
    weights: str | os.PathLike | None = None,
    **backbone_kwargs: Any,
) -> tuple[PyramidBackbone, LoadReport | None]:
    """A CycleMLP feature extractor with an FPN on the stages ``out_indices``.

    Args:
        name: a registered CycleMLP (``cyclemlp_b1`` ... ``cyclemlp_b5``, ``cyclemlp_t/s/b``).
        out_indices: stages fed to the FPN (0 = stride 4 ... 3 = stride 32).
        extra: extra pyramid levels: ``"maxpool"`` (one max-pooled level, for Faster/Mask R-CNN),
            ``"p6p7"`` (P6 by a stride-2 conv on the last stage's output, P7 from P6, RetinaNet),
            or ``"none"``.
        out_channels: FPN channels.
        weights: a classification (or backbone) checkpoint, the project's or the authors', loaded
            into the backbone with :func:`cyclemlp.load_checkpoint` (``strict=False``,
            ``reset_head=True``): it raises when no backbone weight matches.
        **backbone_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``, ``stepsize``).

    Returns:
        The backbone and the load report (``None`` without ``weights``).
    """
    _check_variant(name)
    check_model_arguments(name, backbone_kwargs)
    out_indices = tuple(out_indices)
    body = create_model(name, features_only=True, out_indices=out_indices, **backbone_kwargs)
    network = body.model
    # Per-stage norms of stages that are not returned would be parameters without gradients
    # (DDP rejects those); drop them.
    for i in range(len(network.stage_norms or ())):
        if i not in out_indices:
            network.stage_norms[i] = nn.Identity()
    channels = body.feature_info.channels()
    extra_blocks = _extra_blocks(extra, channels[-1], out_channels)
    report = load_checkpoint(body, weights, strict=False, reset_head=True, adapt_in_chans=True) if weights else None
    return PyramidBackbone(body, channels, out_channels, extra_blocks), report


def resnet_fpn(
    depth: int = 50,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    extra: str = "maxpool",
    out_channels: int = 256,
) -> PyramidBackbone:
    """torchvision's ResNet-18/34/50/101 as a randomly initialised pyramid backbone (a baseline).

    Same FPN and extra levels as :func:`cyclemlp_fpn`. Batch norm layers are trainable (torchvision
    freezes them only for ImageNet-initialised backbones; frozen at random init they would be
    identities).
    """
    from torchvision.models import resnet
    from torchvision.models._utils import IntermediateLayerGetter

    builders = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50, 101: resnet.resnet101}
    if depth not in builders:
        raise ValueError(f"ResNet depth must be one of {sorted(builders)}; got {depth}")
    net = builders[depth](weights=None)
    layers = {f"layer{i + 1}": str(i) for i in out_indices}
    body = IntermediateLayerGetter(net, layers)
    width = 64 if depth < 50 else 256
    channels = [width * 2**i for i in out_indices]
    return PyramidBackbone(body, channels, out_channels, _extra_blocks(extra, channels[-1], out_channels))


def _detector(
    detector: type, backbone: str | PyramidBackbone, out_indices: Sequence[int], extra: str,
    weights: str | os.PathLike | None, backbone_kwargs: dict[str, Any], **detector_kwargs: Any,
) -> nn.Module:
    """Build the pyramid backbone (CycleMLP, ResNet baseline or given) and the torchvision detector."""
    report = None
    if isinstance(backbone, PyramidBackbone):
        if weights:
            raise ValueError("weights apply to a named CycleMLP backbone, not to a built one")
        body = backbone
    elif backbone.startswith("resnet"):
        if weights or backbone_kwargs:
            raise ValueError("weights and backbone arguments apply to CycleMLP backbones only")
        body = resnet_fpn(int(backbone[len("resnet"):]), out_indices, extra)
    else:
        body, report = cyclemlp_fpn(backbone, out_indices, extra, weights=weights, **backbone_kwargs)
    # every backbone here (CycleMLP, torchvision's ResNets) uses ImageNet's normalisation
    mean, std = list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    model = detector(body, image_mean=mean, image_std=std, **detector_kwargs)
    model.backbone_load_report = report
    return model


def retinanet(
    backbone: str | PyramidBackbone = "cyclemlp_b1",
    num_classes: int = 91,
    weights: str | os.PathLike | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    detections_per_img: int = 100,
    **backbone_kwargs: Any,
) -> RetinaNet:
    """RetinaNet with a CycleMLP (or ResNet) backbone: FPN from stride 8, P3-P7, 256 channels.

    Args:
        backbone: a CycleMLP name, ``"resnet18"``/``"resnet50"`` (baselines), or a built
            :class:`PyramidBackbone` with five output levels.
        num_classes: classes including the background index 0 (torchvision's convention).
        weights: classification/backbone checkpoint loaded into the CycleMLP (see
            :func:`cyclemlp_fpn`); the :class:`~cyclemlp.LoadReport` is kept as
            ``model.backbone_load_report``.
        min_size, max_size: images are resized so the short side is ``min_size`` and the long
            side at most ``max_size`` (800/1333 in the 1x recipe).
        detections_per_img: detections kept per image (100, as COCO evaluation counts).
        **backbone_kwargs: passed to ``timm.create_model`` for the CycleMLP.
    """
    return _detector(
        RetinaNet, backbone, (1, 2, 3), "p6p7", weights, backbone_kwargs,
        num_classes=num_classes, min_size=min_size, max_size=max_size, detections_per_img=detections_per_img,
    )


def mask_rcnn(
    backbone: str | PyramidBackbone = "cyclemlp_b1",
    num_classes: int = 91,
    weights: str | os.PathLike | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    detections_per_img: int = 100,
    **backbone_kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN with a CycleMLP (or ResNet) backbone: FPN over all four stages, P2-P6.

    Arguments as in :func:`retinanet`.
    """
    return _detector(
        MaskRCNN, backbone, (0, 1, 2, 3), "maxpool", weights, backbone_kwargs,
        num_classes=num_classes, min_size=min_size, max_size=max_size, box_detections_per_img=detections_per_img,
    )


DETECTORS = {"retinanet": retinanet, "mask_rcnn": mask_rcnn}
