"""The ``trainer`` commands: the command line, a thin shell over the library (parse, build, train, report).

Exit codes: 0 success; 2 a user error (config, command line, missing file); 1 an internal
failure; 130 / 143 after SIGINT / SIGTERM (a checkpoint is written first).

This module imports typer, pydantic and yaml only; torch is imported by the commands that need it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Iterator, Optional

import typer

from trainer import run_dir as run_files
from trainer.cli.yaml_source import ConfigError, Source

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Train PyTorch models from a YAML config. Exit codes: 0 ok, 2 user error, 1 internal failure.",
)

CONFIG = typer.Argument(..., help="The YAML config file.", show_default=False)
OVERRIDES = typer.Argument(None, metavar="[KEY=VALUE]...", help="Overrides such as max_steps=200 optimizer.lr=3e-4.",
                           show_default=False)
DEBUG = typer.Option(False, "--debug", help="Show the full traceback of an error.")


class UserError(Exception):
    """A mistake outside the config file (a run directory that exists, a missing checkpoint)."""


@contextlib.contextmanager
def _reporting(debug: bool) -> Iterator[None]:
    """User errors: one line on stderr, exit 2. Anything else: a traceback, exit 1."""
    try:
        yield
    except (ConfigError, UserError) as exc:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except typer.Exit:
        raise
    except Exception:
        traceback.print_exc()
        typer.echo("internal error (exit 1): the traceback above shows where; please report it", err=True)
        raise typer.Exit(1) from None


def _load(config: Path, overrides: Optional[list[str]]):
    from trainer.cli.run_config import validate

    # A project folder's own modules (my_models.py next to the config) resolve as _target_s.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    source = Source.load(config)
    for text in overrides or []:
        source.apply_override(text)
    return source, validate(source)


def _resolved_yaml(run) -> str:
    import yaml

    return yaml.safe_dump(run.model_dump(mode="json", by_alias=True), sort_keys=False)


@app.command()
def run(
    config: Path = CONFIG,
    overrides: Optional[list[str]] = OVERRIDES,
    resume: Optional[str] = typer.Option(
        None, "--resume", help="'auto': continue from the newest good checkpoint of the run; or a checkpoint path."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an earlier run of the same name first."),
    debug: bool = DEBUG,
) -> None:
    """Train: build everything the config names and fit."""
    with _reporting(debug):
        source, cfg = _load(config, overrides)
        run_dir = Path(cfg.out_dir) / cfg.name
        previous = run_dir.exists() and any(run_dir.iterdir())
        if previous and resume is None:
            if not overwrite:
                raise UserError(
                    f"{run_dir} already holds a run; continue it with --resume auto, replace it with --overwrite, "
                    f"or pick another name, e.g. name={cfg.name}-2"
                )
            if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone touches the run directory
                shutil.rmtree(run_dir)
        from trainer.cli.build import build
        from trainer.checkpoint import CheckpointError, find_resume_checkpoint
        from trainer.metrics import truncate_metrics

        try:
            resume_from = find_resume_checkpoint(run_dir, resume) if resume is not None else None
        except CheckpointError as exc:
            raise UserError(str(exc)) from None
        built = build(source, cfg, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if built.trainer.is_main_process:
            (run_dir / run_files.CONFIG).write_text(_resolved_yaml(cfg), encoding="utf-8")
            if resume is not None:
                # Records logged after the checkpoint are logged again, identically, by the resumed run.
                truncate_metrics(run_dir, resume_from["trainer_state"]["global_step"] if resume_from else 0)
        from trainer.cli.report import write_status

        main = built.trainer.is_main_process
        if main:
            write_status(run_dir, "running")
        try:
            built.trainer.fit(resume_from=resume_from)
        except BaseException as exc:
            if main:
                write_status(run_dir, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                             error=f"{type(exc).__name__}: {exc}"[:500], step=built.trainer.global_step)
            if isinstance(exc, CheckpointError):
                raise UserError(str(exc)) from None
            if isinstance(exc, FloatingPointError):
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(1) from None
            raise
        if main:
            signum = built.trainer.stopped_by_signal
            write_status(run_dir, "interrupted" if signum else "finished", step=built.trainer.global_step,
                         reason=built.trainer.stop_reason or "finished")
        built.trainer.close()  # leave the process group (under torchrun)
        _report(built.trainer, run_dir)
        if built.trainer.stopped_by_signal is not None:
            raise typer.Exit(128 + built.trainer.stopped_by_signal)


def _report(trainer, run_dir: Path) -> None:
    if not trainer.is_main_process:
        return
    last: dict[str, float] = {}
    for record in trainer.history:
        last.update({k: v for k, v in record.items() if k.startswith(("train/", "val/"))})
    shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items())
    typer.echo(f"{trainer.stop_reason or 'finished'}: step {trainer.global_step}, epoch {trainer.epoch}; {shown}")
    typer.echo(f"run directory: {run_dir}")


@app.command()
def check(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES, debug: bool = DEBUG) -> None:
    """Validate a config, print it resolved, build its components; train nothing."""
    with _reporting(debug):
        source, cfg = _load(config, overrides)
        from trainer.cli.build import build

        typer.echo(_resolved_yaml(cfg), nl=False)
        built = build(source, cfg, run_dir=None)
        t = built.trainer
        n_params = sum(p.numel() for p in t.module.parameters())
        n_train = sum(p.numel() for p in t.module.parameters() if p.requires_grad)
        typer.echo(f"# device: {t.device}")
        typer.echo(f"# model: {type(t.module).__name__}, {n_params:,} parameters ({n_train:,} trainable)")
        for name, data in (("train", built.train_data), ("val", built.val_data)):
            if data is not None:
                typer.echo(f"# {name} data: {_size(data)}")
        typer.echo(f"# optimizer steps: {t.total_steps() or 'unknown (data of unknown length)'}")
        typer.echo("# config OK")


def _size(data) -> str:
    try:
        n = len(data) if not isinstance(data, (tuple, dict)) else len(next(iter(data.values() if isinstance(data, dict) else data)))
    except TypeError:
        return type(data).__name__
    return f"{n:,} samples ({type(data).__name__})" if not hasattr(data, "batch_size") else f"{n:,} batches"


@app.command("eval")
def evaluate(
    config: Path = CONFIG,
    overrides: Optional[list[str]] = OVERRIDES,
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A checkpoint written by trainer run (a file, or a directory under strategy: fsdp)."),
    debug: bool = DEBUG,
) -> None:
    """Run validation with a checkpoint's weights and print the metrics as JSON."""
    with _reporting(debug):
        source, cfg = _load(config, overrides)
        from trainer.cli.build import build
        from trainer.checkpoint import CheckpointError, load_checkpoint

        built = build(source, cfg, run_dir=None)
        if built.val_data is None:
            raise ConfigError(f"{source.file}: data: the data callable returned no 'val' data to evaluate on")
        try:
            state = load_checkpoint(checkpoint)
            state["path"] = str(checkpoint)
            built.trainer.load_weights(state)
        except CheckpointError as exc:
            raise UserError(str(exc)) from None
        metrics = built.trainer.evaluate()
        built.trainer.close()  # leave the process group (under torchrun)
        typer.echo(json.dumps({"checkpoint": str(checkpoint), "step": state["trainer_state"]["global_step"], **metrics}))


@app.command()
def runs(out_dir: Path = typer.Argument(Path("runs"), help="The folder that holds run directories.")) -> None:
    """A table of the runs in OUT_DIR: status, steps, best monitored value, newest checkpoint."""
    with _reporting(False):
        from trainer.cli.report import format_table, runs_table

        if not out_dir.is_dir():
            raise UserError(f"{out_dir}: no such folder of runs")
        rows = runs_table(out_dir)
        typer.echo(format_table(rows) if rows else f"no runs in {out_dir}")


@app.command()
def plot(
    run_dirs: list[Path] = typer.Argument(..., help="One or more run directories, overlaid.", show_default=False),
    out: Path = typer.Option(Path("curves.png"), "--out", help="The PNG to write."),
) -> None:
    """Plot train/val loss, the monitored metric, LR and gradient norm against step (needs matplotlib)."""
    with _reporting(False):
        from trainer.cli.report import UnreadableRun, plot_runs

        missing = [str(d) for d in run_dirs if not (d / run_files.METRICS_JSONL).exists()]
        if missing:
            raise UserError(f"no {run_files.METRICS_JSONL} in {', '.join(missing)}: pass run directories such as "
                            "runs/digits")
        try:
            path = plot_runs(run_dirs, out)
        except (ImportError, UnreadableRun) as exc:
            raise UserError(str(exc)) from None
        typer.echo(f"wrote {path}")


@app.command()
def schema() -> None:
    """Print the JSON schema of the config file (for an editor's YAML language server)."""
    from trainer.cli.run_config import RunConfig

    typer.echo(json.dumps(RunConfig.model_json_schema(by_alias=True), indent=2))


def main() -> None:
    app()
