"""The two backward strategies of the token mixer's branch mix (``cyclemlp.layers.kernels``), timed
at the same shapes in one run, to place the switch ``_per_image_backward``; and the per-image
strategy against its earlier form over one stacked (B, C, n, C) product (``stacked``, kept here as
the baseline).

    python -m benchmarks.mix_backward [--threads 2] [--batch 32]

Per-image products do elementwise work over B x C x n*C whatever the number of positions N;
per-branch matrix products cost about 3 x B x N x C x n*C multiply-adds. Prints, per shape, the
times, the ratios per-image / per-branch and stacked / per-image, and the largest difference
between the gradients of the strategies.
"""

from __future__ import annotations

import torch

from benchmarks.kernel_timing import best_time
from benchmarks.kernel_timing import parser as kernel_parser
from cyclemlp.layers.kernels import _mix_backward_per_branch, _mix_backward_per_image

# (positions, channels): B1's four stages at 224 (56², 28², 14², 7²) and at 32 (8² ... 1²), and
# the widths of B2-B5's later stages
SHAPES = [(3136, 64), (784, 128), (196, 320), (49, 512), (64, 48), (16, 96), (4, 192), (1, 384),
          (256, 64), (144, 96), (100, 128), (81, 320), (36, 512)]


def stacked_per_image(grad, parts, a, weight, bias, needs):
    """The per-image strategy as it was first written: the n products stacked into one
    (B, C, n, C) tensor and the elementwise work broadcast across the branch axis."""
    batch, positions, dim = grad.shape
    n = bias.shape[1]
    w = weight.view(1, dim, n, dim)
    grad_t = grad.transpose(1, 2)
    per_image = torch.stack([torch.bmm(grad_t, part) for part in parts], dim=2)  # (B, C, n, C)
    grad_sum = grad.sum(dim=1)
    grad_a = (per_image * w).sum(dim=-1) + bias * grad_sum.unsqueeze(-1)
    grad_weight = (per_image * a.unsqueeze(-1)).sum(dim=0).view(dim, n * dim)
    grad_bias = (a * grad_sum.unsqueeze(-1)).sum(dim=0)
    mixed_weight = (w * a.unsqueeze(-1)).view(batch, dim, n * dim)
    grad_parts = [torch.bmm(grad, mixed_weight[:, :, k * dim:(k + 1) * dim]) for k in range(n)]
    return grad_parts, grad_a, grad_weight, grad_bias


def _flat(grads: tuple) -> list[torch.Tensor]:
    """The gradients of one strategy as a flat list (the parts' gradients come as a list)."""
    return [t for g in grads for t in (g if isinstance(g, list) else [g])]


def main(argv: list[str] | None = None) -> None:
    parser = kernel_parser(__doc__, repeats=5)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = 3
    needs = (True, True, True, True)  # parts, a, weight, bias
    print(f"batch {args.batch}, {args.threads} threads; times in ms (best of {args.repeats})")
    print(f"{'N':>6} {'C':>5} {'per-image':>10} {'per-branch':>11} {'ratio':>7} {'stacked':>8} {'ratio':>7} "
          f"{'max diff':>9}")
    for positions, dim in SHAPES:
        g = torch.Generator().manual_seed(0)
        grad = torch.randn(args.batch, positions, dim, generator=g)
        parts = [torch.randn(args.batch, positions, dim, generator=g) for _ in range(n)]
        a = torch.rand(args.batch, dim, n, generator=g).softmax(-1)
        weight = torch.randn(dim, n * dim, generator=g) / dim**0.5
        bias = torch.randn(dim, n, generator=g)
        image = _mix_backward_per_image(grad, parts, a, weight, bias, needs)
        branch = _mix_backward_per_branch(grad, parts, a, weight, bias, needs)
        stacked = stacked_per_image(grad, parts, a, weight, bias, needs)
        diff = max(((x - y).abs().max() / x.abs().max().clamp_min(1e-12)).item()
                   for other in (branch, stacked) for x, y in zip(_flat(image), _flat(other)))
        t_image = best_time(lambda: _mix_backward_per_image(grad, parts, a, weight, bias, needs), args.repeats)
        t_branch = best_time(lambda: _mix_backward_per_branch(grad, parts, a, weight, bias, needs), args.repeats)
        t_stacked = best_time(lambda: stacked_per_image(grad, parts, a, weight, bias, needs), args.repeats)
        print(f"{positions:>6} {dim:>5} {t_image * 1e3:>10.2f} {t_branch * 1e3:>11.2f} "
              f"{t_image / t_branch:>7.2f} {t_stacked * 1e3:>8.2f} {t_stacked / t_image:>7.2f} {diff:>9.1e}",
              flush=True)


if __name__ == "__main__":
    main()
