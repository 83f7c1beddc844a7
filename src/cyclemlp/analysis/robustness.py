"""ImageNet-C-style robustness (Hendrycks and Dietterich, ICLR 2019), as reported in the CycleMLP
paper: top-1 error under 15 corruptions x 5 severities, normalised by a baseline model.

For model ``f``, corruption ``c`` and severity ``s`` with top-1 error ``E``:

* corruption error ``CE_c(f) = sum_s E(f, c, s) / sum_s E(base, c, s)``; ``mCE`` is its mean over
  the corruptions (100 % = as robust as the baseline; lower is better);
* relative ``CE`` uses the drop from the clean error, ``sum_s (E(f,c,s) - E_clean(f))`` over the
  same sum for the baseline; it is undefined (NaN) for a corruption that does not raise the
  baseline's error, and the relative mCE averages the corruptions where it is defined;
* the unnormalised mean error over all corruptions and severities is reported too.

The corruptions are applied to each image after the model's evaluation resize and crop, before
normalisation, as ImageNet-C images were made at the network's input size.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import Compose

from .corruptions import CORRUPTIONS, SEVERITIES, Corruption
from .report import save_figure, write_rows

__all__ = [
    "EvalModel",
    "corruption_errors",
    "corruption_summary",
    "load_eval_model",
    "read_baseline",
    "robustness_figure",
    "run_robustness",
    "write_robustness",
]

Errors = Mapping[str, Mapping[int, float]]  # corruption -> severity -> top-1 error (0-1)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def corruption_summary(
    errors: Errors, clean_error: float, baseline: Errors | None = None, baseline_clean: float | None = None,
    severities: Sequence[int] = SEVERITIES,
) -> dict[str, object]:
    """Per-corruption and mean errors of one model, normalised by ``baseline`` when given.

    Args:
        errors: top-1 error per corruption and severity.
        clean_error: top-1 error on the uncorrupted set.
        baseline, baseline_clean: the same for the baseline model (None: no normalisation).
        severities: the severities to sum over.

    Returns a flat dict: ``clean_error``, ``mean_corruption_error``, and where a baseline is given
    ``mCE`` and ``relative_mCE`` (fractions, 1.0 = the baseline) plus ``CE/<name>`` and
    ``relative_CE/<name>`` per corruption; ``error/<name>`` is the mean over severities.
    """
    names = list(errors)
    if not names:
        raise ValueError("no corruption errors to summarise")
    missing = [(c, s) for c in names for s in severities if s not in errors[c]]
    if missing:
        raise ValueError(f"errors missing for (corruption, severity) {missing[:5]}")
    out: dict[str, object] = dict(
        clean_error=clean_error,
        mean_corruption_error=float(np.mean([errors[c][s] for c in names for s in severities])),
    )
    for c in names:
        out[f"error/{c}"] = float(np.mean([errors[c][s] for s in severities]))
    if baseline is None:
        return out
    if baseline_clean is None:
        raise ValueError("baseline_clean is needed with a baseline")
    absent = [c for c in names if c not in baseline or any(s not in baseline[c] for s in severities)]
    if absent:
        raise ValueError(f"the baseline has no errors for {absent}")
    ce, relative = {}, {}
    for c in names:
        ce[c] = _ratio(sum(errors[c][s] for s in severities), sum(baseline[c][s] for s in severities))
        relative[c] = _ratio(
            sum(errors[c][s] - clean_error for s in severities),
            sum(baseline[c][s] - baseline_clean for s in severities),
        )
        out[f"CE/{c}"] = ce[c]
        out[f"relative_CE/{c}"] = relative[c]
    out["mCE"] = float(np.mean(list(ce.values())))
    defined = [v for v in relative.values() if not math.isnan(v)]
    out["relative_mCE"] = float(np.mean(defined)) if defined else math.nan
    return out


def robustness_figure(
    results: Mapping[str, Mapping[str, object]], errors: Mapping[str, Errors], baseline: str | None, title: str,
) -> "object":
    """Grouped bars of each model's error per corruption (mean over severities, clean error as a
    dashed line) and error against severity (mean over corruptions)."""
    from matplotlib.figure import Figure

    models = list(results)
    names = [c for c in CORRUPTIONS if any(c in errors[m] for m in models)]
    figure = Figure(figsize=(13, 4.6))
    left, right = figure.subplots(1, 2, gridspec_kw=dict(width_ratios=[3, 1]))
    width = 0.8 / len(models)
    x = np.arange(len(names))
    for i, model in enumerate(models):
        summary = results[model]
        label = model
        if "mCE" in summary and not math.isnan(summary["mCE"]):
            label += f"  mCE {100 * summary['mCE']:.1f}%"
        bars = [100 * summary.get(f"error/{c}", math.nan) for c in names]
        left.bar(x + (i - (len(models) - 1) / 2) * width, bars, width, label=label, color=f"C{i}")
        left.axhline(100 * summary["clean_error"], color=f"C{i}", ls="--", lw=1)
        severities = sorted({s for c in errors[model] for s in errors[model][c]})
        right.plot([0, *severities],
                   [100 * summary["clean_error"]] + [100 * np.mean([errors[model][c][s] for c in errors[model]])
                                                     for s in severities],
                   "o-", color=f"C{i}", label=model)
    left.set_xticks(x, [c.replace("_", "\n") for c in names], fontsize=7)
    left.set_ylabel("top-1 error (%), mean over severities")
    left.legend(fontsize=8, title=f"dashed: clean error; mCE vs {baseline}" if baseline else "dashed: clean error",
                title_fontsize=8)
    right.set_xlabel("severity (0 = clean)")
    right.set_ylabel("top-1 error (%), mean over corruptions")
    right.grid(True, alpha=0.3)
    figure.suptitle(title, fontsize=10)
    return figure


# --- evaluation ---------------------------------------------------------------------------------


@dataclass
class EvalModel:
    """A classifier with the preprocessing it was trained with.

    ``data_config``: ``input_size`` (C, H, W), ``interpolation``, ``crop_pct``, ``mean``, ``std``
    (timm's keys). ``classes``: class names fixing the data's label order (None: the data's own).
    """

    label: str
    model: nn.Module
    data_config: Mapping[str, Any]
    classes: Sequence[str] | None = None
    source: str = ""


def load_eval_model(checkpoint: str | os.PathLike, label: str | None = None, model: str | None = None) -> EvalModel:
    """Rebuild a trained classifier from a checkpoint (see :func:`cyclemlp.training.evaluate.model_from_checkpoint`)
    with the preprocessing its run recorded (the model's pretrained configuration otherwise)."""
    from ..models.factory import data_config, model_from_checkpoint

    net, run, _ = model_from_checkpoint(checkpoint, model)
    config = data_config(net, run, None, None, None)
    classes = list(run["classes"]) if run and run.get("classes") else None
    return EvalModel(label or (run or {}).get("model") or Path(checkpoint).stem, net, config, classes, str(checkpoint))


def _split_transform(transform: Compose) -> tuple[Compose, Compose]:
    """timm's evaluation transform split into (resize + crop on PIL images, to-tensor + normalise)."""
    steps = list(transform.transforms)
    at = next((i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__), None)
    if at is None:
        raise ValueError(f"cannot find the tensor conversion in the evaluation transform {transform}")
    return Compose(steps[:at]), Compose(steps[at:])


class _Corrupted(Dataset):
    """Images run through a corruption, then (optionally) a tensor transform."""

    def __init__(self, images: Sequence[Image.Image], targets: Sequence[int], corruption: Callable,
                 post: Callable | None = None) -> None:
        self.images, self.targets, self.corruption, self.post = images, targets, corruption, post

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.corruption(self.images[index])
        return (self.post(image) if self.post else image), self.targets[index]


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def _corrupt_all(images: Sequence[Image.Image], corruption: Corruption, workers: int) -> list[Image.Image]:
    if corruption.severity == 0:
        return list(images)
    loader = DataLoader(_Corrupted(images, [0] * len(images), corruption), batch_size=32,
                        num_workers=workers, collate_fn=_as_list)
    return [image for batch in loader for image, _ in batch]


def corruption_errors(
    models: Sequence[EvalModel],
    dataset: str | None = "fashion-mnist",
    data: str | os.PathLike | None = None,
    split: str | None = None,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    subset: int | None = 500,
    batch_size: int = 128,
    workers: int = 2,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Top-1 error (0-1) of every model on the clean set and under every corruption and severity.

    The evaluation images are read once per distinct preprocessing (size, crop, interpolation,
    channels, classes), resized and cropped, corrupted once per (corruption, severity) and then
    normalised for each model that shares that preprocessing. Severity 0 is the clean set.

    Returns ``{label: {"clean_error": e, "errors": {corruption: {severity: e}}, "images": n}}``.
    """
    from ..data import build_dataset, build_transform, collate_skip, default_splits
    from ..training.evaluate import evaluate

    if not models:
        raise ValueError("no models to evaluate")
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels repeat: {labels}")
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    bad = [s for s in severities if s not in SEVERITIES]
    if unknown or bad or not corruptions or not severities:
        raise ValueError(f"corruptions must come from {CORRUPTIONS} and severities from {SEVERITIES}; "
                         f"got {list(corruptions)}, {list(severities)}")
    split = split or default_splits(dataset)[1]
    groups: dict[str, tuple[Compose, Mapping[str, Any], list[tuple[EvalModel, Compose]]]] = {}
    for m in models:
        geometric, post = _split_transform(build_transform(dict(m.data_config), False))
        key = repr((geometric, m.data_config["input_size"][0], list(m.classes or [])))
        groups.setdefault(key, (geometric, m.data_config, []))[2].append((m, post))
    out: dict[str, dict[str, Any]] = {}
    for geometric, config, members in groups.values():
        ds = build_dataset(dataset, data, split, geometric, classes=members[0][0].classes,
                           in_chans=config["input_size"][0], subset=subset)
        pairs = [item for item in (ds[i] for i in range(len(ds))) if item is not None]
        images, targets = [p[0] for p in pairs], [int(p[1]) for p in pairs]
        if not images:
            raise ValueError(f"no readable image in the evaluation set ({data or dataset}, {split})")
        for m, _ in members:
            out[m.label] = dict(clean_error=math.nan, errors={c: {} for c in corruptions}, images=len(images))
        settings = [(corruptions[0], 0)] + [(c, s) for c in corruptions for s in severities]
        for name, severity in settings:
            corrupted = _corrupt_all(images, Corruption(name, severity, seed), workers)
            for m, post in members:
                loader = DataLoader(_Corrupted(corrupted, targets, lambda im: im, post), batch_size=batch_size,
                                    collate_fn=collate_skip)
                error = 1 - evaluate(m.model, loader, progress=False).top1 / 100
                if severity == 0:
                    out[m.label]["clean_error"] = error
                else:
                    out[m.label]["errors"][name][severity] = error
                if log:
                    what = "clean" if severity == 0 else f"{name} {severity}"
                    log(f"{m.label}: {what}: top-1 error {100 * error:.2f}%")
    return out


def read_baseline(path: str | os.PathLike, label: str | None = None) -> tuple[str, dict[str, Any]]:
    """A model's errors from a ``robustness.json`` written earlier: ``(label, errors)``; ``label``
    may be omitted when the file holds one model."""
    try:
        saved = json.loads(Path(path).read_text())["meta"]["errors"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a robustness.json written by cyclemlp robustness ({err})") from err
    if label is None:
        if len(saved) != 1:
            raise ValueError(f"{path} holds several models {sorted(saved)}; name the baseline")
        label = next(iter(saved))
    if label not in saved:
        raise ValueError(f"{path} holds no model {label!r}; it has {sorted(saved)}")
    entry = saved[label]
    entry["errors"] = {c: {int(s): e for s, e in by_s.items()} for c, by_s in entry["errors"].items()}
    return label, entry


def run_robustness(
    models: Sequence[EvalModel],
    baseline: str | None = None,
    baseline_results: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = "robustness",
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Evaluate ``models`` under the corruptions (``kwargs`` go to :func:`corruption_errors`) and
    write ``robustness.csv`` (one row per model), ``robustness_errors.csv`` (every corruption and
    severity), ``robustness.json`` and ``robustness.png`` under ``out_dir``.

    Args:
        baseline: the label of the model that normalises the mCE: one of ``models``, or one stored
            in ``baseline_results``. None: no mCE, errors only.
        baseline_results: a ``robustness.json`` from an earlier run holding the baseline's errors,
            so the baseline need not be evaluated again (same corruptions, severities and data).

    Returns the summaries (:func:`corruption_summary`) by model label.
    """
    labels = [m.label for m in models]
    base_entry = None
    if baseline_results is not None:
        baseline, base_entry = read_baseline(baseline_results, baseline)
    elif baseline is not None and baseline not in labels:
        raise ValueError(f"baseline {baseline!r} is not among the evaluated models {labels}")
    errors = corruption_errors(models, **kwargs)
    if base_entry is None and baseline is not None:
        base_entry = errors[baseline]
    settings = dict(
        dataset=kwargs.get("data") or kwargs.get("dataset", "fashion-mnist"), split=kwargs.get("split"),
        subset=kwargs.get("subset", 500), seed=kwargs.get("seed", 0),
        corruptions=list(kwargs.get("corruptions", CORRUPTIONS)), severities=list(kwargs.get("severities", SEVERITIES)),
    )
    return write_robustness(errors, {m.label: m.source for m in models}, baseline, base_entry, settings, out_dir)


def write_robustness(
    errors: Mapping[str, Mapping[str, Any]],
    sources: Mapping[str, str],
    baseline: str | None,
    base_entry: Mapping[str, Any] | None,
    settings: Mapping[str, Any],
    out_dir: str | os.PathLike,
) -> dict[str, dict[str, Any]]:
    """Summarise :func:`corruption_errors` output against ``base_entry`` (the baseline's entry)
    and write the tables and figure (see :func:`run_robustness`); returns the summaries."""
    labels = list(errors)
    severities = settings.get("severities", SEVERITIES)
    summaries = {}
    for label in labels:
        entry = errors[label]
        summaries[label] = corruption_summary(
            entry["errors"], entry["clean_error"],
            base_entry["errors"] if base_entry else None, base_entry["clean_error"] if base_entry else None,
            severities=severities,
        )
    rows = []
    for label in labels:
        row: dict[str, Any] = dict(model=label, checkpoint=sources.get(label, ""), images=errors[label]["images"])
        row.update({k: round(100 * v, 3) if isinstance(v, float) else v for k, v in summaries[label].items()})
        rows.append(row)
    long = [dict(model=label, corruption=c, severity=s, error=round(100 * e, 3))
            for label in labels for c, by_s in errors[label]["errors"].items() for s, e in by_s.items()]
    meta = dict(settings, baseline=baseline, errors=errors,
                units="percent top-1 error; mCE and relative_mCE in percent of the baseline's")
    out_dir = Path(out_dir)
    write_rows(rows, out_dir / "robustness.csv")
    write_rows(long, out_dir / "robustness_errors.csv")
    write_rows(rows, out_dir / "robustness.json", meta)
    images = errors[labels[0]]["images"]
    title = (f"Corruption robustness on {meta['dataset']} ({images} images), {len(meta['corruptions'])} "
             f"corruptions x severities {list(severities)}" + (f", mCE relative to {baseline}" if baseline else ""))
    save_figure(robustness_figure(summaries, {k: v["errors"] for k, v in errors.items()}, baseline, title),
                out_dir / "robustness.png")
    return summaries
