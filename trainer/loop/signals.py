"""SIGTERM, SIGINT and SIGHUP during ``fit``, and inside a SLURM job its requeue signal: they only set
a flag; the loop stops at the next optimizer-step boundary, after a checkpoint, and every rank under
torchrun stops at the same step. A scheduler signals every process of the job: DataLoader workers
leave these signals to the main process (``trainer.data.workers``)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

import torch

from trainer.data.workers import STOP_SIGNALS
from trainer.parallel import distributed



class Interrupted(KeyboardInterrupt):
    """A second stop signal: the run ends at once, wherever it is (a data worker that hangs keeps
    the loop from ever reaching its next step), without a new checkpoint."""

    def __init__(self, signum: int):
        super().__init__(f"stopped at once by a second {name(signum)}; the newest checkpoint is the last one written")
        self.signum = signum


class StopSignals:
    def __init__(self, requeue: int | None = None) -> None:
        self.requeue = requeue  # the SLURM job's requeue signal (trainer.parallel.slurm): a stop, then a requeue
        self.received: int | None = None  # the signal to stop for: this process's, or another rank's
        self._own: int | None = None  # the first stop signal this process received itself
        self._deferring = False
        self._second: int | None = None

    def reset(self) -> None:
        """Forget the signals of an earlier ``fit`` (a later one continues the run)."""
        self.received = self._own = None

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A second signal arriving inside waits for the end of the block (a checkpoint being
        written is finished, then the run stops)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            if self._second is not None:
                signum, self._second = self._second, None
                raise Interrupted(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle the stop signals inside; the previous handlers come back on exit. Only the main
        thread may install handlers: elsewhere the signals keep their own meaning."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        owner = os.getpid()

        def handler(signum, frame):
            if os.getpid() != owner:
                return  # a process forked meanwhile (a DataLoader worker) inherited the handler: not its to act on
            # Only this process's own second signal stops at once. A scheduler that signals every
            # rank of a job reaches some after they have agreed to stop for another rank's signal:
            # that is their first, and they finish the stop with the others.
            if self._own is not None:
                if self._deferring:
                    self._second = signum
                    return
                if _in_finalizer(frame):
                    # Raised in a __del__ (torch's DataLoader iterator ends its workers there), it would
                    # never reach the loop: Python prints it as "Exception ignored" and drops it. Left,
                    # the next signal stops the run at once.
                    return
                raise Interrupted(signum)
            self._own = signum
            if self.received is None:
                self.received = signum
            if distributed.rank() == 0:
                then = ", then requeueing the SLURM job" if signum == self.requeue else ""
                _say(f"trainer: {name(signum)} received; stopping after the current optimizer step with a "
                     f"checkpoint{then} (send it again to stop at once)")

        handled = (*STOP_SIGNALS, self.requeue) if self.requeue is not None else STOP_SIGNALS
        previous = {signum: signal.signal(signum, handler) for signum in handled}
        try:
            yield
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)

    def outcome(self, stopped_by: int | None) -> str:
        """What a run stopped by ``stopped_by`` (or by nothing) ended as: ``finished``, ``interrupted``, or
        ``requeued`` after the requeue signal."""
        if stopped_by is None:
            return "finished"
        return "requeued" if stopped_by == self.requeue else "interrupted"

    def agreed(self, collective_ok: bool, device: torch.device) -> int | None:
        """The signal to stop for. Alone: as soon as it arrives. Under torchrun all ranks must stop at
        the same step, so they agree where a collective is affordable (log points, checkpoint steps)."""
        if not distributed.active():
            return self.received
        if not collective_ok:
            return None
        agreed = distributed.all_max(self.received or 0, device)
        if not agreed:
            # A signal that arrived during the collective (its handler runs once the collective
            # returns) is kept for the next agreement, not overwritten by this one's "none".
            return None
        self.received = agreed
        return agreed


def _in_finalizer(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _say(line: str) -> None:
    """A line to stderr from a signal handler. The handler may run inside a write to ``sys.stderr``
    (one that a signal interrupted: Python handles the signal before the write returns), whose
    buffer then refuses a second write ("reentrant call"): the line goes to the stream's file
    descriptor instead; a stream without one (captured) gets it unless it is the one being written.
    A stderr whose reader has gone (a pipe into ``tee``, which the scheduler's signal to the group
    ended first) loses the line: the run still stops with its checkpoint."""
    stream = sys.stderr
    if stream is None:
        return
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # closed, or not a file
        with contextlib.suppress(RuntimeError):  # the stream being written: the line is dropped
            print(line, file=stream, flush=True)
        return
    with contextlib.suppress(OSError):
        os.write(fd, (line + "\n").encode())


def name(signum: int) -> str:
    return signal.Signals(signum).name
