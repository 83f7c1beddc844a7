"""Training runs on tiny real data: learning, files, exact resume, DDP, accumulation, guards."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from train_utils import (  # noqa: F401  (one_thread is a fixture)
    CLI,
    ROOT,
    TINY_ARGS,
    TINY_KWARGS,
    cli_env,
    imagenet_folder,
    one_thread,
    run_cli,
    tiny_config,
)

from cyclemlp.training import engine
from cyclemlp.training.config import ResumeConflictError, TrainConfig, recipe
from cyclemlp.training.evaluate import evaluate_checkpoint
from cyclemlp.training.train import train

DETERMINISTIC = dict(no_aug=True, drop_path=0.0, reprob=0.0)




@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "fmnist"
    return train(tiny_config(out, epochs=3, lr=3e-3))


def test_short_run_lowers_the_loss_and_writes_every_file(short_run):
    history = short_run.history
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.2
    assert history[-1]["eval_loss"] < math.log(10)  # better than chance
    assert short_run.top1 > 30.0
    names = {p.name for p in short_run.output_dir.iterdir()}
    assert {"last.pth", "best.pth", "metrics.csv", "metrics.json", "curves.png", "model.safetensors",
            "config.json"} <= names
    state = engine.load_training_state(short_run.last_checkpoint)
    assert state["epoch"] == 2 and state["num_updates"] == 3 * 8
    assert {"model", "optimizer", "scheduler", "rng", "metrics", "run", "config"} <= set(state)
    assert state["run"]["classes"][0] == "T-shirt/top" and state["run"]["in_chans"] == 1


def test_eval_of_saved_checkpoints_reproduces_training_accuracy(short_run):
    best_row = max(short_run.history, key=lambda r: r["eval_top1"])
    best = evaluate_checkpoint(short_run.best_checkpoint, dataset="fashion-mnist", subset=128, workers=0,
                               progress=False)
    assert best.top1 == pytest.approx(best_row["eval_top1"]) and best.loss == pytest.approx(best_row["eval_loss"])
    final = evaluate_checkpoint(short_run.weights, dataset="fashion-mnist", subset=128, workers=0, progress=False)
    assert final.top1 == pytest.approx(short_run.top1) and final.top5 == pytest.approx(short_run.top5)


def test_existing_run_is_not_overwritten(short_run):
    with pytest.raises(ValueError, match="already holds a training run"):
        train(tiny_config(short_run.output_dir))


def _weights(path):
    return load_file(str(path))


@pytest.mark.parametrize("data", ["--cache-data", "--no-cache-data"])
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path, data):
    # erasing and translation draw from every generator a resume must restore (Python's, torch's)
    args = TINY_ARGS + ["--epochs", "2", "-j", "1", "--seed", "3", "--reprob", "0.5", "--pad-crop", "2", data]
    full = run_cli("train", *args, "--output", str(tmp_path / "full"), check=True)
    assert "epoch 2/2" in full.stdout

    out = tmp_path / "killed"
    proc = subprocess.Popen(CLI + ["train", *args, "--output", str(out)], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "last.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # in epoch 2 (or writing its checkpoint): any moment must do
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    done = engine.load_training_state(out / "last.pth")["epoch"]

    resumed = run_cli("train", *args, "--resume", str(out), check=True)
    assert f"resuming {out} at epoch {done + 2} of 2" in resumed.stdout
    rows_full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    rows_resumed = json.loads((out / "metrics.json").read_text())
    keys = ("epoch", "lr", "train_loss", "eval_loss", "eval_top1", "eval_top5")
    assert [[r[k] for k in keys] for r in rows_resumed] == [[r[k] for k in keys] for r in rows_full]
    a, b = _weights(tmp_path / "full" / "model.safetensors"), _weights(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_gloo_ddp_matches_one_process(tmp_path):
    common = TINY_ARGS + ["--epochs", "2", "-j", "0", "--no-aug", "--drop-path", "0", "--reprob", "0"]
    single = run_cli("train", *common, "-b", "32", "--output", str(tmp_path / "one"), check=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "cyclemlp"]
    ddp = run_cli("train", *common, "-b", "16", "--output", str(tmp_path / "two"), cmd=torchrun, check=True)
    assert "global batch 32" in single.stdout and "global batch 32" in ddp.stdout
    assert "2 process(es)" in ddp.stdout
    a, b = _weights(tmp_path / "one" / "model.safetensors"), _weights(tmp_path / "two" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    rows_one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    rows_two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-4)
        assert r2["eval_top1"] == pytest.approx(r1["eval_top1"], abs=0.8)  # one image of 128 may flip


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    small = dict(epochs=1, train_subset=96, val_subset=32, **DETERMINISTIC)
    one = train(tiny_config(tmp_path / "b32", **small))
    two = train(tiny_config(tmp_path / "b16x2", batch_size=16, grad_accum_steps=2, **small))
    a, b = _weights(one.weights), _weights(two.weights)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    assert two.train_img_per_s > 0 and one.history[0]["train_loss"] == pytest.approx(two.history[0]["train_loss"],
                                                                                      rel=1e-5)


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    small = dict(epochs=1, train_subset=64, val_subset=32, **DETERMINISTIC)
    plain = train(tiny_config(tmp_path / "plain", **small))
    saved = train(tiny_config(tmp_path / "ckpt", grad_checkpointing=True, **small))
    a, b = _weights(plain.weights), _weights(saved.weights)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


class _Explodes(nn.Module):
    """Wraps a model; its output becomes NaN after ``after`` training forwards."""

    def __init__(self, inner: nn.Module, after: int) -> None:
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                out = out * float("nan")
        return out


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    import timm

    def factory(num_classes, in_chans):
        return _Explodes(timm.create_model("cyclemlp_b1", num_classes=num_classes, in_chans=in_chans,
                                           dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)), after=10)

    out = tmp_path / "nan"
    with pytest.raises(engine.NonFiniteLossError, match=r"nan at epoch 1, step 2.*last\.pth is intact"):
        train(tiny_config(out, epochs=3), model_factory=factory)
    state = engine.load_training_state(out / "last.pth")
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "model.safetensors").exists()


def test_model_kwargs_reach_the_model_and_the_checkpoint(tmp_path):
    result = train(tiny_config(tmp_path / "ablation", epochs=1, train_subset=64,
                               model_kwargs=dict(TINY_KWARGS_ABLATION)))
    state = engine.load_training_state(result.last_checkpoint)
    assert state["run"]["model_kwargs"]["pattern"] == "paper"
    assert state["run"]["model_kwargs"]["branches"] == ["width", "channel"]
    assert not any("height_fc" in k for k in state["model"])
    again = evaluate_checkpoint(result.weights, dataset="fashion-mnist", subset=128, workers=0, progress=False)
    assert again.top1 == pytest.approx(result.top1)


TINY_KWARGS_ABLATION = dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), stepsize=7, pattern="paper",
                            branches=("width", "channel"))


def test_a_timm_peer_trains_with_the_same_code(tmp_path):
    result = train(tiny_config(tmp_path / "peer", model="test_resnet", model_kwargs={}, epochs=1, train_subset=64,
                                      val_subset=32))
    assert result.params > 0 and math.isfinite(result.loss)


def test_image_folder_training_with_a_corrupt_image(tmp_path):
    root = imagenet_folder(tmp_path / "imagenet")
    (root / "train" / "n01440764").mkdir()
    (root / "train" / "n01440764" / "broken.jpg").write_bytes(b"not a jpeg")
    result = train(TrainConfig.from_recipe(
        "fashion-mnist", data=str(root), model_kwargs=dict(TINY_KWARGS_ABLATION), img_size=32, batch_size=8, epochs=1,
        workers=0, warmup_epochs=0, progress=False, output=str(tmp_path / "run")))
    assert result.history[0]["skipped"] <= 1 and result.config["data"] == str(root)
    assert engine.load_training_state(result.last_checkpoint)["run"]["num_classes"] == 20
    strict = TrainConfig.from_recipe(
        "fashion-mnist", data=str(root), model_kwargs=dict(TINY_KWARGS_ABLATION), img_size=32, batch_size=21,
        epochs=1, workers=0, warmup_epochs=0, progress=False, strict=True, output=str(tmp_path / "strict"))
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.jpg"):
        train(strict)


def test_resume_refuses_another_architecture(short_run, tmp_path):
    with pytest.raises(ResumeConflictError, match=r"--model-kwargs: recorded \{'dims': \[16, 32, 64, 128\]"):
        train(resume=str(short_run.output_dir), epochs=4, model_kwargs=dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1)))


def test_the_defaults_are_the_authors_imagenet_recipe():
    values = TrainConfig()
    assert recipe("imagenet") == {}
    assert (values.opt, values.lr_base, values.lr_base_size, values.weight_decay) == ("adamw", 5e-4, 512, 0.05)
    assert (values.opt_eps, values.opt_betas, values.batch_size) == (1e-8, (0.9, 0.999), 128)
    assert (values.epochs, values.warmup_epochs, values.warmup_lr, values.min_lr) == (300, 5, 1e-6, 1e-5)
    assert (values.img_size, values.crop_pct, values.interpolation) == (224, 0.875, "bicubic")
    assert (values.aa, values.reprob, values.remode) == ("rand-m9-mstd0.5-inc1", 0.25, "pixel")
    assert (values.mixup, values.cutmix, values.mixup_switch_prob, values.smoothing) == (0.8, 1.0, 0.5, 0.1)
    assert (values.aug_repeats, values.drop_path, values.amp, values.model_ema) == (3, 0.1, True, True)
    assert values.model_ema_decay == 0.99996 and values.clip_grad is None
    config = TrainConfig.from_recipe("imagenet", epochs=10, data="x")
    assert config.epochs == 10 and config.aa == "rand-m9-mstd0.5-inc1" and config.recipe == "imagenet"
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe("cifar")


@pytest.mark.parametrize("bad, message", [
    (dict(epochs=0), "epochs must be a positive integer"),
    (dict(batch_size=-1), "batch_size must be a positive integer"),
    (dict(lr=float("nan")), "lr must be a positive number"),
    (dict(warmup_epochs=-1), "warmup_epochs must be >= 0"),
    (dict(reprob=1.5), "reprob must be within"),
    (dict(dataset=None), "no dataset given"),
    (dict(model="no_such_model"), "unknown model"),
    (dict(model_kwargs=dict(wings=2)), "model 'cyclemlp_b1' has no argument 'wings'; its arguments: depths"),
    (dict(warmup_epochs=3, epochs=2), r"warmup_epochs \(3\) must be shorter than the run \(2 epoch\(s\)\)"),
    (dict(opt="sgd", opt_fused=True), "fused step"),
    (dict(cache_data=True, scale=(0.5, 1.0)), "cannot cache the data in memory: the training augmentation"),
])
def test_bad_settings_are_clear_errors(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_config(tmp_path / "x", **bad))


def test_fused_optimizer_step_matches_the_per_tensor_loop(tmp_path):
    small = dict(epochs=1, train_subset=96, val_subset=32, **DETERMINISTIC)
    fused = train(tiny_config(tmp_path / "fused", opt_fused=True, **small))
    loop = train(tiny_config(tmp_path / "loop", opt_fused=False, **small))
    groups = [engine.load_training_state(r.last_checkpoint)["optimizer"]["param_groups"] for r in (fused, loop)]
    assert all(g["fused"] for g in groups[0]) and not any(g["fused"] for g in groups[1])
    a, b = _weights(fused.weights), _weights(loop.weights)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)


def test_caching_an_image_folder_is_refused(tmp_path):
    config = tiny_config(tmp_path / "x", dataset=None, data=str(imagenet_folder(tmp_path / "data")), cache_data=True,
                         train_subset=None, val_subset=None, batch_size=4)
    with pytest.raises(ValueError, match="not an in-memory dataset"):
        train(config)


def test_cached_and_per_image_data_train_alike(tmp_path):
    """Without flips both pipelines feed the same pixels in the same order: the same run."""
    small = dict(epochs=1, train_subset=96, val_subset=32, **DETERMINISTIC)
    cached = train(tiny_config(tmp_path / "cached", cache_data=True, **small))
    per_image = train(tiny_config(tmp_path / "per_image", cache_data=False, **small))
    a, b = _weights(cached.weights), _weights(per_image.weights)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert cached.history[0]["eval_top1"] == per_image.history[0]["eval_top1"]
