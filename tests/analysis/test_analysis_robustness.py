"""Robustness: severity 0 is the clean evaluation, mCE arithmetic, baseline reuse, the tool's files."""

import json
import math

import pytest
from PIL import Image

from cyclemlp.analysis.robustness import (
    corruption_errors,
    corruption_summary,
    load_eval_model,
    read_baseline,
    run_robustness,
)
from cyclemlp.training.evaluate import evaluate_checkpoint
from cyclemlp.training.train import TrainConfig, train

SUBSET = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig.from_recipe(
        "fashion-mnist", dataset="fashion-mnist", model="cyclemlp_b1", model_kwargs=dict(dims=(16, 32, 64, 128)),
        img_size=32, epochs=1, warmup_epochs=0, train_subset=64, val_subset=16, batch_size=32, workers=0,
        progress=False, output=str(out / "b1"),
    )
    return train(config).weights


def test_severity_zero_is_the_clean_evaluation(checkpoint):
    model = load_eval_model(checkpoint, "b1")
    errors = corruption_errors([model], subset=SUBSET, corruptions=["fog"], severities=[1], workers=0)
    clean = evaluate_checkpoint(checkpoint, dataset="fashion-mnist", subset=SUBSET, workers=0, progress=False)
    assert errors["b1"]["images"] == SUBSET
    assert errors["b1"]["clean_error"] == pytest.approx(1 - clean.top1 / 100, abs=1e-12)
    assert 0 <= errors["b1"]["errors"]["fog"][1] <= 1


def test_corruption_summary_arithmetic():
    errors = {"fog": {1: 0.2, 2: 0.4}, "snow": {1: 0.3, 2: 0.5}}
    base = {"fog": {1: 0.4, 2: 0.8}, "snow": {1: 0.4, 2: 0.4}}
    s = corruption_summary(errors, 0.1, base, 0.2, severities=(1, 2))
    assert s["error/fog"] == pytest.approx(0.3) and s["mean_corruption_error"] == pytest.approx(0.35)
    assert s["CE/fog"] == pytest.approx(0.5) and s["CE/snow"] == pytest.approx(1.0)
    assert s["mCE"] == pytest.approx(0.75)
    # relative: (0.1 + 0.3) / (0.2 + 0.6) and (0.2 + 0.4) / (0.2 + 0.2)
    assert s["relative_CE/fog"] == pytest.approx(0.5) and s["relative_mCE"] == pytest.approx((0.5 + 1.5) / 2)
    assert "mCE" not in corruption_summary(errors, 0.1, severities=(1, 2))
    with pytest.raises(ValueError, match="missing"):
        corruption_summary(errors, 0.1, severities=(1, 2, 3))


def test_run_robustness_files_and_baseline_reuse(checkpoint, tmp_path):
    models = [load_eval_model(checkpoint, "a"), load_eval_model(checkpoint, "b")]
    options = dict(subset=16, corruptions=["gaussian_noise", "pixelate"], severities=[2], workers=0)
    first = run_robustness(models, baseline="b", out_dir=tmp_path / "one", **options)
    assert first["b"]["mCE"] == pytest.approx(1.0)
    assert first["a"]["mCE"] == pytest.approx(1.0)  # same weights, same corrupted images
    rows = json.loads((tmp_path / "one" / "robustness.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["a", "b"] and rows[1]["mCE"] == pytest.approx(100.0)
    assert (tmp_path / "one" / "robustness_errors.csv").read_text().count("\n") == 1 + 2 * 2
    assert Image.open(tmp_path / "one" / "robustness.png").format == "PNG"

    label, entry = read_baseline(tmp_path / "one" / "robustness.json", "b")
    assert label == "b" and set(entry["errors"]["pixelate"]) == {2}
    again = run_robustness(models[:1], baseline="b", baseline_results=tmp_path / "one" / "robustness.json",
                           out_dir=tmp_path / "two", **options)
    assert again["a"]["mCE"] == pytest.approx(first["a"]["mCE"])
    with pytest.raises(ValueError, match="not among"):
        run_robustness(models[:1], baseline="zz", out_dir=tmp_path / "three", **options)
    with pytest.raises(ValueError, match="several models"):
        read_baseline(tmp_path / "one" / "robustness.json")
    assert not math.isnan(first["a"]["clean_error"])
