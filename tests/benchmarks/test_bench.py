"""The benchmark's target check reads the measured ratios correctly (no timing is asserted)."""

import pytest

from benchmarks.speed import B1_STAGES, check_targets, markdown_table


def _results(speedup: float, linear_ratio: float) -> dict:
    cycle_fc = []
    for side, dim in B1_STAGES:
        shape = f"{side}x{side}x{dim}"
        cycle_fc += [
            dict(batch=8, shape=shape, impl="linear", fwd_ms=1.0, fwd_bwd_ms=10.0),
            dict(batch=8, shape=shape, impl="cyclemlp", fwd_ms=1.0, fwd_bwd_ms=10.0 * linear_ratio),
            dict(batch=8, shape=shape, impl="deform_conv2d", fwd_ms=1.0, fwd_bwd_ms=10.0 * linear_ratio * speedup),
        ]
    models = [
        dict(model="cyclemlp_b1", infer_img_s=30.0, train_img_s=8.0, train_peak_mb=600.0),
        dict(model="deform_b1", infer_img_s=10.0, train_img_s=2.0, train_peak_mb=1000.0),
        dict(model="pvt_v2_b1", infer_img_s=20.0),
        dict(model="cyclemlp_b2", infer_img_s=12.0, achieved_gflop_s=70.0),
        dict(model="resnet50", infer_img_s=11.0),
        dict(model="swin_tiny_patch4_window7_224", infer_img_s=9.0),
        dict(model="pvt_v2_b2", infer_img_s=8.0),
    ]
    return dict(cycle_fc=cycle_fc, models=models, matmul_peak_gflop_s=100.0)


def test_targets_met_and_missed():
    checks = {c["target"]: c for c in check_targets(_results(speedup=20, linear_ratio=1.2))}
    assert all(c["met"] for c in checks.values())
    assert checks["cyclemlp_b1 inference / deform B1"]["value"] == 3.0
    assert checks["cyclemlp_b2 achieved GFLOP/s / matmul peak"]["value"] == 0.7
    missed = {c["target"]: c for c in check_targets(_results(speedup=10, linear_ratio=1.4))}
    assert not missed["Cycle FC fwd+bwd vs deform, 56x56x64, batch 8 (x faster)"]["met"]
    assert not missed["Cycle FC fwd+bwd / Linear, 7x7x512, batch 8"]["met"]


def test_missing_models_are_not_met():
    results = _results(20, 1.2)
    results["models"] = results["models"][:1]
    checks = {c["target"]: c for c in check_targets(results)}
    assert checks["cyclemlp_b2 inference / resnet50"]["value"] is None
    assert not checks["cyclemlp_b2 inference / resnet50"]["met"]
    assert "| - |" in markdown_table([dict(a=None)], ["a"])


def test_peak_share_needed_by_a_throughput_target():
    results = _results(20, 1.2)
    for row in results["models"]:
        if row["model"] == "cyclemlp_b1":
            row["gflops_per_img"] = 4.0
    checks = {c["target"]: c for c in check_targets(results)}
    # 3 x deform's 10 img/s x 4 GFLOP / 100 GFLOP/s peak; training counts 3 passes: 4 x 2 x 4 x 3 / 100
    assert checks["cyclemlp_b1 inference / deform B1"]["needs_peak_share"] == 1.2
    assert abs(checks["cyclemlp_b1 training / deform B1"]["needs_peak_share"] - 0.96) < 1e-12
    assert checks["cyclemlp_b2 inference / resnet50"]["needs_peak_share"] is None  # no FLOPs known


def test_products_only_ceiling_decides_reachability():
    results = _results(20, 1.4)
    for row in results["models"]:
        if row["model"] == "cyclemlp_b1":
            row.update(products_infer_img_s=28.0, products_train_img_s=9.0)
    for row in results["cycle_fc"]:
        if row["impl"] == "linear":
            row["copy_ms"] = 2.0 if row["shape"] == "56x56x64" else 1.0
    checks = {c["target"]: c for c in check_targets(results)}
    # products alone: 28 img/s = 1.4 x pvt_v2_b1's 20 < 1.5 -> out of reach; 2.8 x deform < 3 as well
    assert abs(checks["cyclemlp_b1 inference / pvt_v2_b1"]["products_only"] - 1.4) < 1e-12
    assert checks["cyclemlp_b1 inference / pvt_v2_b1"]["reachable"] is False
    assert checks["cyclemlp_b1 training / deform B1"]["products_only"] == 4.5
    assert checks["cyclemlp_b1 training / deform B1"]["reachable"] is True
    # Cycle FC / Linear: (10 + 2 x 2) / 10 = 1.4 > 1.3 at the first stage, 1.2 elsewhere
    first = checks["Cycle FC fwd+bwd / Linear, 56x56x64, batch 8"]
    assert abs(first["products_only"] - 1.4) < 1e-12 and first["reachable"] is False
    assert checks["Cycle FC fwd+bwd / Linear, 7x7x512, batch 8"]["reachable"] is True
    assert checks["cyclemlp_b2 inference / resnet50"]["reachable"] is None  # no ceiling measured


def test_recorded_products_are_the_models_work():
    import timm
    import torch

    from benchmarks.gemm_bound import ceiling_seconds, product_flops, record_products, replay_seconds
    from cyclemlp import count_cost

    torch.manual_seed(0)
    model = timm.create_model("cyclemlp_b1", dims=(16, 16, 32, 32), depths=(1, 1, 1, 1), num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        calls = record_products(lambda: model(x))
    # the recorded products carry the model's FLOPs (batch 2), as the project's counter sees them
    per_image = product_flops(calls) / 2
    assert abs(per_image - count_cost(model, 64).flops) < 0.01 * count_cost(model, 64).flops
    assert replay_seconds(calls, repeats=1) > 0 and ceiling_seconds(calls, repeats=1) > 0
    model.train()
    train_calls = record_products(lambda: model(x).sum().backward())
    assert len(train_calls) > len(calls)
    with pytest.raises(ValueError, match="no matrix product"):
        record_products(lambda: torch.ones(3) + 1)


def test_op_breakdown_finds_every_kind_in_a_cyclemlp_step():
    import timm
    import torch

    from benchmarks.op_breakdown import KINDS, breakdown, kind

    # a depthwise convolution is a shift; any other convolution is a product
    assert kind("aten::mkldnn_convolution", [[2, 8, 5, 5], [8, 1, 1, 3], [8]]) == "shifts"
    assert kind("aten::mkldnn_convolution", [[2, 3, 5, 5], [8, 3, 7, 7], [8]]) == "matrix products"
    assert kind("aten::baddbmm_", [[4, 9, 8]]) == "matrix products"
    assert kind("aten::native_layer_norm", [[2, 4, 4, 8]]) == "LayerNorm"
    torch.manual_seed(0)
    model = timm.create_model("cyclemlp_b1", dims=(16, 16, 32, 32), depths=(1, 1, 1, 1), num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    times = breakdown(step, steps=1)
    assert list(times) == list(KINDS)
    assert all(times[name] > 0 for name in ("matrix products", "shifts", "LayerNorm", "GELU", "optimizer step"))


def test_allocator_benchmark_alternates_the_two_settings():
    import subprocess
    import sys

    from train_utils import ROOT, cli_env

    done = subprocess.run([sys.executable, "-m", "benchmarks.allocator", "--models", "resnet18", "--rounds", "1",
                           "--batch", "1", "--steps", "1", "--threads", "1"], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resnet18 default:" in done.stdout and "resnet18 keep:" in done.stdout
    row = [line for line in done.stdout.splitlines() if line.startswith("resnet18 ") and "default" not in line
           and "keep:" not in line]
    assert len(row) == 1 and len(row[0].split()) == 10
    bad = subprocess.run([sys.executable, "-m", "benchmarks.allocator", "--rounds", "0"], cwd=ROOT, env=cli_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "must be positive" in bad.stderr
    unknown = subprocess.run([sys.executable, "-m", "benchmarks.op_breakdown", "--model", "no_such_net"], cwd=ROOT,
                             env=cli_env(), capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "unknown model 'no_such_net'" in unknown.stderr


def test_mlp_chunk_benchmark_smoke_run():
    import subprocess
    import sys

    from train_utils import ROOT, cli_env

    done = subprocess.run([sys.executable, "-m", "benchmarks.mlp_chunks", "--quick", "--whole-max-elements", "0",
                           "--threads", "1"], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["56"], ["28"], ["14"], ["7"])]
    assert [row[:2] for row in rows] == [["56", "64"], ["28", "128"], ["14", "320"], ["7", "512"]]
    assert all(float(row[-1]) < 1e-4 for row in rows)  # chunked and whole forms agree
    assert sum(line.split()[0] in ("whole", "chunked") for line in done.stdout.splitlines() if line.strip()) == 4
    bad = subprocess.run([sys.executable, "-m", "benchmarks.mlp_chunks", "--whole-max-elements", "-1"], cwd=ROOT,
                         env=cli_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "must not be negative" in bad.stderr


def test_interleaved_timing_counts_page_faults():
    import mmap

    import torch

    from benchmarks.speed import minor_faults, timeit_interleaved

    if minor_faults() is None:
        pytest.skip("this platform does not count page faults")
    pages = 256

    def touch_fresh_pages():
        with mmap.mmap(-1, pages * mmap.PAGESIZE) as fresh:  # a new anonymous mapping every call
            for page in range(pages):
                fresh[page * mmap.PAGESIZE] = 1

    faults: dict = {}
    times = timeit_interleaved({"fresh": touch_fresh_pages, "idle": lambda: None}, torch.device("cpu"), 3,
                               faults=faults)
    assert set(times) == set(faults) == {"fresh", "idle"}
    assert faults["fresh"] >= pages and faults["idle"] < pages / 4


def test_targets_show_the_page_faults_of_both_sides():
    results = _results(20, 1.2)
    for row in results["cycle_fc"]:
        row["fwd_bwd_faults"] = {"cyclemlp": 6272.0, "linear": 0.4, "deform_conv2d": 10.0}[row["impl"]]
    for row in results["models"]:
        row["train_faults"] = {"cyclemlp_b1": 120.0, "deform_b1": 3000.0}.get(row["model"])
    checks = {c["target"]: c for c in check_targets(results)}
    assert checks["Cycle FC fwd+bwd / Linear, 56x56x64, batch 8"]["page_faults"] == "6272 / 0"
    assert checks["cyclemlp_b1 training / deform B1"]["page_faults"] == "120 / 3000"
    assert checks["cyclemlp_b1 inference / deform B1"]["page_faults"] is None
    assert check_targets(_results(20, 1.2))[1]["page_faults"] is None  # runs without counts
