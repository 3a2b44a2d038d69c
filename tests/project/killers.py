"""Pieces of a user's project for the checkpoint tests: a Trainer whose steps draw from every
random generator, and a callback that really kills its own process at a chosen point."""

import io
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from trainer import Callback, Trainer


class NoisyTrainer(Trainer):
    """Draws from python's, numpy's and torch's generators every step (and dropout draws from torch's),
    so a resume that forgets any one of their states diverges."""

    def training_step(self, batch):
        x, y = batch
        x = x * (1.0 + 0.1 * random.random()) + 0.1 * float(np.random.randn())
        return F.cross_entropy(self.model(x), y)


class NaNTrainer(Trainer):
    """The loss of optimizer step ``nan_step`` (1-based) is NaN."""

    def __init__(self, *args, nan_step: int = 5, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_step = nan_step

    def training_step(self, batch):
        loss = super().training_step(batch)
        return loss * float("nan") if self.global_step + 1 == self.nan_step else loss


class KillAt(Callback):
    """Send ``signum`` to this process once (a marker file remembers it was done):

    * ``mid_accum``: after the first micro-batch of optimizer step ``step + 1``;
    * ``epoch_end``: when epoch ``step`` ends;
    * ``during_save``: half-way through writing the checkpoint of step ``step``;
    * ``after_step``: after optimizer step ``step``;
    * ``after_validation``: after the validation at optimizer step ``step``;
    * ``fit_end``: after the final checkpoint, before ``status.json`` says finished;
    * ``during_async_write``: half-way through the background write (``checkpoint.async``) of the
      checkpoint of step ``step``, once the loop has finished step ``step + 1`` (and before it goes
      on: the loop waits there until the signal is sent, so the step it stops at is always the same).

    With ``flush_loggers`` the loggers that queue records (trackers) send them all first. With
    ``group`` the signal goes to the whole process group, as a scheduler sends it (``os.killpg``);
    the process must lead a group of its own (``start_new_session``), or the test's would get it too.
    """

    def __init__(self, where: str, step: int, marker: str, signum: int = int(signal.SIGKILL), twice: bool = False,
                 flush_loggers: bool = False, group: bool = False):
        self.where, self.step, self.marker, self.signum, self.twice = where, step, Path(marker), signum, twice
        self.group = group
        self.flush_loggers = flush_loggers  # the trackers hold every record logged so far when the signal comes
        self.trainer = None
        self.trained_on, self.fired = threading.Event(), threading.Event()
        if where in ("during_save", "during_async_write") and not self.marker.exists():
            self._patch_save()

    def _fire(self):
        if self.marker.exists():
            return
        self.marker.touch()
        if self.flush_loggers:
            for logger in self.trainer.loggers:
                if hasattr(logger, "flush"):
                    logger.flush()
        self._send()
        if self.twice:
            if threading.current_thread() is not threading.main_thread():
                # From another thread: the main thread's handler must see the first before the second
                # (two pending signals of one kind are one).
                deadline = time.time() + 60
                while self.trainer._signals.received is None and time.time() < deadline:
                    time.sleep(0.01)
            self._send()

    def _send(self):
        if self.group:
            if os.getpgrp() != os.getpid():
                raise RuntimeError("KillAt(group=True) needs a process that leads its own group (start_new_session)")
            os.killpg(os.getpgrp(), self.signum)
        else:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, outputs, batch):
        self.trainer = trainer
        accum = trainer.config.grad_accum_steps
        if (self.where == "during_async_write" and trainer.global_step == self.step + 1
                and trainer.batch_in_epoch % accum == 0 and trainer.is_main_process and not self.marker.exists()):
            self.trained_on.set()
            assert self.fired.wait(60), "the background write of the checkpoint never reached its middle"
        if self.where == "mid_accum" and trainer.global_step == self.step and trainer.batch_in_epoch % accum == 1:
            self._fire()
        if self.where == "after_step" and trainer.global_step == self.step and trainer.batch_in_epoch % accum == 0:
            self._fire()

    def on_train_epoch_end(self, trainer):
        if self.where == "epoch_end" and trainer.epoch == self.step:
            self._fire()

    def on_fit_end(self, trainer):
        if self.where == "fit_end":
            self._fire()

    def on_validation_end(self, trainer, metrics):
        if self.where == "after_validation" and trainer.global_step == self.step:
            self._fire()

    def _patch_save(self):
        real_save = torch.save
        callback = self

        def save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("trainer_state", {}).get("global_step") == callback.step:
                buffer = io.BytesIO()
                real_save(obj, buffer)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                if callback.where == "during_async_write":
                    assert threading.current_thread() is not threading.main_thread(), "not a background write"
                    callback.trained_on.wait(60)  # the loop trains on meanwhile
                callback._fire()  # SIGKILL: never returns; another signal: the write goes on
                callback.fired.set()
                f.write(data[len(data) // 2 :])
                return None
            return real_save(obj, f, *args, **kwargs)

        torch.save = save


class HoldShards(Callback):
    """Under ``strategy: fsdp`` with ``checkpoint.async``: the shards of the checkpoint of ``step``
    are written (by DCP's thread) only once this rank's loop has finished step ``step + 1``, so the
    copy it writes must be the state at ``step`` although the weights have changed since. Each rank
    that held its write touches ``<marker>.<rank>``."""

    def __init__(self, step: int, marker: str):
        import torch.distributed.checkpoint as dcp

        self.step, self.marker, self.trained_on = step, marker, threading.Event()
        real = dcp.FileSystemWriter.write_data
        callback = self

        def write_data(writer, plan, planner):
            if f"step-{callback.step:08d}" in str(writer.path):
                assert threading.current_thread() is not threading.main_thread(), "not a background write"
                assert callback.trained_on.wait(60), "the loop never finished the step after the checkpoint"
                Path(f"{callback.marker}.{os.environ.get('RANK', '0')}").touch()
            return real(writer, plan, planner)

        dcp.FileSystemWriter.write_data = write_data

    def on_train_batch_end(self, trainer, outputs, batch):
        if trainer.global_step == self.step + 1:
            self.trained_on.set()


class FailOnRank(Trainer):
    """Rank ``rank`` raises at optimizer step ``step``; the others carry on into the next collective."""

    def __init__(self, *args, rank: int = 1, step: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_rank, self.fail_step = rank, step

    def training_step(self, batch):
        if self.layout.rank == self.fail_rank and self.global_step + 1 == self.fail_step:
            raise RuntimeError(f"rank {self.fail_rank} fails at step {self.fail_step}")
        return super().training_step(batch)
