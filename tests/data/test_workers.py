"""DataLoader workers under the stop signals a scheduler sends the whole process group, and their end."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from trainer.data.workers import LeaveSignalsToMain, adopt, end_loaders


def data(n=64):
    return TensorDataset(torch.arange(n, dtype=torch.float32))


def wait_dead(worker, seconds=30):
    worker.join(seconds)
    return not worker.is_alive()


def seed_workers(worker_id):
    torch.manual_seed(worker_id)


def test_a_worker_ignores_stop_signals_from_outside_and_ends_when_its_loader_ends_it():
    loader = DataLoader(data(), batch_size=4, num_workers=2, worker_init_fn=LeaveSignalsToMain(None))
    it = iter(loader)
    next(it)
    first = it._workers[0]
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        os.kill(first.pid, signum)  # as a scheduler's signal to the group reaches it
    assert not wait_dead(first, 1)
    assert len(list(it)) == 64 // 4 - 1  # the epoch goes on, every batch delivered
    # torch's own shutdown: the iterator's "done" event, then SIGTERM to a worker that did not end.
    it = iter(loader)
    next(it)
    it._workers_done_event.set()
    os.kill(it._workers[0].pid, signal.SIGTERM)
    assert wait_dead(it._workers[0])
    it._shutdown_workers()


def test_a_users_loader_is_adopted_once_with_data_timeout_unless_it_has_its_own():
    loader = DataLoader(data(), batch_size=4, num_workers=1, worker_init_fn=seed_workers)
    assert adopt(loader, 5.0) == 5.0
    assert isinstance(loader.worker_init_fn, LeaveSignalsToMain) and loader.worker_init_fn.init is seed_workers
    assert adopt(loader, 5.0) == 5.0 and loader.worker_init_fn.init is seed_workers  # not wrapped twice
    own = DataLoader(data(), batch_size=4, num_workers=1, timeout=30)
    assert adopt(own, 5.0) == 30
    plain = DataLoader(data(), batch_size=4)
    assert adopt(plain, 5.0) == 0 and plain.worker_init_fn is None and plain.timeout == 0


def test_a_persistent_loaders_workers_started_before_adoption_are_restarted_to_ignore_the_signals():
    loader = DataLoader(data(), batch_size=4, num_workers=1, persistent_workers=True)
    next(iter(loader))
    before = loader._iterator._workers[0]
    adopt(loader, 0)
    assert wait_dead(before)
    next(iter(loader))
    after = loader._iterator._workers[0]
    os.kill(after.pid, signal.SIGTERM)
    assert not wait_dead(after, 1)
    end_loaders()
    assert wait_dead(after)


def test_end_loaders_ends_a_stopped_worker_and_the_healthy_ones():
    loader = DataLoader(data(), batch_size=4, num_workers=2, worker_init_fn=LeaveSignalsToMain(None))
    it = iter(loader)
    next(it)
    stuck, healthy = it._workers
    os.kill(stuck.pid, signal.SIGSTOP)  # a read stuck for good
    end_loaders()
    assert wait_dead(stuck, 0) and wait_dead(healthy, 0) and it._shutdown


def test_a_stop_signal_while_a_worker_starts_waits_and_is_dropped():
    # Between its start and its worker_init_fn a worker runs torch's own SIGTERM handler, which ends it
    # on a signal from anyone but its parent. A spawned worker spends a second or more there (it
    # imports torch), so a SIGTERM sent as soon as the iterator exists lands in that window.
    loader = DataLoader(data(), batch_size=4, num_workers=1, multiprocessing_context="spawn")
    adopt(loader, 0)
    it = iter(loader)
    worker = it._workers[0]
    os.kill(worker.pid, signal.SIGTERM)
    assert len(list(it)) == 64 // 4  # every batch delivered: the worker lived on


# torch's worker loop asks its "done" event between batches, holding the event's lock while it does:
# a scheduler's SIGTERM that lands then must not make the worker wait for that lock, which it holds
# itself (it would wait for ever, and so would the main process, whose shutdown sets the event).
# The script plays that loop, with the signal sent from inside the lock; then, the event set, the
# SIGTERM torch's shutdown sends a worker that did not end, which ends it.
INTERRUPTED_LOOP = """
import multiprocessing, multiprocessing.synchronize, os, signal, sys
from trainer.data.workers import LeaveSignalsToMain

if sys.argv[1] == "no-sem-getvalue":  # as on macOS
    def get_value(self):
        raise NotImplementedError
    multiprocessing.synchronize.Semaphore.get_value = get_value

def _worker_loop(done_event):  # named and called as torch's, whose done_event the init finds
    LeaveSignalsToMain(None)(0)
    with done_event._cond:  # where done_event.is_set() holds the lock
        os.kill(os.getpid(), signal.SIGTERM)
        print("ignored inside the lock", flush=True)
    done_event.set()
    os.kill(os.getpid(), signal.SIGTERM)
    print("not ended by the SIGTERM after the done event", flush=True)

_worker_loop(multiprocessing.get_context("fork").Event())
"""


@pytest.mark.parametrize("platform", ["sem-getvalue", "no-sem-getvalue"])
def test_a_stop_signal_that_lands_while_the_worker_loop_holds_its_done_events_lock_is_ignored(platform):
    try:
        out = subprocess.run([sys.executable, "-c", INTERRUPTED_LOOP, platform], capture_output=True,
                             text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker's SIGTERM handler waited for the lock the interrupted loop holds")
    assert (out.returncode, out.stdout) == (0, "ignored inside the lock\n"), out.stderr


def test_end_loaders_ends_the_workers_of_an_iterator_that_a_signal_left_half_built(monkeypatch):
    # A second stop signal raises where the loop is; inside torch's iterator __init__ it leaves an
    # iterator with workers started and no worker status, on which torch's own shutdown fails.
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    def interrupted(self, loader, first_iter=False):
        raise KeyboardInterrupt  # as Interrupted, at the end of __init__

    loader = DataLoader(data(), batch_size=4, num_workers=2, worker_init_fn=LeaveSignalsToMain(None))
    monkeypatch.setattr(_MultiProcessingDataLoaderIter, "_reset", interrupted)
    with pytest.raises(KeyboardInterrupt) as raised:
        iter(loader)
    half_built = raised.traceback[-1].frame.f_locals["self"]
    workers = list(half_built._workers)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    end_loaders()
    assert all(wait_dead(w, 0) for w in workers) and half_built._shutdown
