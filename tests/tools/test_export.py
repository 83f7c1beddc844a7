"""Export: ONNX opset 17 through onnxruntime, TorchScript, torch.export — dynamic sizes."""

import onnx
import onnxruntime as ort
import pytest
import timm
import torch

from cyclemlp import CycleMLP, save_weights
from cyclemlp.cli import main
from cyclemlp.tools.export import check_resolutions, export_model


def test_onnx_opset17_two_resolutions(tmp_path):
    model = timm.create_model("cyclemlp_b1").eval()
    result = export_model(model, tmp_path / "b1.onnx", "onnx", (224, 224), opset=17)
    graph = onnx.load(str(result.path))
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert not any("Deform" in node.op_type for node in graph.graph.node)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    for batch, (h, w) in zip((1, 2), check_resolutions((224, 224))):
        x = torch.randn(batch, 3, h, w)
        out = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(out, model(x), atol=1e-4, rtol=1e-4)
    assert len(result.max_rel_diff) == 2 and max(result.max_rel_diff.values()) <= 1e-4


@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
def test_other_formats_dynamic(tmp_path, fmt):
    model = CycleMLP(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), num_classes=5).eval()
    result = export_model(model, tmp_path / f"m.{fmt}", fmt, (96, 128))
    loaded = torch.jit.load(str(result.path)) if fmt == "torchscript" else torch.export.load(str(result.path)).module()
    x = torch.randn(4, 3, 150, 70)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-4, rtol=1e-4)


def test_bad_arguments(tmp_path):
    model = CycleMLP(depths=(1, 1), dims=(8, 16), mlp_ratios=(2, 2), num_classes=2)
    with pytest.raises(ValueError, match="unknown export format"):
        export_model(model, tmp_path / "x", "tflite")
    with pytest.raises(ValueError, match="at least 8"):
        export_model(model, tmp_path / "x", "onnx", (4, 32))
    with pytest.raises(ValueError, match="opset 17"):
        export_model(model, tmp_path / "x", "onnx", opset=13)
    assert not (tmp_path / "x").exists()


def test_cli_export_of_a_file_that_does_not_record_its_model(tmp_path, capsys):
    model = timm.create_model("cyclemlp_b1", num_classes=7)
    weights = save_weights(model, tmp_path / "w.safetensors")
    out = tmp_path / "b1.pt2"
    assert main(["export", "--model", "cyclemlp_b1", "--format", "exported-program", "--checkpoint", str(weights),
                 "-o", str(out), "--img-size", "128x160"]) == 0
    assert "loaded 202/202" in capsys.readouterr().out
    program = torch.export.load(str(out)).module()
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        torch.testing.assert_close(program(x), model.eval()(x), atol=1e-4, rtol=1e-4)
    assert main(["export", "--checkpoint", str(weights)]) == 2  # the file names no model
    assert "does not record its architecture; pass --model NAME" in capsys.readouterr().err
    assert main(["export", "--model", "nonexistent_model", "--random-weights"]) == 2
    assert main(["export", "--model", "cyclemlp_b1", "--checkpoint", str(tmp_path / "missing.pth")]) == 2


def test_cli_export_with_random_weights_is_asked_for_and_seeded(tmp_path, capsys):
    args = ["export", "--model", "cyclemlp_b1", "--model-kwargs", "dims=(16,32,64,128)", "depths=(1,1,1,1)",
            "--num-classes", "3", "--random-weights", "--img-size", "64"]
    assert main([*args, "-o", str(tmp_path / "a.onnx")]) == 0
    assert main([*args, "-o", str(tmp_path / "b.onnx")]) == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
