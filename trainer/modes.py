"""Deprecated: the same functions live in ``trainer.freezing``."""

import warnings

from trainer.freezing import detach, ema_update, eval_mode, freeze, freeze_matching, frozen_copy, unfreeze

warnings.warn("trainer.modes is now trainer.freezing; import from there (or from trainer)", DeprecationWarning,
              stacklevel=2)

__all__ = ["detach", "ema_update", "eval_mode", "freeze", "freeze_matching", "frozen_copy", "unfreeze"]
