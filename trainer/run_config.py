"""Moved to ``trainer.cli.run_config``; this alias goes away in a later release."""

import warnings

from trainer.cli.run_config import Component, RunConfig, trainer_config, validate

__all__ = ["Component", "RunConfig", "trainer_config", "validate"]

warnings.warn("trainer.run_config moved to trainer.cli.run_config; import it from there", DeprecationWarning, stacklevel=2)
