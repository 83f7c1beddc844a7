"""CycleMLP: A MLP-like Architecture for Dense Prediction.

Chen, Xie, Ge, Liang, Luo — ICLR 2022, https://arxiv.org/abs/2107.10224

Two layouts share the same block:

* ``pvt`` (CycleMLP-B1...B5, the authors' release): overlapping 7x7/4 convolution stem and 3x3/2
  convolution downsampling between stages, no norms in either.
* ``swin`` (CycleMLP-T/S/B): 4x4/4 patch embedding with LayerNorm and Swin patch merging. The
  authors never released this code; the layout was reconstructed by matching their FLOPs.

Block (pre-norm): ``x = x + DropPath(mixer(LN(x)))``, ``x = x + DropPath(MLP(LN(x)))``. The token
mixer runs three parallel branches — Cycle FC along the width (stepsize 1xK), Cycle FC along the
height (Kx1) and a plain channel FC — and merges them with per-channel softmax weights computed
from their global mean ("split attention"), followed by a projection.

Feature maps are channels-last ``(B, H, W, C)`` inside the network. The mixer and the block run
fused kernels (:mod:`cyclemlp.layers.kernels`) unless their ``fused`` attribute is off; the
forward passes below state the function they compute (:mod:`cyclemlp.layers.config`).
"""

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, get_device_dtype
from timm.models import build_model_with_cfg, checkpoint_seq, register_notrace_function
from timm.models._features import feature_take_indices
from timm.models._registry import generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging
from torch import nn

from ..layers.config import fused_applies, use_fused
from ..layers.cycle_fc import CycleFC, Pattern, normalize_stepsize
from ..layers.kernels import cycle_block, cycle_mixer, drop_inference_cache, embed_conv
from .checkpoint import checkpoint_filter_fn, load_checkpoint

__all__ = ["CycleMLP", "CycleMixer", "CycleBlock", "MODEL_CONFIGS", "ModelConfig", "BRANCHES", "create"]

BRANCHES: tuple[str, ...] = ("width", "height", "channel")


@dataclass(frozen=True)
class ModelConfig:
    """One row of the model table: everything that defines a registered CycleMLP."""

    depths: tuple[int, ...]
    dims: tuple[int, ...]
    mlp_ratios: tuple[float, ...]
    layout: str
    drop_path_rate: float

    def as_kwargs(self) -> dict[str, Any]:
        return dict(
            depths=self.depths,
            dims=self.dims,
            mlp_ratios=self.mlp_ratios,
            layout=self.layout,
            drop_path_rate=self.drop_path_rate,
        )


# The single source of truth for every registered model (docs/design.md, sections 2 and 3).
MODEL_CONFIGS: dict[str, ModelConfig] = {
    "cyclemlp_b1": ModelConfig((2, 2, 4, 2), (64, 128, 320, 512), (4, 4, 4, 4), "pvt", 0.1),
    "cyclemlp_b2": ModelConfig((2, 3, 10, 3), (64, 128, 320, 512), (4, 4, 4, 4), "pvt", 0.1),
    "cyclemlp_b3": ModelConfig((3, 4, 18, 3), (64, 128, 320, 512), (8, 8, 4, 4), "pvt", 0.1),
    "cyclemlp_b4": ModelConfig((3, 8, 27, 3), (64, 128, 320, 512), (8, 8, 4, 4), "pvt", 0.1),
    "cyclemlp_b5": ModelConfig((3, 4, 24, 3), (96, 192, 384, 768), (4, 4, 4, 4), "pvt", 0.1),
    "cyclemlp_t": ModelConfig((2, 2, 6, 2), (96, 192, 384, 768), (4, 4, 4, 4), "swin", 0.2),
    "cyclemlp_s": ModelConfig((2, 2, 18, 2), (96, 192, 384, 768), (4, 4, 4, 4), "swin", 0.3),
    "cyclemlp_b": ModelConfig((2, 2, 18, 2), (128, 256, 512, 1024), (4, 4, 4, 4), "swin", 0.5),
}


def branch_stepsizes(stepsize: int | Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Stepsizes of the width and height branches: ``K`` gives ``(1, K)`` and ``(K, 1)``; a pair
    ``(S_H, S_W)`` is used as is by the width branch and transposed by the height branch."""
    if isinstance(stepsize, int) and not isinstance(stepsize, bool):
        if stepsize < 1:
            raise ValueError(f"stepsize must be >= 1, got {stepsize}")
        return (1, stepsize), (stepsize, 1)
    sh, sw = normalize_stepsize(stepsize)
    return (sh, sw), (sw, sh)


class CycleMixer(nn.Module):
    """CycleMLP token mixer (called ``attn`` in the authors' code).

    Three parallel branches -- Cycle FC along the width (stepsize 1xK), Cycle FC along the height
    (Kx1) and a plain channel FC -- merged with per-channel softmax weights computed from their
    global mean ("split attention"), then a projection::

        h, w, c = width_fc(x), height_fc(x), channel_fc(x)
        a = softmax over branches of reweight(mean_HW(h + w + c))
        out = proj(a_h * h + a_w * w + a_c * c)

    ``branches`` selects a subset of the three branches (for ablations). With ``fused`` set
    (default :func:`~cyclemlp.layers.config.use_fused`) the forward runs
    :func:`cyclemlp.layers.kernels.cycle_mixer`, the same function without the branch outputs.
    With ``int8`` also set (default off; :func:`cyclemlp.quantize_int8`), CPU float32 inference
    multiplies by int8 dynamic-quantized branch and projection weights: close to, not equal to, the
    float32 function.
    """

    def __init__(
        self,
        dim: int,
        stepsize: int | Sequence[int] = 3,
        pattern: Pattern = "official",
        branches: Sequence[str] = BRANCHES,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        branches = tuple(branches)
        unknown = [b for b in branches if b not in BRANCHES]
        if unknown or not branches or len(set(branches)) != len(branches):
            raise ValueError(f"branches must be a non-empty subset of {BRANCHES}; got {branches}")
        self.dim = dim
        self.branches = branches
        self.fused = use_fused()
        self.int8 = False
        width_step, height_step = branch_stepsizes(stepsize)
        self.width_fc = CycleFC(dim, dim, width_step, pattern, **dd) if "width" in branches else None
        self.height_fc = CycleFC(dim, dim, height_step, pattern, **dd) if "height" in branches else None
        self.channel_fc = nn.Linear(dim, dim, bias=False, **dd) if "channel" in branches else None
        self.reweight = Mlp(dim, dim // 4, dim * len(branches), **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and not torch.jit.is_scripting():
            if fused_applies(self, x):
                return cycle_mixer(self, x)
        batch, dim = x.shape[0], x.shape[-1]
        # h = width_fc(x), w = height_fc(x), c = channel_fc(x), as far as this mixer has them
        outs: list[torch.Tensor] = []
        if self.width_fc is not None:
            outs.append(self.width_fc(x))
        if self.height_fc is not None:
            outs.append(self.height_fc(x))
        if self.channel_fc is not None:
            outs.append(self.channel_fc(x))
        branches = torch.stack(outs, dim=-1)  # (B, H, W, C, n)
        # a = softmax over branches of reweight(mean_HW(h + w + c)); reweight's output index is channel * n + branch
        a = self.reweight(branches.sum(dim=-1).mean(dim=(1, 2))).reshape(batch, 1, 1, dim, -1).softmax(dim=-1)
        return self.proj((a * branches).sum(dim=-1))  # proj(a_h * h + a_w * w + a_c * c)

    def train(self, mode: bool = True) -> "CycleMixer":
        drop_inference_cache(self)  # the fused kernels' inference form of the weights: rebuilt when next needed
        return super().train(mode)


class CycleBlock(nn.Module):
    """Pre-norm CycleMLP block: token mixer then channel MLP, each residual with drop path.

    With ``fused`` set (default :func:`~cyclemlp.layers.config.use_fused`) the forward runs
    :func:`cyclemlp.layers.kernels.cycle_block`, the same function with the mixer's and the MLP's
    fused kernels. With ``int8`` also set (default off; :func:`cyclemlp.quantize_int8`), CPU
    float32 inference runs the channel MLP's products in int8 (dynamic quantization); the mixer
    follows its own ``int8``.
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        stepsize: int | Sequence[int] = 3,
        pattern: Pattern = "official",
        branches: Sequence[str] = BRANCHES,
        drop_path: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fused = use_fused()
        self.int8 = False
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.mixer = CycleMixer(dim, stepsize, pattern, branches, **dd)
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and not torch.jit.is_scripting():
            if fused_applies(self, x):
                return cycle_block(self, x)
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def train(self, mode: bool = True) -> "CycleBlock":
        drop_inference_cache(self)  # the fused kernels' inference form of the weights: rebuilt when next needed
        return super().train(mode)


class ConvEmbed(nn.Module):
    """Strided convolution from channels-last (or an NCHW image) to channels-last, optional LN.

    Used as the stem of both layouts and as the downsampling of the ``pvt`` layout. With ``fused``
    set (default :func:`~cyclemlp.layers.config.use_fused`) the convolution runs
    :func:`cyclemlp.layers.kernels.embed_conv`: in CPU inference the same convolution with its
    weight reordered for oneDNN once instead of on every call.
    """

    def __init__(
        self, in_chans: int, dim: int, kernel: int, stride: int, padding: int, norm: bool = False,
        channels_last_input: bool = True, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.channels_last_input = channels_last_input
        self.fused = use_fused()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride, padding, **dd)
        self.norm = nn.LayerNorm(dim, **dd) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last_input:
            x = x.permute(0, 3, 1, 2)  # an NCHW view of NHWC memory: conv keeps that format
        else:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.fused and not torch.jit.is_scripting():
            if fused_applies(self, x):
                return self.norm(embed_conv(self, x).permute(0, 2, 3, 1))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))

    def train(self, mode: bool = True) -> "ConvEmbed":
        drop_inference_cache(self)  # the fused kernels' inference form of the weights: rebuilt when next needed
        return super().train(mode)


class CycleStage(nn.Module):
    """Optional downsampling followed by a sequence of CycleMLP blocks."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        downsample: str | None,
        mlp_ratio: float,
        stepsize: int | Sequence[int],
        pattern: Pattern,
        branches: Sequence[str],
        drop_path: Sequence[float],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if downsample == "conv":
            self.downsample: nn.Module = ConvEmbed(in_dim, dim, 3, 2, 1, **dd)
        elif downsample == "merge":
            self.downsample = PatchMerging(in_dim, dim, **dd)
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *[CycleBlock(dim, mlp_ratio, stepsize, pattern, branches, drop_path[j], **dd) for j in range(depth)]
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


def _check_image(x: torch.Tensor, in_chans: int, min_size: int) -> None:
    # scripted and traced graphs keep no Python checks
    if not torch.jit.is_scripting() and not torch.jit.is_tracing():
        if x.dim() != 4 or x.shape[1] != in_chans:
            raise ValueError(
                f"CycleMLP expects images of shape (B, {in_chans}, H, W); got {tuple(x.shape)}"
            )
        if not torch.compiler.is_compiling() and min(x.shape[2], x.shape[3]) < min_size:
            raise ValueError(
                f"CycleMLP needs images of at least {min_size}x{min_size} pixels; got "
                f"{x.shape[2]}x{x.shape[3]}"
            )


torch.fx.wrap("_check_image")
register_notrace_function(_check_image)


class CycleMLP(nn.Module):
    """CycleMLP backbone and classifier.

    Args:
        depths: blocks per stage.
        dims: channels per stage.
        mlp_ratios: hidden/in ratio of each stage's channel MLP.
        layout: ``"pvt"`` (B1-B5: conv stem and conv downsampling) or ``"swin"`` (T/S/B: patch
            embedding + LN and patch merging).
        stepsize: Cycle FC stepsize of the token mixers; ``K`` means ``1xK`` and ``Kx1`` branches
            (3 in the authors' weights), a pair ``(S_H, S_W)`` a 2-D stepsize (pattern ``paper``).
        pattern: channel offset pattern, ``"official"`` or ``"paper"`` (see :mod:`cyclemlp.layers.cycle_fc`).
        branches: token-mixer branches to keep, a subset of ``("width", "height", "channel")``.
        in_chans: image channels.
        num_classes: classifier outputs; 0 for no classifier.
        global_pool: ``"avg"`` or ``""`` (no pooling in :meth:`forward_head`).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, growing linearly from 0 over all blocks.
        dense_norms: add one LayerNorm per stage output, used by :meth:`forward_intermediates`
            (the dense-prediction backbone of the paper).
        stem_stride: reduction of the stem, 4 (the paper's) or 2 or 1 for small images: ``pvt``
            keeps its 7x7 kernel (padding 2 at stride 4, else 3), so B1-B5 weights still load;
            ``swin`` uses patches of that size, so the T/S/B stem weights no longer fit.
    """

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 4, 2),
        dims: Sequence[int] = (64, 128, 320, 512),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        layout: str = "pvt",
        stepsize: int | Sequence[int] = 3,
        pattern: Pattern = "official",
        branches: Sequence[str] = BRANCHES,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        dense_norms: bool = False,
        stem_stride: int = 4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        depths, dims, mlp_ratios = tuple(depths), tuple(dims), tuple(mlp_ratios)
        if not (len(depths) == len(dims) == len(mlp_ratios)) or not depths:
            raise ValueError(
                f"depths, dims and mlp_ratios need one entry per stage; got {depths}, {dims}, {mlp_ratios}"
            )
        if layout not in ("pvt", "swin"):
            raise ValueError(f"layout must be 'pvt' or 'swin'; got {layout!r}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or ''; got {global_pool!r}")
        if type(stem_stride) is not int or stem_stride not in (1, 2, 4):
            raise ValueError(f"stem_stride must be 4 (the paper's), 2 or 1; got {stem_stride!r}")
        self.depths, self.dims, self.layout = depths, dims, layout
        self.stepsize, self.pattern, self.branches = stepsize, pattern, tuple(branches)
        self.stem_stride = stem_stride
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dims[-1]
        self.output_fmt = "NHWC"
        self._min_input = 3 if layout == "pvt" else 4

        if layout == "pvt":
            padding = 2 if stem_stride == 4 else 3  # 7x7: the paper's padding 2 at stride 4, else "same"
            self.stem = ConvEmbed(in_chans, dims[0], 7, stem_stride, padding, channels_last_input=False, **dd)
        else:
            self.stem = ConvEmbed(
                in_chans, dims[0], 4 if stem_stride == 4 else stem_stride, stem_stride, 0, norm=True,
                channels_last_input=False, **dd,
            )
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, first = [], 0
        for i, depth in enumerate(depths):
            downsample = None if i == 0 else ("conv" if layout == "pvt" else "merge")
            stages.append(
                CycleStage(
                    dims[i - 1] if i else dims[0], dims[i], depth, downsample, mlp_ratios[i],
                    stepsize, pattern, branches, rates[first:first + depth], **dd,
                )
            )
            first += depth
        self.stages = nn.Sequential(*stages)
        self.feature_info = [
            dict(num_chs=dims[i], reduction=stem_stride * 2**i, module=f"stages.{i}") for i in range(len(dims))
        ]
        self.stage_norms = nn.ModuleList(nn.LayerNorm(d, **dd) for d in dims) if dense_norms else None
        self.norm = nn.LayerNorm(dims[-1], **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # --- timm model interface -------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stage_norms\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or ''; got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        dd = get_device_dtype(self)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)
        if num_classes > 0:
            self._init_weights(self.head)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (strides 4, 8, 16, 32), through the per-stage norms if the model has them.

        ``indices``: last n stages if an int, all if None, else the listed stages. ``norm`` is
        accepted for timm compatibility; the dense norms are part of the model (``dense_norms``).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC'; got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        _check_image(x, self.in_chans, self._min_input)
        x = self.stem(x)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                feat = self.stage_norms[i](x) if self.stage_norms is not None else x
                intermediates.append(feat.permute(0, 3, 1, 2) if output_fmt == "NCHW" else feat)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if self.stage_norms is not None:
            self.stage_norms = self.stage_norms[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, C, H, W)`` -> final normalised features ``(B, H/32, W/32, C_last)``."""
        _check_image(x, self.in_chans, self._min_input)
        x = self.stages(self.stem(x))
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def load_pretrained(self, path: str) -> None:
        """timm's hook for ``pretrained=True``: authors' or project files through our loader."""
        load_checkpoint(self, path, strict=False, reset_head=True, adapt_in_chans=True)


# --- timm registration ------------------------------------------------------------------------

_RELEASE = "https://github.com/ShoufaChen/CycleMLP/releases/download/v0.1/"
_RELEASE_FILES = {
    "cyclemlp_b1": "CycleMLP_B1.pth", "cyclemlp_b2": "CycleMLP_B2.pth", "cyclemlp_b3": "CycleMLP_B3.pth",
    "cyclemlp_b4": "CycleMLP_B4.pth", "cyclemlp_b5": "CycleMLP_B5.pth", "cyclemlp_t": "CycleMLP_tiny.pth",
    "cyclemlp_s": "CycleMLP_small.pth", "cyclemlp_b": "CycleMLP_base.pth",
}


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.proj", "classifier": "head", "license": "mit",
        "paper_ids": "arXiv:2107.10224", "paper_name": "CycleMLP: A MLP-like Architecture for Dense Prediction",
        "origin_url": "https://github.com/ShoufaChen/CycleMLP",
        # Our loader reads the authors' container (prefers 'model', as they evaluated) and layout.
        "custom_load": True,
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {f"{name}.in1k": _cfg(_RELEASE + file) for name, file in _RELEASE_FILES.items()}
)


def create(variant: str, pretrained: bool = False, **kwargs: Any) -> CycleMLP:
    """Build a registered CycleMLP through timm (``features_only`` adds the dense norms)."""
    if variant not in MODEL_CONFIGS:
        raise ValueError(f"unknown CycleMLP variant {variant!r}; known: {sorted(MODEL_CONFIGS)}")
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    if kwargs.get("features_only"):
        kwargs.setdefault("dense_norms", True)
    model_kwargs = {**MODEL_CONFIGS[variant].as_kwargs(), **kwargs}
    return build_model_with_cfg(
        CycleMLP,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        # features_only models carry dense norms that classification files do not have
        pretrained_strict=not kwargs.get("features_only", False),
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **model_kwargs,
    )


@register_model
def cyclemlp_b1(pretrained: bool = False, **kwargs: Any) -> CycleMLP:
    """CycleMLP-B1: 15.2M parameters, 2.1 GMACs at 224x224."""
    return create("cyclemlp_b1", pretrained, **kwargs)


@register_model
def cyclemlp_b2(pretrained: bool = False, **kwargs: Any) -> CycleMLP:
    """CycleMLP-B2: 26.8M parameters, 3.9 GMACs at 224x224."""
    return create("cyclemlp_b2", pretrained, **kwargs)


@register_model
def cyclemlp_b3(pretrained: bool = False, **kwargs: Any) -> CycleMLP:
    """CycleMLP-B3: 38.4M parameters, 6.9 GMACs at 224x224."""
    return create("cyclemlp_b3", pretrained, **kwargs)


@register_model
def cyclemlp_b4(pretrained: bool = False, **kwargs: Any) -> CycleMLP:
    """CycleMLP-B4: 51.8M parameters, 10.1 GMACs at 224x224."""
    return create("cyclemlp_b4", pretrained, **kwargs)


@register_model
def cyclemlp_b5(pretrained: bool = False, **kwargs: Any) -> CycleMLP:
    """CycleMLP-B5: 75.7M parameters, 12.3 GMACs at 224x224."""
    return create("cyclemlp_b5", pretrained, **kwargs)


@register_model
def cyclemlp_t(pretrained: bool = False, **kwargs: Any) -> CycleMLP:
    """CycleMLP-T (Swin layout): 30.4M parameters, 4.4 GMACs at 224x224."""
    return create("cyclemlp_t", pretrained, **kwargs)


@register_model
def cyclemlp_s(pretrained: bool = False, **kwargs: Any) -> CycleMLP:
    """CycleMLP-S (Swin layout): 53.5M parameters, 8.5 GMACs at 224x224."""
    return create("cyclemlp_s", pretrained, **kwargs)


@register_model
def cyclemlp_b(pretrained: bool = False, **kwargs: Any) -> CycleMLP:
    """CycleMLP-B (Swin layout): 94.7M parameters, 15.2 GMACs at 224x224."""
    return create("cyclemlp_b", pretrained, **kwargs)
