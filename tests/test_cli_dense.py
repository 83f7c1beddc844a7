"""``cyclemlp detect`` / ``cyclemlp segment``: argument and input errors end with a clear message."""

from __future__ import annotations

import torch

from cyclemlp.cli import main


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_detect_argument_errors(capsys, tmp_path):
    assert "unknown backbone 'resnet7'" in _error(capsys, ["detect", "train", "--backbone", "resnet7"])
    err = _error(capsys, ["detect", "train", "--model", "mask_rcnn", "--dataset", "trees", "--data-root", str(tmp_path)])
    assert "boxes only" in err and "--dataset fashion" in err
    err = _error(capsys, ["detect", "train", "--train-ann", str(tmp_path / "absent.json"), "--train-images", str(tmp_path)])
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
