"""Moved to ``trainer.cli.build``; this alias goes away in a later release."""

import warnings

from trainer.cli.build import Built, build, check_arguments, import_target, instantiate, split_data

__all__ = ["Built", "build", "check_arguments", "import_target", "instantiate", "split_data"]

warnings.warn("trainer.build moved to trainer.cli.build; import it from there", DeprecationWarning, stacklevel=2)
