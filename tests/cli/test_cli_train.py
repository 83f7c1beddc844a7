"""The train / eval / predict / export commands over one run: the run folder is the record that
every command rebuilds the model from, resume keeps the run one run, and mistakes are one line."""

from __future__ import annotations

import hashlib
import json
import re
import sys

import onnxruntime as ort
import pytest
import torch
from train_utils import TINY_ARGS, one_thread, run_cli  # noqa: F401  (fixture)

from cyclemlp.cli import main
from cyclemlp.data import FashionMNIST
from cyclemlp.models.factory import model_from_checkpoint

# the README main command's model (B1's layout, narrower; recorded model arguments), on a subset
NARROW = ["--recipe", "fashion-mnist", "--train-subset", "256", "--val-subset", "128", "-b", "32", "-j", "0",
          "--no-progress"]


def _snapshot(folder):
    return {p.name: (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def narrow_run(tmp_path_factory):
    """Two epochs of the fashion-mnist recipe's own model: every value from the recipe."""
    out = tmp_path_factory.mktemp("narrow") / "run"
    assert main(["train", *NARROW, "--epochs", "2", "--output", str(out)]) == 0
    return out


def test_the_record_holds_every_resolved_value(narrow_run):
    record = json.loads((narrow_run / "config.json").read_text())
    config, run = record["config"], record["run"]
    assert config["recipe"] == "fashion-mnist" and config["epochs"] == 2 and config["reprob"] == 0.25
    # resolved at the start, not left to later defaults
    assert (config["img_size"], config["in_chans"], config["lr"], config["cache_data"]) == (32, 1, 3e-3, True)
    assert (config["train_split"], config["val_split"], config["mean"], config["std"]) == ("train", "test", [0.286],
                                                                                          [0.353])
    # the model's full constructor arguments: the recipe's widths and depths, and every default
    assert run["model"] == "cyclemlp_b1" and run["model_kwargs"]["dims"] == [48, 96, 192, 384]
    assert {"depths", "mlp_ratios", "layout", "stepsize", "pattern", "branches", "drop_path_rate"} <= set(
        run["model_kwargs"])
    assert run["classes"][9] == "Ankle boot" and run["data_config"]["input_size"] == [1, 32, 32]
    assert record["versions"]["torch"] == str(torch.__version__) and record["extended"] == []


def test_eval_predict_and_export_rebuild_the_model_from_the_checkpoint_alone(narrow_run, tmp_path, capsys):
    printed = {}
    for source in (narrow_run, narrow_run / "best.pth", narrow_run / "model.safetensors"):
        assert main(["eval", "--checkpoint", str(source), "--dataset", "fashion-mnist", "--subset", "128", "-j", "0",
                     "--no-progress"]) == 0
        printed[source.name] = re.search(r"top-1 ([\d.]+)%", capsys.readouterr().out).group(1)
    rows = json.loads((narrow_run / "metrics.json").read_text())
    best = max(rows, key=lambda r: r["eval_top1"])
    assert printed["run"] == printed["best.pth"] == f"{best['eval_top1']:.2f}"
    assert printed["model.safetensors"] == f"{rows[-1]['eval_top1']:.2f}"

    image = tmp_path / "item.png"
    FashionMNIST(split="test")[0][0].save(image)
    assert main(["predict", str(image), "--checkpoint", str(narrow_run / "model.safetensors"), "--topk", "2"]) == 0
    assert capsys.readouterr().out.startswith(str(image))

    model, _, _ = model_from_checkpoint(narrow_run / "model.safetensors")
    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".pt"), ("exported-program", ".pt2")):
        out = tmp_path / f"narrow{suffix}"
        assert main(["export", "--checkpoint", str(narrow_run / "model.safetensors"), "--format", fmt,
                     "--output", str(out)]) == 0, capsys.readouterr().err
        assert out.is_file()
    session = ort.InferenceSession(str(tmp_path / "narrow.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"])[0] == "T-shirt/top" and json.loads(meta["input_size"]) == [1, 32, 32]
    for batch, size in ((1, (32, 32)), (3, (48, 40))):  # its training size, and another
        x = torch.randn(batch, 1, *size)
        with torch.no_grad():
            eager = model(x)
        got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        assert ((got - eager).abs().max() / eager.abs().max()).item() <= 1e-4
    assert main(["export", "--checkpoint", str(narrow_run / "model.safetensors"), "--output",
                 str(tmp_path / "narrow.onnx")]) == 2  # an existing file is not replaced
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_resuming_a_finished_run_changes_no_file(narrow_run, capsys):
    before = _snapshot(narrow_run)
    assert main(["train", "--resume", str(narrow_run), "--threads", "1", "-j", "1", "--no-progress"]) == 0
    assert "is complete (2 epochs); nothing to train" in capsys.readouterr().out
    # ... nor does one that would change it: refused, listing each value
    assert main(["train", "--resume", str(narrow_run), "--img-size", "64", "-b", "16", "--recipe", "imagenet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cyclemlp train: error: cannot resume {narrow_run}: these values differ")
    for line in ("--img-size: recorded 32, given 64", "--batch-size: recorded 32, given 16",
                 "--recipe: recorded 'fashion-mnist', given 'imagenet'"):
        assert f"  {line}\n" in err
    assert main(["train", "--resume", str(narrow_run), "--epochs", "1"]) == 2
    assert "it has trained 2 epochs" in capsys.readouterr().err
    assert _snapshot(narrow_run) == before


def test_resume_alone_continues_and_epochs_extends(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--recipe", "fashion-mnist", "--model-kwargs", "dims=(16,32,64,128)", "depths=(1,1,1,1)",
              "--train-subset", "64", "--val-subset", "32", "-b", "32", "-j", "0", "--no-progress"]
    assert main(["train", *common, "--epochs", "1", "--output", str(out)]) == 0
    assert main(["train", "--resume", str(out / "last.pth"), "--epochs", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"resuming {out} at epoch 2 of 2" in printed and "epoch 2/2" in printed
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["epochs"] == 2 and record["extended"] == [
        dict(at_epoch=1, epochs_before=1, epochs_after=2)]
    assert [r["epoch"] for r in json.loads((out / "metrics.json").read_text())] == [0, 1]


@pytest.mark.parametrize("argv, message", [
    (["train", "--dataset", "fashion-mnist", "--epochs", "0"], "epochs must be a positive integer"),
    (["train", "--epochs", "1", "--recipe", "imagenet"], "no dataset given"),
    (["train", "--dataset", "mnist-9"], "unknown dataset 'mnist-9'"),
    (["train", "--dataset", "fashion-mnist", "--model", "nonexistent_net"], "unknown model 'nonexistent_net'"),
    (["train", "--resume", "/nonexistent/last.pth"], "run to resume not found"),
    (["train", "--data", "/nonexistent/imagenet", "--epochs", "2", "--warmup-epochs", "1"], "dataset folder not found"),
    (["train", "--dataset", "fashion-mnist", "--reprob", "2"], "reprob must be within"),
    (["train", "--dataset", "fashion-mnist", "--warmup-epochs", "10", "--epochs", "1"],
     "warmup_epochs (10) must be shorter than the run (1 epoch(s))"),
    (["train", "--dataset", "fashion-mnist", "--model-kwargs", "foo=1"], "model 'cyclemlp_b1' has no argument 'foo'"),
    (["eval", "--dataset", "fashion-mnist"], "no weights given"),
    (["eval", "--checkpoint", "/nonexistent.pth", "--dataset", "fashion-mnist"], "checkpoint not found"),
    (["predict", "/nonexistent.png", "--checkpoint", "/nonexistent.pth"], "checkpoint not found"),
    (["export", "--model", "cyclemlp_b1"], "no weights given"),
    (["export", "--random-weights"], "--random-weights needs --model NAME"),
    (["detect", "train", "--backbone-kwargs", "foo=1"], "model 'cyclemlp_b1' has no argument 'foo'"),
    (["segment", "train", "--backbone-kwargs", "foo=1"], "model 'cyclemlp_b1' has no argument 'foo'"),
])
def test_mistakes_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cyclemlp {' '.join(argv[:2]) if argv[0] in ('detect', 'segment') else argv[0]}: error: ")
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, message", [
    (["train", "--model-kwargs", "dims"], "argument --model-kwargs: 'dims' is not KEY=VALUE"),
    (["eval", "--model-kwargs", "dims"], "argument --model-kwargs: 'dims' is not KEY=VALUE"),
    (["predict", "x.png", "--model-kwargs", "dims"], "argument --model-kwargs: 'dims' is not KEY=VALUE"),
    (["train", "--model-kwargs", "dims=(16,32,64"], "dims=(16,32,64: '(16,32,64' is not a Python literal"),
    (["train", "--recipe", "cifar"], "argument --recipe: invalid choice: 'cifar'"),
    (["train", "--epochs", "three"], "argument --epochs: invalid int value: 'three'"),
    (["train", "--img-size", "32x48"], "argument --img-size: this command takes a square input size"),
    (["export", "--img-size", "224 224"], "argument --img-size: an input size is N or HxW"),
    (["eval", "--batch-size"], "argument -b/--batch-size: expected one argument"),
    (["erf", "--out", "x"], "unrecognized arguments: --out"),
    (["predict"], "the following arguments are required: IMAGE"),
])
def test_malformed_arguments_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err


def test_predict_reports_a_folder_of_images_and_a_bad_file(narrow_run, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    FashionMNIST(split="test")[0][0].save(folder / "a.png")
    (folder / "b.png").write_text("not an image")
    code = main(["predict", str(folder), str(tmp_path / "missing.png"), "--checkpoint", str(narrow_run),
                 "--json", str(tmp_path / "out.json")])
    captured = capsys.readouterr()
    assert code == 2 and captured.out.startswith(str(folder / "a.png"))
    assert f"error: {folder / 'b.png'}: cannot read the image" in captured.err
    assert f"error: {tmp_path / 'missing.png'}: no such file or folder" in captured.err
    rows = {r["path"]: r for r in json.loads((tmp_path / "out.json").read_text())}
    assert rows[str(folder / "a.png")]["classes"] and rows[str(folder / "b.png")]["error"]


def test_every_option_shows_its_default_in_help():
    import argparse

    from cyclemlp.cli import build_parser

    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    checked = 0
    for parser in parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            if not action.option_strings or switch or action.dest in ("help", "version", "resume"):
                continue  # positionals, and switches (off unless given)
            text = formatter._get_help_string(action) or ""
            if action.default is None and action.const is None and parser.prog != "cyclemlp train":
                continue  # an optional value: unset unless given
            assert "default" in text.lower() or "auto" in text, f"{parser.prog} {action.option_strings}: {text!r}"
            checked += 1
    assert checked > 120


def test_the_command_line_starts_without_pytorch():
    code = ("import sys; from cyclemlp.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['detect', 'train', '--help'], ['erf', '--help']):\n"
            "    try: main(argv)\n"
            "    except SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'timm', 'numpy') if m in sys.modules))")
    done = run_cli(cmd=[sys.executable, "-c", code])
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", done.stderr


def test_nan_loss_stops_the_command(tmp_path, capsys):
    code = main(["train", *TINY_ARGS, "--epochs", "2", "-j", "0", "--train-subset", "96", "--lr", "1e30",
                 "--warmup-epochs", "0", "--output", str(tmp_path / "nan")])
    err = capsys.readouterr().err
    assert code == 1 and "cyclemlp train: stopped: training loss is" in err and "no checkpoint had been written" in err
