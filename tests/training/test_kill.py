"""Kill a run at every file write (and inside a step, during an evaluation, at random moments),
resume it, and check that the run folder is exactly the uninterrupted run's."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from train_utils import ROOT, cli_env

from cyclemlp.io import read_checkpoint
from cyclemlp.training.train import TIMING_COLUMNS

# Two epochs of two steps: erasing and translation draw from every random generator a resume must
# restore; the second epoch may or may not improve on the first (both paths of best.pth occur
# across the scenarios' seeds below).
ARGV = ["--recipe", "fashion-mnist", "--model-kwargs", "dims=(16,32,64,128)", "depths=(1,1,1,1)", "--img-size", "32",
        "--train-subset", "64", "--val-subset", "32", "-b", "32", "--epochs", "2", "-j", "0", "--threads", "1",
        "--no-progress", "--pad-crop", "2"]
FILES = {"config.json", "last.pth", "best.pth", "metrics.csv", "metrics.json", "curves.png", "model.safetensors"}


def _harness(root: Path, seed: int, **spec) -> dict:
    root.mkdir(parents=True)
    spec = dict(argv=[*ARGV, "--seed", str(seed)], root=str(root), seed=seed, **spec)
    (root / "spec.json").write_text(json.dumps(spec))
    env = dict(cli_env(), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_harness.py"), str(root / "spec.json"),
                           str(root / "result.json")], env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((root / "result.json").read_text())


def _rows(folder: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS}
            for row in json.loads((folder / "metrics.json").read_text())]


def _csv_rows(folder: Path) -> list[dict]:
    with open(folder / "metrics.csv") as handle:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(handle)]


def _record(folder: Path) -> dict:
    record = json.loads((folder / "config.json").read_text())
    record["config"]["output"] = None  # the folder's own name
    return record


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else _same_tensors(a[k], b[k])
        if isinstance(a[k], dict) else a[k] == b[k] for k in a)


def _checkpoint(folder: Path, name: str) -> dict:
    state = read_checkpoint(folder / name)
    state["history"] = [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in state["history"]]
    state["metrics"] = state["history"][-1]
    state["record"]["config"]["output"] = state["config"]["output"] = None
    del state["rng"]  # compared through what it drives: weights, metrics
    return state


def _weights(folder: Path) -> tuple[dict, dict]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def _assert_same_run(folder: Path, full: Path) -> None:
    names = {p.name for p in folder.iterdir()}
    assert names == FILES, f"{folder.name}: files {sorted(names ^ FILES)} differ (temporaries must be gone)"
    assert _record(folder) == _record(full)
    assert _rows(folder) == _rows(full) and _csv_rows(folder) == _csv_rows(full)
    for name in ("last.pth", "best.pth"):
        a, b = _checkpoint(folder, name), _checkpoint(full, name)
        assert a["epoch"] == b["epoch"] and a["best_epoch"] == b["best_epoch"], f"{folder.name}: {name}"
        assert _same_tensors(a["model"], b["model"]) and _same_tensors(a["optimizer"], b["optimizer"]), name
        assert a["history"] == b["history"] and a["record"] == b["record"], f"{folder.name}: {name}"
    weights, meta = _weights(folder)
    full_weights, full_meta = _weights(full)
    assert meta == full_meta and _same_tensors(weights, full_weights)


@pytest.mark.parametrize("seed", [3])
def test_a_run_killed_at_any_write_resumes_into_the_uninterrupted_run(tmp_path, seed):
    results = _harness(tmp_path / "runs", seed, write_phases=["before", "after"], random_delays=3,
                       scenarios=[dict(name="step3", kill=dict(step=3)), dict(name="eval1", kill=dict(eval=1))])
    full = tmp_path / "runs" / "full"
    assert results.pop("full")["killed"] == 0
    events = json.loads((tmp_path / "runs" / "events.json").read_text())
    # every file the run writes is a write point (last.pth first each epoch, model.safetensors last)
    assert events[0] == "config.json" and events[-1] == "model.safetensors" and set(events) == FILES
    assert sum(name.startswith("write") for name in results) == 2 * len(events)
    for name, result in results.items():
        if "delay" not in result["kill"]:
            assert result["killed"] == -9, f"{name} was not killed"
        assert result["resumed"] == 0, f"{name}: resuming exited with {result['resumed']}: " + (
            tmp_path / "runs" / f"{name}.log").read_text()[-2000:]
        if result["how"] != "resume":
            # only a kill before the record exists leaves nothing to resume: the first write's
            # "before" phase, or a random moment that fell into a slow start-up
            assert result["kill"].get("write") == 1 or "delay" in result["kill"], name
            assert result["how"] == "restart (resume gave 2)", name
        _assert_same_run(tmp_path / "runs" / name, full)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [4, 5])
def test_kills_in_every_phase_of_every_write_and_at_many_moments(tmp_path, seed):
    results = _harness(tmp_path / "runs", seed, write_phases=["open", "before", "after"], random_delays=12,
                       scenarios=[dict(name=f"step{n}", kill=dict(step=n)) for n in (1, 2, 3, 4)]
                       + [dict(name=f"eval{n}", kill=dict(eval=n)) for n in (1, 2)])
    results.pop("full")
    for name, result in results.items():
        assert result["resumed"] == 0, name
        _assert_same_run(tmp_path / "runs" / name, tmp_path / "runs" / "full")
