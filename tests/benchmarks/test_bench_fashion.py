"""The Fashion-MNIST benchmark: its conditions, its configurations, and its runs (tiny budgets)."""

from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
from train_utils import ROOT, cli_env

from benchmarks.fashion_mnist import CYCLEMLP, PEERS, config_for, strip_jobs
from cyclemlp.training.config import FASHION_MNIST


def _bench(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.fashion_mnist", *args], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_strip_jobs_removes_both_spellings():
    assert strip_jobs(["--budget-min", "5", "--jobs", "2", "--models", "a"]) == ["--budget-min", "5", "--models", "a"]
    assert strip_jobs(["--jobs=3", "--threads", "1"]) == ["--threads", "1"]


def test_every_model_gets_the_recipe_and_the_tables_conditions():
    plan = dict(epochs=4, samples_per_epoch=12800)
    args = Namespace(set={}, workers=1, threads=2, no_progress=True)
    configs = [config_for(entry, plan, Path("unused"), args) for entry in (CYCLEMLP, *PEERS.values())]
    assert configs[0].model == FASHION_MNIST["model"] and configs[0].model_kwargs == FASHION_MNIST["model_kwargs"]
    assert [c.model_kwargs for c in configs[1:]] == [{}, {}, {}]  # the recipe's arguments belong to its model
    for config in configs:
        assert (config.pad_crop, config.reprob, config.lr, config.img_size) == (2, 0.25, 3e-3, 32)
        assert (config.epochs, config.samples_per_epoch, config.warmup_epochs) == (4, 12800, 0.8)  # 0.2 x rounds
    args.set = dict(reprob=0.5, pad_crop=0)
    assert (config_for(CYCLEMLP, plan, Path("unused"), args).reprob,
            config_for(CYCLEMLP, plan, Path("unused"), args).pad_crop) == (0.5, 0)


def test_bad_options_and_other_conditions_are_clear_errors(tmp_path):
    done = _bench("--jobs", "0", "--output", str(tmp_path))
    assert done.returncode == 2 and "--jobs and --threads must be at least 1" in done.stderr
    done = _bench("--set", "reprob=1.5", "--output", str(tmp_path))
    assert done.returncode == 2 and "reprob must be within [0, 1]" in done.stderr
    done = _bench("--set", "wings=2", "--output", str(tmp_path))
    assert done.returncode == 2 and "wings" in done.stderr
    (tmp_path / "conditions.json").write_text(json.dumps(dict(
        budget_min=60.0, threads=2, workers=1, malloc="keep", recipe_changes=dict(pad_crop=2))))
    done = _bench("--output", str(tmp_path), "--set", "reprob=0.5", "--report")
    assert done.returncode == 1 and "holds a benchmark under other conditions (recipe_changes" in done.stderr
    assert _bench("--output", str(tmp_path), "--report").stderr.strip().endswith("holds no run to report")


def test_the_committed_table_is_rebuilt_from_its_run_folders(tmp_path):
    import shutil

    shutil.copytree(ROOT / "benchmarks" / "results" / "fashion_mnist", tmp_path / "fm")
    done = _bench("--report", "--output", str(tmp_path / "fm"))
    assert done.returncode == 0, done.stderr
    committed = (ROOT / "benchmarks" / "results" / "fashion_mnist" / "results.md").read_text()
    assert (tmp_path / "fm" / "results.md").read_text() == committed


@pytest.mark.slow
def test_two_jobs_give_the_table_and_a_rerun_trains_nothing(tmp_path):
    args = ["--budget-min", "0.03", "--models", "cyclemlp", "resnet18", "--threads", "1", "--output", str(tmp_path),
            "--no-progress"]
    first = _bench(*args, "--jobs", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert sorted(r["model"] for r in rows) == ["cyclemlp", "resnet18"]
    for row in rows:
        plan = json.loads((tmp_path / row["model"] / "plan.json").read_text())
        assert row["epochs"] == plan["epochs"] and 0 < row["top1"] <= 100 and row["finished"]
    table = (tmp_path / "results.md").read_text()
    assert "| cyclemlp |" in table and "| resnet18 |" in table
    weights = (tmp_path / "cyclemlp" / "model.safetensors").stat().st_mtime_ns
    again = _bench(*args)  # sequential, everything already trained: nothing is retrained
    assert again.returncode == 0 and (tmp_path / "cyclemlp" / "model.safetensors").stat().st_mtime_ns == weights
    assert json.loads((tmp_path / "results.json").read_text())["results"] == rows
