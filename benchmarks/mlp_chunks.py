"""The channel MLP (Linear -> GELU -> Linear, 4x hidden) run in row chunks against the same MLP
over whole tensors, timed at the same shapes in one run, alone and inside B1.

    python -m benchmarks.mlp_chunks [--threads 2] [--batch 32] [--malloc keep]
    python -m benchmarks.mlp_chunks --quick --whole-max-elements 0   # smoke run, chunks everywhere

For each of B1's four stage shapes at 224 (batch 32): inference (oneDNN, residual add fused) and
a training step (forward + backward) of the MLP, whole-tensor vs ``cyclemlp.layers.kernels``'s
chunked form, and the chunked form's times at other chunk sizes (in hidden-layer elements);
then whole cyclemlp_b1 inference (batch 32) and training (forward + backward + AdamW) with the
chunked MLP switched off and on. Under glibc's default allocator (the default here) every fresh
tensor over 32 MB is mapped anew and page-faulted in; ``--malloc keep`` keeps freed memory and
shows what remains once that cost is gone. Also prints the largest difference between the two
forms' outputs and gradients.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import timm
import torch
import torch.nn.functional as F
from timm.layers import Mlp

import cyclemlp  # noqa: F401  (registers the models)
import cyclemlp.layers.kernels as kernels
from benchmarks.kernel_timing import best_time
from benchmarks.kernel_timing import parser as kernel_parser
from cyclemlp.cli.malloc import add_malloc_argument, apply_malloc_choice, malloc_in_force

# (H = W, C): B1's four stages at 224
SHAPES = [(56, 64), (28, 128), (14, 320), (7, 512)]
CHUNK_ELEMENTS = (1 << 19, 1 << 20, 1 << 22)


@contextlib.contextmanager
def chunking(on: bool, elements: int | None = None) -> Iterator[None]:
    """The chunked MLP on (at ``elements`` hidden elements per chunk) or off (whole tensors)."""
    saved = kernels._MLP_WHOLE_MAX_ELEMENTS, kernels._MLP_CHUNK_ELEMENTS
    if not on:
        kernels._MLP_WHOLE_MAX_ELEMENTS = 1 << 62  # one chunk: the whole tensor
    elif elements is not None:
        kernels._MLP_CHUNK_ELEMENTS = elements
    try:
        yield
    finally:
        kernels._MLP_WHOLE_MAX_ELEMENTS, kernels._MLP_CHUNK_ELEMENTS = saved


def mlp_times(size: int, dim: int, batch: int, repeats: int, elements: int | None, on: bool):
    """(inference s, training s, output, gradients) of B1's MLP at one stage shape."""
    torch.manual_seed(0)
    mlp = Mlp(dim, 4 * dim)
    x = torch.randn(batch, size, size, dim)
    residual = torch.randn_like(x)
    grad = torch.randn_like(x)
    xg = x.clone().requires_grad_()

    def infer():
        with torch.inference_mode():
            return kernels._channel_mlp(mlp, x, residual=residual, onednn=True)

    def train():
        mlp.zero_grad(set_to_none=True)
        xg.grad = None
        kernels._channel_mlp(mlp, xg).backward(grad)

    with chunking(on, elements):
        out = infer()
        train()
        grads = [xg.grad] + [p.grad for p in mlp.parameters()]
        return best_time(infer, repeats), best_time(train, repeats), out, grads


def model_times(batch: int, repeats: int, on: bool) -> tuple[float, float]:
    """(inference img/s, training img/s) of cyclemlp_b1 at 224."""
    torch.manual_seed(0)
    model = timm.create_model("cyclemlp_b1")
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 1000, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def infer():
        with torch.inference_mode():
            model(x)

    def train():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    with chunking(on):
        model.eval()
        t_infer = best_time(infer, repeats)
        model.train()
        t_train = best_time(train, repeats)
    return batch / t_infer, batch / t_train


def main(argv: list[str] | None = None) -> None:
    parser = kernel_parser(__doc__, repeats=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--model-repeats", type=int, default=3, help="timed calls of the whole model (default 3)")
    parser.add_argument("--whole-max-elements", type=int, default=None, metavar="N",
                        help="hidden layers up to N elements run whole (default: the package's, "
                        f"{kernels._MLP_WHOLE_MAX_ELEMENTS})")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 2, one timed call of each")
    add_malloc_argument(parser, fallback="default")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.model_repeats = 2, 1, 1
    if args.whole_max_elements is not None:
        if args.whole_max_elements < 0:
            parser.error(f"--whole-max-elements must not be negative; got {args.whole_max_elements}")
        kernels._MLP_WHOLE_MAX_ELEMENTS = args.whole_max_elements
    if min(args.batch, args.repeats, args.model_repeats, args.threads) < 1:
        parser.error("--batch, --repeats, --model-repeats and --threads must be positive")
    try:
        apply_malloc_choice(args.malloc, fallback="default")
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, {args.threads} threads, allocator {malloc_in_force()}; MLP times in ms "
          f"(best of {args.repeats}); ratio = whole / chunked (above 1: chunks faster)")
    chunk_titles = " ".join(f"{'train@2^' + str(e.bit_length() - 1):>11}" for e in CHUNK_ELEMENTS)
    print(f"{'H=W':>4} {'C':>4} {'infer whole':>12} {'chunked':>8} {'ratio':>6} {'train whole':>12} {'chunked':>8} "
          f"{'ratio':>6} {chunk_titles} {'max diff':>9}")
    for size, dim in SHAPES:
        whole = mlp_times(size, dim, args.batch, args.repeats, None, on=False)
        chunked = mlp_times(size, dim, args.batch, args.repeats, None, on=True)
        others = [mlp_times(size, dim, args.batch, args.repeats, e, on=True)[1] for e in CHUNK_ELEMENTS]
        diff = max(((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
                   for a, b in zip([whole[2]] + whole[3], [chunked[2]] + chunked[3]))
        print(f"{size:>4} {dim:>4} {whole[0] * 1e3:>12.2f} {chunked[0] * 1e3:>8.2f} {whole[0] / chunked[0]:>6.2f} "
              f"{whole[1] * 1e3:>12.2f} {chunked[1] * 1e3:>8.2f} {whole[1] / chunked[1]:>6.2f} "
              + " ".join(f"{t * 1e3:>11.2f}" for t in others) + f" {diff:>9.1e}", flush=True)
    rows = []
    for on in (False, True, False, True):  # alternated: drift shows up as disagreement between rounds
        rows.append((on, *model_times(args.batch, args.model_repeats, on)))
    print(f"\ncyclemlp_b1, batch {args.batch}, 224 px (img/s, best of {args.model_repeats}; two rounds each)")
    print(f"{'MLP':>8} {'inference':>10} {'training':>9}")
    for on, infer, train in rows:
        print(f"{'chunked' if on else 'whole':>8} {infer:>10.2f} {train:>9.2f}")
    best = {on: (max(r[1] for r in rows if r[0] == on), max(r[2] for r in rows if r[0] == on)) for on in (False, True)}
    print(f"{'ratio':>8} {best[True][0] / best[False][0]:>10.2f} {best[True][1] / best[False][1]:>9.2f}"
          "   (chunked / whole, best rounds)")


if __name__ == "__main__":
    main()
