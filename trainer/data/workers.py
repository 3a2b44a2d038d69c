"""DataLoader worker processes under a scheduler's signals, and a main process that must be able to end.

A scheduler signals every process of a job (SLURM, systemd and ``timeout`` the process group, a
closed terminal its session): a worker that died of that SIGTERM would end the run with an error
before it could checkpoint. So every worker of a training run leaves the stop signals to the main
process, which stops at a step boundary, checkpoints and then ends its workers. This holds for the
loaders the Trainer builds and for the user's own (``adopt``), however and whenever their workers start.

A worker that never returns (stuck in I/O, or stopped) must not keep the main process alive, nor
the run's lock: when the run is over, the workers still running get SIGKILL (``end_loaders``).
"""

from __future__ import annotations

import atexit
import gc
import multiprocessing
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.signal_handling import _remove_worker_pids
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

# SIGHUP: the terminal the run was started from closed (an ssh session that ended).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# What workers leave to the main process: the stop signals, and the signals a SLURM job may requeue on
# (slurm.requeue_signal, sent to every process of the job by sbatch --signal=USR1@90).
LEFT_TO_MAIN = (*STOP_SIGNALS, signal.SIGUSR1, signal.SIGUSR2)

# A worker the DataLoader is done with exits as soon as it reads its queue's end marker; at exit,
# one that has not after this long is stuck.
EXIT_GRACE_S = 2.0


class LeaveSignalsToMain:
    """A ``worker_init_fn`` that makes the worker ignore the signals left to the main process, then runs
    the loader's own (picklable, so it also serves workers started by ``spawn``).

    One SIGTERM still ends a worker: the one its DataLoader sends, once it has set the iterator's
    "done" event, to a worker that did not end when told (torch's own shutdown). Ignored, that worker
    would idle until the main process exits."""

    def __init__(self, init: Callable[[int], Any] | None):
        self.init = init

    def __call__(self, worker_id: int) -> None:
        for signum in LEFT_TO_MAIN:
            signal.signal(signum, signal.SIG_IGN)  # one that came while the worker started is dropped
        done = _shutdown_event()
        if done is not None:
            signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0) if _is_set_now(done) else None)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, LEFT_TO_MAIN)  # blocked since the fork (HeldContext)
        if self.init is not None:
            self.init(worker_id)


def _shutdown_event() -> Any:
    """The event torch's worker loop (which calls ``worker_init_fn``) is told to end by, or None
    where the loop is not torch's."""
    caller = sys._getframe(2)
    return caller.f_locals.get("done_event") if caller.f_code.co_name == "_worker_loop" else None


def _is_set_now(event: Any) -> bool:
    """``event.is_set()`` for a signal handler. ``is_set()`` waits for the event's lock, which the code
    the handler interrupted may hold (torch's worker loop asks its "done" event between batches): the
    worker would wait for itself for ever, and the main process with it, whose shutdown sets the
    event. The event's semaphore is read instead, without the lock; where the platform cannot read
    one (macOS), the lock is tried without waiting, and an event whose lock is taken counts as not set."""
    try:
        return event._flag.get_value() > 0
    except NotImplementedError:
        if not event._cond.acquire(False):
            return False
        try:
            if event._flag.acquire(False):
                event._flag.release()
                return True
            return False
        finally:
            event._cond.release()


def worker_settings(init: Callable[[int], Any] | None, num_workers: int) -> dict[str, Any]:
    """The ``worker_init_fn`` and ``multiprocessing_context`` of a loader the Trainer builds."""
    if not num_workers:
        return {"worker_init_fn": init}
    return {"worker_init_fn": LeaveSignalsToMain(init), "multiprocessing_context": held(None)}


def _start_held(start: Callable[[], None]) -> None:
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, LEFT_TO_MAIN)
    try:
        start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class _HeldForkProcess(multiprocessing.context.ForkProcess):
    def start(self) -> None:
        _start_held(super().start)


class _HeldSpawnProcess(multiprocessing.context.SpawnProcess):
    def start(self) -> None:
        _start_held(super().start)


class _HeldForkContext(multiprocessing.context.ForkContext):
    Process = _HeldForkProcess


class _HeldSpawnContext(multiprocessing.context.SpawnContext):
    Process = _HeldSpawnProcess


def held(context: Any) -> Any:
    """A start method whose workers start with the signals left to the main process blocked, until
    ``LeaveSignalsToMain`` has them ignored: between the fork and the ``worker_init_fn`` torch installs
    its own SIGTERM handler, which ends a worker on a signal from anyone but its parent (a
    scheduler's SIGTERM to the group as an epoch starts its workers would end the run with an
    error). A blocked signal waits; ignored, it is dropped. ``forkserver`` and custom contexts are
    left as they are (their processes are not forked from this one)."""
    if isinstance(context, (_HeldForkContext, _HeldSpawnContext)):
        return context
    method = context if isinstance(context, str) or context is None else context.get_start_method()
    # (get_start_method() without allow_none would fix the process's method for good; the first of
    # get_all_start_methods() is the platform's default)
    method = method or multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    if method == "fork":
        return _HeldForkContext()
    if method == "spawn":
        return _HeldSpawnContext()
    return context


def adopt(data: Any, timeout: float) -> float:
    """Make the workers of a user's DataLoader (or StatefulDataLoader) leave the stop signals to the
    main process, and give it ``data_timeout`` unless it has a timeout of its own. Workers it already
    runs (persistent workers of an iterator made before) were started without that, so they are
    ended; the next iterator starts new ones. Returns the timeout its workers now run under (0: none)."""
    if not isinstance(data, DataLoader) or data.num_workers == 0:
        if timeout and not isinstance(data, (DataLoader, Dataset)):
            warnings.warn(f"data_timeout ({timeout:g} s) bounds the reads of DataLoader workers, and the training "
                          f"data is a {type(data).__name__}, whose reads it cannot bound", stacklevel=3)
        return 0.0
    if not isinstance(data.worker_init_fn, LeaveSignalsToMain):
        data.worker_init_fn = LeaveSignalsToMain(data.worker_init_fn)
        data.multiprocessing_context = held(data.multiprocessing_context)
        running = getattr(data, "_iterator", None)
        if running is not None and callable(getattr(running, "_shutdown_workers", None)):
            running._shutdown_workers()
            data._iterator = None
    if timeout and not data.timeout:
        data.timeout = timeout
    return float(data.timeout)


def end_loaders() -> None:
    """End every DataLoader iterator of this process that still has workers, now, while the process
    is whole: when a run is over (the ``trainer`` command ends) and at exit.

    Left to the garbage collector, an iterator in a reference cycle (a Trainer holds its loaders, and
    a persistent DataLoader its iterator) is shut down after multiprocessing has closed its queues:
    its workers never read their end marker, and torch waits 5 s for each, then 5 s more after a
    SIGTERM that they ignore; a worker stuck for good reads nothing at all. So each iterator's
    workers are told to end, given ``EXIT_GRACE_S`` together, and those still running get SIGKILL
    (taken out of torch's watch first, so their end is no error); then the iterator shuts down as
    torch does it, without waiting."""
    if os.getpid() != _OWNER:
        return
    kinds = _iterator_kinds()
    # type(), not isinstance(): some objects of a process warn when their class is asked for.
    iterators = [o for o in gc.get_objects() if type(o) in kinds and not o._shutdown]
    for it in iterators:
        it._workers_done_event.set()
        for q in it._index_queues:
            q.put(None)  # a worker's end marker
    deadline = time.monotonic() + EXIT_GRACE_S
    for w in (w for it in iterators for w in it._workers):
        w.join(max(0.0, deadline - time.monotonic()))
    for it in iterators:
        stuck = [w for w in it._workers if w.is_alive()]
        if stuck and it._worker_pids_set:
            _remove_worker_pids(id(it))
            it._worker_pids_set = False
        for w in stuck:
            w.kill()
            w.join()
        if not hasattr(it, "_workers_status"):
            # Built halfway (a second stop signal raised inside its __init__): torch's shutdown fails
            # on it, and its workers are ended already.
            if it._worker_pids_set:
                _remove_worker_pids(id(it))
                it._worker_pids_set = False
            for q in it._index_queues:
                q.cancel_join_thread()
                q.close()
            it._shutdown = True
            continue
        it._shutdown_workers()


def _iterator_kinds() -> tuple[type, ...]:
    """torch's iterator with workers, and torchdata's StatefulDataLoader copy of it when loaded."""
    stateful = sys.modules.get("torchdata.stateful_dataloader.stateful_dataloader")
    found = getattr(stateful, "_StatefulMultiProcessingDataLoaderIter", None)
    return (_MultiProcessingDataLoaderIter,) if found is None else (_MultiProcessingDataLoaderIter, found)


_OWNER = os.getpid()


def _end_at_exit() -> None:
    """``end_loaders``, then the daemonic children left (multiprocessing would SIGTERM them next and
    wait for each, forever for one that is stopped or ignores it)."""
    if os.getpid() != _OWNER:
        return
    end_loaders()
    alive = [p for p in multiprocessing.active_children() if p.daemon]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + EXIT_GRACE_S
    for p in alive:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in alive:
        if p.is_alive():
            p.kill()
            p.join()


# Registered after multiprocessing's own exit function (imported with torch): runs before it.
atexit.register(_end_at_exit)
