"""The pieces of a small-image training step that the training loop chooses between, timed in one
run against their alternatives: the fused and the per-tensor AdamW step, the branch softmax over a
middle or the last dimension, and a batch from the cached tensor or from timm's per-image pipeline.

    python -m benchmarks.train_step [--threads 2] [--repeats 20]

Shapes are those of the README's Fashion-MNIST model (B1's layout, dims 48/96/192/384, depths
1/1/2/1, 32x32 input, batch 128). Prints each time and the ratio slower / faster.
"""

from __future__ import annotations

import timm
import torch

import cyclemlp  # noqa: F401  (registers CycleMLP with timm)
from benchmarks.kernel_timing import best_time
from benchmarks.kernel_timing import parser as kernel_parser
from cyclemlp.data import CachedLoader, build_dataset, build_sampler, build_transform, cache_images, collate_skip

KWARGS = dict(dims=(48, 96, 192, 384), depths=(1, 1, 2, 1))
BATCH = 128
DATA = dict(input_size=(1, 32, 32), interpolation="bilinear", crop_pct=1.0, mean=(0.286,), std=(0.353,))
AUG = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.5, color_jitter=0.0)


def optimizer_step(repeats: int) -> tuple[float, float]:
    model = timm.create_model("cyclemlp_b1", num_classes=10, in_chans=1, **KWARGS)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    times = []
    for fused in (True, False):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=fused)
        times.append(best_time(opt.step, repeats))
    return times[0], times[1]


def branch_softmax(repeats: int, dim: int) -> tuple[float, float]:
    logits = torch.randn(BATCH, dim * 3)
    middle = best_time(lambda: logits.reshape(BATCH, dim, 3).transpose(1, 2).softmax(1).transpose(1, 2), repeats)
    last = best_time(lambda: logits.reshape(BATCH, dim, 3).softmax(-1), repeats)
    return middle, last


def data_batch(repeats: int) -> tuple[float, float]:
    ds = build_dataset("fashion-mnist", split="test", in_chans=1, subset=4 * BATCH)
    images, targets = cache_images(ds, build_transform(DATA, True, **{**AUG, "hflip": 0.0}))
    loader = CachedLoader(ds, images, targets, build_sampler(ds, BATCH, True), BATCH, True, hflip=AUG["hflip"])
    cached = best_time(lambda: next(iter(loader)), repeats)
    transform = build_transform(DATA, True, **AUG)
    base = ds.dataset

    def per_image():
        base.transform = transform
        return collate_skip([ds[i] for i in range(BATCH)])

    return cached, best_time(per_image, repeats)


def main(argv: list[str] | None = None) -> None:
    args = kernel_parser(__doc__, repeats=20).parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, batch {BATCH}; times in ms (best of {args.repeats})")
    print(f"{'piece':<36} {'chosen':>8} {'other':>8} {'other/chosen':>13}")
    rows = [("AdamW step: fused / per-tensor", *optimizer_step(args.repeats))]
    rows += [(f"branch softmax C={dim}: middle / last", *branch_softmax(args.repeats, dim)) for dim in KWARGS["dims"]]
    rows.append(("batch: cached / per-image timm", *data_batch(args.repeats)))
    for name, chosen, other in rows:
        print(f"{name:<36} {chosen * 1e3:8.3f} {other * 1e3:8.3f} {other / chosen:13.1f}")


if __name__ == "__main__":
    main()
