"""Building any registered model (CycleMLP or a timm peer) the same way for every analysis."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..checkpoint import CheckpointMismatchError, load_checkpoint, read_state_dict
from ..model import CycleMLP

__all__ = ["build_model", "last_stage_features", "load_weights", "weights_label"]


def build_model(
    name: str, weights: str | os.PathLike | None = None, any_size: bool = True, **kwargs: Any
) -> nn.Module:
    """Create the timm model ``name`` in eval mode.

    Args:
        name: any name ``timm.create_model`` knows (CycleMLP models are registered on import).
        weights: a checkpoint file to load, strictly (the classifier too): CycleMLP models through
            :func:`cyclemlp.load_checkpoint` (authors' or project files), other models as a plain
            state dict (read without executing code). Random initialisation when None.
        any_size: build models that take a ``dynamic_img_size`` switch (Swin, ViT, ...) in that
            mode, so they accept any input size with the same weights. Models without such a
            switch (MLP-Mixer) are built as they are and keep their fixed input size.
        kwargs: passed to ``timm.create_model`` (e.g. ``num_classes``, ``in_chans``).
    """
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; see timm.list_models()")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    model = None
    if any_size:
        try:
            model = timm.create_model(name, dynamic_img_size=True, **kwargs)
        except TypeError as err:
            if "dynamic_img_size" not in str(err):
                raise
    if model is None:
        model = timm.create_model(name, **kwargs)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load every tensor of ``model`` from ``path``; raise CheckpointMismatchError otherwise."""
    if isinstance(model, CycleMLP):
        load_checkpoint(model, path)
        return
    state, _ = read_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointMismatchError(f"{path} does not fit {type(model).__name__}: {err}") from err


def weights_label(weights: str | os.PathLike | None) -> str:
    """How a figure names the weights: the file name, or that they are random."""
    return Path(weights).name if weights is not None else "random init"


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
