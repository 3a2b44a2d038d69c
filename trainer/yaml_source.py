"""Moved to ``trainer.cli.yaml_source``; this alias goes away in a later release."""

import warnings

from trainer.cli.yaml_source import ConfigError, Path_, Source, Where, dotted, parse_scalar

__all__ = ["ConfigError", "Path_", "Source", "Where", "dotted", "parse_scalar"]

warnings.warn("trainer.yaml_source moved to trainer.cli.yaml_source; import it from there", DeprecationWarning, stacklevel=2)
