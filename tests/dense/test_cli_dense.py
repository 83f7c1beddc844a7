"""``cyclemlp detect`` / ``cyclemlp segment``: argument and input errors end with a clear message."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from dense_utils import make_ade, make_coco
from train_utils import run_cli

from cyclemlp.cli import main


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_detect_argument_errors(capsys, tmp_path):
    assert "unknown backbone 'resnet7'" in _error(capsys, ["detect", "train", "--backbone", "resnet7"])
    err = _error(capsys, ["detect", "train", "--model", "mask_rcnn", "--dataset", "trees",
                          "--data-root", str(tmp_path)])
    assert "boxes only" in err and "--dataset fashion" in err
    err = _error(capsys, ["detect", "train", "--train-ann", str(tmp_path / "absent.json"),
                          "--train-images", str(tmp_path)])
    assert "annotation file not found" in err


def test_segment_argument_errors(capsys, tmp_path):
    assert "--num-classes or --classes-file" in _error(capsys, ["segment", "train", "--data", str(tmp_path)])
    err = _error(capsys, ["segment", "train", "--data", str(tmp_path), "--num-classes", "3"])
    assert "ADE20K layout" in err
    assert "unknown backbone" in _error(capsys, ["segment", "train", "--backbone", "resnet50"])


def test_checkpoint_of_another_task_is_refused(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"epoch": 0, "model": {}, "config": {"task": "segment"}}, run / "last.pth")
    assert "a 'segment' checkpoint, not a 'detect' one" in _error(capsys, ["detect", "eval", str(run)])
    torch.save({"epoch": 0, "model": {}}, run / "last.pth")
    assert "no model configuration" in _error(capsys, ["segment", "predict", str(run), str(tmp_path)])
    assert "checkpoint not found" in _error(capsys, ["segment", "eval", str(tmp_path / "absent")])
    (run / "last.pth").unlink()
    assert "holds no best.pth or last.pth" in _error(capsys, ["detect", "predict", str(run), str(tmp_path)])
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "plain.pth")  # weights, not a run's checkpoint
    err = _error(capsys, ["detect", "eval", str(tmp_path / "plain.pth")])
    assert "not a training checkpoint of cyclemlp" in err and "give a run folder of `cyclemlp detect train`" in err
    assert "initial weights" not in err


TINY_KWARGS = ["--backbone-kwargs", "depths=(1,1,1,1)", "dims=(32,64,96,128)"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cyclemlp"]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_detect_train_eval_predict_commands(tmp_path, processes):
    ann, images = make_coco(tmp_path, [(64, 96), (96, 64), (64, 64), (80, 64)])
    run = tmp_path / "run"
    train = ["detect", "train", "--train-ann", str(ann), "--train-images", str(images), "--val-ann", str(ann),
             "--val-images", str(images), "--epochs", "1", "--batch-size", str(2 // processes), "--min-size", "64",
             "--max-size", "96", "--workers", "0", "--output", str(run), *TINY_KWARGS]
    result = run_cli(*train, cmd=TORCHRUN if processes == 2 else None, check=True)
    assert "epoch 0: loss" in result.stdout and result.stdout.count("epoch 0: loss") == 1  # rank 0 prints
    assert json.loads((run / "metrics.json").read_text())[0]["train_loss"] > 0
    evaluated = run_cli("detect", "eval", str(run), "--ann", str(ann), "--images", str(images),
                        "--json", str(tmp_path / "ap.json"), check=True)
    assert "bbox" in evaluated.stdout and "AP50" in evaluated.stdout
    assert "bbox_AP" in json.loads((tmp_path / "ap.json").read_text())["metrics"]
    predicted = run_cli("detect", "predict", str(run), str(images / "train"), "--output", str(tmp_path / "pred"),
                        "--score-threshold", "0", check=True)
    assert predicted.stdout.count("detections ->") == 4 and len(list((tmp_path / "pred").glob("*.png"))) == 4
    (tmp_path / "broken.png").write_text("not an image")
    first = sorted((images / "train").iterdir())[0]
    partial = run_cli("detect", "predict", str(run), str(first), str(tmp_path / "broken.png"), "--output",
                      str(tmp_path / "pred2"))
    assert partial.returncode == 2 and partial.stdout.count("detections ->") == 1
    assert f"error: {tmp_path / 'broken.png'}: cannot read the image" in partial.stderr


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_segment_train_eval_predict_commands(tmp_path, processes):
    root = make_ade(tmp_path / "data", [(64, 64), (48, 80), (80, 48), (64, 64)])
    run = tmp_path / "run"
    train = ["segment", "train", "--data", str(root), "--num-classes", "3", "--iters", "2", "--eval-interval", "2",
             "--batch-size", str(2 // processes), "--crop-size", "64", "--scale", "256", "64", "--workers", "0",
             "--output", str(run), *TINY_KWARGS]
    result = run_cli(*train, cmd=TORCHRUN if processes == 2 else None, check=True)
    assert result.stdout.count("iteration 2: loss") == 1
    evaluated = run_cli("segment", "eval", str(run), "--data", str(root), "--num-classes", "3", "--mode", "slide",
                        "--stride", "32", check=True)
    assert "mIoU" in evaluated.stdout and "slide inference" in evaluated.stdout
    predicted = run_cli("segment", "predict", str(run), str(root / "images" / "validation"), "--output",
                        str(tmp_path / "pred"), check=True)
    assert predicted.stdout.count("_overlay.png") == 2
