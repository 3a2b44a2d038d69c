"""The built-in callbacks: each a ``Callback`` (``trainer.hooks``) that a run lists in ``callbacks``."""

from __future__ import annotations

from typing import Any

from trainer.callbacks import progress
from trainer.callbacks.checkpoints import BestCheckpoints
from trainer.callbacks.ema import EMAWeights
from trainer.callbacks.gradients import GradNormLogger
from trainer.callbacks.progress import ProgressBar, ProgressLines
from trainer.callbacks.stopping import EarlyStopping
from trainer.config import TrainerConfig

# The callbacks whose ``monitor`` validation must report (the sanity pass checks it does).
MONITORING = (EarlyStopping, BestCheckpoints)


def from_config(cfg: TrainerConfig) -> list[Any]:
    """The callbacks the config asks for: gradient norms (``grad_logging``) and the progress display."""
    made: list[Any] = []
    if cfg.grad_logging.every_n_steps:
        grad = cfg.grad_logging
        made.append(GradNormLogger(grad.every_n_steps, grad.per_layer, grad.histograms))
    shown = progress.for_mode(cfg.progress)
    if shown is not None:
        made.append(shown)
    return made


__all__ = ["BestCheckpoints", "EMAWeights", "EarlyStopping", "GradNormLogger", "ProgressBar", "ProgressLines",
           "from_config"]
