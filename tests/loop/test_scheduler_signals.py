"""Runs with DataLoader workers, signalled and killed the way schedulers and machines do it: SLURM,
systemd and ``timeout`` signal the whole process group, a closed terminal sends SIGHUP, the OOM
killer kills the main process alone and leaves its workers, a worker stuck for good never returns.
Each run is a real ``trainer run`` in a session of its own, so that a signal to its group reaches
its workers and nothing else. The runs before and after it (the run it resumes, the run that
resumes it) are not signalled, and run in the test's process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import descendants, in_process, process_env, wait_until_stuck, workers_config
from trainer import run_dir as run_files

pytestmark = pytest.mark.slow


def config(tmp_path: Path, kind: str = "dataset", **data) -> Path:
    return workers_config(tmp_path, data={"kind": kind, "delay": 0.01, **data}, max_steps=100000,
                          log_every_n_steps=1, checkpoint={"every_n_steps": 1000})


def start(cfg: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer", "run", str(cfg), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=process_env(), start_new_session=True)


def run(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    """A real ``trainer run`` that the test waits for (one that signals itself)."""
    return subprocess.run([sys.executable, "-m", "trainer", "run", str(cfg), *args], capture_output=True, text=True,
                          env=process_env(), timeout=300)


def steps(run_dir: Path) -> list[int]:
    path = run_dir / run_files.METRICS_JSONL
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def wait_for(predicate, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 120
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            end(proc)
            pytest.fail(f"{what} never happened: {proc.communicate()}")
        time.sleep(0.1)


def end(proc: subprocess.Popen) -> None:
    """Whatever is left of a run's session (its workers, stopped or orphaned, included)."""
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / run_files.STATUS).read_text())


def state(pid: int) -> str | None:
    """R, S, T (stopped), Z (a zombie: dead, not yet reaped), ...; None: no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def alive(pid: int) -> bool:
    return state(pid) not in (None, "Z")


@pytest.mark.parametrize("kind, signum, resumed", [
    ("dataset", signal.SIGTERM, True),  # workers started after a resume
    ("loader", signal.SIGTERM, False),  # the user's DataLoader, persistent workers started before the run
    ("stateful", signal.SIGINT, True),  # the user's StatefulDataLoader
    ("dataset", signal.SIGHUP, False),  # the terminal closed
], ids=["dataset-resumed-TERM", "persistent-loader-TERM", "stateful-resumed-INT", "dataset-HUP"])
def test_a_signal_to_the_process_group_stops_at_a_step_with_a_checkpoint(tmp_path, kind, signum, resumed):
    cfg = config(tmp_path, kind)
    run_dir = tmp_path / "runs" / "w"
    if resumed:
        assert in_process("run", cfg, "max_steps=3").returncode == 0
    proc = start(cfg, *(["--resume", "auto"] if resumed else []))
    try:
        wait_for(lambda: len(steps(run_dir)) >= (3 if resumed else 0) + 3, proc, "three steps")
        assert descendants(proc.pid), "the run has no worker processes to signal"
        os.killpg(proc.pid, signum)  # every process of the job, as a scheduler does
        out, err = proc.communicate(timeout=120)
    finally:
        end(proc)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "killed by signal" not in err and "internal error" not in err, err[-3000:]
    assert f"{name} received; stopping after the current optimizer step" in err
    stopped = status(run_dir)
    assert stopped["status"] == "interrupted" and f"stopped by {name}" in stopped["reason"]
    newest = run_files.list_checkpoints(run_files.checkpoint_dir(run_dir))[-1]
    assert newest.name == run_files.checkpoint_name(stopped["step"])  # the step it stopped at, saved
    assert steps(run_dir)[-1] == stopped["step"]
    resumed_run = in_process("run", cfg, "--resume", "auto", f"max_steps={stopped['step'] + 2}")
    assert resumed_run.returncode == 0, resumed_run.stderr[-3000:]
    assert steps(run_dir)[-1] == stopped["step"] + 2


def test_a_signal_whose_notice_meets_a_stderr_with_no_reader_still_stops_with_a_checkpoint(tmp_path):
    # `trainer run cfg 2>&1 | tee log` under a scheduler: the signal to the group can end tee first,
    # and the handler's notice to stderr then fails with EPIPE (the run had exited 1, "failed").
    cfg = config(tmp_path)
    run_dir = tmp_path / "runs" / "w"
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "run", str(cfg)], stdout=subprocess.PIPE,
                            stderr=write_end, text=True, env=process_env(), start_new_session=True)
    os.close(write_end)
    try:
        wait_for(lambda: len(steps(run_dir)) >= 3, proc, "three steps")
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        end(proc)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    stopped = status(run_dir)
    assert stopped["status"] == "interrupted", stopped
    newest = run_files.list_checkpoints(run_files.checkpoint_dir(run_dir))[-1]
    assert newest.name == run_files.checkpoint_name(stopped["step"])


def test_kill_9_of_the_main_process_leaves_nothing_locked_while_its_workers_linger(tmp_path):
    # The OOM killer kills the main process alone; its workers read on for a while (here 30 s) before
    # they notice. A requeued run must go on at once, and `trainer runs` must tell the dead run from a live one.
    cfg = config(tmp_path, outlive_parent=30.0, delay=0.02)
    run_dir = tmp_path / "runs" / "w"
    proc = start(cfg, "checkpoint.every_n_steps=2")
    try:
        wait_for(lambda: len(run_files.list_checkpoints(run_files.checkpoint_dir(run_dir))) >= 2, proc,
                 "two checkpoints")
        shown = subprocess.run([sys.executable, "-m", "trainer", "runs", str(tmp_path / "runs")],
                               capture_output=True, text=True, env=process_env(), timeout=120)
        assert shown.stdout.splitlines()[1].split()[:2] == ["w", "running"], shown.stdout + shown.stderr
        workers = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        orphans = [pid for pid in workers if alive(pid)]
        assert orphans, "no worker outlived the main process"
        shown = subprocess.run([sys.executable, "-m", "trainer", "runs", str(tmp_path / "runs")],
                               capture_output=True, text=True, env=process_env(), timeout=120)
        assert shown.stdout.splitlines()[1].split()[:2] == ["w", "died"], shown.stdout + shown.stderr
        saved = int(run_files.list_checkpoints(run_files.checkpoint_dir(run_dir))[-1].name[5:13])
        requeued = in_process("run", cfg, "--resume", "auto", f"max_steps={saved + 2}")
        assert any(alive(pid) for pid in orphans)  # they were there all along
    finally:
        end(proc)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "in use by a live run" not in requeued.stderr
    assert steps(run_dir)[-1] == saved + 2 and status(run_dir)["status"] == "finished"


def wait_stopped(marker: Path, proc: subprocess.Popen) -> list[int]:
    """The workers that stopped themselves, once the loop waits for a batch they never deliver."""
    wait_until_stuck(marker, proc)
    stopped = [pid for pid in descendants(proc.pid) if state(pid) == "T"]
    assert stopped
    return stopped


@pytest.mark.parametrize("kind", ["dataset", "stateful"])
def test_data_timeout_ends_a_run_whose_worker_is_stopped_for_good_and_frees_it(tmp_path, kind):
    cfg = config(tmp_path, kind, stuck_at=20, marker=str(tmp_path / "stuck"))
    run_dir = tmp_path / "runs" / "w"
    proc = start(cfg, "data_timeout=2")
    try:
        stuck = wait_stopped(tmp_path / "stuck", proc)
        out, err = proc.communicate(timeout=120)  # ended by the timeout, not by the test
    finally:
        end(proc)
    assert proc.returncode == 2, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(
        "error: a DataLoader worker took longer than data_timeout (2 s) to deliver a batch"), err[-3000:]
    assert status(run_dir)["status"] == "failed"
    assert run_files.lock_holder(run_dir) is None
    assert not any(alive(pid) for pid in stuck)  # ended, not left stopped


def test_two_signals_to_the_group_end_a_run_whose_worker_is_stopped_for_good(tmp_path):
    cfg = config(tmp_path, stuck_at=20, marker=str(tmp_path / "stuck"))
    run_dir = tmp_path / "runs" / "w"
    proc = start(cfg)
    try:
        stuck = wait_stopped(tmp_path / "stuck", proc)
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(1)  # the first waits for a step boundary that never comes
        assert proc.poll() is None
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        end(proc)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped at once by a second SIGTERM" in err
    assert status(run_dir)["status"] == "interrupted"
    assert run_files.lock_holder(run_dir) is None
    assert not any(alive(pid) for pid in stuck)  # ended, not left stopped


def test_a_signal_during_the_sanity_pass_stops_the_run_at_its_first_step_with_a_checkpoint(tmp_path):
    # The sanity pass reads a batch before fit installs anything of its own: a scheduler's SIGINT then
    # was an ordinary KeyboardInterrupt, which Python can lose inside a fork hook (the run trained on).
    cfg = config(tmp_path, signal_group=int(signal.SIGINT), marker=str(tmp_path / "sent"))
    run_dir = tmp_path / "runs" / "w"
    proc = start(cfg)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        end(proc)
    assert (tmp_path / "sent").exists()
    assert proc.returncode == 130, err[-3000:]
    assert "SIGINT received; stopping after the current optimizer step" in err
    stopped = status(run_dir)
    assert stopped["status"] == "interrupted" and stopped["step"] == 1
    assert [p.name for p in run_files.list_checkpoints(run_files.checkpoint_dir(run_dir))] == ["step-00000001.pt"]


def test_a_signal_after_the_final_checkpoint_leaves_a_finished_run_finished(tmp_path):
    cfg = config(tmp_path)
    text = cfg.read_text() + (f"callbacks:\n  - {{_target_: killers.KillAt, where: fit_end, step: 0, "
                              f"marker: '{tmp_path / 'sent'}', signum: {int(signal.SIGTERM)}}}\n")
    cfg.write_text(text)
    done = run(cfg, "max_steps=4")
    assert (tmp_path / "sent").exists()
    assert done.returncode == 0, done.stderr[-3000:]
    assert status(tmp_path / "runs" / "w")["status"] == "finished"


# The command's teardown, after its run has finished or stopped: the DataLoader workers are ended,
# what the run left is collected, then atexit, then the interpreter's finalization. A signal that
# lands there must not interrupt it: a KeyboardInterrupt there printed a traceback, left workers
# running, and could leave them untold so that multiprocessing's own exit waited for them for
# ever; a SIGTERM killed a finished run. The script sends the signal as the teardown ends the
# workers, or from an object freed by the finalization.
TEARDOWN = """
import os, signal, sys, types
import trainer.cli.commands as commands
import trainer.data.workers as workers

where, signum = sys.argv.pop(), int(sys.argv.pop())
if where == "teardown":
    end_loaders = workers.end_loaders

    def signalled_end_loaders():
        if not os.environ.get("SENT"):  # once (at exit it is called again)
            os.environ["SENT"] = "1"
            os.kill(os.getpid(), signum)
        end_loaders()

    workers.end_loaders = signalled_end_loaders
else:
    class FreedLast:
        def __del__(self):
            os.kill(os.getpid(), signum)

    sys.modules["freed_last"] = types.ModuleType("freed_last")
    sys.modules["freed_last"].held = FreedLast()
sys.argv = ["trainer", "run", *sys.argv[1:]]
commands.main()
"""


@pytest.mark.parametrize("where", ["teardown", "finalization"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_commands_teardown_leaves_the_run_finished_and_no_worker_behind(tmp_path, signum, where):
    cfg = config(tmp_path, kind="loader")  # the user's persistent DataLoader: its workers live to the end
    proc = subprocess.Popen([sys.executable, "-c", TEARDOWN, str(cfg), "max_steps=6", str(int(signum)), where],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=process_env(),
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        end(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert status(tmp_path / "runs" / "w")["status"] == "finished"
    with pytest.raises(ProcessLookupError):  # nothing of the run's session is left
        os.killpg(proc.pid, 0)
