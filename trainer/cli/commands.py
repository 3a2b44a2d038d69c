"""The ``trainer`` commands: the command line, a thin shell over the library (parse, build, train, report).

Exit codes: 0 success; 2 a user error (config, command line, missing file, a failure of the
sanity pass); 1 a failed run (one line when the user's code raised, naming it) or an internal
failure (a traceback); 130 / 143 after SIGINT / SIGTERM (a checkpoint is written first); 128 + N after
a SLURM job's requeue signal N (138 for SIGUSR1), requeued or not (status.json says which).

This module imports typer, pydantic and yaml only; torch is imported by the commands that need it.
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import errno
import gc
import json
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Iterator, Optional

import typer
import yaml

from trainer import run_dir as run_files
from trainer.cli.errors import FailedRun, UserError
from trainer import yaml_source
from trainer.parallel import slurm
from trainer.cli.report import NoSuchMetric, UnreadableRun, format_table, plot_runs, runs_table
from trainer.yaml_source import ConfigError, Source

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Train PyTorch models from a YAML config. Exit codes: 0 ok, 2 user error, 1 internal failure.",
)

CONFIG = typer.Argument(..., help="The YAML config file.", show_default=False)
MORE = typer.Argument(
    None, metavar="[CONFIG]... [KEY=VALUE]...", show_default=False,
    help="More config files, each merged over those before it (trainer run base.yaml mlflow.yaml), then overrides "
         "such as max_steps=200 optimizer.lr=3e-4: an argument with '=' is an override, any other a file.")
DEBUG = typer.Option(False, "--debug", help="Show the full traceback of an error.")


_DEBUG_HINT = "; --debug shows the traceback"


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
    except FailedRun as exc:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {exc}{'' if debug else _DEBUG_HINT}", err=True)
        raise typer.Exit(1) from None
    except typer.Exit:
        raise
    except Exception:
        traceback.print_exc()
        typer.echo("internal error (exit 1): the traceback above shows where; please report it", err=True)
        raise typer.Exit(1) from None


def _load(config: Path, more: Optional[list[str]]):
    from trainer.cli.run_config import validate

    # A project folder's own modules (my_models.py next to the config) resolve as _target_s.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    source = yaml_source.load(*_files_and_overrides(config, more or []))
    # A deprecated setting still works; the user hears about it once, as one line, not as a
    # DeprecationWarning that Python's filters hide outside __main__.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validated = validate(source)
    for warning in caught:
        typer.echo(f"warning: {source.file}: {warning.message}", err=True)
    return source, validated


def _files_and_overrides(config: Path, more: list[str]) -> tuple[list[Path], list[str]]:
    """The config files and the overrides of a command line: after the first file, an argument with '='
    is an override and any other a file; the files come first, as they are applied."""
    files, overrides = [config], []
    for text in more:
        if "=" in text:
            if _names(text, Path.is_file):
                raise ConfigError(f"command line '{text}': an argument with '=' after the first config file is an "
                                  "override KEY=VALUE, yet this one is a file; to read it as a config, rename it "
                                  "without '='")
            overrides.append(text)
        elif not _names(text, Path.exists):
            raise ConfigError(f"{text}: config file not found (an argument without '=' is a config file; an "
                              "override is KEY=VALUE, e.g. max_steps=200)")
        elif overrides:
            raise ConfigError(f"command line '{text}': a config file after the override '{overrides[-1]}'; give the "
                              "config files first, then the KEY=VALUE overrides, which apply last")
        else:
            files.append(Path(text))
    return files, overrides


def _names(text: str, test) -> bool:
    """Whether ``test`` holds for the path ``text``; text that no path can be (too long, a NUL) names none."""
    try:
        return test(Path(text))
    except (OSError, ValueError):
        return False


def _resolved_yaml(run) -> str:
    return yaml.safe_dump(run.model_dump(mode="json", by_alias=True), sort_keys=False)


@app.command()
def run(
    config: Path = CONFIG,
    more: Optional[list[str]] = MORE,
    resume: Optional[str] = typer.Option(
        None, "--resume", help="'auto': continue from the newest good checkpoint of the run; or a checkpoint path."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an earlier run of the same name first."),
    accept_changes: bool = typer.Option(
        False, "--accept-changes",
        help="With --resume: continue although the config changes what exact resume needs unchanged (seed, batch "
             "size, model, optimizer, ...); the new values apply from the checkpoint on."),
    debug: bool = DEBUG,
) -> None:
    """Train: build everything the config names and fit."""
    with _reporting(debug):
        source, cfg = _load(config, more)
        _run(source, cfg, resume, overwrite, accept_changes)


def _run(source: Source, cfg, resume: str | None, overwrite: bool, accept_changes: bool) -> None:
    """``trainer run`` once its config is loaded (verify-resume's runs add a callback to it first)."""
    if overwrite and resume is not None:
        raise UserError("--overwrite starts the run anew and --resume continues it: pass one of the two")
    run_dir = Path(cfg.out_dir) / cfg.name
    try:
        os.environ.update(slurm.as_torchrun(os.environ))  # srun without torchrun: each task is one rank
    except ValueError as exc:
        raise UserError(str(exc)) from None
    # Under torchrun rank 0 alone touches the run directory; the others follow its files.
    claim = _claim(run_dir, cfg.name, resume, overwrite) if os.environ.get("RANK", "0") == "0" else _Claim()
    with claim:
        _train(source, cfg, run_dir, resume, claim, accept_changes)


@app.command("verify-resume-run", hidden=True)
def verify_resume_run(
    config: Path = CONFIG,
    more: Optional[list[str]] = MORE,
    resume: bool = typer.Option(False, "--resume", help="Continue with --resume auto."),
) -> None:
    """One run of a verification: trainer run with verify-resume's probe appended to the config's callbacks."""
    from trainer.cli.run_config import validate

    with _reporting(debug=False):
        source, _ = _load(config, more)
        source.data["callbacks"] = [*(source.data.get("callbacks") or []), {"_target_": "trainer.cli.verify.Probe"}]
        _run(source, validate(source), "auto" if resume else None, overwrite=False, accept_changes=False)


@app.command("verify-resume")
def verify_resume(
    config: Path = CONFIG,
    more: Optional[list[str]] = MORE,
    steps: Optional[int] = typer.Option(
        None, "--steps", show_default=False,
        help="Optimizer steps of each run (default: the config's max_steps, at most 50)."),
    kills: int = typer.Option(2, "--kills", help="SIGKILLs at random steps (one inside an accumulation window when "
                                                  "grad_accum_steps > 1); a SIGTERM comes on top."),
    seed: int = typer.Option(0, "--seed", help="Picks the steps of the stops: the same seed, the same stops."),
    debug: bool = DEBUG,
) -> None:
    """Prove exact resume on this config before a long run: train it short, uninterrupted and then killed
    (SIGKILL, SIGTERM) and resumed with --resume auto, in a temporary directory, and compare the batches,
    every logged value and the final state bit for bit. Exit 0 exact, 1 a finding (where the runs part,
    what, the likely cause and the fix), 2 a config error."""
    with _reporting(debug):
        _, cfg = _load(config, more)
        from trainer.cli.verify import verify

        files, overrides = _files_and_overrides(config, more or [])
        finding = verify(files, overrides, cfg, steps, kills, seed, echo=typer.echo)
    if finding is not None:
        raise typer.Exit(1)


class _Claim:
    """The run directory held by this process: its lock (None on ranks other than 0); when it
    already holds a run that this command may not replace, the refusal to raise once the config has
    been checked in full; with ``--overwrite``, that the earlier run goes once the config and the
    sanity pass have passed (a mistake in the new config loses nothing)."""

    def __init__(self, lock: run_files.RunLock | None = None, refusal: UserError | None = None,
                 overwrite: bool = False):
        self.lock, self.refusal, self.overwrite = lock, refusal, overwrite

    def __enter__(self) -> "_Claim":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.lock is not None:
            self.lock.release()


def _claim(run_dir: Path, name: str, resume: str | None, overwrite: bool) -> _Claim:
    """Lock ``run_dir`` for this process, remove what killed saves left in it and, after a run that
    failed before its first checkpoint, empty it (with --overwrite, ``_train`` empties it once the new
    config has passed every check). Problems with the place itself
    (a file in the way, a link, someone else's folder, no space, no write access, a live run) are
    UserErrors now; a run that may not be replaced is a refusal for later."""
    out_dir = run_dir.parent
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"out_dir {out_dir} is a file, not a folder; set out_dir= to a folder for runs")
        if run_dir.is_symlink():
            # --overwrite would empty whatever it points at: a run directory is a real folder in out_dir.
            raise UserError(f"{run_dir} is a symbolic link; a run directory is a real folder in {out_dir}: "
                            f"remove the link or pick another name=")
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"{run_dir} is a file, not a run directory; pick another name=")
        if run_files.contents(run_dir) and not run_files.is_run_dir(run_dir):
            ours = ", ".join(f"{n}/" if n == run_files.CHECKPOINTS else n for n in run_files.OWN)
            raise UserError(f"{run_dir} holds files that are not a run's (none of {ours}); "
                            f"it is left as it is: pick another name= or out_dir=")
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = run_files.RunLock(run_dir)
        except run_files.RunDirBusy as exc:
            stop = f" or stop it (kill {exc.pid})" if exc.pid is not None else ""
            raise UserError(f"{exc}; wait for it to end{stop}, or pick another name, e.g. name={name}-2") from None
        except run_files.LockFileError as exc:
            raise UserError(str(exc)) from None
        try:
            run_files.remove_temp_files(run_dir)
            if not run_files.contents(run_dir) or resume is not None:
                return _Claim(lock)
            if overwrite:
                return _Claim(lock, overwrite=True)
            replaced = _replaceable(run_dir)
            if replaced:
                typer.echo(f"{run_dir}: replacing {replaced}")
                run_files.clear(run_dir)
                return _Claim(lock)
        except BaseException:
            lock.release()
            raise
        return _Claim(lock, UserError(
            f"{run_dir} already holds a run; continue it with --resume auto, replace it with --overwrite, "
            f"or pick another name, e.g. name={name}-2"))
    except OSError as exc:
        raise UserError(_unwritable(run_dir, exc)) from None


def _read_status(run_dir: Path) -> dict | None:
    """``status.json`` as written by ``write_status``; None when there is none or it is damaged."""
    try:
        data = json.loads((run_dir / run_files.STATUS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _replaceable(run_dir: Path) -> str | None:
    """What the run in ``run_dir`` was, when it left nothing to continue and a new run may take its place:
    no checkpoint, and a status of failed, or of running (we hold the lock, so its process is gone),
    or none at all (its process died before writing one)."""
    checkpoints = run_files.checkpoint_dir(run_dir)
    if checkpoints.exists() and (not checkpoints.is_dir() or any(checkpoints.iterdir())):
        return None
    if not (run_dir / run_files.STATUS).exists():
        return "an earlier run whose process ended before its first checkpoint"
    status = (_read_status(run_dir) or {}).get("status")
    if status == "failed":
        return "an earlier run that failed before its first checkpoint"
    if status == "running":
        return "an earlier run whose process ended before its first checkpoint"
    return None


# The machine's conditions an OSError can report: a one-line user error, not a traceback.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_MACHINE = (*_NO_SPACE, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG)


def _unwritable(run_dir: Path, exc: OSError) -> str:
    where = exc.filename or run_dir
    fix = ("free some space, or set out_dir= to another disk" if exc.errno in _NO_SPACE
           else f"set out_dir= to a folder you can write (now {run_dir.parent})")
    return f"cannot write {where}: {exc.strerror or exc}; {fix}"


def _train(source: Source, cfg, run_dir: Path, resume: str | None, claim: _Claim, accept_changes: bool) -> None:
    from trainer.cli.build import build
    from trainer.checkpoint import CheckpointError, find_resume_checkpoint
    from trainer.data.workers import STOP_SIGNALS
    from trainer.loop.signals import Interrupted

    try:
        finished = _finished_at(run_dir, cfg) if resume == "auto" else None
        if finished is not None:
            typer.echo(f"{run_dir}: the run finished at step {finished} and its newest checkpoint is the final one; "
                       "nothing to continue (raise max_steps or max_epochs to train further)")
            return
        resume_from = find_resume_checkpoint(run_dir, resume) if resume is not None else None
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    # A run that may not be replaced gets no files from this one: built without its run directory,
    # the config is checked in full (its own errors come first), then the refusal.
    built = build(source, cfg, None if claim.refusal else run_dir)
    if claim.refusal:
        raise claim.refusal
    # A stop signal from here on is the run's, as inside fit (whose handlers take over there): one that
    # comes during the resume's load or the sanity pass stops the run at its first step boundary, with
    # a checkpoint; one after fit's final checkpoint leaves the finished run finished. When the handlers
    # end, those that hold the signals through the teardown come back (_hold_stop_signals).
    _hold_stop_signals(STOP_SIGNALS)
    try:
        with built.trainer.stop_signals():
            _fit_built(source, cfg, run_dir, resume, resume_from, claim, built, accept_changes)
    except Interrupted as exc:  # a second signal outside fit
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(128 + exc.signum) from None


def _fit_built(source: Source, cfg, run_dir: Path, resume: str | None, resume_from, claim: _Claim, built,
               accept_changes: bool) -> None:
    from trainer.checkpoint import CheckpointError
    from trainer.data.sources import DataError
    from trainer.observability.metrics import truncate_metrics
    from trainer.loop.signals import Interrupted
    from trainer.observability.trackers import TrackerError

    if built.trainer.is_main_process:
        for note in built.notes:
            typer.echo(f"note: {note}")
    if resume_from is not None:
        # Restored and checked against this config before anything in the run directory changes.
        try:
            changes = built.trainer.load_checkpoint(resume_from, accept_changes=accept_changes)
        except CheckpointError as exc:
            raise UserError(str(exc)) from None
        if changes and built.trainer.is_main_process:
            typer.echo(f"resume: changed since the checkpoint: {'; '.join(changes)}")
    if resume_from is None:
        _init_from(source, built.trainer)  # a fresh run's starting weights; a resumed run has its checkpoint's
    _sanity_pass(source, cfg, built.trainer)  # before anything in the run directory changes
    main = built.trainer.is_main_process
    if main:
        try:
            if claim.overwrite:
                run_files.clear(run_dir)  # --overwrite: the new config has passed every check
            if resume_from is not None:
                # Records logged after the checkpoint are logged again, identically, by the resumed run.
                saved = resume_from["trainer_state"]
                truncate_metrics(run_dir, saved.get("global_step", 0), records=saved.get("logged_records", 0))
            elif resume is not None:
                # Nothing to continue (killed before its first checkpoint): the run starts again from
                # step 0 in its own directory, and what it had logged is logged again.
                for name in (run_files.METRICS_JSONL, run_files.METRICS_CSV):
                    (run_dir / name).unlink(missing_ok=True)
        except OSError as exc:
            raise UserError(_unwritable(run_dir, exc)) from None
    try:
        # fit writes the run's record (status.json, and config.yaml: this whole config, which the
        # Trainer was given as run_config), under the lock this process holds already.
        built.trainer.fit()
    except BaseException as exc:
        if isinstance(exc, Interrupted):
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(128 + exc.signum) from None
        if isinstance(exc, (CheckpointError, DataError, TrackerError)):
            raise UserError(str(exc)) from None
        if isinstance(exc, OSError) and exc.errno in _MACHINE:
            raise UserError(f"{_unwritable(run_dir, exc)}; the checkpoints already written are intact "
                            "(--resume auto continues from the newest)") from None
        if isinstance(exc, FloatingPointError):
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        if isinstance(exc, Exception):
            _raise_if_users(source, cfg, built.trainer, exc)
        raise
    finally:
        for logger in built.trainer.loggers:  # the loggers the config built (fit closes only its files)
            logger.close()
    signum = built.trainer.stopped_by_signal
    requeue = signum is not None and signum == slurm.requeue_signal(built.trainer.config.slurm.requeue_signal)
    # Said before the ranks meet to leave the group: after a stop signal each rank exits 143 as soon
    # as it leaves, and torchrun then ends the ranks still running, rank 0 included.
    _report(built.trainer, run_dir)
    if requeue and main:
        _requeue(run_dir, built.trainer)
    built.trainer.close()  # leave the process group (under torchrun)
    if built.trainer.stopped_by_signal is not None:
        raise typer.Exit(128 + built.trainer.stopped_by_signal)


def _requeue(run_dir: Path, trainer) -> None:
    """Requeue the SLURM job once everything is written (SLURM ends the job's processes as soon as it
    accepts). A job that could not be requeued keeps its checkpoint; status.json and one line say why."""
    job = slurm.job_id()
    try:
        slurm.requeue()
    except slurm.RequeueError as exc:
        with contextlib.suppress(OSError):
            run_files.write_status(run_dir, "interrupted", step=trainer.global_step, reason=_ending(trainer),
                                   requeue_error=str(exc))
        typer.echo(f"error: SLURM job {job} was not requeued: {exc}; the checkpoint of step {trainer.global_step} "
                   "is complete: submit the job again (its trainer run ... --resume auto continues from it), or make "
                   "scontrol available to the job to have it requeued", err=True)
        return
    typer.echo(f"SLURM job {job} requeued (scontrol requeue {job}): it runs again and --resume auto continues "
               f"from step {trainer.global_step}")


def _init_from(source: Source, trainer, prefix: str = "") -> None:
    """Load ``init_from`` (if set); a file that is missing, unreadable or does not fit the model is a
    config error at ``init_from``. Under torchrun every rank loads; rank 0 says what."""
    from trainer.checkpoint.weights import WeightsError

    try:
        loaded = trainer.apply_init_from()
    except WeightsError as exc:
        raise source.at(("init_from",), str(exc).removeprefix("init_from: ")) from None
    if loaded and trainer.is_main_process:
        typer.echo(f"{prefix}{loaded}")


def _entry(source: Source, cfg, part: str | None, callback: int | None) -> tuple[str, tuple]:
    """The config entry behind a part of the run (``trainer.loop.sanity.PARTS``): a label and its path."""
    trainer_path = cfg.trainer.target if not isinstance(cfg.trainer, str) else cfg.trainer
    if part == "model":
        return f"{cfg.model.target}(...)", ("model",)
    if part == "loss" and cfg.loss is not None:
        return (cfg.loss if isinstance(cfg.loss, str) else f"{cfg.loss.target}(...)"), ("loss",)
    if part == "data":
        return f"{cfg.data.target}(...)", ("data",)
    if part == "callback" and callback is not None:
        at = ("callbacks", callback, "monitor") if "monitor" in cfg.callbacks[callback].kwargs else ("callbacks", callback)
        return cfg.callbacks[callback].target, at
    if part in ("training_step", "validation_step", "backward"):
        return f"{trainer_path}.{part}", ("trainer",)
    return trainer_path, ("trainer",)


def _sanity_pass(source: Source, cfg, trainer) -> None:
    """The sanity pass (unless ``sanity_check: false``); a failure is a config error at the entry
    responsible. Under torchrun every rank runs it."""
    from trainer.data.sources import DataError
    from trainer.loop.sanity import SanityCheckError

    if not cfg.sanity_check:
        return
    try:
        trainer.sanity_check()
    except DataError as exc:
        raise UserError(str(exc)) from None
    except SanityCheckError as exc:
        label, path = _entry(source, cfg, exc.part, exc.callback)
        hint = _DEBUG_HINT if exc.__cause__ is not None else ""
        raise source.at(path, f"{label} {exc.problem}{hint}") from exc


def _raise_if_users(source: Source, cfg, trainer, exc: Exception) -> None:
    """A ``FailedRun`` naming the user's code when ``exc`` came from it; our own errors pass."""
    from trainer.loop.sanity import culprit, one_line

    found = culprit(trainer, exc)
    if found is None:
        return
    if found.frame is not None:
        where = found.location()
    else:  # torch's code inside the user's part (an nn.Sequential): the config entry is what to look at
        label, path = _entry(source, cfg, found.part, found.callback)
        where = f"{label} ({source.where(path)})"
    steps = trainer.global_step
    raise FailedRun(f"the run failed after {steps} optimizer step{'s' * (steps != 1)}: {one_line(exc)}, "
                    f"raised in {where}") from exc


def _finished_at(run_dir: Path, cfg) -> int | None:
    """The step at which the run in ``run_dir`` finished, when ``--resume auto`` has nothing to add:
    its status says finished, its newest checkpoint is the final one, and the config's max_steps and
    max_epochs are those it finished with, or already reached. None otherwise."""
    from trainer.checkpoint import CheckpointError, load_checkpoint

    status = _read_status(run_dir) or {}
    checkpoints = run_files.list_checkpoints(run_files.checkpoint_dir(run_dir))
    if status.get("status") != "finished" or not checkpoints:
        return None
    newest = checkpoints[-1]
    step = int(run_files.CHECKPOINT_NAME.match(newest.name).group(1))
    if step != status.get("step"):
        return None  # the final checkpoint is gone or damaged: the resume rebuilds it
    try:
        state = load_checkpoint(newest)
    except CheckpointError:
        return None  # find_resume_checkpoint falls back past it, and says so
    saved = state.get("config") or {}
    if (cfg.max_steps, cfg.max_epochs) == (saved.get("max_steps"), saved.get("max_epochs")):
        return step  # stopped by its own limits or by a callback (early stopping): the same again
    # The Trainer's own stopping rule (Trainer._done), applied to the checkpoint's counters.
    epoch = state["trainer_state"]["epoch"]
    max_epochs = cfg.max_epochs if cfg.max_epochs is not None else (1 if cfg.max_steps is None else None)
    reached = ((cfg.max_steps is not None and step >= cfg.max_steps)
               or (max_epochs is not None and epoch >= max_epochs))
    return step if reached else None


def _ending(trainer) -> str:
    """Why the run ended, as ``status.json`` says it."""
    return run_files.ending(trainer.stop_reason, trainer.should_stop)


def _report(trainer, run_dir: Path) -> None:
    from trainer.callbacks.progress import epoch_text

    if not trainer.is_main_process:
        return
    last: dict[str, float] = {}
    for record in trainer.history:
        last.update({k: v for k, v in record.items() if k.startswith(("train/", "val/"))})
    shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items())
    # Counted from 1 like the progress bar and lines: the epoch of the last step, which the last
    # record of metrics.jsonl holds counted from 0.
    epoch = epoch_text(trainer.last_step_epoch, trainer.total_epochs())
    typer.echo(f"{_ending(trainer)}: step {trainer.global_step}, {epoch}; {shown}")
    typer.echo(f"run directory: {run_dir}")


@app.command()
def check(config: Path = CONFIG, more: Optional[list[str]] = MORE, debug: bool = DEBUG) -> None:
    """Validate a config, print it resolved, build its components; train nothing."""
    with _reporting(debug):
        source, cfg = _load(config, more)
        from trainer.cli.build import build

        typer.echo(_resolved_yaml(cfg), nl=False)
        built = build(source, cfg, run_dir=None)
        t = built.trainer
        for note in built.notes:
            typer.echo(f"# note: {note}")
        _init_from(source, t, prefix="# ")
        _sanity_pass(source, cfg, t)
        n_params = sum(p.numel() for p in t.module.parameters())
        n_train = sum(p.numel() for p in t.module.parameters() if p.requires_grad)
        typer.echo(f"# device: {t.device}")
        typer.echo(f"# model: {type(t.module).__name__}, {n_params:,} parameters ({n_train:,} trainable)")
        for name, data in built.splits.items():  # train, val, test: those the data callable returned
            typer.echo(f"# {name} data: {_size(data)}")
        typer.echo(f"# optimizer steps: {t.total_steps() or 'unknown (data of unknown length)'}")
        typer.echo("# sanity pass: one training and one validation batch went through" if cfg.sanity_check
                   else "# sanity pass: off (sanity_check: false)")
        typer.echo("# config OK")


def _size(data) -> str:
    try:
        n = len(data) if not isinstance(data, (tuple, dict)) else len(next(iter(data.values() if isinstance(data, dict) else data)))
    except TypeError:
        return type(data).__name__
    return f"{n:,} samples ({type(data).__name__})" if not hasattr(data, "batch_size") else f"{n:,} batches"


CHECKPOINT = typer.Option(
    ..., "--checkpoint", show_default=False,
    help="A run directory (its newest good checkpoint, as --resume auto picks it), or a checkpoint written by "
         "trainer run: a file, or a directory under strategy: fsdp.")


@app.command("eval")
def evaluate(
    config: Path = CONFIG,
    more: Optional[list[str]] = MORE,
    checkpoint: Path = CHECKPOINT,
    data: str = typer.Option("val", "--data", help="The split of the config's data to evaluate on: val, test or train; "
                                                    "its name prefixes the metrics (test/acc)."),
    debug: bool = DEBUG,
) -> None:
    """Evaluate a checkpoint on a split of the config's data (val unless --data), with the weights the
    run validated (an EMA of them under EMAWeights), and print the metrics as JSON; "weights" says
    which: "ema" or "trained". Nothing of the run changes."""
    with _reporting(debug):
        source, cfg = _load(config, more)
        _check_exists(checkpoint)  # before anything is built
        from trainer.cli.build import build

        built = build(source, cfg, run_dir=None)
        split = _split(source, cfg, built, data, "evaluate on")
        state = _restore(built.trainer, checkpoint, "eval")
        # With the data given, no validation hook fires: EarlyStopping and BestCheckpoints stay still.
        metrics = built.trainer.evaluate(split, prefix=data)
        swapped = _weights_used(built.trainer)
        built.trainer.close()  # leave the process group (under torchrun)
        typer.echo(json.dumps({"checkpoint": state["path"], "step": state["trainer_state"]["global_step"],
                               "weights": swapped or "trained", "data": data, **metrics}))


@app.command()
def predict(
    config: Path = CONFIG,
    more: Optional[list[str]] = MORE,
    checkpoint: Path = CHECKPOINT,
    out: Path = typer.Option(
        ..., "--out", show_default=False,
        help="The file to write: NAME.pt (torch.save of the outputs, held in memory) or NAME.safetensors "
             "(streamed to disk, for sets larger than memory)."),
    data: Optional[str] = typer.Option(
        None, "--data", show_default=False,
        help="The split of the config's data to predict: test, val or train (default: test, else val)."),
    debug: bool = DEBUG,
) -> None:
    """Write a checkpoint's predictions (predict_step's outputs, the model's by default) for every
    sample of a split of the config's data, in data order, with the weights the run validated."""
    with _reporting(debug):
        source, cfg = _load(config, more)
        _check_exists(checkpoint)  # before anything is built
        from trainer.cli.build import build
        from trainer.evaluation.prediction import PredictionError, check_out

        try:
            check_out(out, "--out")
        except PredictionError as exc:
            raise UserError(str(exc)) from None
        # The weights come from the checkpoint file, or from every file of a sharded checkpoint's
        # directory; a run directory's own files and checkpoints are check_out's to guard.
        given = checkpoint.resolve()
        if out.resolve() == given or (given in out.resolve().parents and not run_files.is_run_dir(checkpoint)):
            raise UserError(f"--out {out} is the checkpoint --checkpoint reads the weights from; writing there would "
                            f"replace it: pick another name, e.g. {out.with_name('preds' + out.suffix)}")
        built = build(source, cfg, run_dir=None)
        if data is None:
            data = "test" if "test" in built.splits else "val"
        split = _split(source, cfg, built, data, "predict")
        state = _restore(built.trainer, checkpoint, "predict")
        try:
            written = built.trainer.predict(split, out=out)
        except PredictionError as exc:
            raise UserError(str(exc)) from None
        except OSError as exc:  # a full disk: the earlier file, if any, stays whole
            raise UserError(f"cannot write {exc.filename or out}: {exc.strerror or exc}; free some space or pick "
                            "another --out") from None
        swapped = _weights_used(built.trainer)
        built.trainer.close()  # leave the process group (under torchrun)
        if written is not None:  # rank 0
            which = f"the EMA weights ({swapped})" if swapped else "the trained weights"
            typer.echo(f"wrote {written.path}: {written.samples} predictions of the {data} data, {written.describe()}; "
                       f"{which} of step {state['trainer_state']['global_step']} from {state['path']}")


def _split(source: Source, cfg, built, name: str, purpose: str):
    """The split ``name`` of what the config's data callable returned, or the error naming those it has."""
    if name in built.splits:
        return built.splits[name]
    from trainer.cli.build import SPLITS

    returned = ", ".join(built.splits)
    if name not in SPLITS:
        close = difflib.get_close_matches(name, list(built.splits), n=1)
        hint = f"did you mean --data {close[0]}? " if close else ""
        raise UserError(f"--data {name}: no such split; {hint}the data callable returns {returned}")
    raise ConfigError(f"{source.file}: data: {cfg.data.target}(...) returned no '{name}' data to {purpose} (it "
                      f"returns {returned}); return {{'train': ..., 'val': ..., 'test': ...}}, or pass --data "
                      f"{'val' if name != 'val' and 'val' in built.splits else 'train'}")


def _restore(trainer, checkpoint: Path, purpose: str) -> dict:
    """Load the weights of ``checkpoint`` (a run directory: its newest good checkpoint) into ``trainer``,
    with the callbacks' and registered state, which evaluation uses too (EMAWeights' average)."""
    from trainer.checkpoint import CheckpointError, load_checkpoint, newest_good_checkpoint

    _check_exists(checkpoint)
    try:
        if run_files.is_run_dir(checkpoint):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                state = newest_good_checkpoint(checkpoint, purpose)
            for warning in caught:  # a damaged newest checkpoint passed over
                typer.echo(f"warning: {warning.message}", err=True)
            if state is None:
                raise UserError(f"--checkpoint {checkpoint}: the run has no checkpoint in "
                                f"{run_files.checkpoint_dir(checkpoint)}; checkpoints are written every "
                                "checkpoint.every_n_steps steps and at the end of a run")
        else:
            state = load_checkpoint(checkpoint)
            state["path"] = str(checkpoint)
        trainer.load_weights(state, states=True)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    return state


def _check_exists(checkpoint: Path) -> None:
    if not checkpoint.exists():
        raise UserError(f"--checkpoint {checkpoint} does not exist; pass a run directory (runs/NAME) or one of its "
                        "checkpoints (runs/NAME/checkpoints/step-....pt)")


def _weights_used(trainer) -> str:
    """Which callbacks' evaluation weights were used ("ema"), or "" for the trained weights."""
    return "+".join(cb.weights_name for cb in trainer.callbacks
                    if hasattr(cb, "evaluation_weights") and getattr(cb, "weights_name", None))


@app.command()
def export(
    source: Path = typer.Argument(
        ..., metavar="RUN_DIR_OR_CHECKPOINT", show_default=False,
        help="A run directory (its newest good checkpoint, as --resume auto picks it), or a checkpoint: a file, "
             "or a directory under strategy: fsdp."),
    out: Path = typer.Option(
        ..., "--out", show_default=False,
        help="The weights file to write, NAME.safetensors; the model's config goes beside it as NAME.yaml."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", show_default=False,
        help="bf16, fp16 or fp32 for the floating-point tensors (default: as saved)."),
    weights: str = typer.Option(
        "auto", "--weights",
        help="auto: the EMA when the run kept one (EMAWeights), else the trained weights; ema; trained; "
             "or the state_key of one EMA callback."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace NAME.safetensors and NAME.yaml if they exist."),
    debug: bool = DEBUG,
) -> None:
    """Write a checkpoint's weights (the EMA of them under EMAWeights) as one .safetensors file for
    serving, and the model's config beside it (needs safetensors)."""
    with _reporting(debug):
        from trainer.checkpoint import CheckpointError
        from trainer.evaluation.export import ExportError, SafetensorsMissing, export_model

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                done = export_model(source, out, dtype=dtype, weights=weights, overwrite=overwrite)
            except (ExportError, CheckpointError, SafetensorsMissing) as exc:
                raise UserError(str(exc)) from None
            except OSError as exc:  # a full disk, a read-only folder: the earlier files stay whole
                raise UserError(f"cannot write {exc.filename or out}: {exc.strerror or exc}; free some space or "
                                "pick another --out") from None
            finally:
                for warning in caught:  # a damaged newest checkpoint passed over, say
                    typer.echo(f"warning: {warning.message}", err=True)
        which = f"the EMA weights ({done.ema})" if done.ema is not None else "the trained weights"
        typer.echo(f"wrote {done.weights}: {which} of step {done.step}, {done.tensors} tensors, {done.dtype}, "
                   f"{_bytes(done.bytes)}, from {done.checkpoint}")
        if done.config is not None:
            typer.echo(f"wrote {done.config}: the model section of the run's config")
        else:
            typer.echo("no model config written: the checkpoint's config has no model section (the Trainer was "
                       "built in code)")


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


@app.command()
def runs(out_dir: Path = typer.Argument(Path("runs"), help="The folder that holds run directories.")) -> None:
    """A table of the runs in OUT_DIR: status, steps, best monitored value, newest checkpoint."""
    with _reporting(False):
        if not out_dir.is_dir():
            raise UserError(f"{out_dir}: no such folder of runs")
        rows = runs_table(out_dir)
        typer.echo(format_table(rows) if rows else f"no runs in {out_dir}")


@app.command()
def plot(
    run_dirs: list[Path] = typer.Argument(..., help="One or more run directories, overlaid.", show_default=False),
    out: Path = typer.Option(Path("curves.png"), "--out", help="The PNG to write."),
    metric: Optional[list[str]] = typer.Option(
        None, "--metric", help="A logged metric to plot in a panel of its own (repeatable), e.g. val/teacher_acc."),
) -> None:
    """Plot train/val loss, the monitored metric, LR, gradient norm, the shares of wall time and any
    --metric against step, one shared step axis, runs overlaid; noisy series with their EMA over them;
    panels without data are left out (needs matplotlib)."""
    with _reporting(False):
        missing = [str(d) for d in run_dirs if not (d / run_files.METRICS_JSONL).exists()]
        if missing:
            raise UserError(f"no {run_files.METRICS_JSONL} in {', '.join(missing)}: pass run directories such as "
                            "runs/digits")
        try:
            path = plot_runs(run_dirs, out, metrics=metric or [])
        except (ImportError, UnreadableRun, NoSuchMetric) as exc:
            raise UserError(str(exc)) from None
        typer.echo(f"wrote {path}")


@app.command()
def schema() -> None:
    """Print the JSON schema of the config file (for an editor's YAML language server)."""
    from trainer.cli.run_config import RunConfig

    typer.echo(json.dumps(RunConfig.model_json_schema(by_alias=True), indent=2))


def _one_line_warnings() -> None:
    """A warning raised at one of the framework's own lines reads as the CLI's other messages do:
    ``warning: ...`` on one line (the file and line inside ``trainer`` would tell a user nothing).
    One raised at a user's line, or by another package, keeps Python's form, which names that line."""
    package = Path(__file__).resolve().parents[1]
    python_form = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if Path(filename).resolve().is_relative_to(package):
            typer.echo(f"warning: {message}", err=True)
        else:
            python_form(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main() -> None:
    _one_line_warnings()
    # Registered before the commands import torch and multiprocessing, so that it runs after their
    # exit handlers, as the last one.
    atexit.unregister(_ignore_held_signals)
    atexit.register(_ignore_held_signals)
    try:
        app()
    finally:
        _hold_stop_signals()
        release()


def _hold_stop_signals(signums: tuple[int, ...] | None = None) -> None:
    """From the end of the run (or of a command without one) to the process's exit (its DataLoader
    workers ended, what it left collected, atexit), a stop signal has nothing left to stop: the
    run's outcome is written. Left to its default there, it killed the process or raised
    KeyboardInterrupt in the middle of ending the workers (a traceback, workers left running, or
    never told to end, and multiprocessing's exit then waited for them for ever). The first one is
    noted and the teardown, which is bounded, goes on, so the exit status stays the command's; a
    second one has its default effect at once. ``signums``: those held (default: every signal the
    DataLoader workers leave to the main process; before a run, those its handlers give back). A
    command that loaded no data (and no torch) has no such teardown: its signals are left as they are."""
    workers = sys.modules.get("trainer.data.workers")
    if workers is None or _teardown_signal:
        return  # (a signal noted already: the next has its default effect)
    for signum in signums or workers.LEFT_TO_MAIN:
        with contextlib.suppress(ValueError):  # not the main thread: the signals keep their meaning
            signal.signal(signum, _noted)


_teardown_signal: list[int] = []  # the stop signal noted in the teardown, if any


def _noted(signum: int, frame) -> None:
    _teardown_signal.append(signum)
    for held in _held():
        signal.signal(held, signal.SIG_DFL)


def _held() -> list[int]:
    return [signum for signum in signal.valid_signals() if signal.getsignal(signum) is _noted]


def _ignore_held_signals() -> None:
    """The last exit handler: the interpreter's finalization gives every signal that has a Python
    handler its default back, so one that lands in the last moments of the exit would still kill
    the process. Those held (none noted yet) are ignored for that time instead."""
    for signum in _held():
        signal.signal(signum, signal.SIG_IGN)


def release() -> None:
    """Free what a command leaves behind (the Trainer, an FSDP module and the collectives' work objects
    it keeps) while the interpreter is whole: freed during interpreter shutdown, a tensor gloo's work
    still holds needs the GIL there, and the process aborts ("terminate called without an active
    exception", seen on one rank of a finished fsdp run). The DataLoader workers first: collected,
    their iterators would wait seconds for each (trainer.data.workers; loaded with any run's data, and
    never by the commands that need no torch)."""
    workers = sys.modules.get("trainer.data.workers")
    if workers is not None:
        workers.end_loaders()
    gc.collect()
