"""The run folder's lock: one trainer at a time, and never held by a killed trainer's children."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from cyclemlp.training import record

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and flock")


def test_a_second_trainer_is_refused(tmp_path):
    with record.lock(tmp_path):
        with pytest.raises(ValueError, match="is being trained by another process"):
            with record.lock(tmp_path):
                pass
    with record.lock(tmp_path):  # released with the first
        pass


def test_a_forked_child_does_not_keep_the_folder_locked(tmp_path):
    # a DataLoader worker outlives its SIGKILLed trainer for a few seconds; a resume started
    # meanwhile must get the folder
    read, write = os.pipe()
    with record.lock(tmp_path):
        child = os.fork()
        if child == 0:  # the fork hooks have run by now
            os.write(write, b"1")
            time.sleep(30)
            os._exit(0)
        os.read(read, 1)
    os.close(read)
    os.close(write)
    try:
        with record.lock(tmp_path):
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
