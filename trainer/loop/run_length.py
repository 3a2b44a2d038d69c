"""How long a run is: ``max_steps``, ``max_epochs`` (one epoch when neither is set), and what the
training data's length makes of them; and which optimizer steps end at a boundary with work."""

from __future__ import annotations

import math

from trainer.config import TrainerConfig
from trainer.data.run_data import RunData
from trainer.data.sources import length_of


class RunLength:
    def __init__(self, config: TrainerConfig, data: RunData):
        self.config, self.data = config, data
        # The first optimizer step whose boundary may have work; the boundaries before it only look for
        # a stop (``Trainer._after_step``); set at each busy boundary (``schedule``).
        self.busy_from = 0

    def total_epochs(self) -> int | None:
        cfg = self.config
        return cfg.max_epochs if cfg.max_epochs is not None else (1 if cfg.max_steps is None else None)

    def total_steps(self) -> int | None:
        cfg = self.config
        length = length_of(self.data.train_source())
        per_epoch = math.ceil(length / cfg.grad_accum_steps) if length is not None else None
        epochs = self.total_epochs()
        by_epochs = per_epoch * epochs if per_epoch is not None and epochs is not None else None
        limits = [n for n in (cfg.max_steps, by_epochs) if n is not None]
        return min(limits) if limits else None

    def next_busy(self, step: int) -> int:
        """The first optimizer step after ``step`` whose boundary may have work: a log point, an
        evaluation, a checkpoint, or ``max_steps``. The boundaries before it only look for a stop
        (``Trainer._after_step``); read again at each busy boundary, a changed config counts from there."""
        cfg = self.config
        periods = (cfg.log_every_n_steps, cfg.checkpoint.every_n_steps,
                   cfg.eval_every_n_steps if self.data.val is not None else None)
        due = [(step // n + 1) * n for n in periods if n]
        if cfg.max_steps is not None and cfg.max_steps > step:
            due.append(cfg.max_steps)
        return min(due, default=step + 1)

    def reread(self) -> None:
        """The next boundary reads the schedule (a new epoch or fit, whose callbacks may have changed it)."""
        self.busy_from = 0

    def schedule(self, step: int, every_step: bool = False) -> None:
        """At the boundary of ``step``: ``busy_from`` becomes the next busy step (``every_step``: the next
        step, while the profiler traces)."""
        self.busy_from = step + 1 if every_step else self.next_busy(step)

    def done(self, step: int, epoch: int) -> bool:
        """Whether a run that has taken ``step`` optimizer steps and is in ``epoch`` has ended."""
        cfg = self.config  # read each time: a later fit may have raised the limits
        if cfg.max_steps is not None:
            return step >= cfg.max_steps or (cfg.max_epochs is not None and epoch >= cfg.max_epochs)
        return epoch >= (cfg.max_epochs if cfg.max_epochs is not None else 1)


__all__ = ["RunLength"]
