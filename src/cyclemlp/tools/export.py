"""Export to ONNX, TorchScript and ``torch.export`` programs, with dynamic batch and image size.

Cycle FC is a zero pad plus a gather in graph form, so an exported CycleMLP needs no
DeformConv: ONNX opset 17 has every operator it uses. Each export is checked against the eager
model at three resolutions from the same file before it is moved into place.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..io import atomic_write

__all__ = ["FORMATS", "ExportResult", "export_model", "check_resolutions"]

FORMATS: tuple[str, ...] = ("onnx", "torchscript", "exported-program")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}


@dataclass
class ExportResult:
    path: Path
    format: str
    opset: int | None
    max_abs_diff: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        checks = ", ".join(f"{size}: {diff:.1e}" for size, diff in self.max_abs_diff.items())
        opset = f", opset {self.opset}" if self.opset else ""
        return f"wrote {self.path} ({self.format}{opset}); max |exported - eager| at {checks}"


def check_resolutions(img_size: Sequence[int]) -> list[tuple[int, int]]:
    """Three different resolutions around ``img_size``: itself, a smaller non-square one and a
    larger non-square one (never below 64 pixels per side)."""
    h, w = img_size
    return [(h, w), (max(64, (h * 3) // 4 + 1), max(64, w - 31)), (h + 37, w + 64)]


def _onnx(model: nn.Module, example: torch.Tensor, path: str, opset: int) -> None:
    axes = {"image": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch"}}
    if opset < 18:
        # The TorchScript-based exporter writes opset 17 directly.
        torch.onnx.export(
            model, (example,), path, input_names=["image"], output_names=["output"],
            dynamic_axes=axes, opset_version=opset, dynamo=False,
        )
    else:
        batch, height, width = (torch.export.Dim(n, min=m, max=8192) for n, m in
                                (("batch", 1), ("height", 64), ("width", 64)))
        program = torch.onnx.export(
            model, (example,), input_names=["image"], output_names=["output"],
            dynamic_shapes={"x": {0: batch, 2: height, 3: width}}, opset_version=opset, dynamo=True,
        )
        program.save(path)


def _onnx_runner(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])

    return run


def _exported_program(model: nn.Module, example: torch.Tensor, path: str) -> None:
    # Maps must stay larger than 1x1 through stride 32 for one graph to cover every size.
    batch = torch.export.Dim("batch", min=1, max=4096)
    height = torch.export.Dim("height", min=64, max=8192)
    width = torch.export.Dim("width", min=64, max=8192)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch, 2: height, 3: width},))
    torch.export.save(program, path)


@torch.no_grad()
def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "onnx",
    img_size: Sequence[int] = (224, 224),
    opset: int = 17,
    in_chans: int | None = None,
    atol: float = 1e-4,
) -> ExportResult:
    """Export ``model`` (eval mode, CPU) and check it at three resolutions against eager PyTorch.

    Args:
        model: any image model taking ``(B, C, H, W)``.
        path: destination file; written only after the check passed (atomically).
        format: ``"onnx"``, ``"torchscript"`` (trace) or ``"exported-program"`` (torch.export).
        img_size: example ``(H, W)``; the batch and both sizes stay dynamic in the file.
        opset: ONNX opset (17 or newer).
        in_chans: input channels (default: ``model.in_chans`` or 3).
        atol: largest allowed absolute difference to eager outputs.

    Raises:
        ValueError: unknown format, bad sizes, or an export whose outputs differ from eager.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {FORMATS}")
    if len(img_size) != 2 or min(img_size) < 64:
        raise ValueError(f"img_size must be (H, W) with both at least 64; got {tuple(img_size)}")
    if format == "onnx" and opset < 17:
        raise ValueError(f"ONNX export needs opset 17 or newer (LayerNormalization); got {opset}")
    model = model.eval().cpu()
    in_chans = in_chans or getattr(model, "in_chans", 3)
    example = torch.randn(2, in_chans, *img_size)
    sizes = check_resolutions(img_size)
    path = Path(path)
    with warnings.catch_warnings():
        # tracing and the exporters narrate constant folding and constants; the checks below
        # are what matters
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        diffs, data = _export_and_check(model, example, format, opset, sizes, in_chans, atol)
    atomic_write(path, lambda tmp_path: Path(tmp_path).write_bytes(data))
    return ExportResult(path=path, format=format, opset=opset if format == "onnx" else None, max_abs_diff=diffs)


def _export_and_check(
    model: nn.Module,
    example: torch.Tensor,
    format: str,
    opset: int,
    sizes: list[tuple[int, int]],
    in_chans: int,
    atol: float,
) -> tuple[dict[str, float], bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_file = os.path.join(tmp, "model" + SUFFIX[format])
        run: Callable[[torch.Tensor], torch.Tensor]
        if format == "onnx":
            _onnx(model, example, tmp_file, opset)
            run = _onnx_runner(tmp_file)
        elif format == "torchscript":
            torch.jit.trace(model, example, check_trace=False).save(tmp_file)
            run = torch.jit.load(tmp_file)
        else:
            _exported_program(model, example, tmp_file)
            run = torch.export.load(tmp_file).module()
        diffs = {}
        for i, (h, w) in enumerate(sizes):
            x = torch.randn(1 + i, in_chans, h, w)
            diff = (run(x) - model(x)).abs().max().item()
            diffs[f"{1 + i}x{h}x{w}"] = diff
            if not diff <= atol:
                raise ValueError(
                    f"{format} export differs from eager PyTorch by {diff:.2e} at input {1 + i}x{h}x{w} "
                    f"(allowed {atol:.0e}); nothing was written"
                )
        return diffs, Path(tmp_file).read_bytes()
