"""The metric files after stops and resumes equal those of an uninterrupted run, record for record.

The runs train in bf16-true (weights, gradients and optimizer state in bf16); the fp32 path is
held bit for bit by tests/checkpoint/test_files.py."""

import csv
import json
import signal

import pytest

from helpers import NOISY, in_process, process_env, project_config
from trainer.observability.timing import is_timing

def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    # Everything but the clock: the same records, steps and values.
    return [{k: v for k, v in json.loads(line).items() if not is_timing(k)} for line in lines]


def table(run_dir):
    """metrics.csv as records: the columns each row has a value in, but the clock's."""
    with (run_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: float(v) for k, v in row.items() if v != "" and not is_timing(k)} for row in rows]


def write(tmp_path, kill=""):
    path = tmp_path / "cfg.yaml"
    path.write_text(project_config(NOISY, out_dir=str(tmp_path / "runs"), precision="bf16-true") + kill)
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    proc = in_process("run", write(tmp))
    assert proc.returncode == 0, proc.stderr
    found = records(tmp / "runs" / "r")
    assert [r["step"] for r in found] == [4, 6, 8, 12, 12, 16, 18, 18]  # 6 steps an epoch, validation at 6, 12, 18
    return found


@pytest.mark.slow
@pytest.mark.parametrize("where,step,signum", [
    ("after_step", 7, signal.SIGTERM),  # between log points and checkpoints: the interval goes into the checkpoint
    ("after_validation", 6, signal.SIGKILL),  # after the epoch's validation was logged, past the checkpoint of step 5
    ("after_step", 12, signal.SIGKILL),  # a log point, before that step's epoch-end validation
    ("fit_end", 0, signal.SIGKILL),  # after the final checkpoint, before status.json says finished
    ("after_step", 5, signal.SIGKILL),  # past the first log point, before the first checkpoint: a fresh start
])
def test_metric_files_after_a_stop_and_a_resume_equal_the_uninterrupted_run(
        uninterrupted, run_cli, tmp_path, where, step, signum):
    marker = tmp_path / "fired"
    kill = f"callbacks:\n  - {{_target_: killers.KillAt, where: {where}, step: {step}, marker: '{marker}', signum: {int(signum)}}}\n"
    cfg = write(tmp_path, kill)
    first = run_cli("run", cfg, env={"PYTHONPATH": process_env()["PYTHONPATH"]})  # a real process, really stopped
    assert first.returncode in (-signal.SIGKILL, 128 + signal.SIGTERM), first.stderr
    assert marker.exists()
    if signum == signal.SIGTERM:  # a stopped run logged what the uninterrupted run logged up to then, no more
        stopped = records(tmp_path / "runs" / "r")
        assert stopped and stopped == uninterrupted[:len(stopped)]
    second = in_process("run", cfg, "--resume", "auto")
    assert second.returncode == 0, second.stderr
    assert records(tmp_path / "runs" / "r") == uninterrupted
    # And a resume of the finished run adds nothing.
    third = in_process("run", cfg, "--resume", "auto")
    assert third.returncode == 0 and "nothing to continue" in third.stdout
    assert records(tmp_path / "runs" / "r") == uninterrupted


@pytest.fixture(scope="module")
def uninterrupted_accumulating(tmp_path_factory):
    """The same run in micro-batches of 8, two to a step."""
    tmp = tmp_path_factory.mktemp("whole_accum")
    proc = in_process("run", write(tmp), "batch_size=8", "grad_accum_steps=2")
    assert proc.returncode == 0, proc.stderr
    return records(tmp / "runs" / "r")


@pytest.mark.slow
@pytest.mark.parametrize("where,step,signum,accum", [
    # At the last step (18), between log points: the interval of steps 17 and 18 goes into the checkpoint.
    ("after_step", 18, signal.SIGTERM, 1),
    ("after_step", 18, signal.SIGINT, 1),
    ("after_step", 18, signal.SIGTERM, 2),
    # Killed after the periodic checkpoint of the last step, before the record of its interval.
    ("epoch_end", 3, signal.SIGKILL, 1),
    ("epoch_end", 3, signal.SIGKILL, 2),
])
def test_a_stop_at_the_last_step_keeps_its_record(uninterrupted, uninterrupted_accumulating, run_cli, tmp_path,
                                                   where, step, signum, accum):
    marker = tmp_path / "fired"
    kill = (f"callbacks:\n  - {{_target_: killers.KillAt, where: {where}, step: {step}, marker: '{marker}', "
            f"signum: {int(signum)}, group: true}}\n")
    cfg = write(tmp_path, kill)
    changes = ["checkpoint.every_n_steps=9"] + (["batch_size=8", f"grad_accum_steps={accum}"] if accum > 1 else [])
    # A real process in a group of its own, signalled as a scheduler signals a job: the whole group.
    first = run_cli("run", cfg, *changes, env={"PYTHONPATH": process_env()["PYTHONPATH"]}, session=True)
    assert first.returncode == (128 + signum if signum != signal.SIGKILL else -signal.SIGKILL), first.stderr
    assert marker.exists()
    second = in_process("run", cfg, *changes, "--resume", "auto")
    assert second.returncode == 0, second.stderr
    expected = uninterrupted if accum == 1 else uninterrupted_accumulating
    assert records(tmp_path / "runs" / "r") == expected
    assert "train/loss" in expected[-1] and expected[-1]["step"] == 18
    assert table(tmp_path / "runs" / "r") == expected


@pytest.mark.slow
def test_a_refused_resume_changes_nothing_and_accepted_changes_are_recorded(tmp_path):
    cfg = write(tmp_path)
    assert in_process("run", cfg, "max_epochs=1").returncode == 0
    run_dir = tmp_path / "runs" / "r"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}

    refused = in_process("run", cfg, "--resume", "auto", "optimizer.lr=0.05", "batch_size=8")
    assert refused.returncode == 2, refused.stderr
    message = refused.stderr.strip().splitlines()[-1]
    assert "optimizer.lr: 0.01 -> 0.05 (breaks exact resume)" in message
    assert "batch_size: 16 -> 8 (breaks exact resume)" in message and "--accept-changes" in message
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"} == before

    accepted = in_process("run", cfg, "--resume", "auto", "optimizer.lr=0.05", "max_epochs=2", "--accept-changes")
    assert accepted.returncode == 0, accepted.stderr
    assert "optimizer.lr: 0.01 -> 0.05" in accepted.stdout
    assert "lr: 0.05" in (run_dir / "config.yaml").read_text()
    lrs = [r["lr"] for r in records(run_dir) if "lr" in r]
    assert lrs[0] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.05)  # what config.yaml says trained
