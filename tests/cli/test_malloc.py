"""The allocator setting of the project's commands (cyclemlp.cli.malloc) and its switches."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
from train_utils import ROOT, cli_env, run_cli

from cyclemlp.cli.malloc import ENV_VAR, malloc_choice

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# In a fresh process: apply the setting named by argv[1], then allocate and free 512 MB and report
# the resident memory (MB) before, while holding and after freeing it.
PROBE = """
import json, os, sys
from cyclemlp.cli.malloc import apply_malloc_choice, malloc_in_force
kept = apply_malloc_choice(sys.argv[1])
import torch
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
before = rss()
x = torch.ones(128 * 2**20)
held = rss()
del x
print(json.dumps(dict(kept=kept, in_force=malloc_in_force(), before=before, held=held, after=rss())))
"""


@pytest.mark.skipif(not GLIBC, reason="the setting exists for glibc only")
def test_keep_holds_freed_memory_and_default_returns_it():
    results = {}
    for setting in ("keep", "default"):
        done = subprocess.run([sys.executable, "-c", PROBE, setting], env=cli_env(), capture_output=True, text=True,
                              timeout=120, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        results[setting] = json.loads(done.stdout.strip().splitlines()[-1])
    keep, default = results["keep"], results["default"]
    assert keep["kept"] and keep["in_force"] == "keep"
    assert not default["kept"] and default["in_force"] == "default"
    for r in (keep, default):
        assert r["held"] - r["before"] > 500  # the 512 MB tensor is resident
    assert keep["after"] - keep["before"] > 500  # freed, still in the process
    assert default["after"] - default["before"] < 100  # freed and handed back


def test_choice_comes_from_flag_then_environment(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert malloc_choice() == "keep"
    monkeypatch.setenv(ENV_VAR, "default")
    assert malloc_choice() == "default"
    assert malloc_choice("keep") == "keep"  # the flag wins
    monkeypatch.delenv(ENV_VAR)
    assert malloc_choice(fallback="default") == "default"  # the benchmarks' fallback
    monkeypatch.setenv(ENV_VAR, "tcmalloc")
    with pytest.raises(ValueError, match=f"{ENV_VAR} must be one of keep, default; got 'tcmalloc'"):
        malloc_choice()
    with pytest.raises(ValueError, match="--malloc must be one of"):
        malloc_choice("bogus")


def test_cli_rejects_bad_settings_by_name():
    bad_flag = run_cli("--malloc", "bogus", "flops", "cyclemlp_b1")
    assert bad_flag.returncode == 2 and "--malloc: invalid choice: 'bogus'" in bad_flag.stderr
    bad_env = run_cli("flops", "cyclemlp_b1", env=dict(cli_env(), **{ENV_VAR: "tcmalloc"}))
    assert bad_env.returncode == 2
    assert f"cyclemlp flops: error: {ENV_VAR} must be one of keep, default; got 'tcmalloc'" in bad_env.stderr
    fine = run_cli("--malloc", "default", "flops", "cyclemlp_b1")
    assert fine.returncode == 0, fine.stderr
