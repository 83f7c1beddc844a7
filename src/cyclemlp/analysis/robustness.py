"""ImageNet-C-style robustness (Hendrycks and Dietterich, ICLR 2019), as reported in the CycleMLP
paper: top-1 error under 15 corruptions x 5 severities, normalised by a baseline model.

For model ``f``, corruption ``c`` and severity ``s`` with top-1 error ``E``:

* corruption error ``CE_c(f) = sum_s E(f, c, s) / sum_s E(base, c, s)``; ``mCE`` is its mean over
  the corruptions (100 % = as robust as the baseline; lower is better);
* relative ``CE`` uses the drop from the clean error, ``sum_s (E(f,c,s) - E_clean(f))`` over the
  same sum for the baseline;
* the unnormalised mean error over all corruptions and severities is reported too.

The corruptions are applied to each image after the model's evaluation resize and crop, before
normalisation, as ImageNet-C images were made at the network's input size.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from .corruptions import CORRUPTIONS, SEVERITIES

__all__ = ["corruption_summary", "robustness_figure"]

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
    out["relative_mCE"] = float(np.mean(list(relative.values())))
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
