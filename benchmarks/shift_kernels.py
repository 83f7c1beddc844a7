"""The eager Cycle FC shift kernels of ``cyclemlp.layers.cycle_fc``, timed at the same shapes in one run.

    python -m benchmarks.shift_kernels [--threads 2]

For the token mixer's branch inputs (width and height shifts of stepsize 3, plus the unshifted
input) at B1's stages at 224 and at 32x32 input:

``gather``: the three side by side in one gather through a cached index, border strips zeroed.
``sliced``: the same stack by one strided copy per channel slice sharing an offset (these two
place the switch ``_SLICED_MAX_ELEMENTS``; graph mode and non-CPU devices still use them).
``native``: what the eager CPU path builds, the two shifted inputs by the native one-pass kernel
(``cyclemlp.layers.native``; the unshifted branch reads the input itself). ``conv``: its fallback where
that kernel cannot be built, the two as one-hot depthwise convolutions. ``copy``: two plain copies
of the input, the memory traffic any shift must add. All results are compared for equality.
"""

from __future__ import annotations

import importlib

import torch

from benchmarks.kernel_timing import best_time
from benchmarks.kernel_timing import parser as kernel_parser

shift = importlib.import_module("cyclemlp.layers.cycle_fc")

# (batch, side, channels)
SHAPES = [(8, 56, 64), (8, 28, 128), (8, 14, 320), (8, 7, 512), (32, 56, 64), (32, 7, 512),
          (128, 8, 48), (128, 4, 96), (128, 2, 192), (1, 56, 64), (1, 14, 320), (1, 7, 512)]


def main(argv: list[str] | None = None) -> None:
    parser = kernel_parser(__doc__, repeats=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads; ms, best of {args.repeats}")
    native = shift.native.available()
    if not native:
        print(f"native kernel not available ({shift.native.build_error()}): its column stays empty")
    print(f"{'shape (B,H,W,C)':>18} {'gather':>8} {'sliced':>8} {'conv':>8} {'native':>8} {'copy':>8} "
          f"{'conv/native':>12} {'native/copy':>12}")
    for batch, side, channels in SHAPES:
        width = shift._offsets(channels, (1, 3), "official")
        height = shift._offsets(channels, (3, 1), "official")
        tables = (width, height, tuple((0, 0) for _ in range(channels)))
        periods = tuple(shift._period(t) for t in tables)
        x = torch.randn(batch, side, side, channels)
        sliced = shift._sliced_shift(x, tables, periods)
        saved, shift._SLICED_MAX_ELEMENTS = shift._SLICED_MAX_ELEMENTS, -1
        try:
            gathered = shift._gather_shift(x, tables)
            assert torch.equal(sliced, gathered), "the two kernels disagree"
            t_gather = best_time(lambda: shift._gather_shift(x, tables), args.repeats)
        finally:
            shift._SLICED_MAX_ELEMENTS = saved
        t_sliced = best_time(lambda: shift._sliced_shift(x, tables, periods), args.repeats)
        convs = [shift._conv_shift(x, t) for t in tables[:2]]
        assert torch.equal(torch.cat([*convs, x], dim=-1), gathered), "the convolution disagrees"
        t_conv = best_time(lambda: [shift._conv_shift(x, t) for t in tables[:2]], args.repeats)
        t_copy = best_time(lambda: [x.clone() for _ in range(2)], args.repeats)
        if native:
            infos = [shift._table_info(t) for t in tables[:2]]
            shifted = [torch.ops.cyclemlp.shift(x, info.offsets) for info in infos]
            assert torch.equal(torch.cat([*shifted, x], dim=-1), gathered), "the native kernel disagrees"
            t_native = best_time(lambda: [torch.ops.cyclemlp.shift(x, info.offsets) for info in infos], args.repeats)
            native_cols = f"{t_native * 1e3:>8.3f} {t_copy * 1e3:>8.3f} {t_conv / t_native:>12.2f} {t_native / t_copy:>12.2f}"
        else:
            native_cols = f"{'':>8} {t_copy * 1e3:>8.3f} {'':>12} {'':>12}"
        print(f"{str((batch, side, side, channels)):>18} {t_gather * 1e3:>8.3f} {t_sliced * 1e3:>8.3f} "
              f"{t_conv * 1e3:>8.3f} {native_cols}", flush=True)


if __name__ == "__main__":
    main()
