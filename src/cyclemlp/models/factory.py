"""Rebuilding models: by name with clear errors, and from checkpoint files alone.

A project checkpoint records how its model was made (model name and constructor arguments,
classes, input channels and preprocessing) under ``run`` (``.pth``) or in its safetensors
metadata, so the file alone rebuilds the model; other files (the authors' releases, timm state
dicts) need the model name.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from ..io import CheckpointError, CheckpointMismatchError, read_checkpoint
from .checkpoint import read_state_dict

__all__ = ["data_config", "load_weights", "model_from_checkpoint", "read_run_info"]

logger = logging.getLogger(__name__)


def read_run_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``run`` record of a project checkpoint (``.pth`` or safetensors), or None."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: read only the header
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
        except Exception as err:  # noqa: BLE001  (safetensors raises its own error types)
            raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
        return json.loads(meta["run"]) if "run" in meta else None
    state = read_checkpoint(path)
    return dict(state["run"]) if isinstance(state, Mapping) and isinstance(state.get("run"), Mapping) else None


def _classifier_outputs(model_name: str, state: Mapping[str, torch.Tensor]) -> int | None:
    """Class count of a state dict, from the classifier named by the model's pretrained config."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    names = cfg.classifier if cfg is not None and cfg.classifier else "head"
    for name in [names] if isinstance(names, str) else list(names):
        for prefix in ("", "module."):
            weight = state.get(f"{prefix}{name}.weight")
            if weight is not None and weight.dim() >= 1:
                return int(weight.shape[0])
    return None


def load_weights(model: nn.Module, path: str | os.PathLike, reset_head: bool = False, use_ema: bool = False) -> str:
    """Load a file's weights into ``model`` and return a one-paragraph report.

    CycleMLP models go through :func:`cyclemlp.load_checkpoint` (authors' layout, offset checks);
    other models need a state dict in their own layout. ``reset_head`` keeps the model's classifier
    when the file's has another class count.
    """
    from .cyclemlp import CycleMLP

    target = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    if isinstance(target, CycleMLP):
        from .checkpoint import load_checkpoint

        return str(load_checkpoint(target, path, strict=not reset_head, reset_head=reset_head, use_ema=use_ema))
    state, container = read_state_dict(path, use_ema=use_ema)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    expected = target.state_dict()
    shape_bad = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    notes = []
    if reset_head and shape_bad:
        notes.append(f"classifier re-initialised ({', '.join(shape_bad)}: another class count)")
        for key in shape_bad:
            del state[key]
        shape_bad = []
    missing = [k for k in expected if k not in state and not (reset_head and k in shape_bad)]
    unexpected = [k for k in state if k not in expected]
    if shape_bad or missing or unexpected:
        problems = []
        if shape_bad:
            problems.append("shape mismatch (file vs model): " + "; ".join(
                f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in shape_bad[:8]))
        if missing:
            problems.append(f"missing in the file ({len(missing)}): {', '.join(missing[:8])}")
        if unexpected:
            problems.append(f"not in the model ({len(unexpected)}): {', '.join(unexpected[:8])}")
        raise CheckpointMismatchError(f"{path} does not fit {type(target).__name__}:\n  " + "\n  ".join(problems))
    target.load_state_dict(state)
    where = f"['{container}']" if container else "(bare state dict)"
    report = "\n".join([f"loaded {len(state)}/{len(expected)} tensors from {path} {where}"] + [f"  {n}" for n in notes])
    logger.info("%s", report)
    return report


def model_from_checkpoint(
    checkpoint: str | os.PathLike | None,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    pretrained: bool = False,
    use_ema: bool = False,
) -> tuple[nn.Module, dict[str, Any] | None, str]:
    """Build the model a checkpoint was trained as, and load it: ``(model, run info, report)``.

    ``model``/``model_kwargs`` override (or, for files without a run record, provide) the
    architecture; the class count comes from the file's classifier unless given.
    """
    import cyclemlp  # noqa: F401  (registers CycleMLP with timm)

    if checkpoint is None and not pretrained:
        raise ValueError("no weights given: pass --checkpoint PATH (or --pretrained to let timm fetch them)")
    run = read_run_info(checkpoint) if checkpoint else None
    if run and run.get("custom_model") and model is None:
        raise ValueError(
            f"{checkpoint} was trained with a custom model factory ({run.get('model')}); build that model "
            "and call cyclemlp.training.evaluate.load_weights, or pass --model"
        )
    name = model or (run or {}).get("model")
    if name is None:
        raise ValueError(f"{checkpoint} does not record its architecture; pass --model NAME")
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; see timm.list_models() (CycleMLP: cyclemlp_b1 ...)")
    kwargs = dict((run or {}).get("model_kwargs", {}) if model is None or model == (run or {}).get("model") else {})
    kwargs.update(model_kwargs or {})
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if run:
        kwargs.setdefault("in_chans", run.get("in_chans", 3))
        num_classes = num_classes or run.get("num_classes")
    if checkpoint and num_classes is None:
        state, _ = read_state_dict(checkpoint, use_ema=use_ema)
        num_classes = _classifier_outputs(name, state)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        net = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    except TypeError as err:
        raise ValueError(f"model {name!r} does not accept {kwargs}: {err}") from err
    report = load_weights(net, checkpoint, use_ema=use_ema) if checkpoint else f"{name}: timm's pretrained weights"
    return net.eval(), run, report


def data_config(model: nn.Module, run: Mapping[str, Any] | None, img_size: int | None,
                 crop_pct: float | None, interpolation: str | None) -> dict[str, Any]:
    if run and run.get("data_config"):
        cfg = dict(run["data_config"])
        cfg["input_size"] = tuple(cfg["input_size"])
    else:
        cfg = resolve_data_config({}, model=model)
    if img_size:
        cfg["input_size"] = (cfg["input_size"][0], img_size, img_size)
    if crop_pct is not None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be within (0, 1]; got {crop_pct}")
        cfg["crop_pct"] = crop_pct
    if interpolation:
        cfg["interpolation"] = interpolation
    cfg["mean"], cfg["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
    return cfg


