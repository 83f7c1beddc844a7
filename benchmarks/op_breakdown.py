"""Where a model's time goes: the eager forward (inference) and a training step, split by kind of
operator with PyTorch's profiler.

    python -m benchmarks.op_breakdown [--model cyclemlp_b1] [--batch 32] [--threads 2] [--steps 3]

Kinds: matrix products (every ``mm``/``addmm``/``bmm``/``baddbmm``, oneDNN Linear and
convolution that is not depthwise, and their backward), the shifts (Cycle FC's native kernel, the
gathers of its readable form, and depthwise convolutions: other models' spatial mixing), LayerNorm,
GELU, the optimizer step, and everything else (adds, softmax, means, reshapes, copies). Each kind's
share of the profiled operator time is printed with the time per image; the products' share is the
ceiling of what fusing or removing everything else could gain. Numbers are self times of the profiled operators
(the profiler adds some overhead per operator; compare shares, not absolute times, with the speed
benchmark).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import cyclemlp  # noqa: F401  (registers the models)
from cyclemlp.cli.malloc import add_malloc_argument, apply_malloc_choice

PRODUCT_NAMES = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_",
                 "mkldnn::_linear_pointwise", "mkldnn::_linear_pointwise.binary", "quantized::linear_dynamic",
                 "aten::mkldnn_linear_backward", "aten::mkldnn_linear_backward_input",
                 "aten::mkldnn_linear_backward_weights")
CONV_NAMES = ("aten::mkldnn_convolution", "mkldnn::_convolution_pointwise", "aten::convolution_backward",
              "aten::_convolution",
              "aten::thnn_conv2d", "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward")
SHIFT_NAMES = ("cyclemlp::shift", "aten::gather", "aten::index", "aten::slice_scatter", "aten::index_select")
NORM_NAMES = ("aten::native_layer_norm", "aten::native_layer_norm_backward")
GELU_NAMES = ("aten::gelu", "aten::gelu_", "aten::gelu_backward")
OPTIMIZER_NAMES = ("aten::_fused_adamw_", "aten::_fused_adamw")
KINDS = ("matrix products", "shifts", "LayerNorm", "GELU", "optimizer step", "everything else")


def kind(name: str, shapes: list) -> str:
    """The kind of one profiled operator, from its name and (for convolutions) its weight's shape."""
    if name in PRODUCT_NAMES:
        return "matrix products"
    if name in CONV_NAMES:
        weight = shapes[1] if len(shapes) > 1 else []
        depthwise = len(weight) == 4 and weight[1] == 1 and weight[0] > 1
        return "shifts" if depthwise else "matrix products"
    if name in SHIFT_NAMES:
        return "shifts"
    if name in NORM_NAMES:
        return "LayerNorm"
    if name in GELU_NAMES:
        return "GELU"
    if name in OPTIMIZER_NAMES:
        return "optimizer step"
    return "everything else"


def breakdown(fn, steps: int, top: dict[str, float] | None = None) -> dict[str, float]:
    """Seconds per call of ``fn`` by kind of operator (self time; one unprofiled warm-up call).
    ``top``, if given, receives the seconds per call of every operator of "everything else"."""
    fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            fn()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        seconds = event.self_cpu_time_total / 1e6 / steps
        what = kind(event.key, event.input_shapes)
        totals[what] += seconds
        if top is not None and what == "everything else":
            top[event.key] = top.get(event.key, 0.0) + seconds
    return {name: totals.get(name, 0.0) for name in KINDS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cyclemlp_b1", help="a timm model name (default cyclemlp_b1)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=3, help="profiled calls of each (default 3)")
    parser.add_argument("--top", type=int, default=8, help='operators of "everything else" listed (default 8)')
    add_malloc_argument(parser, fallback="default")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.img_size < 1 or args.top < 0:
        parser.error("--batch, --steps and --img-size must be positive, --top not negative")
    if not timm.is_model(args.model):
        parser.error(f"unknown model {args.model!r}: not a timm model name")
    try:
        apply_malloc_choice(args.malloc, fallback="default")
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, model.num_classes, (args.batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def inference() -> None:
        with torch.inference_mode():
            model(x)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    infer_top: dict[str, float] = {}
    train_top: dict[str, float] = {}
    model.eval()
    infer = breakdown(inference, args.steps, infer_top)
    model.train()
    train = breakdown(train_step, args.steps, train_top)
    print(f"{args.model}, batch {args.batch}, {args.img_size} px, {args.threads} threads; operator self time "
          f"in ms per image and share ({args.steps} profiled calls each)")
    print(f"{'kind':<18} {'inference ms':>13} {'share':>7} {'training ms':>12} {'share':>7}")
    infer_total, train_total = sum(infer.values()), sum(train.values())
    for name in KINDS:
        print(f"{name:<18} {infer[name] / args.batch * 1e3:13.2f} {infer[name] / infer_total:7.1%} "
              f"{train[name] / args.batch * 1e3:12.2f} {train[name] / train_total:7.1%}")
    print(f"{'total':<18} {infer_total / args.batch * 1e3:13.2f} {1:7.1%} {train_total / args.batch * 1e3:12.2f} "
          f"{1:7.1%}")
    for title, top, total in (("inference", infer_top, infer_total), ("training", train_top, train_total)):
        if args.top and top:
            print(f"\neverything else, {title}: the {args.top} largest operators (share of the total)")
            for name, seconds in sorted(top.items(), key=lambda item: -item[1])[:args.top]:
                print(f"  {name:<60} {seconds / total:7.1%}")


if __name__ == "__main__":
    main()
