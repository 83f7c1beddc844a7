"""glibc's allocator defaults against the setting the project's commands apply (``--malloc keep``,
:mod:`cyclemlp.cli.malloc`), for whole models.

    python -m benchmarks.allocator [--models cyclemlp_b1 deform_b1] [--rounds 3] [--batch 32]

glibc serves blocks over its mmap threshold (at most 32 MB) straight from the operating system and
returns them when freed, so each large activation is page-faulted and zeroed again at every step;
``keep`` keeps freed memory in the process. A setting cannot be undone for memory already handed
out, so every measurement is a fresh process (this module with ``--child``), the two settings
alternating round by round. Each prints training
(forward, backward, AdamW step) and inference images per second at 224x224, the median of
``--steps`` calls after two warm-up calls, and the process's peak resident memory (all training
steps, then inference); the table gives the medians over the rounds and the ratios keep / default.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SETTINGS = ("default", "keep")


def child(name: str, batch: int, steps: int, threads: int, malloc: str) -> dict[str, float]:
    import torch

    from benchmarks.speed import build
    from cyclemlp.cli.malloc import apply_malloc_choice

    kept = apply_malloc_choice(malloc)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build(name)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    def median_seconds(fn) -> float:
        times = []
        for i in range(steps + 2):
            start = time.perf_counter()
            fn()
            if i >= 2:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    train = median_seconds(train_step)
    model.eval()
    with torch.inference_mode():
        infer = median_seconds(lambda: model(x))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return dict(train_img_s=batch / train, infer_img_s=batch / infer, peak_rss_mb=peak_mb, heap_kept=kept)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["cyclemlp_b1", "deform_b1"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=SETTINGS, default="default", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.batch < 1 or args.steps < 1 or args.threads < 1:
        parser.error("--rounds, --batch, --steps and --threads must be positive")
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.steps, args.threads, args.setting)))
        return
    import timm

    from benchmarks.speed import DEFORM

    unknown = [m for m in args.models if m not in DEFORM and not timm.is_model(m)]
    if unknown:
        parser.error(f"unknown model(s): {unknown}")
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for name in args.models:
            for setting in SETTINGS:
                cmd = [sys.executable, "-m", "benchmarks.allocator", "--child", name, "--batch", str(args.batch),
                       "--steps", str(args.steps), "--threads", str(args.threads), "--setting", setting]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    tail = "\n".join(done.stderr.strip().splitlines()[-5:])
                    raise SystemExit(f"the {setting} run of {name} failed (exit status {done.returncode}):\n{tail}")
                measured = json.loads(done.stdout.strip().splitlines()[-1])
                if measured.pop("heap_kept") != (setting == "keep"):
                    raise SystemExit(f"the {setting} run of {name} did not get the allocator setting it was started "
                                     "with (keep needs glibc)")
                results.setdefault((name, setting), []).append(measured)
                print(f"{name} {setting}: {results[(name, setting)][-1]}", flush=True)
    print(f"\nbatch {args.batch}, {args.threads} threads, medians of {args.rounds} rounds (img/s)")
    print(f"{'model':<14} {'train default':>14} {'keep':>8} {'ratio':>6} {'infer default':>14} {'keep':>8} {'ratio':>6}"
          f" {'peak MB default':>16} {'keep':>8} {'ratio':>6}")
    for name in args.models:
        row = []
        for key in ("train_img_s", "infer_img_s", "peak_rss_mb"):
            default = statistics.median(r[key] for r in results[(name, "default")])
            kept = statistics.median(r[key] for r in results[(name, "keep")])
            row += [default, kept, kept / default]
        print(f"{name:<14} {row[0]:14.2f} {row[1]:8.2f} {row[2]:6.2f} {row[3]:14.2f} {row[4]:8.2f} {row[5]:6.2f}"
              f" {row[6]:16.0f} {row[7]:8.0f} {row[8]:6.2f}")


if __name__ == "__main__":
    main()
