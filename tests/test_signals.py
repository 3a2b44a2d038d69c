"""Stop signals when the loop cannot reach its next step: a data worker that hangs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROJECT = Path(__file__).parent / "project"


def start(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(PROJECT / "hanging.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_a_second_sigterm_ends_a_run_whose_data_worker_hangs():
    proc = start()
    try:
        assert proc.stdout.readline().strip() == "training"
        time.sleep(3)  # the worker is now stuck on sample 16
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=3)  # the first one waits for a step boundary that never comes
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert "SIGTERM received; stopping after the current optimizer step" in err
    assert "stopped at once by a second SIGTERM" in err
    assert proc.returncode != 0


@pytest.mark.slow
def test_data_timeout_turns_a_hanging_worker_into_an_error():
    proc = start("2")
    try:
        proc.wait(timeout=60)
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert "DataError: a DataLoader worker took longer than data_timeout (2 s) to deliver a batch" in err
    assert proc.returncode == 1
