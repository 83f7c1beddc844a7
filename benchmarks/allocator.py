"""glibc's allocator defaults against a heap that keeps freed memory, for whole models.

    python -m benchmarks.allocator [--models cyclemlp_b1 deform_b1] [--rounds 3] [--batch 32]

glibc serves blocks over its mmap threshold (at most 32 MB) straight from the operating system and
returns them when freed, so each large activation is page-faulted and zeroed again at every step.
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` keeps freed memory in the process.
Allocator settings are fixed when a process starts, so every measurement is a fresh process (this
module with ``--child``), the two settings alternating round by round. Each prints training
(forward, backward, AdamW step) and inference images per second at 224x224, the median of
``--steps`` calls after two warm-up calls; the table gives the medians over the rounds and the
ratio kept / default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

KEEP_HEAP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}


def child(name: str, batch: int, steps: int, threads: int) -> dict[str, float]:
    import torch

    from benchmarks.run import build

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
    kept = all(os.environ.get(k) == v for k, v in KEEP_HEAP.items())
    return dict(train_img_s=batch / train, infer_img_s=batch / infer, heap_kept=kept)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["cyclemlp_b1", "deform_b1"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.batch < 1 or args.steps < 1 or args.threads < 1:
        parser.error("--rounds, --batch, --steps and --threads must be positive")
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.steps, args.threads)))
        return
    from benchmarks.run import DEFORM

    import timm

    unknown = [m for m in args.models if m not in DEFORM and not timm.is_model(m)]
    if unknown:
        parser.error(f"unknown model(s): {unknown}")
    base_env = {k: v for k, v in os.environ.items() if k not in KEEP_HEAP}
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for name in args.models:
            for setting, env in (("default", base_env), ("kept", {**base_env, **KEEP_HEAP})):
                cmd = [sys.executable, "-m", "benchmarks.allocator", "--child", name, "--batch", str(args.batch),
                       "--steps", str(args.steps), "--threads", str(args.threads)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    tail = "\n".join(done.stderr.strip().splitlines()[-5:])
                    raise SystemExit(f"the {setting} run of {name} failed (exit status {done.returncode}):\n{tail}")
                measured = json.loads(done.stdout.strip().splitlines()[-1])
                if measured.pop("heap_kept") != (setting == "kept"):
                    raise SystemExit(f"the {setting} run of {name} did not get the allocator settings it was started with")
                results.setdefault((name, setting), []).append(measured)
                print(f"{name} {setting}: {results[(name, setting)][-1]}", flush=True)
    print(f"\nbatch {args.batch}, {args.threads} threads, medians of {args.rounds} rounds (img/s)")
    print(f"{'model':<14} {'train default':>14} {'kept':>8} {'ratio':>6} {'infer default':>14} {'kept':>8} {'ratio':>6}")
    for name in args.models:
        row = []
        for key in ("train_img_s", "infer_img_s"):
            default = statistics.median(r[key] for r in results[(name, "default")])
            kept = statistics.median(r[key] for r in results[(name, "kept")])
            row += [default, kept, kept / default]
        print(f"{name:<14} {row[0]:14.2f} {row[1]:8.2f} {row[2]:6.2f} {row[3]:14.2f} {row[4]:8.2f} {row[5]:6.2f}")


if __name__ == "__main__":
    main()
