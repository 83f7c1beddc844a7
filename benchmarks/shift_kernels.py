"""Cycle FC's two shifts, timed at the same shapes in one run.

    python -m benchmarks.shift_kernels [--threads 2]

For the token mixer's two shifted inputs (width and height shifts of stepsize 3) at B1's stages
at 224 and at 32x32 input, forward only: ``native``, the one-pass C++ kernel that the fused
kernels use on the CPU (``cyclemlp.layers.native``); ``gather``, the readable form
(``cyclemlp.cycle_shift``), which graph modes, other devices and CPUs without the native kernel
run; ``copy``, two plain copies of the input, the memory traffic any shift must add. The results
of the two shifts are compared for equality.
"""

from __future__ import annotations

import torch

from benchmarks.kernel_timing import best_time
from benchmarks.kernel_timing import parser as kernel_parser
from cyclemlp import cycle_offsets, cycle_shift
from cyclemlp.layers import native

# (batch, side, channels)
SHAPES = [(8, 56, 64), (8, 28, 128), (8, 14, 320), (8, 7, 512), (32, 56, 64), (32, 7, 512),
          (128, 8, 48), (128, 4, 96), (128, 2, 192), (1, 56, 64), (1, 14, 320), (1, 7, 512)]


def main(argv: list[str] | None = None) -> None:
    parser = kernel_parser(__doc__, repeats=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads; ms, best of {args.repeats}")
    if not native.available():
        print(f"native kernel not available ({native.build_error()}): its column stays empty")
    print(f"{'shape (B,H,W,C)':>18} {'gather':>8} {'native':>8} {'copy':>8} {'gather/native':>14} {'native/copy':>12}")
    for batch, side, channels in SHAPES:
        x = torch.randn(batch, side, side, channels)
        offsets = [cycle_offsets(channels, step) for step in ((1, 3), (3, 1))]

        def both(shift, x=x, offsets=offsets):
            return [shift(x, o) for o in offsets]

        t_gather = best_time(lambda: both(cycle_shift), args.repeats)
        t_copy = best_time(lambda: both(lambda source, _: source.clone()), args.repeats)
        row = f"{str((batch, side, side, channels)):>18} {t_gather * 1e3:>8.3f} "
        if native.available():
            assert all(map(torch.equal, both(native.shift), both(cycle_shift))), "the two shifts disagree"
            t_native = best_time(lambda: both(native.shift), args.repeats)
            row += (f"{t_native * 1e3:>8.3f} {t_copy * 1e3:>8.3f} {t_gather / t_native:>14.2f} "
                    f"{t_native / t_copy:>12.2f}")
        else:
            row += f"{'':>8} {t_copy * 1e3:>8.3f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
