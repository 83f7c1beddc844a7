"""timm's own model tests on the eight CycleMLP models.

``tests/test_models.py`` ships in timm's source distribution, which ``setup.sh`` fetches into
``.cache/timm-<version>/``. It runs there, in a subprocess, through ``timm_suite_plugin``: every
test of that file whose parameters are CycleMLP models (forward, backward, default configs and the
model API contract on the meta device, TorchScript, feature extraction, torch.fx forward and
backward, torch.fx + TorchScript), except the two that download pretrained weights.

By default for B1 and T, one model of each layout (about a minute); the six larger variants
share their code and only repeat it in more and wider blocks, at 6-15 minutes of CPU time on two
cores, so they run with ``pytest -m slow``.
"""

import re
import subprocess
import sys

import pytest
import timm
from train_utils import ROOT, cli_env

from cyclemlp import MODEL_CONFIGS

TIMM_SOURCE = ROOT / ".cache" / f"timm-{timm.__version__}"
SUITE = TIMM_SOURCE / "tests" / "test_models.py"
NETWORK_TESTS = ("test_model_load_pretrained", "test_model_features_pretrained")
TESTS_PER_MODEL = 8

# The slow groups: two of about equal run time, so that two workers (pytest -n 2) share them.
GROUPS = [
    pytest.param(("cyclemlp_b1", "cyclemlp_t"), id="b1-t"),
    pytest.param(("cyclemlp_b2", "cyclemlp_b3", "cyclemlp_b"), id="b2-b3-b", marks=pytest.mark.slow),
    pytest.param(("cyclemlp_b4", "cyclemlp_b5", "cyclemlp_s"), id="b4-b5-s", marks=pytest.mark.slow),
]


def test_groups_cover_every_model():
    assert sorted(name for group in GROUPS for name in group.values[0]) == sorted(MODEL_CONFIGS)


@pytest.mark.skipif(not SUITE.exists(), reason=f"{SUITE} is missing: setup.sh fetches it with pip download "
                    f"(timm=={timm.__version__}, source distribution), which needs pip's index")
@pytest.mark.parametrize("models", GROUPS)
def test_timm_model_suite(models):
    env = cli_env()
    env["PYTHONPATH"] = f"{ROOT / 'src'}:{ROOT / 'tests'}:{env['PYTHONPATH']}"
    env.pop("OMP_NUM_THREADS")  # the models are real size: one test per worker, its threads
    selection = "cyclemlp and " + " and ".join(f"not {name}" for name in NETWORK_TESTS)
    command = [
        sys.executable, "-m", "pytest", str(SUITE), "-p", "timm_suite_plugin", "--cyclemlp-models", ",".join(models),
        "-k", selection, "-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestUnknownMarkWarning",
        "--rootdir", str(TIMM_SOURCE), "-c", str(TIMM_SOURCE / "pyproject.toml"),
    ]
    done = subprocess.run(command, cwd=TIMM_SOURCE, env=env, capture_output=True, text=True, timeout=1200)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) == TESTS_PER_MODEL * len(models), summary
    assert not re.search(r"failed|skipped|error", summary), summary
