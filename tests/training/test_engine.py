"""Tests of the shared training engine: distribution, random state, checkpoints, logs, guards."""

from __future__ import annotations

import json
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from cyclemlp.io import CheckpointError
from cyclemlp.training import engine


def _draws() -> tuple:
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist())


def test_seed_everything_repeats_all_generators():
    engine.seed_everything(5)
    first = _draws()
    engine.seed_everything(5)
    assert _draws() == first
    engine.seed_everything(6)
    assert _draws() != first


def test_rng_state_survives_a_weights_only_file(tmp_path):
    engine.seed_everything(1)
    _draws()
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = engine.capture_rng_state()
    expected = _draws()
    torch.save(state, tmp_path / "rng.pth")
    engine.seed_everything(99)
    engine.restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    assert _draws() == expected


def test_rng_state_from_another_world_size_is_refused():
    state = {"ranks": [engine._local_rng_state()] * 2}
    with pytest.raises(ValueError, match="2 process"):
        engine.restore_rng_state(state, engine.DistInfo())


def test_setup_distributed_single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = engine.setup_distributed(device="cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert info.device == torch.device("cpu")
    x = torch.tensor([2.0, 4.0])
    assert torch.equal(engine.reduce_mean(x, info), x)
    assert engine.all_gather_objects({"a": 1}, info) == [{"a": 1}]
    engine.cleanup_distributed()


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        engine.resolve_device("cuda")


def _gloo_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    info = engine.setup_distributed(device="cpu")
    try:
        engine.seed_everything(10 + info.rank)
        state = engine.capture_rng_state(info)
        mine = torch.rand(2).tolist()
        engine.seed_everything(0)
        engine.restore_rng_state(state, info)
        again = torch.rand(2).tolist()
        mean = engine.reduce_mean(torch.tensor([float(rank)]), info).item()
        total = engine.reduce_sum(torch.tensor([float(rank + 1)]), info).item()
        result = dict(rank=info.rank, world=info.world_size, is_main=info.is_main, mean=mean,
                      total=total, n_states=len(state["ranks"]), same=mine == again, draw=mine)
        with open(f"{out}.{rank}", "w") as handle:
            json.dump(result, handle)
    finally:
        engine.cleanup_distributed()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_gloo_collectives_and_per_rank_rng(tmp_path):
    mp.start_processes(_gloo_worker, args=(2, free_port(), str(tmp_path / "r")), nprocs=2, start_method="fork")
    results = [json.loads((tmp_path / f"r.{r}").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == 2 and res["is_main"] == (r == 0)
        assert res["mean"] == pytest.approx(0.5) and res["total"] == pytest.approx(3.0)
        assert res["n_states"] == 2 and res["same"]
    assert results[0]["draw"] != results[1]["draw"]  # each rank restored its own generator


def test_checkpoint_manager_keeps_last_and_best(tmp_path):
    manager = engine.CheckpointManager(tmp_path / "run", mode="max")
    assert manager.latest() is None
    assert manager.save({"model": {"w": torch.ones(2)}, "epoch": 0}, metric=50.0)
    assert not manager.save({"model": {"w": torch.full((2,), 2.0)}, "epoch": 1}, metric=40.0)
    assert not manager.save({"model": {"w": torch.full((2,), 3.0)}, "epoch": 2}, metric=float("nan"))
    last = engine.load_training_state(manager.latest())
    best = engine.load_training_state(manager.best_path)
    assert last["epoch"] == 2 and torch.equal(last["model"]["w"], torch.full((2,), 3.0))
    assert best["epoch"] == 0 and best["best_metric"] == 50.0 and last["best_metric"] == 50.0
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.pth", "last.pth"]  # no temp files


def test_checkpoint_manager_min_mode_and_disabled_rank(tmp_path):
    manager = engine.CheckpointManager(tmp_path, mode="min")
    assert manager.save({"model": {}, "epoch": 0}, metric=2.0)
    assert manager.save({"model": {}, "epoch": 1}, metric=1.0)
    silent = engine.CheckpointManager(tmp_path / "other", enabled=False)
    assert silent.save({"model": {}, "epoch": 0}, metric=1.0)
    assert not (tmp_path / "other").exists()
    with pytest.raises(ValueError, match="mode"):
        engine.CheckpointManager(tmp_path, mode="up")


def test_resolve_resume_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no last.pth"):
        engine.resolve_resume(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        engine.resolve_resume(tmp_path / "missing.pth")
    manager = engine.CheckpointManager(tmp_path)
    manager.save({"model": {}, "epoch": 3})
    assert engine.resolve_resume(tmp_path) == tmp_path / "last.pth"
    torch.save({"w": torch.ones(1)}, tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        engine.load_training_state(tmp_path / "weights.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "last.pth").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        engine.load_training_state(tmp_path / "cut.pth")


def test_metrics_logger_files_truncate_and_plot(tmp_path):
    log = engine.MetricsLogger(tmp_path)
    for epoch in range(3):
        log.log({"epoch": epoch, "train_loss": 2.0 - epoch, "eval_loss": torch.tensor(1.5 - epoch / 2),
                 "eval_top1": 50.0 + 10 * epoch})
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [0, 1, 2] and rows[2]["eval_loss"] == pytest.approx(0.5)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "epoch,train_loss,eval_loss,eval_top1" and len(lines) == 4

    resumed = engine.MetricsLogger(tmp_path)  # reads the existing log back
    resumed.truncate(2)
    resumed.log({"epoch": 2, "train_loss": 0.1, "eval_loss": 0.2, "eval_top1": 71.0})
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [0, 1, 2] and rows[2]["eval_top1"] == 71.0

    png = resumed.plot(title="run")
    assert png == tmp_path / "curves.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert engine.MetricsLogger(tmp_path / "x", enabled=False).plot() is None


def test_metrics_logger_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    log = engine.MetricsLogger(tmp_path, tensorboard=True)
    log.log({"epoch": 0, "train_loss": 1.0})
    log.close()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_check_finite_names_the_intact_checkpoint(tmp_path):
    engine.check_finite(torch.tensor(1.5), 0, 0)
    with pytest.raises(engine.NonFiniteLossError, match="no checkpoint had been written"):
        engine.check_finite(float("inf"), 0, 3)
    manager = engine.CheckpointManager(tmp_path)
    manager.save({"model": {}, "epoch": 0})
    with pytest.raises(engine.NonFiniteLossError, match=r"nan at epoch 1, step 7.*last\.pth is intact"):
        engine.check_finite(torch.tensor(float("nan")), 1, 7, manager.last_path)


def test_progress_bar_counts_items(capsys):
    bar = engine.progress_bar(10, "test", enabled=True)
    bar.update(4)
    assert bar.n == 4
    bar.close()
    silent = engine.progress_bar(10, "quiet", enabled=False)
    silent.update(10)
    silent.close()
    assert "quiet" not in capsys.readouterr().err
