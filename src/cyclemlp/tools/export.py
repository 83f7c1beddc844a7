"""Export to ONNX, TorchScript and ``torch.export`` programs, with dynamic batch and image size.

Cycle FC is a zero pad plus a gather in graph form, so an exported CycleMLP needs no
DeformConv: ONNX opset 17 has every operator it uses. Each export is checked against the eager
model at two resolutions from the same file before it is moved into place, and can carry the
model's record (classes, preprocessing) as metadata.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..io import atomic_write

if TYPE_CHECKING:  # torch is imported where an export runs, so that the command line starts fast
    import torch
    from torch import nn

__all__ = ["FORMATS", "ExportResult", "export_model", "check_resolutions"]

FORMATS: tuple[str, ...] = ("onnx", "torchscript", "exported-program")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}


@dataclass
class ExportResult:
    path: Path
    format: str
    opset: int | None
    # per checked input: max |exported - eager| / max |eager|
    max_rel_diff: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        checks = ", ".join(f"{size}: {diff:.1e}" for size, diff in self.max_rel_diff.items())
        opset = f", opset {self.opset}" if self.opset else ""
        notes = "".join(f"\n  {note}" for note in self.notes)
        return f"wrote {self.path} ({self.format}{opset}); max relative difference to eager PyTorch at {checks}{notes}"


def check_resolutions(img_size: Sequence[int]) -> list[tuple[int, int]]:
    """The input sizes an export is checked at: ``img_size`` itself and a larger, non-square one."""
    h, w = img_size
    return [(h, w), (h + h // 2 + 1, w + w // 4 + 3)]


def _onnx(model: nn.Module, example: torch.Tensor, path: str, opset: int) -> None:
    import torch

    axes = {"image": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch"}}
    if opset < 18:
        # The TorchScript-based exporter writes opset 17 directly.
        torch.onnx.export(
            model, (example,), path, input_names=["image"], output_names=["output"],
            dynamic_axes=axes, opset_version=opset, dynamo=False,
        )
    else:
        batch, height, width = (torch.export.Dim(n, min=1, max=8192) for n in ("batch", "height", "width"))
        program = torch.onnx.export(
            model, (example,), input_names=["image"], output_names=["output"],
            dynamic_shapes={"x": {0: batch, 2: height, 3: width}}, opset_version=opset, dynamo=True,
        )
        program.save(path)


def _onnx_runner(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])

    return run


def _exported_program(model: nn.Module, example: torch.Tensor, path: str, notes: list[str]) -> bool:
    """Export with dynamic batch, height and width; where the example's feature maps shrink to 1x1
    (torch.export specialises sizes of 1), the height and width are fixed at the example's.
    Returns whether the spatial sizes stayed dynamic."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    # sizes from the example's (at most 64) up: below that, some feature map would be 1x1
    height, width = (torch.export.Dim(n, min=min(64, size), max=8192)
                     for n, size in (("height", example.shape[2]), ("width", example.shape[3])))
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch, 2: height, 3: width},))
        dynamic = True
    except Exception as err:  # noqa: BLE001  (torch.export raises several types for violated constraints)
        if "Constraints violated" not in str(err):
            raise
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        notes.append(f"height and width are fixed at {tuple(example.shape[2:])}: a feature map is 1x1 there, and "
                     "torch.export specialises sizes of 1 (export at a larger --img-size for a dynamic size)")
        dynamic = False
    torch.export.save(program, path)
    return dynamic


def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "onnx",
    img_size: Sequence[int] = (224, 224),
    opset: int = 17,
    in_chans: int | None = None,
    rtol: float = 1e-4,
    metadata: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Export ``model`` (eval mode, CPU) and check it against eager PyTorch before writing it.

    The file takes any batch and (where the format allows) any height and width; it is checked at
    ``img_size`` and at a larger non-square size (:func:`check_resolutions`), with batches of 1
    and 2.

    Args:
        model: any image model taking ``(B, C, H, W)``.
        path: destination file; written only after the check passed (atomically).
        format: ``"onnx"``, ``"torchscript"`` (trace) or ``"exported-program"`` (torch.export).
        img_size: example ``(H, W)``.
        opset: ONNX opset (17 or newer).
        in_chans: input channels (default: ``model.in_chans`` or 3).
        rtol: largest allowed ``max |exported - eager| / max |eager|``.
        metadata: stored in the file as JSON strings (ONNX metadata properties; an extra file
            ``cyclemlp.json`` in TorchScript and torch.export archives), e.g. the classes and the
            preprocessing the model expects.

    Raises:
        ValueError: unknown format, bad sizes, or an export whose outputs differ from eager.
    """
    import torch

    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {FORMATS}")
    if len(img_size) != 2 or min(img_size) < 8:
        raise ValueError(f"img_size must be (H, W) with both at least 8; got {tuple(img_size)}")
    if format == "onnx" and opset < 17:
        raise ValueError(f"ONNX export needs opset 17 or newer (LayerNormalization); got {opset}")
    model = model.eval().cpu()
    in_chans = in_chans or getattr(model, "in_chans", 3)
    example = torch.randn(2, in_chans, *img_size)
    path = Path(path)
    with warnings.catch_warnings(), torch.no_grad():
        # tracing and the exporters narrate constant folding and constants; the checks below
        # are what matters
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        result, data = _export_and_check(model, example, format, opset, tuple(img_size), in_chans, rtol, metadata)
    atomic_write(path, lambda tmp_path: Path(tmp_path).write_bytes(data))
    result.path = path
    return result


def _export_and_check(
    model: nn.Module,
    example: torch.Tensor,
    format: str,
    opset: int,
    img_size: tuple[int, int],
    in_chans: int,
    rtol: float,
    metadata: Mapping[str, Any] | None,
) -> tuple[ExportResult, bytes]:
    import torch

    extra = {"cyclemlp.json": json.dumps(dict(metadata))} if metadata else {}
    notes: list[str] = []
    sizes = check_resolutions(img_size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_file = os.path.join(tmp, "model" + SUFFIX[format])
        run: Callable[[torch.Tensor], torch.Tensor]
        if format == "onnx":
            _onnx(model, example, tmp_file, opset)
            if metadata:
                import onnx

                graph = onnx.load(tmp_file)
                onnx.helper.set_model_props(graph, {k: v if isinstance(v, str) else json.dumps(v)
                                                    for k, v in metadata.items()})
                onnx.save(graph, tmp_file)
            run = _onnx_runner(tmp_file)
        elif format == "torchscript":
            torch.jit.save(torch.jit.trace(model, example, check_trace=False), tmp_file, _extra_files=extra)
            run = torch.jit.load(tmp_file)
        else:
            if not _exported_program(model, example, tmp_file, notes):
                sizes = sizes[:1]
            if extra:  # torch.export.save takes the extra files with the program: write it again
                program = torch.export.load(tmp_file)
                torch.export.save(program, tmp_file, extra_files=extra)
            run = torch.export.load(tmp_file).module()
        diffs = {}
        for i, (h, w) in enumerate(sizes):
            batch = 1 + i % 2
            x = torch.randn(batch, in_chans, h, w)
            eager = model(x)
            diff = ((run(x) - eager).abs().max() / eager.abs().max().clamp(min=1e-12)).item()
            diffs[f"{batch}x{in_chans}x{h}x{w}"] = diff
            if not diff <= rtol:
                raise ValueError(
                    f"{format} export differs from eager PyTorch by {diff:.2e} (relative) at input "
                    f"{batch}x{in_chans}x{h}x{w} (allowed {rtol:.0e}); nothing was written"
                )
        result = ExportResult(path=Path(tmp_file), format=format, opset=opset if format == "onnx" else None,
                              max_rel_diff=diffs, notes=notes)
        return result, Path(tmp_file).read_bytes()
