"""Evaluation and prediction of checkpoints: preprocessing, class mapping, names, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from timm.data import ImageNetInfo
from train_utils import TINY_KWARGS, foolbox_imagenet, imagenet_folder, one_thread, tiny_config  # noqa: F401

from cyclemlp.data import FASHION_MNIST_CLASSES, FashionMNIST
from cyclemlp.io import save_weights
from cyclemlp.models.factory import data_config, model_from_checkpoint
from cyclemlp.training.evaluate import evaluate_checkpoint, predict
from cyclemlp.training.train import train


@pytest.fixture(scope="module")
def imagenet_weights(tmp_path_factory):
    """A 1000-class CycleMLP's weights as a bare safetensors file (no record of how it was made)."""
    torch.manual_seed(0)
    model = timm.create_model("cyclemlp_b1", **TINY_KWARGS)
    path = tmp_path_factory.mktemp("w") / "tiny_in1k.safetensors"
    save_weights(model, path)
    return path


@pytest.fixture(scope="module")
def fmnist_run(tmp_path_factory):
    return train(tiny_config(tmp_path_factory.mktemp("fm") / "run", epochs=1, train_subset=128, val_subset=64))


def test_imagenet_weights_on_a_synset_folder_use_imagenet_indices(tmp_path, imagenet_weights):
    root = imagenet_folder(tmp_path)
    net, run, _ = model_from_checkpoint(imagenet_weights, "cyclemlp_b1", TINY_KWARGS)
    assert run is None and net.num_classes == 1000  # the class count is read from the file's head
    cfg = data_config(net, None, None, None, None)  # the model's own preprocessing (the authors')
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    result = evaluate_checkpoint(imagenet_weights, data=root, model="cyclemlp_b1", model_kwargs=TINY_KWARGS,
                                 img_size=64, workers=0, progress=False)
    assert result.count == 20 and result.skipped == 0
    assert 0 <= result.top1 <= result.top5 <= 100 and result.loss > 0


def test_class_count_mismatch_is_a_clear_error(tmp_path, fmnist_run):
    root = imagenet_folder(tmp_path)
    with pytest.raises(ValueError, match="classes the checkpoint was not trained on"):
        evaluate_checkpoint(fmnist_run.weights, data=root, workers=0, progress=False)
    bare = tmp_path / "bare10.safetensors"
    save_weights(timm.create_model("cyclemlp_b1", num_classes=10, **TINY_KWARGS), bare)
    with pytest.raises(ValueError, match=r"classifier has 10 classes but the data .* has 19"):
        evaluate_checkpoint(bare, data=root, model="cyclemlp_b1", model_kwargs=TINY_KWARGS, workers=0)
    with pytest.raises(ValueError, match="does not record its architecture; pass --model"):
        evaluate_checkpoint(bare, data=root, workers=0)
    with pytest.raises(ValueError, match="no weights given"):
        evaluate_checkpoint(None, data=root)


def test_corrupt_images_are_counted_in_evaluation(tmp_path, imagenet_weights):
    root = imagenet_folder(tmp_path)
    broken = sorted((root / "val").iterdir())[0] / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    result = evaluate_checkpoint(imagenet_weights, data=root, model="cyclemlp_b1", model_kwargs=TINY_KWARGS,
                                 img_size=32, workers=0, progress=False)
    assert result.count == 20 and result.skipped == 1
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.jpg"):
        evaluate_checkpoint(imagenet_weights, data=root, model="cyclemlp_b1", model_kwargs=TINY_KWARGS,
                            img_size=32, workers=0, strict=True, progress=False)


def test_predict_names_imagenet_classes(imagenet_weights):
    photos = foolbox_imagenet()[:2]
    preds = predict(photos, imagenet_weights, model="cyclemlp_b1", model_kwargs=TINY_KWARGS, topk=3, img_size=64)
    info = ImageNetInfo()
    assert [p.path for p in preds] == [str(p) for p in photos]
    for pred in preds:
        probs = [prob for _, _, prob in pred.classes]
        assert len(pred.classes) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert all(name == info.index_to_description(index) for index, name, _ in pred.classes)


def test_predict_names_the_checkpoints_classes(tmp_path, fmnist_run):
    image, label = FashionMNIST(split="test")[0]
    path = tmp_path / "boot.png"
    image.save(path)
    rgb = tmp_path / "boot_rgb.png"
    image.convert("RGB").save(rgb)  # converted to the model's one channel
    preds = predict([path, rgb], fmnist_run.weights, topk=10)
    for pred in preds:
        assert sorted(name for _, name, _ in pred.classes) == sorted(FASHION_MNIST_CLASSES)
        assert sum(p for _, _, p in pred.classes) == pytest.approx(1.0, abs=1e-5)
    assert preds[0].classes == preds[1].classes


def test_predict_reports_bad_inputs_and_predicts_the_good_ones(tmp_path, fmnist_run):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        FashionMNIST(split="test")[i][0].save(folder / f"item{i}.png")
    (folder / "bad.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    preds = predict([folder, tmp_path / "none.png", tmp_path / "empty"], fmnist_run.output_dir, topk=2)
    errors = {p.path: p.error for p in preds if p.error}
    assert errors == {str(tmp_path / "none.png"): "no such file or folder",
                      str(tmp_path / "empty"): "a folder without images",
                      str(folder / "bad.png"): errors[str(folder / "bad.png")]}
    assert errors[str(folder / "bad.png")].startswith("cannot read the image")
    good = [p for p in preds if not p.error]
    assert [Path(p.path).name for p in good] == ["item0.png", "item1.png"] and all(len(p.classes) == 2 for p in good)
    with pytest.raises(ValueError, match="topk must be positive"):
        predict([folder], fmnist_run.weights, topk=0)


def test_use_ema_weights_of_a_training_checkpoint(tmp_path):
    run = train(tiny_config(tmp_path / "ema", epochs=1, train_subset=64, val_subset=32, model_ema=True,
                            model_ema_decay=0.5))
    plain = evaluate_checkpoint(run.last_checkpoint, dataset="fashion-mnist", subset=32, workers=0, progress=False)
    ema = evaluate_checkpoint(run.last_checkpoint, dataset="fashion-mnist", subset=32, workers=0, progress=False,
                              use_ema=True)
    assert plain.loss == pytest.approx(run.loss)
    assert ema.loss == pytest.approx(run.history[-1]["eval_ema_loss"])
    assert (run.output_dir / "model_ema.safetensors").exists()
