"""Loading the authors' and the project's files; clear errors for bad ones."""

import argparse
import collections
import os

import pytest
import timm
import torch
from deform_reference import deform_model
from safetensors.torch import load_file

import cyclemlp
import cyclemlp.io
from cyclemlp import CheckpointError, CheckpointMismatchError, load_checkpoint, save_weights


@pytest.fixture(scope="module")
def authors_b1():
    torch.manual_seed(1)
    return deform_model("cyclemlp_b1").eval()


@pytest.fixture
def authors_file(tmp_path, authors_b1):
    path = tmp_path / "CycleMLP_B1.pth"
    torch.save({"model": authors_b1.state_dict(), "epoch": 299, "args": argparse.Namespace(lr=1e-3)}, path)
    return path


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


X = torch.randn(2, 3, 112, 144)


def test_authors_container_via_timm(authors_file, authors_b1):
    model = timm.create_model("cyclemlp_b1", pretrained=True, pretrained_cfg_overlay=dict(file=str(authors_file)))
    torch.testing.assert_close(_logits(model, X), _logits(authors_b1, X), atol=1e-4, rtol=1e-4)


def test_authors_bare_state_dict(tmp_path, authors_b1):
    path = tmp_path / "bare.pth"
    torch.save(authors_b1.state_dict(), path)
    model = timm.create_model("cyclemlp_b1")
    report = load_checkpoint(model, path)
    assert report.loaded == report.total and report.layout == "authors'" and report.container is None
    assert "loaded 202/202" in str(report)
    torch.testing.assert_close(_logits(model, X), _logits(authors_b1, X), atol=1e-4, rtol=1e-4)


def test_prefers_model_over_ema(tmp_path, authors_b1):
    ema = {k: v + 1 if v.is_floating_point() and not k.endswith("offset") else v
           for k, v in authors_b1.state_dict().items()}
    path = tmp_path / "train.pth"
    torch.save({"model": authors_b1.state_dict(), "model_ema": ema}, path)
    model = timm.create_model("cyclemlp_b1")
    assert load_checkpoint(model, path).container == "model"
    torch.testing.assert_close(_logits(model, X), _logits(authors_b1, X), atol=1e-4, rtol=1e-4)
    assert load_checkpoint(model, path, use_ema=True).container == "model_ema"


def test_dense_checkpoint_with_detector_prefix(tmp_path):
    ref = deform_model("cyclemlp_b1", dense=True).eval()
    sd = {"backbone." + k: v for k, v in ref.state_dict().items()}
    sd["neck.lateral.weight"] = torch.zeros(3)
    path = tmp_path / "retinanet.pth"
    torch.save({"state_dict": sd}, path)
    model = timm.create_model("cyclemlp_b1", features_only=True)
    report = load_checkpoint(model, path, strict=False)
    assert "stage_norms.0.weight" not in report.missing
    with torch.no_grad():
        for a, b in zip(model.eval()(X), ref(X)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_classification_file_into_dense_backbone(authors_file):
    model = timm.create_model("cyclemlp_b1", features_only=True)
    with pytest.raises(CheckpointMismatchError, match="stage_norms"):
        load_checkpoint(model, authors_file)  # strict: the dense norms are not in the file
    report = load_checkpoint(model, authors_file, strict=False, reset_head=True)
    assert any(k.startswith("stage_norms") for k in report.missing)
    assert "left at initialisation" in str(report)


def test_project_safetensors_roundtrip(tmp_path):
    model = timm.create_model("cyclemlp_b1", num_classes=10)
    path = save_weights(model, tmp_path / "w.safetensors", {"architecture": "cyclemlp_b1"})
    assert set(load_file(path)) == set(model.state_dict())
    other = timm.create_model("cyclemlp_b1", num_classes=10)
    report = load_checkpoint(other, path)
    assert report.layout == "project" and report.loaded == report.total
    torch.testing.assert_close(_logits(other, X), _logits(model, X))
    via_timm = timm.create_model("cyclemlp_b1", num_classes=10, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    torch.testing.assert_close(_logits(via_timm, X), _logits(model, X))
    assert not list(tmp_path.glob("*.tmp"))


def test_head_mismatch(authors_file):
    model = timm.create_model("cyclemlp_b1", num_classes=10)
    with pytest.raises(CheckpointMismatchError, match=r"head.weight: \(1000, 512\) vs \(10, 512\)"):
        load_checkpoint(model, authors_file)
    report = load_checkpoint(model, authors_file, reset_head=True)
    assert "classifier re-initialised" in str(report)
    # timm: another class count re-initialises the head
    tuned = timm.create_model("cyclemlp_b1", num_classes=10, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(authors_file)))
    torch.testing.assert_close(tuned.stem.proj.weight, model.stem.proj.weight)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(timm.create_model("cyclemlp_b1"), tmp_path / "nope.pth")


def test_truncated_and_corrupt_files(tmp_path, authors_file):
    data = authors_file.read_bytes()
    truncated = tmp_path / "trunc.pth"
    truncated.write_bytes(data[: len(data) // 2])
    model = timm.create_model("cyclemlp_b1")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(model, truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="neither a PyTorch"):
        load_checkpoint(model, garbage)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(model, empty)
    st = save_weights(model, tmp_path / "w.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(st.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(model, cut)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_never_executes_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Payload()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(timm.create_model("cyclemlp_b1"), path)


def test_other_architecture_lists_keys(tmp_path):
    path = tmp_path / "b2.pth"
    torch.save({"model": deform_model("cyclemlp_b2").state_dict()}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(timm.create_model("cyclemlp_b1"), path)
    assert "not in the model" in str(err.value) and "stages.1.blocks.2" in str(err.value)
    path5 = tmp_path / "b5.pth"
    torch.save({"model": deform_model("cyclemlp_b5").state_dict()}, path5)
    with pytest.raises(CheckpointMismatchError, match=r"stem.proj.weight: \(96, 3, 7, 7\) vs \(64, 3, 7, 7\)"):
        load_checkpoint(timm.create_model("cyclemlp_b1"), path5)
    with pytest.raises(CheckpointMismatchError):
        timm.create_model("cyclemlp_b1", pretrained=True, pretrained_cfg_overlay=dict(file=str(path5)))


def test_unrelated_state_dict(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match="no backbone weight"):
        load_checkpoint(timm.create_model("cyclemlp_b1"), path, strict=False)


def test_offsets_are_checked(tmp_path):
    ref = deform_model("cyclemlp_b1", stepsize=7)
    path = tmp_path / "k7.pth"
    torch.save({"model": ref.state_dict()}, path)
    with pytest.raises(CheckpointMismatchError, match=r"stepsize \(1, 7\), pattern 'official'"):
        load_checkpoint(timm.create_model("cyclemlp_b1"), path)
    model = timm.create_model("cyclemlp_b1", stepsize=7)
    load_checkpoint(model, path)
    torch.testing.assert_close(_logits(model, X), _logits(ref.eval(), X), atol=1e-4, rtol=1e-4)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_checkpoint(timm.create_model("cyclemlp_b1"), path)
    path2 = tmp_path / "nested.pth"
    torch.save({"epoch": 3, "notes": "x"}, path2)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_checkpoint(timm.create_model("cyclemlp_b1"), path2)


def test_ddp_prefix_and_ordered_dict(tmp_path, authors_b1):
    sd = collections.OrderedDict(("module." + k, v) for k, v in authors_b1.state_dict().items())
    path = tmp_path / "ddp.pth"
    torch.save({"model": sd}, path)
    model = timm.create_model("cyclemlp_b1")
    assert load_checkpoint(model, path).loaded == 202
    assert cyclemlp.models.checkpoint.describe_offsets(model.stages[0].blocks[0].mixer.height_fc.offsets) \
        == "stepsize (3, 1), pattern 'official'"


def _to_assumed_swin_layout(model) -> dict:
    """The project's T/S/B keys renamed to the Swin-style layout the loader assumes for the
    authors' unreleased T/S/B code (patch_embed / layers.i.blocks.j.attn.* / layers.i.downsample)."""
    import re

    out = {}
    for key, value in model.state_dict().items():
        new = key.replace("stem.", "patch_embed.", 1)
        m = re.match(r"stages\.(\d+)\.downsample\.(.*)", key)
        if m:
            new = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", key)
        if m:
            rest = (m.group(3).replace("mixer.width_fc.", "attn.sfc_h.").replace("mixer.height_fc.", "attn.sfc_w.")
                    .replace("mixer.channel_fc.", "attn.mlp_c.").replace("mixer.", "attn."))
            new = f"layers.{m.group(1)}.blocks.{m.group(2)}.{rest}"
            if rest.endswith(("sfc_h.weight", "sfc_w.weight")):
                value = value[:, :, None, None]
        out[new] = value
    for name, module in model.named_modules():
        if isinstance(module, cyclemlp.CycleFC):
            m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.mixer\.(width|height)_fc", name)
            branch = "sfc_h" if m.group(3) == "width" else "sfc_w"
            out[f"layers.{m.group(1)}.blocks.{m.group(2)}.attn.{branch}.offset"] = \
                module.offsets.float().reshape(1, -1, 1, 1)
    return out


def test_swin_layout_tiny(tmp_path):
    source = timm.create_model("cyclemlp_t").eval()
    path = tmp_path / "CycleMLP_tiny.pth"
    torch.save({"model": _to_assumed_swin_layout(source)}, path)
    model = timm.create_model("cyclemlp_t").eval()
    report = load_checkpoint(model, path)
    assert report.layout == "authors'" and report.loaded == report.total
    x = torch.randn(1, 3, 96, 160)
    torch.testing.assert_close(_logits(model, x), _logits(source, x))


def test_atomic_write_gives_normal_permissions(tmp_path):
    path = cyclemlp.io.atomic_write(tmp_path / "out.txt", lambda tmp: open(tmp, "w").write("x"))
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~mask)
    assert path.read_text() == "x" and len(list(tmp_path.iterdir())) == 1
