"""The built-in callbacks: each a ``Callback`` (``trainer.hooks``) that a run lists in ``callbacks``."""

from trainer.callbacks.checkpoints import BestCheckpoints
from trainer.callbacks.ema import EMAWeights
from trainer.callbacks.gradients import GradNormLogger
from trainer.callbacks.progress import ProgressBar, ProgressLines
from trainer.callbacks.stopping import EarlyStopping

__all__ = ["BestCheckpoints", "EMAWeights", "EarlyStopping", "GradNormLogger", "ProgressBar", "ProgressLines"]
