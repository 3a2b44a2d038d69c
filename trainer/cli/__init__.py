"""The command line, a thin shell over the library: parse (``trainer.yaml_source``, ``run_config``),
build (``build``, with ``trainer.components``), train (``commands``), report (``report``). Torch-free at import: the commands that
need torch import it when they run.
"""

from trainer.cli.commands import app, main

__all__ = ["app", "main"]
