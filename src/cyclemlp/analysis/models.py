"""Building any registered model (CycleMLP or a timm peer) the same way for every analysis."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

__all__ = ["build_model", "last_stage_features", "weights_label"]


def build_model(
    name: str, weights: str | os.PathLike | None = None, any_size: bool = True, **kwargs: Any
) -> nn.Module:
    """Create the timm model ``name`` in eval mode.

    Args:
        name: any name ``timm.create_model`` knows (CycleMLP models are registered on import).
        weights: a checkpoint file or run folder, loaded strictly by
            :func:`cyclemlp.models.factory.model_from_checkpoint`
            (the project's training files rebuild the model they record: classes, channels, model
            arguments; the authors' files and plain state dicts work too). Random initialisation
            when None.
        any_size: build models that take a ``dynamic_img_size`` switch (Swin, ViT, ...) in that
            mode, so they accept any input size with the same weights. Models without such a
            switch (MLP-Mixer) are built as they are and keep their fixed input size.
        kwargs: passed to ``timm.create_model`` (e.g. ``num_classes``, ``in_chans``).
    """
    from ..models.factory import checkpoint_file, model_from_checkpoint

    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; see timm.list_models()")
    if weights is not None:
        weights = checkpoint_file(weights)
    for extra in ([dict(dynamic_img_size=True)] if any_size else []) + [{}]:
        try:
            if weights is None:
                return timm.create_model(name, **extra, **kwargs).eval()
            return model_from_checkpoint(weights, name, {**extra, **kwargs})[0].eval()
        except (TypeError, ValueError) as err:
            if not extra or "dynamic_img_size" not in str(err):
                raise
    raise AssertionError("unreachable")


def weights_label(weights: str | os.PathLike | None) -> str:
    """How a figure names the weights: the file and its folder (training runs all write
    ``model.safetensors``), or that they are random."""
    if weights is None:
        return "random init"
    path = Path(weights)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def last_stage_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last-stage feature map ``(B, C, h, w)`` of any timm-style model.

    Uses ``forward_intermediates`` where the model has it (CycleMLP and most timm models); a
    ``features_only`` model's last map otherwise; any other module's own 4-D output.
    """
    if hasattr(model, "forward_intermediates"):
        feats = model.forward_intermediates(x, indices=1, intermediates_only=True)
    else:
        feats = model(x)
    if isinstance(feats, (list, tuple)):
        feats = feats[-1]
    if isinstance(feats, dict):
        feats = list(feats.values())[-1]
    if not isinstance(feats, torch.Tensor) or feats.dim() != 4:
        shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(f"{type(model).__name__} gives no 4-D feature map (got {shape})")
    return feats
