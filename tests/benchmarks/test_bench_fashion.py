"""The Fashion-MNIST benchmark runner: plans, parallel jobs, tables and resuming (tiny budgets)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from train_utils import ROOT, cli_env

from benchmarks.fashion_mnist.run import strip_jobs


def test_strip_jobs_removes_both_spellings():
    assert strip_jobs(["--budget-min", "5", "--jobs", "2", "--models", "a"]) == ["--budget-min", "5", "--models", "a"]
    assert strip_jobs(["--jobs=3", "--seed", "1"]) == ["--seed", "1"]


def _bench(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.fashion_mnist.run", *args], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_bad_jobs_is_a_clear_error(tmp_path):
    done = _bench("--jobs", "0", "--output", str(tmp_path))
    assert done.returncode == 2 and "--jobs must be at least 1" in done.stderr


def test_bad_or_changed_recipe_options_are_a_clear_error(tmp_path):
    done = _bench("--reprob", "1.5", "--output", str(tmp_path))
    assert done.returncode == 2 and "--reprob must be within [0, 1]" in done.stderr
    (tmp_path / "conditions.json").write_text(json.dumps(dict(
        started="x", machine="x", torch="x", timm="x", load_start=0.0, reprob=0.25)))
    done = _bench("--output", str(tmp_path))  # the run folder was made with erasing; this asks for none
    assert done.returncode == 2 and "holds a benchmark run with random erasing 0.25" in done.stderr
    done = _bench("--reprob", "0.25", "--drop-path", "0.1", "--output", str(tmp_path))  # made without drop path
    assert done.returncode == 2 and "holds a benchmark run with drop path 0.0; pass --drop-path 0.0" in done.stderr
    done = _bench("--drop-path", "-0.1", "--output", str(tmp_path))
    assert done.returncode == 2 and "--drop-path must be within [0, 1]" in done.stderr
    done = _bench("--mixup", "-0.2", "--output", str(tmp_path))
    assert done.returncode == 2 and "--mixup must be within [0, 10]" in done.stderr
    done = _bench("--model-ema", "1.5", "--output", str(tmp_path))
    assert done.returncode == 2 and "--model-ema must be within [0, 1]" in done.stderr
    done = _bench("--lr", "0", "--output", str(tmp_path))
    assert done.returncode == 2 and "--lr must be positive; got 0.0" in done.stderr
    done = _bench("--pad-crop", "9", "--output", str(tmp_path))
    assert done.returncode == 2 and "--pad-crop must be within [0, 8]" in done.stderr
    # the folder's runs were made under glibc's defaults (no record: from before the option)
    done = _bench("--reprob", "0.25", "--malloc", "keep", "--output", str(tmp_path))
    if platform.libc_ver()[0] == "glibc":
        assert done.returncode == 2 and "holds a benchmark run under --malloc default; pass that" in done.stderr
    done = _bench("--malloc", "tcmalloc", "--output", str(tmp_path))
    assert done.returncode == 2 and "--malloc: invalid choice: 'tcmalloc'" in done.stderr


def test_recipe_options_checked_against_the_run_folder():
    from benchmarks.fashion_mnist.run import changed_option

    # the recipe's values (it keeps no weight EMA: decay 0)
    base = dict(reprob=0.0, drop_path=0.0, weight_decay=0.05, mixup=0.0, cutmix=0.0, model_ema_decay=0.0, lr=3e-3,
                pad_crop=0)
    settings = dict(base, reprob=0.25)
    assert changed_option(dict(base, reprob=0.25), settings) is None
    assert changed_option(dict(reprob=0.25), settings) is None  # made before the other options existed
    assert changed_option(dict(reprob=0.0), settings) == "random erasing 0.0; pass --reprob 0.0 to continue it"
    assert changed_option({}, dict(base, drop_path=0.1)) == "drop path 0.0; pass --drop-path 0.0 to continue it"
    assert changed_option(dict(base, mixup=0.2), base) == "Mixup alpha 0.2; pass --mixup 0.2 to continue it"
    assert changed_option({}, dict(base, weight_decay=0.1)) == (
        "weight decay 0.05; pass --weight-decay 0.05 to continue it")
    # a folder made before the EMA option had none
    assert changed_option(dict(reprob=0.0), base) is None
    assert changed_option({}, dict(base, model_ema_decay=0.999)) == (
        "weight EMA decay 0.0; pass --model-ema 0.0 to continue it")
    assert changed_option(dict(base, model_ema_decay=0.999), dict(base, model_ema_decay=0.999)) is None
    # a folder made before the learning-rate option trained at the recipe's
    assert changed_option(dict(reprob=0.25), dict(base, reprob=0.25, lr=1.5e-3)) == (
        "learning rate 0.003; pass --lr 0.003 to continue it")
    assert changed_option(dict(base), dict(base, pad_crop=2)) == "translation padding 0; pass --pad-crop 0 to continue it"


def test_ema_option_sets_up_the_training_and_its_column():
    from argparse import Namespace

    from benchmarks.fashion_mnist.run import COLUMNS, CYCLEMLP, RECIPE_OPTIONS, config_for, recipe_settings

    assert recipe_settings()["model_ema_decay"] == 0.0
    plan = dict(epochs=4, samples_per_epoch=1280)
    args = Namespace(img_size=32, batch_size=128, workers=0, threads=1, seed=0, no_progress=True,
                     **{key: None for key in RECIPE_OPTIONS})
    assert not config_for(CYCLEMLP, plan, Path("unused"), args).model_ema
    args.model_ema_decay = 0.999
    config = config_for(CYCLEMLP, plan, Path("unused"), args)
    assert config.model_ema and config.model_ema_decay == 0.999
    assert ("ema_top1", "EMA weights top-1 (%)") in COLUMNS
    assert config_for(CYCLEMLP, plan, Path("unused"), args).lr == 3e-3  # the recipe's
    args.lr = 1.5e-3
    assert config_for(CYCLEMLP, plan, Path("unused"), args).lr == 1.5e-3
    assert config_for(CYCLEMLP, plan, Path("unused"), args).pad_crop == 0
    args.pad_crop = 2
    assert config_for(CYCLEMLP, plan, Path("unused"), args).pad_crop == 2


@pytest.mark.slow
def test_two_jobs_give_the_table_and_a_rerun_trains_nothing(tmp_path):
    args = ["--budget-min", "0.03", "--models", "cyclemlp", "resnet18", "--output", str(tmp_path), "--no-progress"]
    first = _bench(*args, "--jobs", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert sorted(r["model"] for r in rows) == ["cyclemlp", "resnet18"]
    for row in rows:
        plan = json.loads((tmp_path / row["model"] / "plan.json").read_text())
        assert row["epochs"] == plan["epochs"] and 0 < row["top1"] <= 100
        assert (tmp_path / row["model"] / "model.safetensors").exists()
    table = (tmp_path / "results.md").read_text()
    assert "| cyclemlp |" in table and "| resnet18 |" in table
    weights = (tmp_path / "cyclemlp" / "model.safetensors").stat().st_mtime_ns
    again = _bench(*args)  # sequential, everything already trained: nothing is retrained
    assert again.returncode == 0 and (tmp_path / "cyclemlp" / "model.safetensors").stat().st_mtime_ns == weights
    assert json.loads((tmp_path / "results.json").read_text())["results"] == rows


def test_a_run_folder_of_other_model_arguments_is_refused(tmp_path):
    from benchmarks.fashion_mnist.run import CYCLEMLP, Entry, check_same_model

    folder = tmp_path / "cyclemlp"
    folder.mkdir()
    check_same_model(CYCLEMLP, folder)  # nothing there yet
    # a folder from before plans named their model: its training configuration says which it is
    (folder / "config.json").write_text(json.dumps(dict(config=dict(model="cyclemlp_b1", model_kwargs=dict(
        dims=[48, 96, 192, 384], depths=[1, 1, 2, 1])))))
    check_same_model(CYCLEMLP, folder)  # tuples and JSON lists are the same arguments
    other = Entry("cyclemlp", "cyclemlp_b1", dict(dims=(24, 48, 96, 192), depths=(1, 1, 2, 1), stem_stride=2))
    with pytest.raises(SystemExit, match=r"holds a run of cyclemlp_b1 with arguments .*48, 96.*not cyclemlp_b1"):
        check_same_model(other, folder)
    (folder / "plan.json").write_text(json.dumps(dict(epochs=2, model="cyclemlp_b1", kwargs=dict(
        dims=[24, 48, 96, 192], depths=[1, 1, 2, 1], stem_stride=2))))
    check_same_model(other, folder)  # the plan, written first, decides
    with pytest.raises(SystemExit, match="stem_stride"):
        check_same_model(CYCLEMLP, folder)
    done = _bench("--models", "cyclemlp", "--output", str(tmp_path))
    assert done.returncode == 1 and "pass those arguments to continue it, or another --output" in done.stderr
    (folder / "plan.json").write_text('{"epochs": 2, "mod')  # cut short by hand
    with pytest.raises(SystemExit, match=r"plan.json cannot be read .*move the folder aside"):
        check_same_model(CYCLEMLP, folder)
