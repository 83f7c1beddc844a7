"""glibc's malloc thresholds for one image at a time (cyclemlp.layers.heap): set by the first
one-image block, not before, not against the user's settings, and no page faults per image after."""

import json
import os
import subprocess
import sys

import pytest
from train_utils import ROOT, cli_env

from cyclemlp.layers import heap

GLIBC = hasattr(os, "confstr") and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")

SCRIPT = """
import json, resource, torch, timm
from cyclemlp.layers import heap
torch.set_num_threads(2)
model = timm.create_model("cyclemlp_b1").eval()
with torch.inference_mode():
    model(torch.randn(2, 3, 224, 224))
    before = heap.applied()
    for _ in range(3):
        model(torch.randn(1, 3, 224, 224))
    x, faults = torch.randn(1, 3, 224, 224), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        model(x)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps(dict(before=before, applied=heap.applied(), faults=faults / 5)))
"""


def _run(**env):
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=dict(cli_env(), **env), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_first_one_image_block_keeps_freed_memory():
    """Batch 2 leaves the allocator alone; the first image sets the thresholds, after which an image
    at 224 px takes no fresh pages (with glibc's adaptive thresholds a lone B1 takes thousands)."""
    result = _run()
    assert result["before"] is False and result["applied"] is True
    assert result["faults"] < 100, result


@pytest.mark.parametrize("env", [{"CYCLEMLP_KEEP_HEAP": "0"}, {"MALLOC_TRIM_THRESHOLD_": "1000000"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}])
def test_switch_and_the_users_settings_stand(env):
    assert _run(**env)["applied"] is False


def test_enabled_reads_the_environment(monkeypatch):
    for name in (heap.ENV_VAR, "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    assert heap.enabled()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX512F")  # not the allocator's
    assert heap.enabled()
    monkeypatch.setenv(heap.ENV_VAR, "off")
    assert not heap.enabled()
    monkeypatch.setenv(heap.ENV_VAR, "1")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert not heap.enabled()
