"""CycleMLP weights: the authors' key layout, conversion, checks and loading.

Accepted files: the authors' releases (``{'model': state_dict, ...}`` training containers or bare
state dicts, classification or dense-backbone keys, optionally under a detector's ``backbone.``
prefix) and the project's own (safetensors or torch). Files are read with
``torch.load(weights_only=True)`` or safetensors (:mod:`cyclemlp.io`), so loading never executes
code from a file.

All knowledge of the authors' key layout lives in :func:`convert_state_dict`.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..io import CheckpointError, CheckpointMismatchError, read_checkpoint
from ..layers.cycle_fc import CycleFC, cycle_offsets, offset_table

__all__ = [
    "LoadReport",
    "checkpoint_filter_fn",
    "convert_state_dict",
    "describe_offsets",
    "load_checkpoint",
    "read_state_dict",
]

logger = logging.getLogger(__name__)

_CONTAINER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")


def _unwrap(checkpoint: Any, path: str, use_ema: bool) -> tuple[dict[str, torch.Tensor], str | None]:
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    order = ("model_ema", "state_dict_ema", "model", "state_dict") if use_ema else _CONTAINER_KEYS
    container = None
    for key in order:
        if isinstance(checkpoint.get(key), Mapping):
            container = key
            break
    state = checkpoint[container] if container else checkpoint
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path} is not a state dict: entries {bad[:5]} are not tensors (known containers: "
            f"{', '.join(_CONTAINER_KEYS)})"
        )
    if not state:
        raise CheckpointError(f"{path} holds an empty state dict")
    return dict(state), container


def read_state_dict(path: str | os.PathLike, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict of a checkpoint file and the container key it sat under (or None).

    The authors evaluated their non-EMA weights, so ``'model'`` is preferred unless ``use_ema``.
    """
    return _unwrap(read_checkpoint(path), str(path), use_ema)


# --- the authors' layout ------------------------------------------------------------------------

_STRIP_PREFIXES = ("module.", "_orig_mod.")


def _authors_key(key: str) -> str:
    """Map one authors' key (B1-B5 PVT layout, or the Swin-style layout assumed for T/S/B)."""
    if key.startswith("patch_embed."):
        return "stem." + key[len("patch_embed."):]
    m = re.match(r"^network\.(\d+)\.proj\.(.*)$", key)
    if m:
        index = int(m.group(1))
        return f"stages.{index // 2 + 1}.downsample.proj.{m.group(2)}"
    m = re.match(r"^network\.(\d+)\.(\d+)\.(.*)$", key)
    if m:
        stage, block, rest = int(m.group(1)) // 2, m.group(2), m.group(3)
        return f"stages.{stage}.blocks.{block}.{_block_key(rest)}"
    m = re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.(.*)$", key)
    if m:
        return f"stages.{m.group(1)}.blocks.{m.group(2)}.{_block_key(m.group(3))}"
    m = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", key)
    if m:  # Swin puts merging at the end of stage i; here it opens stage i + 1
        return f"stages.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    m = re.match(r"^norm([0246])\.(.*)$", key)
    if m:
        return f"stage_norms.{int(m.group(1)) // 2}.{m.group(2)}"
    return key


def _block_key(rest: str) -> str:
    for old, new in (
        ("attn.sfc_h.", "mixer.width_fc."),
        ("attn.sfc_w.", "mixer.height_fc."),
        ("attn.mlp_c.", "mixer.channel_fc."),
        ("attn.", "mixer."),
    ):
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _is_authors_layout(keys: list[str]) -> bool:
    return any(k.startswith(("network.", "patch_embed.", "layers.")) for k in keys)


def describe_offsets(offsets: torch.Tensor | Sequence[Sequence[int]]) -> str:
    """Name the stepsize/pattern that produces ``(C, 2)`` offsets, or describe them."""
    if isinstance(offsets, torch.Tensor):
        offsets = offsets.tolist()
    table = [(int(dy), int(dx)) for dy, dx in offsets]
    channels = len(table)
    reach = max(max(abs(dy), abs(dx)) for dy, dx in table)
    for k in range(1, 2 * reach + 2):
        for step in ((1, k), (k, 1)):
            if offset_table(channels, step, "official") == table:
                return f"stepsize {step}, pattern 'official'"
    for sh in range(1, 2 * reach + 2):
        for sw in range(1, 2 * reach + 2):
            if offset_table(channels, (sh, sw), "paper") == table:
                return f"stepsize {(sh, sw)}, pattern 'paper'"
    dys = sorted({dy for dy, _ in table})
    dxs = sorted({dx for _, dx in table})
    return f"an unrecognised pattern (dy in {dys}, dx in {dxs})"


def _check_offsets(key: str, tensor: torch.Tensor, module: nn.Module | None) -> None:
    if module is None:
        return  # reported as an unexpected key by the caller
    if not isinstance(module, CycleFC):
        raise CheckpointMismatchError(f"{key}: the model has no Cycle FC at this place")
    if tensor.numel() != 2 * module.in_features:
        return  # another width: the weights' shape mismatch reports it
    pairs = tensor.reshape(-1, 2)
    if not torch.equal(pairs, pairs.round()):
        raise CheckpointMismatchError(f"{key}: offsets are not integers")
    if not torch.equal(pairs.long().cpu(), cycle_offsets(module.in_features, module.stepsize, module.pattern)):
        raise CheckpointMismatchError(
            f"{key}: the file was trained with {describe_offsets(pairs)}, but the model uses "
            f"stepsize {module.stepsize}, pattern {module.pattern!r}; build the model with the "
            "file's stepsize and pattern"
        )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Bring a state dict into this project's layout (timm's ``checkpoint_filter_fn``).

    Authors' keys are renamed, their ``(C, C, 1, 1)`` Cycle FC weights flattened, and their
    ``offset`` buffers compared with the model's offsets (then dropped). A ``backbone.`` prefix
    (a whole detector/segmentor file) keeps only the backbone. Project files pass unchanged.
    """
    state = {}
    for key, value in state_dict.items():
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if not _is_authors_layout(list(state)):
        return state
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new_key = _authors_key(key)
        if new_key.endswith(".offset"):
            _check_offsets(key, value, modules.get(new_key[: -len(".offset")]))
            continue
        if re.search(r"mixer\.(width|height)_fc\.weight$", new_key) and value.dim() == 4:
            value = value.flatten(1)
        out[new_key] = value
    return out


# --- loading ------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did."""

    path: str
    layout: str
    container: str | None
    loaded: int
    total: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        where = f"['{self.container}']" if self.container else "(bare state dict)"
        lines = [
            f"loaded {self.loaded}/{self.total} tensors from {self.path} {where}, {self.layout} layout"
        ]
        if self.missing:
            lines.append(f"  left at initialisation ({len(self.missing)}): {_short(self.missing)}")
        if self.unexpected:
            lines.append(f"  ignored from the file ({len(self.unexpected)}): {_short(self.unexpected)}")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def _short(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _is_backbone(key: str) -> bool:
    return key.startswith(("stem.", "stages."))


def _target(model: nn.Module) -> nn.Module:
    # timm's features_only wrapper keeps the network under .model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "stages") and not hasattr(model, "stages"):
        return inner
    return model


def _match(
    state: dict[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    strict: bool,
    reset_head: bool,
    notes: list[str],
    source: str,
) -> tuple[list[str], list[str], list[str]]:
    """Compare a converted state dict with the model's; raise on anything that is not allowed.

    Removes skipped head entries from ``state``. Returns (matched, missing, unexpected) keys.
    """
    mismatched = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if reset_head:
        head_bad = [m for m in mismatched if m[0].startswith("head.")]
        if head_bad:
            notes.append(
                f"classifier re-initialised: the file has {head_bad[0][1][0]} classes, the model "
                f"{head_bad[0][2][0]}"
            )
            for k, _, _ in head_bad:
                del state[k]
            mismatched = [m for m in mismatched if not m[0].startswith("head.")]
        if not any(k.startswith("head.") for k in expected):
            dropped = [k for k in state if k.startswith("head.")]
            if dropped:
                notes.append("the file's classifier is not used (the model has none)")
                for k in dropped:
                    del state[k]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]

    problems = []
    if mismatched:
        problems.append(
            "shape mismatch (key: file vs model): "
            + "; ".join(f"{k}: {a} vs {b}" for k, a, b in mismatched[:12])
            + (f"; ... (+{len(mismatched) - 12} more)" if len(mismatched) > 12 else "")
        )
    reset = {k for k in missing if reset_head and k.startswith("head.")}
    hard_missing = [k for k in missing if k not in reset and (strict or _is_backbone(k))]
    hard_unexpected = unexpected if strict else [k for k in unexpected if _is_backbone(k)]
    if hard_missing:
        problems.append(f"missing in the file ({len(hard_missing)}): {_short(hard_missing)}")
    if hard_unexpected:
        problems.append(f"not in the model ({len(hard_unexpected)}): {_short(hard_unexpected)}")
    matched = [k for k in state if k in expected]
    if not any(_is_backbone(k) for k in matched):
        problems.append("no backbone weight of the file matches the model")
    if problems:
        raise CheckpointMismatchError(
            f"{source} does not fit this model ({len(matched)} of {len(expected)} model tensors "
            "found):\n  " + "\n  ".join(problems)
        )
    return matched, missing, unexpected


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: convert, then insist that the whole backbone matches.

    The head and the dense per-stage norms are left to timm (it re-initialises a head of another
    class count).
    """
    target = _target(model)
    state = convert_state_dict(state_dict, target)
    expected = target.state_dict()
    notes: list[str] = []
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    body = {k: v for k, v in state.items() if not k.startswith("head.")}
    matched, missing, unexpected = _match(body, expected, False, False, notes, "pretrained weights")
    logger.info("pretrained weights: %d/%d tensors match; missing %s", len(matched), len(expected), _short(missing))
    return {**{k: body[k] for k in matched}, **head}


def _adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A stem convolution's weight for ``in_chans`` input channels: timm's rule from RGB; from grey,
    the one channel's weight spread evenly over the new ones (a grey image repeated over them
    gives the same response)."""
    if weight.shape[1] == 1:
        return weight.repeat(1, in_chans, 1, 1) / in_chans
    from timm.models import adapt_input_conv

    return adapt_input_conv(in_chans, weight)


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    strict: bool = True,
    reset_head: bool = False,
    adapt_in_chans: bool = False,
    use_ema: bool = False,
) -> LoadReport:
    """Load the authors' or the project's weights into a CycleMLP, reporting what was loaded.

    Args:
        model: a CycleMLP (or timm's ``features_only`` wrapper of one).
        path: ``.pth``/``.pt`` (weights_only) or ``.safetensors`` file.
        strict: every key must match. With ``strict=False`` the backbone (stem and stages) must
            still match completely; the final norm, the head and the dense per-stage norms may be
            missing (left at initialisation) or extra (ignored).
        reset_head: a classifier of another class count in the file is skipped and the model's
            head kept at initialisation (fine-tuning); otherwise that is an error.
        adapt_in_chans: convert the file's stem (RGB, or grey) to the model's ``in_chans``.
        use_ema: prefer the EMA weights of a training container.

    Raises:
        FileNotFoundError, CheckpointError: unreadable, corrupt or unsafe file.
        CheckpointMismatchError: the file is for another architecture, stepsize or pattern.
    """
    target = _target(model)
    state, container = read_state_dict(path, use_ema=use_ema)
    layout = "authors'" if _is_authors_layout([k.removeprefix("backbone.") for k in state]) else "project"
    state = convert_state_dict(state, target)
    expected = target.state_dict()
    notes: list[str] = []

    stem_key = "stem.proj.weight"
    if adapt_in_chans and stem_key in state and state[stem_key].shape != expected[stem_key].shape:
        notes.append(f"stem converted from {state[stem_key].shape[1]} to {expected[stem_key].shape[1]} input channels")
        state[stem_key] = _adapt_stem(state[stem_key], expected[stem_key].shape[1])

    matched, missing, unexpected = _match(state, expected, strict, reset_head, notes, f"{path} ({layout} layout)")
    target.load_state_dict({k: state[k] for k in matched}, strict=False)
    report = LoadReport(
        path=str(path), layout=layout, container=container, loaded=len(matched), total=len(expected),
        missing=missing, unexpected=unexpected, notes=notes,
    )
    logger.info("%s", report)
    return report
