"""Checkpoints written in the background (``checkpoint.async``).

The loop waits while the state is copied off the device into CPU memory, then trains on while a
thread writes that copy with the same code a synchronous save runs (temp file, digest, fsync,
rename; under fsdp the shards through ``dcp.async_save``, then the digests and ``trainer.pt``).

The copy is DCP's ``DefaultStager``: every storage of the state once (tied weights stay tied) into
CPU memory, pinned on CUDA, copied without blocking and then waited for; the containers around the
tensors are copied too, so nothing the loop changes afterwards reaches the file. The CPU buffers
are kept from save to save (allocating and pinning them is most of a first save's cost), which is
why at most one write may be in flight: the next save waits for the one before, and a copy never
lands in buffers a write is still reading.

A write that fails keeps its exception; the next save, or the end of ``fit``, raises it.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from trainer.checkpoint.files import CheckpointError


class BackgroundWriter:
    """One checkpoint write at a time in a thread, and the CPU copy of the state it writes."""

    def __init__(self, device: torch.device):
        self.device = device
        self._stager: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._step: int | None = None  # the step of the write in flight
        self._warned_slow = False
        self.group: Any = None  # under fsdp, the gloo group of the writes' collectives

    @property
    def stager(self) -> Any:
        if self._stager is None:
            # DCP, imported by the first background save: a run without one does not load it
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = self.device.type == "cuda"
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=cuda))
        return self._stager

    def snapshot(self, state: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``state`` in CPU memory that the loop cannot change."""
        # note: CPU-GPU sync point on CUDA: the stager waits for its copies to finish
        return self.stager.stage(state)

    def start(self, step: int, write: Callable[[], None]) -> None:
        """Run ``write`` in a thread. The caller has waited for the write before (``wait``)."""
        assert self._thread is None, "a checkpoint write is still in flight"

        def run() -> None:
            try:
                write()
            except BaseException as exc:  # kept for the main thread, which raises it
                self._error = exc

        self._step = step
        # Not a daemon: a process that ends with a write in flight finishes it first.
        self._thread = threading.Thread(target=run, name=f"checkpoint-step-{step}")
        self._thread.start()

    def wait(self, at_step: int | None = None) -> None:
        """Block until the write in flight is complete on disk; raise its error if it failed.
        ``at_step``: the step of a new save that waits, named in a one-time warning when it does."""
        if self._thread is not None:
            # Two saves of one step (a periodic one and BestCheckpoints') wait for each other by design.
            if at_step not in (None, self._step) and self._thread.is_alive() and not self._warned_slow:
                start = time.perf_counter()
                self._thread.join()
                self._warned_slow = True
                warnings.warn(
                    f"checkpoint.async: the write of step {self._step} was still in flight when step {at_step} "
                    f"saved; the loop waited {time.perf_counter() - start:.2f} s for it. Checkpoints come faster "
                    "than the disk writes them: raise checkpoint.every_n_steps (said once)",
                    stacklevel=4,
                )
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if isinstance(error, CheckpointError):
            raise CheckpointError(
                f"checkpoint.async: the background write of step {self._step} failed: {error}") from error
        if error is not None:
            raise error

    def release(self) -> None:
        """Wait for the write in flight, then free the CPU copy (a later save makes a new one)."""
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def close(self) -> None:
        """``release``, and leave the writes' process group."""
        try:
            self.release()
        finally:
            if self.group is not None:
                if dist.is_initialized():
                    dist.destroy_process_group(self.group)
                self.group = None
