"""The authors' construction of CycleMLP, kept as a test oracle and a benchmark baseline.

Cycle FC is computed the way the released code does it: ``torchvision.ops.deform_conv2d`` with a
1x1 kernel, one offset group per input channel and a constant integer offset map expanded to
``(B, 2*C, H, W)``. The network uses the authors' module and parameter names (``patch_embed``,
``network.{k}``, ``attn.sfc_h`` ...), so its ``state_dict()`` has exactly the layout of their
checkpoint files. Nothing here imports the ``cyclemlp`` package: it is an independent
formulation.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchvision.ops import deform_conv2d

__all__ = ["DeformCycleFC", "DeformCycleMLP", "deform_offsets", "DEFORM_CONFIGS"]

DEFORM_CONFIGS = {
    "cyclemlp_b1": dict(layers=(2, 2, 4, 2), dims=(64, 128, 320, 512), mlp_ratios=(4, 4, 4, 4)),
    "cyclemlp_b2": dict(layers=(2, 3, 10, 3), dims=(64, 128, 320, 512), mlp_ratios=(4, 4, 4, 4)),
    "cyclemlp_b3": dict(layers=(3, 4, 18, 3), dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4)),
    "cyclemlp_b4": dict(layers=(3, 8, 27, 3), dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4)),
    "cyclemlp_b5": dict(layers=(3, 4, 24, 3), dims=(96, 192, 384, 768), mlp_ratios=(4, 4, 4, 4)),
}


def deform_offsets(channels: int, stepsize: Sequence[int], pattern: str = "official") -> torch.Tensor:
    """Offset map ``(1, 2*C, 1, 1)``: channel ``2i`` holds dy, ``2i + 1`` holds dx."""
    sh, sw = stepsize
    offset = torch.zeros(1, 2 * channels, 1, 1)
    for i in range(channels):
        if pattern == "official":
            assert sh == 1 or sw == 1, "the released code supports 1xK and Kx1 only"
            k = sh * sw
            value = (i + k // 2) % k - k // 2
            if sh == 1:
                offset[0, 2 * i + 1] = value
            else:
                offset[0, 2 * i] = value
        elif pattern == "paper":
            offset[0, 2 * i] = i % sh - sh // 2
            offset[0, 2 * i + 1] = (i // sh) % sw - sw // 2
        else:
            raise ValueError(pattern)
    return offset


class DeformCycleFC(nn.Module):
    """Cycle FC as the authors wrote it: a 1x1 deformable convolution with fixed offsets."""

    def __init__(self, in_channels: int, out_channels: int, stepsize: Sequence[int], pattern: str = "official"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.register_buffer("offset", deform_offsets(in_channels, stepsize, pattern))
        nn.init.trunc_normal_(self.weight, std=0.02)
        nn.init.normal_(self.bias, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, W, C)
        b, h, w, _ = x.shape
        out = deform_conv2d(
            x.permute(0, 3, 1, 2), self.offset.expand(b, -1, h, w), self.weight, self.bias
        )
        return out.permute(0, 2, 3, 1)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _CycleMLPAttn(nn.Module):
    def __init__(self, dim: int, stepsize: int = 3):
        super().__init__()
        self.mlp_c = nn.Linear(dim, dim, bias=False)
        self.sfc_h = DeformCycleFC(dim, dim, (1, stepsize))
        self.sfc_w = DeformCycleFC(dim, dim, (stepsize, 1))
        self.reweight = _Mlp(dim, dim // 4, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        hh = self.sfc_h(x)
        ww = self.sfc_w(x)
        cc = self.mlp_c(x)
        a = (hh + ww + cc).permute(0, 3, 1, 2).flatten(2).mean(2)
        a = self.reweight(a).reshape(b, c, 3).permute(2, 0, 1).softmax(dim=0).unsqueeze(2).unsqueeze(2)
        x = hh * a[0] + ww * a[1] + cc * a[2]
        return self.proj(x)


class _Block(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, stepsize: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _CycleMLPAttn(dim, stepsize)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Conv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, kernel, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class DeformCycleMLP(nn.Module):
    """The authors' B1-B5 network (inference; no drop path) with their parameter names.

    ``dense=True`` builds their detection/segmentation backbone instead: no final norm and head,
    per-stage ``norm0/norm2/norm4/norm6`` and a list of NCHW feature maps as output.
    """

    def __init__(
        self, layers, dims, mlp_ratios, num_classes: int = 1000, in_chans: int = 3,
        stepsize: int = 3, dense: bool = False,
    ):
        super().__init__()
        self.dense = dense
        self.patch_embed = _Conv(in_chans, dims[0], 7, 4, 2)
        network = []
        for i, depth in enumerate(layers):
            network.append(nn.Sequential(*[_Block(dims[i], mlp_ratios[i], stepsize) for _ in range(depth)]))
            if i < len(layers) - 1:
                network.append(_Conv(dims[i], dims[i + 1], 3, 2, 1))
        self.network = nn.ModuleList(network)
        if dense:
            for k in (0, 2, 4, 6):
                self.add_module(f"norm{k}", nn.LayerNorm(dims[k // 2]))
        else:
            self.norm = nn.LayerNorm(dims[-1])
            self.head = nn.Linear(dims[-1], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.normal_(module.bias, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.normal_(module.weight, 1.0, 0.1)
                nn.init.normal_(module.bias, std=0.1)

    def forward(self, x: torch.Tensor):
        x = self.patch_embed(x).permute(0, 2, 3, 1)
        outs = []
        for k, module in enumerate(self.network):
            if k % 2 == 1:
                x = module(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            else:
                x = module(x)
                if self.dense:
                    outs.append(getattr(self, f"norm{k}")(x).permute(0, 3, 1, 2).contiguous())
        if self.dense:
            return outs
        x = self.norm(x).flatten(1, 2)
        return self.head(x.mean(1))


def deform_model(name: str, **kwargs) -> DeformCycleMLP:
    return DeformCycleMLP(**DEFORM_CONFIGS[name], **kwargs)
