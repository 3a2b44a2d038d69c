"""Runs inside a SLURM job, without SLURM: the job's variables are set by the test, and ``scontrol`` is a
stand-in on PATH that records its arguments. The signal is real, sent to the run's process group
as ``sbatch --signal=USR1@90`` sends it to every process of the job, DataLoader workers included."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import in_process, process_env, workers_config
from trainer import run_dir as run_files
from trainer.checkpoint import load_checkpoint
from trainer.observability.timing import is_timing
from trainer.parallel import slurm

JOB = "4242"


def config(tmp_path: Path, **changes) -> Path:
    """Two DataLoader workers that read slowly enough for a signal to come in the middle; a log point
    every 2 steps, so that a stop between them saves the interval in progress."""
    return workers_config(tmp_path, "job", data={"delay": 0.02}, max_steps=24, log_every_n_steps=2, **changes)


def scontrol(folder: Path, code: int = 0) -> Path:
    """A stand-in ``scontrol`` in ``folder`` that appends its arguments to ``folder/calls`` and exits ``code``."""
    folder.mkdir()
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{folder / "calls"}"\n'
                      + ('echo "scontrol: error: Requested operation is presently disabled" >&2\n' if code else "")
                      + f"exit {code}\n")
    script.chmod(0o755)
    return folder


def job_env(path: str, **slurm_vars) -> dict:
    env = {k: v for k, v in process_env().items() if not k.startswith("SLURM_")}
    return {**env, "PATH": path, **slurm_vars}


def signalled(cfg: Path, env: dict, signum: int = signal.SIGUSR1) -> subprocess.CompletedProcess:
    """``trainer run cfg`` in a session of its own, sent ``signum`` to its whole process group once it
    has logged two records."""
    metrics = cfg.parent / "runs" / "job" / run_files.METRICS_JSONL
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "run", str(cfg), "--resume", "auto"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the run never logged two records: {proc.communicate()}")
            time.sleep(0.05)
        os.killpg(proc.pid, signum)
        out, err = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the session (workers of a killed run)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / run_files.STATUS).read_text())


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / run_files.METRICS_JSONL).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not is_timing(k)} for line in lines]


def newest_checkpoint(run_dir: Path) -> Path:
    return run_files.list_checkpoints(run_files.checkpoint_dir(run_dir))[-1]


@pytest.mark.slow
def test_the_requeue_signal_checkpoints_requeues_the_job_and_its_next_run_continues_it_exactly(tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    assert in_process("run", config(whole)).returncode == 0
    bin_dir = scontrol(tmp_path / "bin")
    cfg = config(tmp_path)
    run_dir = tmp_path / "runs" / "job"

    first = signalled(cfg, job_env(f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID=JOB))

    assert first.returncode == 128 + signal.SIGUSR1, first.stderr[-3000:]
    assert "SIGUSR1 received; stopping after the current optimizer step with a checkpoint, then requeueing" in first.stderr
    assert (bin_dir / "calls").read_text() == f"requeue {JOB}\n"  # once, by the one process that may
    stopped = status(run_dir)
    assert stopped["status"] == "requeued" and "stopped by SIGUSR1" in stopped["reason"]
    assert 2 <= stopped["step"] < 24
    assert newest_checkpoint(run_dir).name == run_files.checkpoint_name(stopped["step"])
    assert f"SLURM job {JOB} requeued" in first.stdout
    shown = in_process("runs", tmp_path / "runs")
    assert shown.stdout.splitlines()[1].split()[:3] == ["job", "requeued", str(stopped["step"])]

    # The job's script runs again, with the same command.
    again = in_process("run", cfg, "--resume", "auto", env={"SLURM_JOB_ID": JOB})
    assert again.returncode == 0, again.stderr
    assert status(run_dir)["status"] == "finished" and status(run_dir)["step"] == 24
    assert records(run_dir) == records(whole / "runs" / "job")
    assert (bin_dir / "calls").read_text() == f"requeue {JOB}\n"


@pytest.mark.slow
def test_a_job_that_cannot_be_requeued_says_why_in_one_line_and_keeps_its_checkpoint(tmp_path):
    empty = tmp_path / "no-scontrol"
    empty.mkdir()
    run_dir = tmp_path / "runs" / "job"

    done = signalled(config(tmp_path), job_env(str(empty), SLURM_JOB_ID=JOB))

    assert done.returncode == 128 + signal.SIGUSR1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: SLURM job {JOB} was not requeued: scontrol was not found on PATH; the checkpoint of step"), done.stderr
    assert "Traceback" not in done.stderr
    stopped = status(run_dir)
    assert stopped["status"] == "interrupted" and stopped["requeue_error"] == "scontrol was not found on PATH"
    newest = newest_checkpoint(run_dir)
    assert newest.name == run_files.checkpoint_name(stopped["step"])
    assert load_checkpoint(newest)["trainer_state"]["global_step"] == stopped["step"]  # whole: its digest holds


@pytest.mark.slow
def test_outside_a_slurm_job_sigusr1_keeps_its_default_meaning(tmp_path):
    # No handler is installed: the process ends by the signal, as any Python program does, and leaves
    # no status of its own (trainer runs shows it as died).
    done = signalled(config(tmp_path), job_env(os.environ["PATH"]))
    assert done.returncode == -signal.SIGUSR1, done.stderr[-3000:]
    assert status(tmp_path / "runs" / "job")["status"] == "running"


def test_scontrol_that_fails_is_a_requeue_error_with_its_own_words(tmp_path, monkeypatch):
    bin_dir = scontrol(tmp_path / "bin", code=1)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("SLURM_JOB_ID", JOB)
    with pytest.raises(slurm.RequeueError, match=f"^scontrol requeue {JOB} exited 1: scontrol: error: Requested "
                                                 "operation is presently disabled$"):
        slurm.requeue()
    assert (bin_dir / "calls").read_text() == f"requeue {JOB}\n"


def test_the_requeue_signal_applies_inside_a_job_only(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert slurm.requeue_signal("USR1") is None
    monkeypatch.setenv("SLURM_JOB_ID", JOB)
    assert slurm.requeue_signal("USR1") == signal.SIGUSR1
    assert slurm.requeue_signal("USR2") == signal.SIGUSR2
    assert slurm.requeue_signal(None) is None


@pytest.mark.parametrize("value, message", [
    ("TERM", "slurm.requeue_signal: TERM already stops the run with a checkpoint, without a requeue; the requeue "
             "signal is USR1 or USR2"),
    ("KILL", "slurm.requeue_signal: Input should be 'USR1' or 'USR2' (found 'KILL')"),
])
def test_a_requeue_signal_that_cannot_be_is_one_line_naming_it(tmp_path, value, message):
    cfg = config(tmp_path, slurm={"requeue_signal": value})
    done = in_process("check", cfg)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
    assert f"job.yaml:{len(cfg.read_text().splitlines())}:" in done.stderr  # the line that set it


@pytest.mark.parametrize("nodelist, host", [
    ("node07", "node07"),
    ("node[01-04]", "node01"),
    ("node[01-04,07]", "node01"),
    ("gpu-a[3,5],gpu-b7", "gpu-a3"),
    ("rack[1-2]-n[08-09]", "rack1-n08"),
    ("a,b", "a"),
    ("127.0.0.1", "127.0.0.1"),
])
def test_the_first_host_of_a_node_list(nodelist, host):
    assert slurm.first_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["", "node[01-04", "node]", "[1-2]"])
def test_a_node_list_slurm_never_writes_is_an_error_that_says_what_to_set(nodelist):
    with pytest.raises(ValueError, match="set MASTER_ADDR to the host of rank 0"):
        slurm.first_host(nodelist)


STEP = {"SLURM_JOB_ID": "123456", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8", "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "node[03-06]"}


def test_a_task_srun_started_alone_gets_torchruns_variables_from_slurms():
    assert slurm.as_torchrun(STEP) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node03",
                                       "MASTER_PORT": str(15000 + 3456)}  # the same on every node of the job
    chosen = slurm.as_torchrun({**STEP, "MASTER_ADDR": "head", "MASTER_PORT": "29400"})
    assert (chosen["MASTER_ADDR"], chosen["MASTER_PORT"]) == ("head", "29400")


@pytest.mark.parametrize("env", [
    {**STEP, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},  # srun torchrun: torchrun's variables win
    {k: v for k, v in STEP.items() if k != "SLURM_STEP_NUM_TASKS"},  # the batch script itself, outside any step
    {**STEP, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"},  # a step of one task
    {},
], ids=["srun-torchrun", "batch-script", "one-task", "no-slurm"])
def test_everywhere_else_slurms_variables_change_nothing(env):
    assert slurm.as_torchrun(env) == {}
