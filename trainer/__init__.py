"""trainer: a training loop for PyTorch that reads like a hand-written one.

The public names are imported on first use, so ``trainer --help`` and ``trainer schema``
start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "Trainer": "trainer.trainer",
    "HOOKS": "trainer.hooks",
    "Callback": "trainer.hooks",
    "TrainerConfig": "trainer.config",
    "GradLoggingConfig": "trainer.config",
    "CheckpointConfig": "trainer.config",
    "InitFromConfig": "trainer.config",
    "ProfileConfig": "trainer.config",
    "ThroughputConfig": "trainer.config",
    "read_weights": "trainer.checkpoint.weights",
    "WeightsError": "trainer.checkpoint.weights",
    "GradNormLogger": "trainer.callbacks",
    "EarlyStopping": "trainer.callbacks",
    "BestCheckpoints": "trainer.callbacks",
    "EMAWeights": "trainer.callbacks",
    "WarmupDecay": "trainer.schedules",
    "TensorBoardLogger": "trainer.observability.tensorboard",
    "MLflowLogger": "trainer.observability.trackers",
    "WandbLogger": "trainer.observability.trackers",
    "ProgressBar": "trainer.callbacks.progress",
    "ProgressLines": "trainer.callbacks.progress",
    "eval_mode": "trainer.freezing",
    "detach": "trainer.freezing",
    "freeze": "trainer.freezing",
    "unfreeze": "trainer.freezing",
    "freeze_matching": "trainer.freezing",
    "frozen_copy": "trainer.freezing",
    "ema_update": "trainer.freezing",
    "resolve_device": "trainer.device",
    "seed_everything": "trainer.device",
    "Precision": "trainer.device",
    "to_device": "trainer.data",
    "DataError": "trainer.data",
    "SanityCheckError": "trainer.loop.sanity",
    "Logger": "trainer.observability.metrics",
    "JsonlLogger": "trainer.observability.metrics",
    "CsvLogger": "trainer.observability.metrics",
    "export_model": "trainer.evaluation.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:
    from trainer.callbacks import BestCheckpoints, EarlyStopping, EMAWeights, GradNormLogger
    from trainer.schedules import WarmupDecay
    from trainer.observability.tensorboard import TensorBoardLogger
    from trainer.observability.trackers import MLflowLogger, WandbLogger
    from trainer.config import (
        CheckpointConfig, GradLoggingConfig, InitFromConfig, ProfileConfig, ThroughputConfig, TrainerConfig,
    )
    from trainer.data.batches import to_device
    from trainer.data.sources import DataError
    from trainer.loop.sanity import SanityCheckError
    from trainer.device import Precision, resolve_device, seed_everything
    from trainer.evaluation.export import export_model
    from trainer.hooks import HOOKS, Callback
    from trainer.observability.metrics import CsvLogger, JsonlLogger, Logger
    from trainer.freezing import detach, ema_update, eval_mode, freeze, freeze_matching, frozen_copy, unfreeze
    from trainer.callbacks.progress import ProgressBar, ProgressLines
    from trainer.trainer import Trainer
    from trainer.checkpoint.weights import WeightsError, read_weights
