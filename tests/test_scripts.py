"""The measurement scripts run against the code as it is (their numbers go to docs/performance.md;
nothing here looks at a number)."""

import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_count_calls_runs_the_trainer_and_the_raw_loop_and_prints_its_table():
    """count_calls.py drives the Trainer's telemetry and step boundary directly, and builds both
    loops from bench_overhead.py as count_instructions.py does."""
    done = subprocess.run([sys.executable, str(SCRIPTS / "count_calls.py"), "--steps", "50"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.split()[:2] == ["raw", "loop"] for line in lines)
    assert any(line.split()[:1] == ["Trainer"] for line in lines)
    assert "us per step (timeit, best of 5)" in lines[-1]


def test_overhead_parts_turns_the_trainers_parts_off_and_prints_its_table():
    """overhead_parts.py replaces the Trainer's internals to turn parts off; it stops with a message
    when they have changed, so this run fails then."""
    done = subprocess.run([sys.executable, str(SCRIPTS / "overhead_parts.py"), "--repeats", "1", "--steps", "20",
                           "--variant", "no-phase-clock"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split()[0] for line in done.stdout.splitlines() if line and not line.startswith("#")]
    assert rows == ["variant", "raw", "no-phase-clock"]
