"""The command line a results file records: what a user would type to run it again."""

from __future__ import annotations

import subprocess
import sys

from train_utils import ROOT, cli_env

SCRIPT = "from cyclemlp.tools.environment import command_line; print(command_line())"


def _recorded(*command: str, cwd) -> str:
    result = subprocess.run(list(command), capture_output=True, text=True, env=cli_env(), cwd=cwd, check=True)
    return result.stdout.strip().splitlines()[-1]


def test_a_module_run_is_recorded_as_python_dash_m(tmp_path):
    (tmp_path / "probe.py").write_text(SCRIPT + "\n")
    assert _recorded(sys.executable, "-m", "probe", "--size", "224", cwd=tmp_path) == "python -m probe --size 224"
    assert _recorded(sys.executable, str(tmp_path / "probe.py"), "a b", cwd=tmp_path) == (
        f"python {tmp_path / 'probe.py'} 'a b'")


def test_the_cli_is_recorded_as_cyclemlp():
    code = f"import sys; sys.argv = ['cyclemlp', 'train', '--epochs', '2']; {SCRIPT}"
    assert _recorded(sys.executable, "-c", code, cwd=ROOT) == "cyclemlp train --epochs 2"
