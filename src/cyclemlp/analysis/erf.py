"""Effective receptive field (Luo et al., NeurIPS 2016), as compared in the CycleMLP paper.

For one image ``x`` and a model whose last stage gives the feature map ``F`` (``C x h x w``), the
contribution of input pixel ``p`` is ``|d (sum_c relu(F[c, h//2, w//2])) / d x[:, p]|`` summed over
the input channels; the ERF is the mean of that map over many real images. The positive part is
taken (as in RepLKNet's ERF study) because a plain sum over channels cancels exactly when the last
stage ends in a LayerNorm (``sum_c LN(v)_c`` does not depend on ``v`` at initialisation), as in
PVT-v2 and Swin. A scalar per model: the
smallest share of the image area whose pixels hold a given fraction (20, 50, 99 %) of the total
contribution (pixels taken from the strongest down), so 1 pixel for a network of 1x1 convolutions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn

from ..io import atomic_write
from .images import load_images
from .models import build_model, last_stage_features, weights_label
from .report import save_figure, write_rows
from .settings import ERF_FRACTIONS, ERF_MODELS

__all__ = [
    "DEFAULT_FRACTIONS",
    "DEFAULT_MODELS",
    "ErfResult",
    "contribution_area",
    "effective_receptive_field",
    "erf_figure",
    "preprocess",
    "run_erf",
]

DEFAULT_MODELS = ERF_MODELS
DEFAULT_FRACTIONS = ERF_FRACTIONS


@dataclass
class ErfResult:
    """The ERF of one model: the mean contribution map and the area scalars."""

    model: str
    weights: str  # file name, or "random init"
    erf: np.ndarray  # (H, W): mean over images of the summed absolute input gradient
    feature_size: tuple[int, int]
    num_images: int
    areas: dict[float, float]  # fraction of contribution -> share of the input area holding it

    def row(self) -> dict[str, object]:
        height, width = self.erf.shape
        row: dict[str, object] = dict(
            model=self.model, weights=self.weights, input=f"{height}x{width}",
            feature_map=f"{self.feature_size[0]}x{self.feature_size[1]}", images=self.num_images,
        )
        for fraction, share in self.areas.items():
            row[f"area{_percent(fraction)}_pct"] = round(100 * share, 4)
            row[f"area{_percent(fraction)}_px"] = int(round(share * height * width))
        return row


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g}"


def contribution_area(erf: np.ndarray, fraction: float) -> float:
    """Smallest share of the pixels of ``erf`` that together hold ``fraction`` of its sum."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    values = np.sort(np.asarray(erf, dtype=np.float64).ravel())[::-1]
    cumulative = np.cumsum(values)
    if not cumulative[-1] > 0:
        raise ValueError("the contribution map is zero everywhere (no gradient reached the input)")
    count = int(np.searchsorted(cumulative, fraction * cumulative[-1], side="left")) + 1
    return min(count, values.size) / values.size


def effective_receptive_field(
    model: nn.Module, images: torch.Tensor, batch_size: int = 4
) -> tuple[np.ndarray, tuple[int, int]]:
    """Mean contribution map ``(H, W)`` of the centre of ``model``'s last-stage feature map.

    Args:
        model: any module that :func:`~cyclemlp.analysis.models.last_stage_features` understands;
            it is run in eval mode, so every image's output depends on that image only.
        images: preprocessed input batch ``(N, C, H, W)``.
        batch_size: images per forward/backward pass.

    Returns the map and the size ``(h, w)`` of the feature map whose centre was taken.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) batch; got {tuple(images.shape)}")
    was_training = model.training
    needs_grad = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():  # only input gradients are needed
        p.requires_grad_(False)
    total = torch.zeros(images.shape[-2:], dtype=torch.float64)
    try:
        for chunk in images.split(batch_size):
            x = chunk.detach().clone().requires_grad_(True)
            feats = last_stage_features(model, x)
            h, w = feats.shape[-2:]
            centre = feats[:, :, h // 2, w // 2].relu().sum()
            (grad,) = torch.autograd.grad(centre, x)
            total += grad.abs().sum(dim=(0, 1)).double().cpu()
    finally:
        for p, flag in zip(model.parameters(), needs_grad):
            p.requires_grad_(flag)
        model.train(was_training)
    return (total / images.shape[0]).numpy(), (int(h), int(w))


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def preprocess(model: nn.Module, images: Sequence[Image.Image], img_size: int | tuple[int, int]) -> torch.Tensor:
    """Resize (shorter side) and centre-crop photos to ``img_size`` and normalise them the way
    the model's pretrained configuration says (timm's eval transform with no crop margin)."""
    config = resolve_data_config({}, model=model)
    in_chans = int(getattr(model, "in_chans", config["input_size"][0]))
    mean, std = config["mean"], config["std"]
    if in_chans == 1:
        mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
    elif in_chans != 3:
        raise ValueError(f"photos have 1 or 3 channels; the model takes {in_chans}")
    transform = create_transform(
        input_size=(in_chans, *_pair(img_size)), interpolation=config["interpolation"],
        mean=mean, std=std, crop_pct=1.0,
    )
    mode = "L" if in_chans == 1 else "RGB"
    return torch.stack([transform(image.convert(mode)) for image in images])


def erf_figure(results: Sequence[ErfResult], source: str) -> "object":
    """Side-by-side heat maps (log scale, each relative to its maximum) with the area scalars."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.2 * len(results) + 0.8, 4.0))
    axes = figure.subplots(1, len(results), squeeze=False)[0]
    image = None
    for ax, result in zip(axes, results):
        relative = result.erf / result.erf.max()
        image = ax.imshow(np.clip(relative, 1e-4, 1), cmap="magma", norm=LogNorm(vmin=1e-4, vmax=1))
        shares = "/".join(_percent(f) for f in result.areas)
        areas = " / ".join(f"{100 * a:.2g}" for a in result.areas.values())
        ax.set_title(f"{result.model}\n({result.weights})", fontsize=9)
        ax.set_xlabel(f"{shares}% of contribution in\n{areas} % of the image", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        figure.colorbar(image, ax=list(axes), fraction=0.02, pad=0.02, label="contribution / max")
    first = results[0]
    figure.suptitle(
        f"Effective receptive field: centre of the last stage, mean over {first.num_images} images "
        f"({source}), input {first.erf.shape[0]}x{first.erf.shape[1]}", fontsize=10,
    )
    return figure


def run_erf(
    models: Sequence[str] = DEFAULT_MODELS,
    source: str | os.PathLike = "foolbox",
    num_images: int = 10,
    img_size: int | tuple[int, int] = 448,
    weights: Mapping[str, str | os.PathLike] | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    batch_size: int = 2,
    out_dir: str | os.PathLike = "erf",
) -> list[ErfResult]:
    """Compute the ERF of every model and write ``erf.csv``, ``erf.json``, ``erf.png`` and the raw
    maps ``erf_maps.npz`` under ``out_dir``.

    Args:
        models: timm model names.
        source: ``"foolbox"``, ``"skimage"`` or a folder of images (see :mod:`.images`).
        num_images: how many photos to average over (all the source has if fewer).
        img_size: input size, ``N`` or ``(H, W)``.
        weights: checkpoint file per model name; models not listed keep their random initialisation.
        fractions: shares of the total contribution whose areas are reported.
        batch_size: images per forward/backward pass.
        out_dir: output folder (created).
    """
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(models))
    if unknown:
        raise ValueError(f"weights given for models that are not analysed: {unknown}")
    if min(_pair(img_size)) < 32:
        raise ValueError(f"img_size must be at least 32, got {img_size}")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad or not fractions:
        raise ValueError(f"fractions must be non-empty and each in (0, 1]; got {list(fractions)}")
    photos = load_images(source, num_images)
    results = []
    for name in models:
        model = build_model(name, weights.get(name))
        erf, feature_size = effective_receptive_field(model, preprocess(model, photos, img_size), batch_size)
        areas = {float(f): contribution_area(erf, f) for f in fractions}
        results.append(ErfResult(name, weights_label(weights.get(name)), erf, feature_size, len(photos), areas))
    out_dir = Path(out_dir)
    meta = dict(source=str(source), num_images=len(photos), img_size=list(_pair(img_size)), fractions=list(fractions))
    write_rows([r.row() for r in results], out_dir / "erf.csv")
    write_rows([r.row() for r in results], out_dir / "erf.json", meta)
    maps = {r.model: r.erf.astype(np.float32) for r in results}

    def write_maps(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **maps)

    atomic_write(out_dir / "erf_maps.npz", write_maps)
    save_figure(erf_figure(results, str(source)), out_dir / "erf.png")
    return results
