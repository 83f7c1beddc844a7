"""Rebuilding models: by name with clear errors, and from a checkpoint file alone.

A project checkpoint records how its model was made: the model name and its full constructor
arguments, the classes, the input channels and the preprocessing, under ``run`` in a ``.pth``
training checkpoint or in the metadata of a ``.safetensors`` file. :func:`model_from_checkpoint`
rebuilds exactly that model from the file alone. Other files (the authors' releases, timm state
dicts) name no model: they need ``model`` (and ``model_kwargs`` where the model is not a
registered configuration).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
from typing import Any, Mapping

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from ..io import CheckpointError, CheckpointMismatchError, checkpoint_file, read_checkpoint
from .checkpoint import read_state_dict

__all__ = [
    "backbone_arguments", "check_model_arguments", "checkpoint_file", "create_model", "data_config", "load_weights",
    "model_args", "model_from_checkpoint", "read_run_info",
]

logger = logging.getLogger(__name__)


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with one-line errors for an unknown model or argument."""
    import cyclemlp  # noqa: F401  (registers CycleMLP with timm)

    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; see timm.list_models() (CycleMLP: cyclemlp_b1 ... cyclemlp_b5, "
                         "cyclemlp_t, cyclemlp_s, cyclemlp_b)")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as err:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unknown:
            known = _cyclemlp_arguments(name)
            hint = f"; its arguments: {', '.join(known)}" if known else ""
            raise ValueError(f"model {name!r} has no argument {unknown.group(1)!r}{hint}") from err
        raise ValueError(f"model {name!r} cannot be built with {_show_kwargs(kwargs)}: {err}") from err


def check_model_arguments(name: str, kwargs: Mapping[str, Any]) -> None:
    """Raise ValueError naming an argument that a registered CycleMLP does not take (other models
    are checked when they are built)."""
    known = _cyclemlp_arguments(name)
    unknown = [k for k in kwargs if known and k not in known]
    if unknown:
        raise ValueError(f"model {name!r} has no argument {unknown[0]!r}; its arguments: {', '.join(known)}")


# Arguments of a classifier that a dense-prediction backbone does not inherit from its weights:
# they concern the classifier or regularisation, not the layers whose weights are loaded.
_NOT_ARCHITECTURE = frozenset({"drop_rate", "drop_path_rate", "global_pool", "dense_norms"})


def backbone_arguments(
    name: str | None, kwargs: Mapping[str, Any], weights: str | os.PathLike | None, default: str
) -> tuple[str, dict[str, Any]]:
    """The backbone of a dense model: ``name`` (else ``default``) and ``kwargs`` — for a project
    checkpoint given as ``weights``, its recorded model and architecture, so that the weights fit.

    ``name`` and ``kwargs`` may repeat the record; an architecture argument that differs from it
    is an error. Regularisation (``drop_path_rate``) stays the caller's choice.
    """
    from ..training.config import jsonable

    run = read_run_info(checkpoint_file(weights)) if weights is not None else None
    if not run or run.get("custom_model"):
        name = name or default
        check_model_arguments(name, kwargs)
        return name, dict(kwargs)
    if name is not None and name != run["model"]:
        raise ValueError(f"{weights} holds a {run['model']}; --backbone {name} differs (leave it out)")
    recorded = {k: _as_python(v) for k, v in run.get("model_kwargs", {}).items() if k not in _NOT_ARCHITECTURE}
    differ = [k for k, v in kwargs.items() if k in recorded and jsonable(v) != jsonable(recorded[k])]
    if differ:
        raise ValueError(f"{weights} records {', '.join(f'{k}={recorded[k]!r}' for k in differ)}; the backbone "
                         f"arguments give {', '.join(f'{k}={kwargs[k]!r}' for k in differ)}")
    merged = {**recorded, **kwargs}
    check_model_arguments(run["model"], merged)
    return run["model"], merged


def _cyclemlp_arguments(name: str) -> list[str]:
    from .cyclemlp import MODEL_CONFIGS, CycleMLP

    if name not in MODEL_CONFIGS:
        return []
    return [p for p in inspect.signature(CycleMLP.__init__).parameters if p not in ("self", "device", "dtype")]


def _show_kwargs(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no arguments"


def model_args(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The full constructor arguments of model ``name`` built with ``kwargs`` (JSON-ready; without
    ``num_classes`` and ``in_chans``, recorded apart): a registered CycleMLP's every argument,
    another timm model's given ones (timm builds those through layers of defaults of its own)."""
    from ..training.config import jsonable
    from .cyclemlp import MODEL_CONFIGS, CycleMLP

    args = dict(kwargs)
    if name in MODEL_CONFIGS:
        skip = ("self", "in_chans", "num_classes", "device", "dtype")
        defaults = {p.name: p.default for p in inspect.signature(CycleMLP.__init__).parameters.values()
                    if p.name not in skip and p.default is not inspect.Parameter.empty}
        args = {**defaults, **MODEL_CONFIGS[name].as_kwargs(), **args}
    args.pop("num_classes", None)
    args.pop("in_chans", None)
    return jsonable(args)


def read_run_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``run`` record of a project checkpoint (``.pth`` or safetensors, or a run folder), or None."""
    path = checkpoint_file(path)
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


def _as_python(value: Any) -> Any:
    """JSON lists back to the tuples model constructors take."""
    return tuple(_as_python(v) for v in value) if isinstance(value, list) else value


def model_from_checkpoint(
    checkpoint: str | os.PathLike | None,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    pretrained: bool = False,
    use_ema: bool = False,
) -> tuple[nn.Module, dict[str, Any] | None, str]:
    """Build the model a checkpoint holds and load it: ``(model in eval mode, run record, report)``.

    Args:
        checkpoint: a file (``.pth``, ``.safetensors``) or a run folder (its best, else last,
            checkpoint); None with ``pretrained`` for timm's pretrained weights.
        model, model_kwargs, num_classes: the architecture of a file that does not record it (the
            authors' releases, timm state dicts). For the project's files they may only repeat
            the record: a differing value is an error, never a silently different model.
        use_ema: the EMA weights of a training checkpoint.
    """
    from ..training.config import jsonable

    if checkpoint is None and not pretrained:
        raise ValueError("no weights given: pass --checkpoint PATH (or --pretrained to let timm fetch them)")
    path = checkpoint_file(checkpoint) if checkpoint is not None else None
    run = read_run_info(path) if path is not None else None
    kwargs = dict(model_kwargs or {})
    if run:
        if run.get("custom_model"):
            raise ValueError(
                f"{path} was trained with a custom model factory ({run.get('model')}); build that model and load the "
                "file with cyclemlp.models.factory.load_weights"
            )
        name = run["model"]
        recorded = dict(run.get("model_kwargs", {}))
        given = {"model": model, "num_classes": num_classes, **kwargs}
        record = {"model": name, "num_classes": run.get("num_classes"), **recorded}
        differ = [k for k, v in given.items() if v is not None and jsonable(v) != record.get(k, _MISSING)]
        if differ:
            raise ValueError(
                f"{path} records its model; " + "; ".join(
                    f"{k}: recorded {record[k]!r}, given {given[k]!r}" if k in record else
                    f"{k}={given[k]!r} is not among its arguments" for k in differ)
                + " (leave --model and --model-kwargs out for the project's checkpoints)"
            )
        kwargs = {k: _as_python(v) for k, v in recorded.items()}
        kwargs["in_chans"] = run.get("in_chans", 3)
        num_classes = run.get("num_classes")
    else:
        if model is None:
            raise ValueError(f"{path} does not record its architecture; pass --model NAME" if path is not None
                             else "pass --model NAME for timm's pretrained weights")
        name = model
        if path is not None and num_classes is None:
            state, _ = read_state_dict(path, use_ema=use_ema)
            num_classes = _classifier_outputs(name, state)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    net = create_model(name, pretrained=pretrained and path is None, **kwargs)
    report = load_weights(net, path, use_ema=use_ema) if path is not None else f"{name}: timm's pretrained weights"
    return net.eval(), run, report


_MISSING = object()


def data_config(model: nn.Module, run: Mapping[str, Any] | None, img_size: int | tuple[int, int] | None = None,
                crop_pct: float | None = None, interpolation: str | None = None) -> dict[str, Any]:
    """Preprocessing of a model: its record's (a project checkpoint), else the model's own, with
    the given values replacing those."""
    if run and run.get("data_config"):
        cfg = dict(run["data_config"])
        cfg["input_size"] = tuple(cfg["input_size"])
    else:
        cfg = resolve_data_config({}, model=model)
    if img_size:
        height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
        cfg["input_size"] = (cfg["input_size"][0], height, width)
    if crop_pct is not None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be within (0, 1]; got {crop_pct}")
        cfg["crop_pct"] = crop_pct
    if interpolation:
        cfg["interpolation"] = interpolation
    cfg["mean"], cfg["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
    return cfg


