"""Kill ``cyclemlp train`` at chosen moments and resume it: the harness of tests/training/test_kill.py.

    python tests/kill_harness.py PLAN.json RESULT.json

PLAN holds ``argv`` (the train command's arguments, without ``--output``), ``root`` (a folder),
``scenarios`` (below), and optionally ``write_phases`` (one scenario per file write of the
reference run and phase) and ``random_delays`` (that many kills at moments drawn uniformly over
the reference run's duration, seeded by ``seed``). This process imports everything once and then
forks one child per run, so a scenario costs a second rather than an interpreter start; nothing in
this process touches PyTorch's thread pools before forking. Every run's folder is ``root/<scenario name>``.

A scenario kills its run (SIGKILL, as the machine or a user would) at one moment:

* ``{"write": N, "phase": P}`` — at the N-th file the run replaces atomically (counting from 1;
  ``os.replace`` of a temporary file onto its target): ``"open"`` right after the temporary file
  is created (nothing in it yet), ``"before"`` with the temporary file complete but not yet in
  place, ``"after"`` just after it replaced the target;
* ``{"step": N}`` — at the N-th training step (before its update);
* ``{"eval": N}`` — at the start of the N-th evaluation;
* ``{"delay": S}`` — S seconds after the run started (from outside, at whatever it is doing).

Then it resumes the run with ``cyclemlp train --resume FOLDER`` alone (or, if the kill came
before the run wrote its record, starts it again with the original command). The reference run
(scenario ``full``, never killed) also records the files it writes, in order.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import tempfile
import time


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _child(argv: list[str], kill: dict | None, events_path: str | None) -> None:
    """Run the command in this (forked) process, dying where ``kill`` says."""
    from cyclemlp.cli import main
    from cyclemlp.training import engine, train

    events: list[str] = []
    count = {"write": 0, "step": 0, "eval": 0}
    real_replace, real_mkstemp = os.replace, tempfile.mkstemp

    def replace(src, dst, *args, **kwargs):
        count["write"] += 1
        events.append(os.path.basename(dst))
        if kill and kill.get("write") == count["write"] and kill["phase"] == "before":
            _kill()
        real_replace(src, dst, *args, **kwargs)
        if kill and kill.get("write") == count["write"] and kill["phase"] == "after":
            _kill()

    def mkstemp(*args, **kwargs):
        handle = real_mkstemp(*args, **kwargs)
        if kill and kill.get("write") == count["write"] + 1 and kill.get("phase") == "open":
            _kill()
        return handle

    def counted(kind: str, fn):
        """``fn``, killing the process at its ``kill[kind]``-th call."""
        def wrapper(*args, **kwargs):
            count[kind] += 1
            if kill and kill.get(kind) == count[kind]:
                _kill()
            return fn(*args, **kwargs)
        return wrapper

    step, evaluation = counted("step", engine.check_finite), counted("eval", train.evaluate)

    os.replace, tempfile.mkstemp = replace, mkstemp
    engine.check_finite, train.evaluate = step, evaluation
    code = main(argv)
    if events_path:
        with open(events_path, "w") as handle:
            json.dump(events, handle)
    os._exit(code)


def _run(argv: list[str], kill: dict | None = None, events_path: str | None = None, log: str = os.devnull) -> int:
    """Fork a child running ``argv``; its exit code, or minus the signal that ended it."""
    delay = kill.get("delay") if kill else None
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            _child(argv, None if delay is not None else kill, events_path)
        finally:
            os._exit(99)  # an exception escaped the command
    if delay is not None:
        start = time.monotonic()
        while time.monotonic() - start < delay:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main() -> None:
    spec_path, result_path = sys.argv[1:3]
    with open(spec_path) as handle:
        spec = json.load(handle)
    import cyclemlp.cli  # noqa: F401  (imported once, before forking)
    import cyclemlp.training.train  # noqa: F401
    from cyclemlp.data import FashionMNIST
    from cyclemlp.layers import native

    native.available()  # the native shift, built or loaded once
    FashionMNIST(split="test")  # the data files located (and read into the page cache) once

    root = spec["root"]
    results: dict[str, dict] = {}
    full = os.path.join(root, "full")
    start = time.monotonic()
    code = _run(["train", *spec["argv"], "--output", full], events_path=os.path.join(root, "events.json"),
                log=os.path.join(root, "full.log"))
    seconds = time.monotonic() - start
    results["full"] = dict(killed=code, seconds=round(seconds, 2))
    with open(os.path.join(root, "events.json")) as handle:
        events = json.load(handle)
    scenarios = list(spec.get("scenarios", []))
    for n, target in enumerate(events, 1):
        scenarios += [dict(name=f"write{n}-{target}-{phase}", kill=dict(write=n, phase=phase))
                      for phase in spec.get("write_phases", ())]
    rng = random.Random(spec.get("seed", 0))
    scenarios += [dict(name=f"delay{i}", kill=dict(delay=round(rng.uniform(0.05, 1.0) * seconds, 3)))
                  for i in range(spec.get("random_delays", 0))]
    for scenario in scenarios:
        name, folder = scenario["name"], os.path.join(root, scenario["name"])
        log = os.path.join(root, f"{name}.log")
        killed = _run(["train", *spec["argv"], "--output", folder], scenario["kill"], log=log)
        if os.path.exists(os.path.join(folder, "config.json")):
            how, resumed = "resume", _run(["train", "--resume", folder, "--no-progress"], log=log)
        else:  # killed before the run had a record: nothing to resume, start it again
            refused = _run(["train", "--resume", folder, "--no-progress"], log=log)
            how, resumed = f"restart (resume gave {refused})", _run(["train", *spec["argv"], "--output", folder],
                                                                   log=log)
        results[name] = dict(kill=scenario["kill"], killed=killed, how=how, resumed=resumed)
    with open(result_path, "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
