"""SIGTERM and SIGINT during ``fit``: they only set a flag; the loop stops at the next optimizer-step
boundary, after a checkpoint, and every rank under torchrun stops at the same step."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import torch

from trainer import distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    def __init__(self) -> None:
        self.received: int | None = None  # the first stop signal seen, not yet acted on

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle SIGTERM and SIGINT inside; the previous handlers come back on exit. Only the main
        thread may install handlers: elsewhere the signals keep their own meaning."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self.received = self.received or signum

        previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)

    def agreed(self, collective_ok: bool, device: torch.device) -> int | None:
        """The signal to stop for. Alone: as soon as it arrives. Under torchrun all ranks must stop at
        the same step, so they agree where a collective is affordable (log points, checkpoint steps)."""
        if not distributed.active():
            return self.received
        if not collective_ok:
            return None
        self.received = distributed.all_max(self.received or 0, device) or None
        return self.received


def name(signum: int) -> str:
    return signal.Signals(signum).name
