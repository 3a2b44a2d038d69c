"""Moved to ``trainer.cli.report``; this alias goes away in a later release."""

import warnings

from trainer.cli.report import format_table, monitored, plot_runs, read_records, run_status, runs_table, write_status

__all__ = ["format_table", "monitored", "plot_runs", "read_records", "run_status", "runs_table", "write_status"]

warnings.warn("trainer.report moved to trainer.cli.report; import it from there", DeprecationWarning, stacklevel=2)
