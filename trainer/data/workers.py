"""DataLoader worker processes under a scheduler's signals, and a main process that must be able to end.

A scheduler signals every process of a job (SLURM, systemd and ``timeout`` the process group, a
closed terminal its session): a worker that died of that SIGTERM would end the run with an error
before it could checkpoint. So every worker of a training run leaves the stop signals to the main
process, which stops at a step boundary, checkpoints and then ends its workers. This holds for the
loaders the Trainer builds and for the user's own (``adopt``), however and whenever their workers start.

A worker that never returns (stuck in I/O, or stopped) must not keep the main process alive: at
exit, multiprocessing terminates its daemonic children and then waits for each, forever for one
that is stopped or ignores SIGTERM. Just before that, the workers still alive get SIGKILL.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import time
import warnings
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader, Dataset

# SIGHUP: the terminal the run was started from closed (an ssh session that ended).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# A worker the DataLoader is done with exits as soon as it reads its queue's end marker; at exit,
# one that has not after this long is stuck.
EXIT_GRACE_S = 2.0


class LeaveSignalsToMain:
    """A ``worker_init_fn`` that makes the worker ignore the stop signals, then runs the loader's own
    (picklable, so it also serves workers started by ``spawn``)."""

    def __init__(self, init: Callable[[int], Any] | None):
        self.init = init

    def __call__(self, worker_id: int) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if self.init is not None:
            self.init(worker_id)


def worker_init(init: Callable[[int], Any] | None, num_workers: int) -> Callable[[int], Any] | None:
    """The ``worker_init_fn`` of a loader the Trainer builds."""
    return LeaveSignalsToMain(init) if num_workers else None


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
        running = getattr(data, "_iterator", None)
        if running is not None and callable(getattr(running, "_shutdown_workers", None)):
            running._shutdown_workers()
            data._iterator = None
    if timeout and not data.timeout:
        data.timeout = timeout
    return float(data.timeout)


_OWNER = os.getpid()


def _end_stuck_workers() -> None:
    if os.getpid() != _OWNER:
        return
    alive = [p for p in multiprocessing.active_children() if p.daemon]
    for p in alive:
        p.terminate()  # what multiprocessing does next anyway; a worker of ours ignores it
    deadline = time.monotonic() + EXIT_GRACE_S
    for p in alive:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in alive:
        if p.is_alive():
            p.kill()
            p.join()


# Registered after multiprocessing's own exit function (imported with torch): runs before it.
atexit.register(_end_stuck_workers)
