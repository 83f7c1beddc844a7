"""Every command that takes weights rebuilds the model a run recorded from the run alone: the
analyses (erf, robustness) and the dense models' backbones (detect, segment)."""

from __future__ import annotations

import pytest
import torch
from train_utils import TINY_KWARGS, one_thread, tiny_config  # noqa: F401  (fixture)

from cyclemlp.analysis.models import build_model
from cyclemlp.analysis.robustness import load_eval_model
from cyclemlp.cli import main
from cyclemlp.dense.detection.models import cyclemlp_fpn
from cyclemlp.dense.segmentation.models import semantic_fpn
from cyclemlp.models.factory import backbone_arguments
from cyclemlp.training.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch run of a custom-width CycleMLP on one-channel images."""
    return train(tiny_config(tmp_path_factory.mktemp("run") / "run", epochs=1, train_subset=64, val_subset=32))


def _backbone_weights(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(run.weights)).items() if k.startswith("stages.")}


def test_erf_and_robustness_rebuild_the_recorded_model(run, tmp_path, capsys):
    model = build_model("cyclemlp_b1", run.output_dir)
    assert model.dims == TINY_KWARGS["dims"] and model.in_chans == 1
    for key, value in _backbone_weights(run).items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(ValueError, match="records its model; model: recorded 'cyclemlp_b1', given 'cyclemlp_b2'"):
        build_model("cyclemlp_b2", run.output_dir)
    evaluated = load_eval_model(run.weights)
    assert evaluated.model.dims == TINY_KWARGS["dims"] and evaluated.data_config["input_size"] == (1, 32, 32)
    assert evaluated.classes[0] == "T-shirt/top"
    assert main(["erf", "cyclemlp_b1", "--weights", f"cyclemlp_b1={run.output_dir}", "--source", "skimage",
                 "--images", "1", "--img-size", "64", "--output", str(tmp_path / "erf")]) == 0
    assert (tmp_path / "erf" / "erf.csv").is_file()


def test_dense_backbones_take_the_architecture_their_weights_record(run, capsys):
    name, kwargs = backbone_arguments(None, {"drop_path_rate": 0.2}, run.output_dir, "cyclemlp_b2")
    assert name == "cyclemlp_b1" and tuple(kwargs["dims"]) == TINY_KWARGS["dims"]
    assert kwargs["drop_path_rate"] == 0.2  # regularisation stays the caller's
    body, report = cyclemlp_fpn(name, (1, 2, 3), "p6p7", weights=run.output_dir, **kwargs)
    assert "stem converted from 1 to 3 input channels" in str(report)
    state = body.body.model.state_dict()
    for key, value in _backbone_weights(run).items():
        assert torch.equal(state[key], value), key
    segmenter = semantic_fpn(name, 4, weights=run.output_dir, **kwargs)
    encoder = getattr(segmenter.encoder.model, "model", segmenter.encoder.model).state_dict()
    assert all(torch.equal(encoder[k], v) for k, v in _backbone_weights(run).items())

    with pytest.raises(ValueError, match="holds a cyclemlp_b1; --backbone cyclemlp_b2 differs"):
        backbone_arguments("cyclemlp_b2", {}, run.output_dir, "cyclemlp_b1")
    with pytest.raises(ValueError, match="records dims="):
        backbone_arguments(None, {"dims": (8, 16, 32, 64)}, run.output_dir, "cyclemlp_b1")
    assert main(["detect", "train", "--weights", str(run.output_dir), "--backbone", "cyclemlp_b2"]) == 2
    assert "holds a cyclemlp_b1; --backbone cyclemlp_b2 differs" in capsys.readouterr().err
