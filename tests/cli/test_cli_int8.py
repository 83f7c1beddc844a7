"""``cyclemlp eval --int8`` and ``cyclemlp predict --int8``: int8 CPU inference of a recorded run,
and one-line refusals where it cannot run."""

from __future__ import annotations

import re

import pytest
from train_utils import one_thread, tiny_config  # noqa: F401  (fixture)

from cyclemlp.cli import build_parser, main
from cyclemlp.data import FashionMNIST
from cyclemlp.training.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch run of the tiny CycleMLP (its last stage, 128 channels wide, goes int8)."""
    return train(tiny_config(tmp_path_factory.mktemp("run") / "run", epochs=1, train_subset=64, val_subset=32))


def _top1_and_loss(argv, capsys) -> tuple[float, float]:
    assert main(argv) == 0
    found = re.search(r"top-1 ([\d.]+)% .* loss ([\d.]+) ", capsys.readouterr().out)
    return float(found.group(1)), float(found.group(2))


def test_eval_and_predict_run_in_int8(run, tmp_path, capsys):
    argv = ["eval", "--checkpoint", str(run.output_dir), "--dataset", "fashion-mnist", "--subset", "64", "-j", "0",
            "--no-progress"]
    fp32_top1, fp32_loss = _top1_and_loss(argv, capsys)
    int8_top1, int8_loss = _top1_and_loss([*argv, "--int8"], capsys)
    assert int8_loss != fp32_loss and abs(int8_loss - fp32_loss) < 0.05  # int8 ran, close to float32
    assert abs(int8_top1 - fp32_top1) <= 10  # 64 images of a one-epoch model: a few may flip
    image = tmp_path / "item.png"
    FashionMNIST(split="test")[0][0].save(image)
    assert main(["predict", str(image), "--checkpoint", str(run.output_dir), "--topk", "2", "--int8",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith(str(image))


@pytest.mark.parametrize("argv, message", [
    (["eval", "--dataset", "fashion-mnist", "--int8", "--device", "cuda"], "int8 inference runs on the CPU only"),
    (["eval", "--dataset", "fashion-mnist", "--int8", "--amp"], "does not combine with mixed precision"),
    (["predict", "x.png", "--int8", "--device", "cuda:0"], "int8 inference runs on the CPU only"),
])
def test_int8_elsewhere_is_refused_in_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cyclemlp {argv[0]}: error: ") and message in err and err.count("\n") == 1, err


def test_help_states_what_int8_does():
    for command in ("eval", "predict"):
        parser = build_parser()._subparsers._group_actions[0].choices[command]
        text = " ".join(parser.format_help().split())
        assert "post-training dynamic int8" in text and "CPU only" in text and "not equal" in text
