"""Object detection and instance segmentation with CycleMLP backbones (torchvision detectors)."""

from .models import DETECTORS, PyramidBackbone, cyclemlp_fpn, mask_rcnn, resnet_fpn, retinanet

__all__ = ["DETECTORS", "PyramidBackbone", "cyclemlp_fpn", "mask_rcnn", "resnet_fpn", "retinanet"]
