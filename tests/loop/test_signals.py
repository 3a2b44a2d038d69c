"""Stop signals when the loop cannot reach its next step: a data worker that hangs."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.nn import functional as F

from helpers import PROJECT, classification, mlp, quiet, wait_until_stuck
from trainer import Callback, Trainer
from trainer.checkpoint import list_checkpoints


def start(*args, marker=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")])}
    if marker is not None:
        env["HANGING_MARKER"] = str(marker)
    # A session of its own: the worker stuck in sleep never notices its parent died, so the test ends
    # the whole group, not the main process alone.
    return subprocess.Popen([sys.executable, str(PROJECT / "hanging.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def end(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_a_second_sigterm_ends_a_run_whose_data_worker_hangs(tmp_path):
    proc = start(marker=tmp_path / "stuck")
    try:
        assert proc.stdout.readline().strip() == "training"
        wait_until_stuck(tmp_path / "stuck", proc)  # on sample 16
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=3)  # the first one waits for a step boundary that never comes
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        end(proc)
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
        end(proc)
    err = proc.stderr.read()
    assert "DataError: a DataLoader worker took longer than data_timeout (2 s) to deliver a batch" in err
    assert proc.returncode == 1


@pytest.mark.slow
def test_trainer_run_stopped_twice_while_its_worker_hangs_exits_143_and_says_interrupted(tmp_path):
    import json

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""\
name: hang
out_dir: {tmp_path / "runs"}
batch_size: 4
num_workers: 1
progress_bar: false
log_every_n_steps: 1
eval_every_n_epochs: null
model: {{_target_: torch.nn.Linear, in_features: 8, out_features: 3}}
data: {{_target_: hanging.data}}
loss: torch.nn.functional.cross_entropy
optimizer: {{_target_: torch.optim.SGD, lr: 0.1}}
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")]),
           "HANGING_MARKER": str(tmp_path / "stuck")}
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "run", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    run_dir = tmp_path / "runs" / "hang"
    try:
        wait_until_stuck(tmp_path / "stuck", proc)  # sample 16, the fifth batch
        proc.send_signal(signal.SIGTERM)
        time.sleep(2)
        assert proc.poll() is None  # waiting for a step boundary that never comes
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        end(proc)
    assert proc.returncode == 143, proc.stderr.read()
    assert "stopped at once by a second SIGTERM" in proc.stderr.read()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"


def test_a_signal_that_arrives_during_the_ranks_agreement_is_kept_for_the_next_one(monkeypatch):
    """Under torchrun the ranks agree on stopping with an all-reduce at log points. A rank that is
    waiting in that collective when its signal comes runs the handler as the collective returns;
    the collective's answer (no rank had a signal) must not erase it, or the run never stops."""
    import torch

    from trainer.parallel import distributed
    from trainer.loop.signals import StopSignals

    sent = []

    def all_max(value, device):  # this rank's part of the all-reduce; the other ranks bring nothing
        if not sent:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the collective is in progress
            sent.append(True)
        return value

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "all_max", all_max)
    stops = StopSignals()
    with stops.installed():
        agreements = [stops.agreed(True, torch.device("cpu")) for _ in range(2)]
    assert agreements == [None, signal.SIGTERM]


def test_a_rank_signalled_after_agreeing_to_stop_for_another_ranks_signal_finishes_the_stop(monkeypatch):
    """A scheduler signals every rank of a job, some a little later than others. A rank whose own
    first signal comes after the ranks agreed to stop for another's must finish the stop with them
    (a checkpoint, the same step), not take it for a second signal that stops it at once; its own
    second signal still does."""
    import torch

    from trainer.parallel import distributed
    from trainer.loop.signals import Interrupted, StopSignals

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "all_max", lambda value, device: signal.SIGTERM)  # another rank's signal
    stops = StopSignals()
    with stops.installed():
        assert stops.agreed(True, torch.device("cpu")) == signal.SIGTERM
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # this rank's first: noted, nothing more
        except Interrupted:
            pytest.fail("this rank's first signal was taken for a second one")
        assert stops.received == signal.SIGTERM
        with pytest.raises(Interrupted, match="second SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next instruction; the sleep is never finished


def test_a_signal_on_an_epochs_last_step_leaves_the_epochs_end_to_the_resumed_run(tmp_path):
    """SIGTERM during the last step of epoch 0: the signal's checkpoint holds the epoch unfinished,
    so the stopped run neither ends nor validates it (its records would come after the checkpoint,
    and the resumed run makes them again). The resumed run's validations are the uninterrupted run's."""

    class SignalAtStep4(Callback):
        def on_train_batch_end(self, trainer, outputs, batch):
            if trainer.global_step == 4 and not trainer.should_stop:
                os.kill(os.getpid(), signal.SIGTERM)

    def build(run_dir, callbacks=()):
        x, y = classification(32)  # 4 batches an epoch
        model = mlp()
        return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), val_data=(x, y),
                       loss_fn=F.cross_entropy, callbacks=list(callbacks), run_dir=run_dir,
                       config=quiet(max_steps=8, batch_size=8, eval_every_n_epochs=1))

    def validations(trainer):
        return [(r["step"], r["epoch"], r["val/loss"]) for r in trainer.history if "val/loss" in r]

    whole = build(tmp_path / "whole")
    whole.fit()
    stopped = build(tmp_path / "cut", [SignalAtStep4()])
    stopped.fit()
    assert stopped.stopped_by_signal == signal.SIGTERM and stopped.global_step == 4
    assert (stopped.epoch, stopped.batch_in_epoch) == (0, 4)  # what its checkpoint holds
    assert validations(stopped) == []
    resumed = build(tmp_path / "cut")
    resumed.fit(resume_from=list_checkpoints(tmp_path / "cut" / "checkpoints")[-1])
    assert [step for step, _, _ in validations(whole)] == [4, 8]
    assert validations(resumed) == validations(whole)


# A write to stderr that a signal interrupts (a pipe whose reader is slow, a terminal over ssh: the
# write blocks, the signal makes it return EINTR) runs the handler inside the stream's buffer, which
# Python's own write still holds: a handler that printed to stderr raised "reentrant call" there, in
# the middle of whatever the loop was writing (the progress bar), and the run crashed instead of
# stopping at its next step. The script plays such a write.
INTERRUPTED_WRITE = """
import io, os, signal, sys
from trainer.loop.signals import StopSignals

class InterruptedFile(io.RawIOBase):
    sent = False
    def writable(self):
        return True
    def fileno(self):
        return 2
    def write(self, data):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)  # handled here, inside the buffer's write
        return os.write(2, bytes(data))

sys.stderr = io.TextIOWrapper(io.BufferedWriter(InterruptedFile()), line_buffering=True)
stops = StopSignals()
with stops.installed():
    print("a progress bar's line", file=sys.stderr, flush=True)
    print("stopping for", signal.Signals(stops.received).name, flush=True)
"""


def test_a_stop_signal_that_interrupts_a_write_to_stderr_is_noted_without_breaking_the_write():
    out = subprocess.run([sys.executable, "-c", INTERRUPTED_WRITE], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (0, "stopping for SIGTERM\n"), out.stderr
    assert out.stderr.count("SIGTERM received; stopping after the current optimizer step") == 1
    assert out.stderr.count("a progress bar's line\n") == 1 and "Traceback" not in out.stderr


# A second signal that lands inside a __del__ (torch's DataLoader iterator shuts its workers down
# there, as an epoch or a stopping run lets it go): an exception raised there never reaches the
# loop; Python prints it as "Exception ignored" and drops it. The handler leaves it, so nothing is
# printed, and the next signal stops the run at once.
SECOND_IN_DEL = """
import os, signal
from trainer.loop.signals import Interrupted, StopSignals

class ShutsDownWorkers:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)  # the second signal, handled inside __del__

stops = StopSignals()
with stops.installed():
    os.kill(os.getpid(), signal.SIGTERM)  # the first: noted
    ShutsDownWorkers()
    print("went on", flush=True)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
    except Interrupted as exc:
        print("stopped at once by", signal.Signals(exc.signum).name, flush=True)
"""


def test_a_second_signal_inside_a_del_is_left_and_the_next_stops_at_once():
    out = subprocess.run([sys.executable, "-c", SECOND_IN_DEL], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (0, "went on\nstopped at once by SIGTERM\n"), out.stderr
    assert "Exception ignored" not in out.stderr and "Traceback" not in out.stderr, out.stderr
