"""Semantic segmentation with CycleMLP backbones: Semantic FPN and UPerNet (segmentation_models_pytorch)."""

from .models import SEGMENTERS, semantic_fpn, upernet

__all__ = ["SEGMENTERS", "semantic_fpn", "upernet"]
