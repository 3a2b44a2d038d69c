"""Learning-rate schedules in optimizer steps: linear warmup, then cosine or linear decay.

The total step count is filled in by the Trainer when training starts (from ``max_steps`` or
epochs x batches), so a config names the shape of the schedule, not the arithmetic:

    scheduler: {_target_: trainer.schedules.WarmupDecay, warmup_steps: 100, decay: cosine}
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def set_total_steps(schedulers: list, total_steps: int | None) -> None:
    """Give the run's length to each scheduler that asks for it (``set_total_steps``), when ``fit`` starts."""
    for scheduler in schedulers:
        if hasattr(scheduler, "set_total_steps"):
            scheduler.set_total_steps(total_steps)


class WarmupDecay(LambdaLR):
    """LR factor: ``step / warmup_steps`` during warmup, then from 1 down to ``min_lr_ratio`` at
    ``total_steps`` along a cosine or a line; constant after ``total_steps``."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0, decay: str = "cosine",
                 total_steps: int | None = None, min_lr_ratio: float = 0.0):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if decay not in ("cosine", "linear", "none"):
            raise ValueError(f"decay must be 'cosine', 'linear' or 'none', got {decay!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.warmup_steps, self.decay, self.total_steps, self.min_lr_ratio = warmup_steps, decay, total_steps, min_lr_ratio
        self.given_total = total_steps is not None
        super().__init__(optimizer, self.factor)

    def set_total_steps(self, total_steps: int | None) -> None:
        """Called by the Trainer at the start of every fit: the run's length, unless the config gave
        ``total_steps`` (a later fit with a raised ``max_steps`` stretches the rest of the schedule)."""
        if not self.given_total:
            if total_steps is None and self.decay != "none":
                raise ValueError(
                    "WarmupDecay needs the run's length: set max_steps (or use data of known length), "
                    "or give total_steps"
                )
            self.total_steps = total_steps

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "none" or self.total_steps is None:
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape

    def state_dict(self):
        state = super().state_dict()
        state.pop("lr_lambdas", None)  # a bound method; the settings below rebuild it
        return state
