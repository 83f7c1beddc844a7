"""The train / eval / predict commands: a round trip and clear errors for bad arguments."""

from __future__ import annotations

import json
import re

import pytest
from train_utils import TINY_ARGS, one_thread  # noqa: F401  (fixture)

from cyclemlp.cli import main
from cyclemlp.data import FashionMNIST


def test_train_eval_predict_round_trip(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--epochs", "1", "-j", "0", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    trained = re.search(r"epoch 1/1: .* top-1 ([\d.]+)%", printed).group(1)
    assert "done: top-1" in printed and (out / "model.safetensors").exists()

    assert main(["eval", "--checkpoint", str(out / "best.pth"), "--dataset", "fashion-mnist", "--subset", "128",
                 "-j", "0", "--json", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"top-1 {trained}%" in printed  # the accuracy training printed
    assert json.loads((tmp_path / "eval.json").read_text())["count"] == 128

    image = tmp_path / "item.png"
    FashionMNIST(split="test")[1][0].save(image)
    assert main(["predict", str(image), "--checkpoint", str(out / "model.safetensors"), "--topk", "2",
                 "--json", str(tmp_path / "pred.json")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(str(image)) and "  1. " in printed and "  2. " in printed
    assert len(json.loads((tmp_path / "pred.json").read_text())[0]["classes"]) == 2


def test_resume_flag_continues_a_finished_run_for_more_epochs(tmp_path, capsys):
    out = tmp_path / "run"
    common = [*TINY_ARGS, "-j", "0", "--train-subset", "64", "--val-subset", "32"]
    assert main(["train", *common, "--epochs", "1", "--output", str(out)]) == 0
    assert main(["train", *common, "--epochs", "2", "--resume", str(out / "last.pth")]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "epoch 2/2" in printed
    assert [r["epoch"] for r in json.loads((out / "metrics.json").read_text())] == [0, 1]


def test_nan_loss_stops_the_command(tmp_path, capsys):
    code = main(["train", *TINY_ARGS, "--epochs", "2", "-j", "0", "--train-subset", "96", "--lr", "1e30",
                 "--warmup-epochs", "0", "--output", str(tmp_path / "nan")])
    err = capsys.readouterr().err
    assert code == 1 and "cyclemlp train: stopped: training loss is" in err and "no checkpoint had been written" in err


@pytest.mark.parametrize("argv, message", [
    (["train", "--dataset", "fashion-mnist", "--epochs", "0"], "epochs must be a positive integer"),
    (["train", "--epochs", "1"], "no dataset given"),
    (["train", "--dataset", "mnist-9"], "unknown dataset 'mnist-9'"),
    (["train", "--dataset", "fashion-mnist", "--model", "nonexistent_net"], "unknown model 'nonexistent_net'"),
    (["train", "--dataset", "fashion-mnist", "--resume", "/nonexistent/last.pth"], "checkpoint to resume not found"),
    (["train", "--data", "/nonexistent/imagenet", "--epochs", "1"], "dataset folder not found"),
    (["train", "--dataset", "fashion-mnist", "--reprob", "2"], "reprob must be within"),
    (["eval", "--dataset", "fashion-mnist"], "no weights given"),
    (["eval", "--checkpoint", "/nonexistent.pth", "--dataset", "fashion-mnist"], "checkpoint not found"),
    (["predict", "/nonexistent.png", "--checkpoint", "/nonexistent.pth"], "not found"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cyclemlp {argv[0]}: error: ") and message in err


@pytest.mark.parametrize("argv", [
    ["train", "--recipe", "cifar"],
    ["train", "--epochs", "three"],
    ["train", "--in-chans", "4"],
    ["eval", "--batch-size"],
    ["predict"],
])
def test_malformed_arguments_are_rejected_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err
