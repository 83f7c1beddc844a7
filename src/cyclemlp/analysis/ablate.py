"""The paper's token-mixer ablations as configurations trained under one budget.

Every variant is CycleMLP with one change to its token mixer, trained by
:func:`cyclemlp.training.train.train` with the same settings, data subset, schedule and seed:

* without each of the three branches (width 1xK, height Kx1, channel FC);
* stepsize 3 (the released models) vs 7 (the paper's text) vs a 2-D 3x3 stepsize (paper pattern);
* offset pattern ``official`` vs ``paper``;
* Cycle FC vs spatial FC: the whole mixer replaced by MLP-Mixer-style token mixing, one FC over
  all positions of the (fixed-size) feature map shared by the channels, then the channel
  projection (:class:`SpatialFCMixer`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import timm
import torch
from torch import nn

from ..models.cyclemlp import CycleBlock
from ..tools.flops import count_cost
from .report import save_figure, write_rows
from .settings import ABLATION_MODEL_KWARGS, ABLATION_TRAIN_CONFIG, VARIANTS, Variant

__all__ = [
    "DEFAULT_MODEL_KWARGS",
    "DEFAULT_TRAIN_CONFIG",
    "VARIANTS",
    "AblationResult",
    "SpatialFCMixer",
    "Variant",
    "run_ablation",
    "use_spatial_fc",
    "variant_factory",
]


DEFAULT_TRAIN_CONFIG = ABLATION_TRAIN_CONFIG
DEFAULT_MODEL_KWARGS = ABLATION_MODEL_KWARGS


class SpatialFCMixer(nn.Module):
    """Token mixing of MLP-Mixer as one layer: every output position is a learned weighted sum of
    all ``height x width`` input positions (weights shared by the channels), followed by a channel
    projection. Its weight is tied to the feature-map size, unlike Cycle FC's."""

    def __init__(self, dim: int, height: int, width: int) -> None:
        super().__init__()
        self.height, self.width = height, width
        self.token_fc = nn.Linear(height * width, height * width)
        self.proj = nn.Linear(dim, dim)
        for linear in (self.token_fc, self.proj):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        if (height, width) != (self.height, self.width):
            raise ValueError(
                f"spatial FC was built for {self.height}x{self.width} feature maps; got {height}x{width}"
            )
        tokens = x.reshape(batch, height * width, dim).transpose(1, 2)
        return self.proj(self.token_fc(tokens).transpose(1, 2).reshape(batch, height, width, dim))


def use_spatial_fc(model: nn.Module, img_size: int | tuple[int, int]) -> nn.Module:
    """Replace the token mixer of every CycleMLP block of ``model`` by a :class:`SpatialFCMixer`
    sized for ``img_size`` inputs (found by running one image through the model)."""
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    blocks = [m for m in model.modules() if isinstance(m, CycleBlock)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no CycleMLP blocks to change")
    sizes: dict[CycleBlock, tuple[int, int]] = {}

    def record(block: CycleBlock) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            sizes[block] = tuple(args[0].shape[1:3])

        return hook

    hooks = [b.mixer.register_forward_hook(record(b)) for b in blocks]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, getattr(model, "in_chans", 3), *img_size))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    for block in blocks:
        block.mixer = SpatialFCMixer(block.mixer.dim, *sizes[block])
    return model


def variant_factory(base: str, variant: Variant, img_size: int, **kwargs: Any) -> Callable[..., nn.Module]:
    """``factory(num_classes=, in_chans=)`` building ``base`` changed as ``variant`` says;
    ``kwargs`` (widths, drop path, ...) go to ``timm.create_model`` for every variant alike."""

    def factory(num_classes: int, in_chans: int) -> nn.Module:
        model = timm.create_model(base, num_classes=num_classes, in_chans=in_chans,
                                  **{**kwargs, **dict(variant.model_kwargs)})
        return use_spatial_fc(model, img_size) if variant.spatial_fc else model

    factory.__name__ = f"{base}-{variant.name}"
    return factory


@dataclass
class AblationResult:
    """One variant trained with one or more seeds (accuracies in percent)."""

    variant: str
    description: str
    params_m: float
    gmacs: float
    top1: float  # final-epoch top-1, mean over seeds
    top1_std: float
    sampling_se: float | None  # binomial standard error of one top-1 on the evaluation images
    best_top1: float
    seeds: list[int]
    top1_per_seed: list[float]
    wall_s: float
    runs: list[str]

    def row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        row["seeds"] = " ".join(map(str, self.seeds))
        row["top1_per_seed"] = " ".join(f"{v:.2f}" for v in self.top1_per_seed)
        row["runs"] = " ".join(self.runs)
        return row


def _finished_run(folder: Path) -> dict[str, Any] | None:
    """Top-1 figures of the run in ``folder`` if it finished (wrote its final weights)."""
    metrics = folder / "metrics.json"
    if not (folder / "model.safetensors").is_file() or not metrics.is_file():
        return None
    rows = json.loads(metrics.read_text())
    if not rows:
        return None
    return dict(top1=rows[-1]["eval_top1"], best_top1=max(r["eval_top1"] for r in rows),
                wall_s=rows[-1].get("time_s", math.nan))


def _sampling_se(top1: float, images: int | None) -> float | None:
    """Binomial standard error (percent) of an accuracy measured on ``images`` images."""
    if not images:
        return None
    p = top1 / 100
    return round(100 * math.sqrt(p * (1 - p) / images), 3)


def ablation_figure(results: Sequence[AblationResult], title: str) -> "object":
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 0.45 * len(results) + 1.6))
    ax = figure.subplots()
    names = [r.variant for r in results][::-1]
    values = [r.top1 for r in results][::-1]
    errors = [r.top1_std if len(r.seeds) > 1 else (r.sampling_se or 0) for r in results][::-1]
    colours = ["C1" if r.variant == results[0].variant else "C0" for r in results][::-1]
    ax.barh(names, values, xerr=errors, color=colours)
    for y, r in enumerate(results[::-1]):
        ax.text(r.top1, y, f" {r.top1:.2f}%  ({r.params_m:.2f}M, {r.gmacs:.3f} GMACs)", va="center", fontsize=8)
    low = min(values)
    ax.set_xlim(max(0.0, low - 10), min(100.0, max(values) + 8))
    ax.axvline(results[0].top1, color="C1", ls="--", lw=1)
    ax.set_xlabel("top-1 accuracy (%), final epoch; bars: std over seeds, or with one seed the "
                  "binomial standard error of the evaluation")
    figure.suptitle(title, fontsize=9)
    return figure


def run_ablation(
    base: str = "cyclemlp_b1",
    variants: Sequence[Variant] = VARIANTS,
    train_config: Mapping[str, Any] | None = None,
    model_kwargs: Mapping[str, Any] | None = DEFAULT_MODEL_KWARGS,
    seeds: Sequence[int] = (0,),
    out_dir: str | os.PathLike = "ablate",
) -> list[AblationResult]:
    """Train every variant under the same budget and write ``ablate.csv``, ``ablate.json`` and
    ``ablate.png`` under ``out_dir`` (training runs in ``out_dir/runs/<variant>-seed<N>``).

    Args:
        base: the CycleMLP model the variants change.
        variants: the ablations (:data:`VARIANTS` by default); the first is the reference.
        train_config: :class:`cyclemlp.training.train.TrainConfig` fields shared by every run, over
            :data:`DEFAULT_TRAIN_CONFIG` (the ``fashion-mnist`` recipe, 56 px, 3 epochs on 5000
            training images, evaluated on 2000 test images).
        model_kwargs: constructor arguments shared by every variant (e.g. ``dims`` for narrower models).
        seeds: training seeds; each variant is trained once per seed and the mean is reported.
        out_dir: output folder. A run that already finished there with the same settings is read
            back, an interrupted one is resumed, so a stopped ablation continues where it stopped.
    """
    from ..data import native_in_chans
    from ..training.record import RECORD
    from ..training.train import TrainConfig, train

    if not variants:
        raise ValueError("no variants to train")
    if not seeds:
        raise ValueError("no seeds given")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names repeat: {names}")
    settings = dict(DEFAULT_TRAIN_CONFIG)
    settings.update(train_config or {})
    config = TrainConfig.from_recipe(settings.pop("recipe"), **settings)
    config.check()
    if config.img_size is None:
        raise ValueError("ablations need a fixed img_size (the spatial-FC variant is built for it)")
    img_size = config.img_size
    in_chans = config.in_chans or native_in_chans(config.dataset)
    shared_kwargs = dict(model_kwargs or {})
    train_kwargs = dict(shared_kwargs, drop_rate=config.drop_rate)
    if config.drop_path is not None:
        train_kwargs["drop_path_rate"] = config.drop_path
    out_dir = Path(out_dir)
    results = []
    for variant in variants:
        factory = variant_factory(base, variant, img_size, **train_kwargs)
        cost = count_cost(factory(num_classes=10, in_chans=in_chans), img_size)
        top1s, bests, walls, runs = [], [], [], []
        for seed in seeds:
            folder = out_dir / "runs" / f"{variant.name}-seed{seed}"
            # CycleMLP variants are built through timm, so their checkpoints record how to rebuild them
            kwargs = shared_kwargs if variant.spatial_fc else {**shared_kwargs, **dict(variant.model_kwargs)}
            run_config = dataclasses.replace(config, seed=seed, output=str(folder), model=base, model_kwargs=kwargs)
            if (folder / RECORD).is_file():  # continue it (a finished run is left as it is); other settings are refused
                recorded = json.loads((folder / RECORD).read_text())["config"]["epochs"]
                if recorded != run_config.epochs:  # a resume would extend it: not the same budget
                    raise ValueError(f"{folder} holds a run of {recorded} epochs, not {run_config.epochs}; pass "
                                     "another output folder")
                run_config = dataclasses.replace(run_config, resume=str(folder))
            train(run_config, model_factory=factory if variant.spatial_fc else None)
            done = _finished_run(folder)
            if done is None:
                raise RuntimeError(f"training {variant.name} (seed {seed}) left no final weights in {folder}")
            top1s.append(done["top1"])
            bests.append(done["best_top1"])
            walls.append(done["wall_s"])
            runs.append(str(folder))
        results.append(AblationResult(
            variant=variant.name, description=variant.description, params_m=round(cost.params_m, 3),
            gmacs=round(cost.gmacs, 4), top1=round(statistics.fmean(top1s), 3),
            top1_std=round(statistics.stdev(top1s), 3) if len(top1s) > 1 else 0.0,
            sampling_se=_sampling_se(statistics.fmean(top1s), config.val_subset),
            best_top1=round(statistics.fmean(bests), 3), seeds=list(seeds), top1_per_seed=top1s,
            wall_s=round(sum(walls), 1), runs=runs,
        ))
    budget = dict(
        base=base, model_kwargs=shared_kwargs, drop_path=config.drop_path, img_size=img_size,
        dataset=config.dataset or config.data, epochs=config.epochs, train_subset=config.train_subset,
        val_subset=config.val_subset, batch_size=config.batch_size, lr=config.lr, seeds=list(seeds),
        threads=torch.get_num_threads(),
    )
    rows = [r.row() for r in results]
    write_rows(rows, out_dir / "ablate.csv")
    write_rows(rows, out_dir / "ablate.json", budget)
    train_n = config.train_subset or "all"
    title = (f"Token-mixer ablations: {base} {shared_kwargs.get('dims', '')} on {config.dataset or config.data} "
             f"{img_size}px, {config.epochs} epochs on {train_n} training images, "
             f"eval on {config.val_subset or 'all'}, seeds {list(seeds)}")
    save_figure(ablation_figure(results, title), out_dir / "ablate.png")
    return results
