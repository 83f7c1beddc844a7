"""Where a measurement was made: the machine, the library versions, the command. Every results
file the project writes carries this, so that a number can be read with its conditions."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["command_line", "environment", "machine"]


def machine() -> str:
    """``"2 CPU cores (AMD EPYC, AVX512)"``: cores, CPU model and the vector instructions PyTorch uses."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{os.cpu_count()} CPU cores ({cpu}, {torch.backends.cpu.get_cpu_capability()})"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def command_line() -> str:
    """The command this process runs, as a user would type it."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = spec.name.removesuffix(".__main__") if spec is not None and spec.name else None
    if program == "cyclemlp" or module == "cyclemlp":
        return shlex.join(["cyclemlp", *sys.argv[1:]])
    if module:  # python -m module ...
        return shlex.join(["python", "-m", module, *sys.argv[1:]])
    return shlex.join(["python", *sys.argv])


def environment() -> dict[str, Any]:
    """The machine, versions, torch threads, date and command of a measurement."""
    import timm
    import torch

    import cyclemlp

    return dict(machine=machine(), threads=torch.get_num_threads(), torch=str(torch.__version__),
                timm=timm.__version__, cyclemlp=cyclemlp.__version__, date=time.strftime("%Y-%m-%d %H:%M"),
                command=command_line())
