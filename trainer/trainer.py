"""The training loop.

``Trainer.fit`` reads top to bottom: epochs of micro-batches, each one forward, backward and,
every ``grad_accum_steps`` micro-batches, one optimizer step. Everything optional hangs off the
hooks listed in ``trainer.hooks``. A subclass overrides a step (``training_step``,
``validation_step``, ``backward``, ``configure_optimizers``, or ``manual_step`` to back and step
several optimizers itself), not the loop.

The Trainer wires its parts: the strategy (one process, DDP or FSDP), the telemetry, the optimizer
step, the non-finite guard, the checkpoints, evaluation, the run's length and stop signals each live
in a module of their own and decide for themselves when to act.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer import callbacks as builtin_callbacks
from trainer import checkpoint as ckpt
from trainer import schedules
from trainer.checkpoint import weights
from trainer.checkpoint.saving import RunCheckpoints
from trainer.config import TrainerConfig, compile_settings
from trainer.data.batches import describe
from trainer.data.run_data import RunData
from trainer.data.sources import LoaderStates, empty_epoch, is_stateful_loader, length_of
from trainer.device import seed_everything, torch_settings
from trainer.evaluation.evaluator import Evaluator
from trainer.freezing import UnfrozenGroups, detach
from trainer.hooks import HOOKS, collect_hooks
from trainer.loop import compilation, manual, sanity, signals
from trainer.loop.nonfinite import Diagnosis, NonFiniteGuard
from trainer.loop.placement import place
from trainer.loop.run_length import RunLength
from trainer.loop.step import OptimizerStep, split_loss
from trainer.observability import metric_objects, timing
from trainer.observability.metrics import Logger
from trainer.observability.profiling import RunProfiler
from trainer.observability.records import Records
from trainer.observability.telemetry import Telemetry
from trainer.parallel import distributed, slurm
from trainer.run_dir import RunRecord


class Trainer:
    """Trains ``model`` on ``train_data`` with ``optimizer``: the public API, and the wiring of the
    components that decide for themselves. The arguments, the override points and what callbacks and
    subclasses may read: docs/callbacks.md (several optimizers: docs/loop.md); the rest is internal."""

    def __init__(self, model: nn.Module | Callable[[], nn.Module], optimizer: torch.optim.Optimizer | Any = None,
                 train_data: Any = None, val_data: Any = None, *, loss_fn: Any = None, scheduler: Any = None,
                 callbacks: Sequence[Any] = (), config: TrainerConfig | dict[str, Any] | None = None,
                 run_dir: str | Path | None = None, loggers: Sequence[Logger] = (),
                 run_config: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None):
        cfg = self.config = TrainerConfig.of(config)
        self.layout = distributed.from_env()  # rank 0 of 1 outside torchrun
        manual_mode = type(self).manual_step is not Trainer.manual_step
        placed = place(model, optimizer, cfg, self.layout, self.configure_sharding, steps_itself=manual_mode)
        self.device, self.precision, self.strategy = placed.device, placed.precision, placed.strategy
        self.module = placed.module  # the plain (under fsdp, sharded) module
        compiled = compile_settings(cfg.compile)
        self.model = compilation.compile_model(placed.stepped, compiled)  # what training steps call
        self.loss_fn = loss_fn
        self.metrics = metric_objects.for_run(metrics, self.device)
        self._data = RunData(train_data, val_data, cfg, self.device, self.precision.param_dtype, self.layout)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.is_main_process = self.layout.rank == 0  # writes files, shows progress
        # The run's config as saved in checkpoints and config.yaml, and given to trackers.
        run_config = run_config if run_config is not None else cfg.model_dump(mode="json")

        # Every optimizer with its scheduler (None where it has none); the first is ``optimizer``.
        overridden = type(self).configure_optimizers is not Trainer.configure_optimizers
        self.optimizers, self.schedulers = manual.resolve_optimizers(
            optimizer, scheduler, self.configure_optimizers, self.trainable_parameters,
            overridden=f"{type(self).__name__}.configure_optimizers" if overridden else None)
        self.optimizer, self.scheduler = self.optimizers[0], self.schedulers[0]
        manual.check_optimizers(self.optimizers, self.module, self.strategy, steps_itself=manual_mode)
        self.callbacks = [*callbacks, *builtin_callbacks.from_config(cfg)]
        self._hooks = collect_hooks(self, self.callbacks, Trainer)

        # Progress, saved in checkpoints: optimizer steps done, the epoch, its micro-batches consumed.
        self.global_step = self.epoch = self.batch_in_epoch = 0
        self.should_stop, self.stop_reason, self.stopped_by_signal = False, None, None  # see stop()
        # Seeded or resumed (a later fit() continues, it does not seed again); sanity pass done.
        self._started = self._sanity_checked = False

        self._run_record = RunRecord(self.run_dir, self.is_main_process, run_config)  # lock, config.yaml, status.json
        self._records = Records(loggers, self.run_dir, self.is_main_process, run_config,
                                lambda record: self._call("on_log", record))
        self.loggers, self.history = self._records.loggers, self._records.history  # the same lists
        self._profiler = RunProfiler(cfg.profile, self.device, self.run_dir, self.layout.rank)
        # Inside a SLURM job its requeue signal stops the run like SIGTERM; the CLI then requeues it.
        self._signals = signals.StopSignals(requeue=slurm.requeue_signal(cfg.slurm.requeue_signal))
        self._guard = guard = NonFiniteGuard(cfg.on_nonfinite, cfg.max_consecutive_skips, self.optimizers, self.device,
                                            fp16=cfg.precision == "fp16", check=cfg.nonfinite_check)
        self._step = OptimizerStep.for_run(self, self._hooks, self.strategy, guard, self.precision.scaler,
                                           self.optimizers, self.schedulers, self.device, cfg.clip_grad_norm,
                                           compiled, automatic=not manual_mode)
        times = timing.for_run(cfg.throughput, self.module, self.device, cfg.precision)  # time/*, tokens/s, mfu
        self._telemetry = Telemetry.for_run(self.device, times, guard, self.optimizers,
                                            compilation.Recompiles() if compiled is not None else None)
        self._unfrozen = UnfrozenGroups(self.module, self.optimizer, self.scheduler, others=self.optimizers[1:])
        init_from = weights.InitFrom(cfg.init_from, self.module, reset_missing=placed.built_on_meta)
        guard.explain = Diagnosis(self.module, lambda: self._telemetry.last_batch(self.global_step),
                                  init_from)  # what a non-finite step's message names
        self._evaluator = Evaluator(self, self._data, self.strategy, self.precision, cfg, self.callbacks, self._hooks,
                                    self.metrics)  # evaluate, test, predict; when the run validates
        self._checkpointer = ckpt.Checkpointer(
            self.strategy, self.module, self.optimizers, self.schedulers, self.precision.scaler, self.callbacks,
            # batch_size and grad_accum_steps as trained: a resume on other ranks may have set them (the
            # checkpointer restores the values this run takes, see load_checkpoint).
            train_state=[ckpt.Attributes(self, "global_step", "epoch", "batch_in_epoch"),
                         self._evaluator,  # validated_step
                         ckpt.Attributes(self._records, "logged_records"),
                         ckpt.Attributes(cfg, "batch_size", "grad_accum_steps"),
                         guard, self._telemetry.interval,
                         LoaderStates(lambda: self._data.train_source() if is_stateful_loader(self._data.train) else None)],
            config=run_config, unfrozen=self._unfrozen, loggers=self.loggers, init_from=init_from,
        )
        self._saves = RunCheckpoints(self._checkpointer, self.run_dir, cfg.checkpoint, self._signals.deferred,
                                     self.is_main_process, self.strategy.sharded)
        self._length = RunLength(cfg, self._data)
        self._manual = (manual.ManualSteps(self, self._step, self.optimizers, self._hooks, self.precision,
                                           self.layout.world_size, lambda: cfg.grad_accum_steps)
                        if manual_mode else None)  # the subclass's own step
        # What the sanity pass and culprit() need beyond the public attributes (trainer.loop.sanity).
        self.sanity_parts = sanity.Parts.of(type(self), Trainer, self._data, self._evaluator, self._manual,
                                            builtin_callbacks.MONITORING, Trainer._loss, Trainer._unpack)

    # ----------------------------------------------------------------- override points

    def configure_optimizers(self) -> Any:
        """Return an optimizer, or ``(optimizer, scheduler)``; called once when none is given (docs/loop.md)."""
        raise TypeError("no optimizer: pass Trainer(model, optimizer=...) or override configure_optimizers() in your "
                        "Trainer subclass, e.g. return torch.optim.AdamW(self.trainable_parameters(), lr=1e-3)")

    def configure_sharding(self, module: nn.Module) -> None:
        """Apply ``fully_shard`` to ``module`` under ``strategy: fsdp``, the root last (docs/distributed.md)."""
        distributed.shard_model(module, self.config.precision)

    def training_step(self, batch: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """Return the mean loss, a dict with ``"loss"`` and extra metrics (``train/<name>``), or one
        with ``"loss_sum"`` and ``"count"`` for the mean over every item of the step (docs/memory.md)."""
        x, y = self._unpack(batch, "training_step")
        return self._loss(self.model(x), y)

    def validation_step(self, batch: Any) -> dict[str, Any]:
        """Return per-batch means (``val/<name>``), ``"loss_sum"`` and ``"count"``, or metric objects
        computed over the whole set. The default: ``loss``, ``acc`` for class logits and ``metrics``."""
        x, y = self._unpack(batch, "validation_step")
        out = self.model(x)
        loss = self._loss(out, y)
        metrics = dict(loss) if isinstance(loss, dict) else {"loss": loss}
        if out.ndim == 2 and y.ndim == 1 and not y.is_floating_point():
            metrics["acc"] = (out.argmax(dim=-1) == y).float().mean()
        for metric in self.metrics.values():
            metric.update(out, y)
        return {**metrics, **self.metrics}

    def predict_step(self, batch: Any) -> Any:
        """What ``predict`` collects for a batch, one row per sample: the model on the batch or its first item."""
        if isinstance(batch, torch.Tensor):
            return self.model(batch)
        if isinstance(batch, (tuple, list)) and batch:
            return self.model(batch[0])
        raise TypeError(f"the default predict_step expects each batch to be a tensor of inputs or a tuple starting "
                        f"with them, got {describe(batch)}; override predict_step(self, batch) in a Trainer subclass")

    def manual_step(self, batch: Any) -> dict[str, torch.Tensor] | None:
        """Override to take over the whole step (GANs, alternating updates): called per micro-batch
        instead of ``training_step``, ``backward`` and the optimizer step, it calls ``manual_backward``
        and ``optimizer_step``; returns ``None`` or values to log (docs/loop.md)."""
        raise NotImplementedError  # never called: the automatic step runs unless a subclass overrides this

    def manual_backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """In ``manual_step``: backward as the automatic step does it, into ``optimizer``'s parameters only when given."""
        manual.steps(self._manual, "manual_backward", self).backward(loss, optimizer)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """In ``manual_step``: step ``optimizer`` on the window's last micro-batch (True), else note it (False)."""
        return manual.steps(self._manual, "optimizer_step", self).step(optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        """Fill ``.grad`` from ``loss``, already divided by ``grad_accum_steps`` (a ``loss_sum`` is not)
        and scaled under fp16. Override to call ``loss.backward(v)`` for a non-scalar loss."""
        if loss.ndim != 0:
            raise ValueError(f"training_step returned a non-scalar loss of shape {tuple(loss.shape)}; reduce it "
                             "(e.g. loss.mean()) or override backward(loss) to call loss.backward(gradient)")
        loss.backward()

    def _unpack(self, batch: Any, where: str) -> tuple[Any, Any] | list[Any]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"the default {where} expects each batch to be (inputs, targets), got {describe(batch)}; "
                            f"override {where}(self, batch) in a Trainer subclass to handle this batch")
        return batch  # unpacked by the caller: (inputs, targets)

    def _loss(self, output: Any, target: Any) -> torch.Tensor:
        if self.loss_fn is None:
            raise TypeError("no loss_fn: pass Trainer(..., loss_fn=torch.nn.functional.cross_entropy) "
                            "or override training_step(batch) to compute the loss")
        return self.loss_fn(output, target)

    # ----------------------------------------------------------------- helpers for steps and callbacks

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def unfreeze(self, what: nn.Module | str | Sequence[str], **hyperparameters: Any) -> list[str]:
        """Unfreeze a submodule or the parameters matching glob patterns, adding those the optimizer
        lacks as one new group with ``hyperparameters``; returns their names (docs/callbacks.md)."""
        added = self._unfrozen.unfreeze(what, self.layout.world_size, **hyperparameters)
        if self._manual is None:  # clipping and the non-finite check see them too
            self._step.set_params(self.optimizer, self.trainable_parameters())
        return added

    def register_state(self, name: str, obj: Any) -> None:
        """Keep ``obj`` (with ``state_dict()`` and ``load_state_dict()``) in checkpoints under ``name``."""
        self._checkpointer.register(name, obj)

    def apply_init_from(self) -> str | None:
        """Load ``config.init_from`` into the model now; one line saying what, or ``None`` (docs/memory.md)."""
        self._check_open()
        return self._checkpointer.apply_init_from()

    def log(self, name: str, value: torch.Tensor | float) -> None:
        """Record a value; tensors stay on the device and become numbers at the next log point."""
        self._telemetry.log(name, value)

    def stop(self, reason: str) -> None:
        """End the run at the next optimizer-step boundary; the first ``reason`` given is ``stop_reason``."""
        self.should_stop = True
        if self.stop_reason is None:
            self.stop_reason = reason

    @property
    def train_data(self) -> Any:
        return self._data.train

    @train_data.setter
    def train_data(self, data: Any) -> None:
        self._data.train = data

    @property
    def val_data(self) -> Any:
        return self._data.val

    @val_data.setter
    def val_data(self, data: Any) -> None:
        self._data.val = data

    @property
    def sharded(self) -> bool:
        """Whether parameters are sharded over ranks (``strategy: fsdp`` under torchrun)."""
        return self.strategy.sharded

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for a non-finite loss (device mode: as of the last log point)."""
        return self._guard.skipped

    @property
    def last_step_epoch(self) -> int:
        """The epoch (from 0) of the latest optimizer step, which its records carry."""
        return self.epoch - 1 if self.batch_in_epoch == 0 and self.epoch > 0 else self.epoch

    def total_epochs(self) -> int | None:
        """Epochs this run may take: ``max_epochs``, 1 when neither limit is set, None under ``max_steps`` alone."""
        return self._length.total_epochs()

    def total_steps(self) -> int | None:
        """Optimizer steps this run takes, when the data length says so (for progress and schedules)."""
        return self._length.total_steps()

    # ----------------------------------------------------------------- the loop

    def fit(self, resume_from: str | Path | dict[str, Any] | None = None, overwrite: bool = False) -> list[dict[str, float]]:
        """Train until ``max_steps`` or ``max_epochs``; returns ``history``. ``resume_from``: a checkpoint
        to continue from exactly; ``overwrite``: replace another run in ``run_dir`` (docs/checkpoints.md).
        A second ``fit()`` continues where the first stopped."""
        if self.stopped_by_signal is not None:
            self._signals.reset()  # a later fit continues after a stop signal
        # The stop signals are handled from the lock to the last word of the record: one during the
        # resume's load or the sanity pass stops the run at its first step boundary.
        with self._run_record.held(), self._signals.installed():
            try:
                self._fit(resume_from, overwrite)
            except BaseException as exc:
                self._run_record.failed(exc, self.global_step)
                raise
            self._run_record.ended(self.global_step, self.stop_reason, self.should_stop,
                                   self._signals.outcome(self.stopped_by_signal))
        return self.history

    def _fit(self, resume_from: str | Path | dict[str, Any] | None, overwrite: bool) -> None:
        cfg = self.config
        self._check_open()
        if cfg.checkpoint.every_n_steps and self.run_dir is None:
            raise ValueError("checkpoint.every_n_steps needs a run_dir: Trainer(..., run_dir='runs/my-run')")
        # A later fit continues, also after an early stop or a signal (raise the limits first).
        self.should_stop, self.stop_reason, self.stopped_by_signal = False, None, None
        self._data.check_not_empty()
        if resume_from is None and not self._started:
            self._saves.claim(overwrite)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        self.apply_init_from()  # a fresh run's starting weights (nothing once a checkpoint's are loaded)
        if cfg.sanity_check and not self._sanity_checked:
            self.sanity_check()  # before the metric files are opened
        self._unfrozen.warn_unheld()
        if not self._started:
            seed_everything(cfg.seed)
            self._started = True
        self._guard.start(self.global_step, log_every=cfg.log_every_n_steps, per_step=len(self.optimizers))
        schedules.set_total_steps(self.schedulers, self.total_steps())  # schedules that need the run's length
        self._run_record.start()
        self._records.open()
        with torch_settings(self.device, cfg.deterministic):
            try:
                self._records.start()
                self._telemetry.start(self.global_step, time_first_step=bool(cfg.compile))  # compilation: timed alone
                self._call("on_fit_start")
                self._profiler.begin(self.global_step + 1, self.total_steps())
                self._saves.background = cfg.checkpoint.async_
                try:
                    while not self._done():
                        self._train_epoch()
                        self._unfrozen.warn_unheld()  # a plain unfreeze() in a hook during the epoch
                except torch.OutOfMemoryError as exc:  # restated with the run's figures and what to try
                    raise self._profiler.out_of_memory_error(exc, self.global_step + 1, cfg, self.module) from exc
                stopped = self.stopped_by_signal is not None
                if not (stopped and self.run_dir is not None):
                    # Stopped by a signal, the interval in progress is in the checkpoint for the resumed run
                    # to log (logged now too, a tracker would keep a point the uninterrupted run never logged).
                    self._flush_logs()
                if not stopped and self._evaluator.due(self.global_step, end=True):
                    self._validate(epoch=self.last_step_epoch)  # final metrics
                self._saves.release()  # the final checkpoint is on disk when fit returns
                if cfg.checkpoint.save_final and self.run_dir is not None and not stopped:
                    self.save_checkpoint()
            except BaseException as exc:
                self._saves.finish()
                self._call("on_exception", exc)
                raise
            finally:
                self._profiler.end()
                self._records.close()
        self._call("on_fit_end")

    def sanity_check(self) -> None:
        """One training and one validation batch, the run left as it was, or ``SanityCheckError`` (docs/config.md)."""
        self.apply_init_from()
        sanity.run(self)
        self._sanity_checked = True

    def stop_signals(self) -> Any:
        """The stop-signal handlers, around what precedes ``fit``: a signal there stops it at its first step."""
        return self._signals.installed()

    def close(self) -> None:
        """Under torchrun, on every rank after the last ``fit``/``evaluate``: drop the DDP wrapper, then
        leave the process group the Trainer joined; outside torchrun, nothing (docs/distributed.md)."""
        self._checkpointer.close()  # a write in flight first; then its process group goes
        if self.strategy.unwrap():
            self.model = self.module
            compilation.forget(self.config.compile)  # compiled code holds the wrapper too
        self.strategy.close()  # leaves the process group it joined

    def _check_open(self) -> None:
        if self.strategy.closed:
            raise RuntimeError("this Trainer was closed (close() left the process group); build a new one to go on")

    def _train_epoch(self) -> None:
        cfg, source, telemetry, h = self.config, self._data.train_source(), self._telemetry, self._hooks
        accum, precision = cfg.grad_accum_steps, self.precision
        no_sync = self.strategy.no_sync() if accum > 1 else None  # local gradients before a step
        epoch_len = length_of(source)
        self._length.reread()  # the epoch's first boundary reads the schedule
        self._call("on_train_epoch_start")
        fresh = self.batch_in_epoch == 0
        step_now = True  # an epoch starts, or resumes, at a step boundary
        for batch in telemetry.batches(source.epoch(self.epoch, self.batch_in_epoch), self._data.move):  # moved
            self.batch_in_epoch += 1
            step_now = self.batch_in_epoch % accum == 0 or self.batch_in_epoch == epoch_len or source.last_batch
            for fn in h["on_train_batch_start"]:
                fn(self, batch)
            if self._manual is None:
                with precision.autocast:
                    outputs = self.training_step(batch)
                loss, divided, count = split_loss(outputs, accum, precision.scale)
                for fn in h["on_before_backward"]:
                    fn(self, loss)
                if no_sync is None or step_now:
                    self.backward(divided)
                else:  # under DDP / FSDP the micro-batches before the step skip the gradient all-reduce
                    with no_sync():
                        self.backward(divided)
                telemetry.computed(batch, outputs, loss, count)
            else:  # the subclass's manual_step backs and steps itself: its steps count as compute
                outputs = self._manual.micro_batch(batch, step_now, self.global_step + 1)
                telemetry.computed(batch, outputs)
            if step_now:
                self._optimizer_step()
            if h["on_train_batch_end"]:
                outputs = detach(outputs)
                for fn in h["on_train_batch_end"]:
                    fn(self, outputs, batch)
            if step_now and self._after_step():
                # Stopping on the epoch's last batch still ends the epoch, unless a signal's checkpoint
                # holds it unfinished: then the resumed run (or a later fit) ends it, and validates.
                if self.batch_in_epoch != epoch_len or self.stopped_by_signal is not None:
                    return
                break
        if fresh and self.batch_in_epoch == 0:  # looping on would never reach max_steps
            raise empty_epoch(source, self.epoch, self.train_data, self.layout.world_size)
        if not step_now and epoch_len is None:  # the last, partial window of an iterable of unknown length
            self._optimizer_step()
            self._after_step()
        self.epoch += 1
        self.batch_in_epoch = 0
        self._call("on_train_epoch_end")
        if self._evaluator.due(self.global_step, epochs_done=self.epoch):
            self._validate(epoch=self.epoch - 1)  # tagged with the epoch it evaluates

    def _optimizer_step(self) -> None:
        """The window's optimizer step (under ``manual_step``, those it asked for), then the step count."""
        step = self.global_step + 1
        if self._manual is None:
            loss, count = self._telemetry.step_loss()
            skipped = self._step.run(self.optimizer, step, loss, count)
        else:
            self._manual.end_window()
            skipped = True  # manual_step's values are tracked already: the window has no loss of its own
        self._telemetry.stepped(skipped, step)
        self.global_step = step

    def _after_step(self) -> bool:
        """Log, validate, checkpoint and decide whether to stop, at an optimizer-step boundary;
        before the run length's ``busy_from`` (trainer.loop.run_length) only a stop is looked for."""
        step = self.global_step
        if step < self._length.busy_from and not (self.should_stop or self._signals.received):
            return False
        log_point = step % self.config.log_every_n_steps == 0
        if log_point:
            self._flush_logs()
        if self._evaluator.due(step):
            self._validate(epoch=self.epoch)
        save_point = self._saves.due(step)
        # A stop signal: alone, acted on at once; under torchrun, at the points where the ranks agree.
        if (self._signals.received or log_point or save_point) and self._signals.agreed(log_point or save_point,
                                                                                         self.device):
            self._stop_on_signal()
        elif save_point:
            self.save_checkpoint()
        done = self._done()
        if self._profiler.traces:
            self._profiler.at_boundary(step + 1, last=done)
        self._length.schedule(step, every_step=self._profiler.traces)
        return done

    def _stop_on_signal(self) -> None:
        # The interval in progress goes into the checkpoint, not the logs: the resumed run logs it.
        signum = self._signals.received
        path = self.save_checkpoint() if self.run_dir is not None else None
        self.stopped_by_signal = signum
        self.should_stop = True
        self.stop_reason = f"stopped by {signals.name(signum)}" + (f", checkpoint {path}" if path else "")


    def _done(self) -> bool:
        return self.should_stop or self._length.done(self.global_step, self.epoch)

    def _flush_logs(self) -> None:  # the log point: the interval's record to the history, on_log and loggers
        record = self._telemetry.record(self.global_step, self.last_step_epoch)
        if record is not None:
            self._records.emit(record)

    def _call(self, hook: str, *args: Any) -> None:
        for fn in self._hooks[hook]:
            fn(self, *args)

    # ----------------------------------------------------------------- checkpoints (docs/checkpoints.md)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (every rank together; under fsdp, this rank's shards)."""
        return self._checkpointer.state_dict()

    def load_checkpoint(self, source: str | Path | dict[str, Any], accept_changes: bool = False) -> list[str]:
        """Restore everything ``state_dict`` saved (a file, a sharded directory or a loaded checkpoint)
        for ``fit()`` to continue. A changed seed, global batch, precision, model, data or optimizer is
        refused unless ``accept_changes``; returns the differences, one line each."""
        cfg = self.config
        configured = ckpt.BatchLayout(cfg.batch_size, cfg.grad_accum_steps, self.layout.world_size)
        resumed = self._checkpointer.load(source, accept_changes, configured, cfg.on_world_size_change)
        self._started = True  # the random state is the checkpoint's: fit() must not seed again
        if resumed.notice and self.is_main_process:
            print(f"trainer: {resumed.notice}", flush=True)
        self.batch_in_epoch = self._data.resumed(self.batch_in_epoch, configured, resumed.saved, resumed.layout)
        return resumed.describe()

    def load_weights(self, source: str | Path | dict[str, Any], states: bool = False) -> None:
        """The model's weights from a checkpoint, with ``states`` the callbacks' and registered states too."""
        self._checkpointer.load_weights(source, states)

    def load_model_state(self, saved: dict[str, torch.Tensor], where: str = "given") -> None:
        """A model state dict into the model, naming every missing, unexpected or reshaped key first."""
        self._checkpointer.load_model(saved, where)

    def save_checkpoint(self, path: str | Path | None = None, rotate: bool = True,
                        on_written: Callable[[Path], None] | None = None) -> Path | None:
        """Write ``<run_dir>/checkpoints/step-<step>.pt`` (or ``path``) atomically and rotate old ones;
        every rank calls it together, rank 0 gets the path. With ``checkpoint.async`` a save inside
        ``fit`` returns before the write ends."""
        self._guard.flush()  # its unread device flags go into the checkpoint read
        return self._saves.save(self.global_step, path, rotate, on_written)

    # ----------------------------------------------------------------- evaluation (docs/config.md)

    def evaluate(self, data: Any = None, prefix: str = "val") -> dict[str, float]:
        """``validation_step`` over ``data`` in eval mode: ``{"<prefix>/<name>": value}``. Without
        ``data``, the run's validation on ``val_data`` with its hooks; with it, nothing about the run changes."""
        self.apply_init_from()
        return self._evaluator.evaluate(data, prefix)

    def test(self, data: Any) -> dict[str, float]:
        """``evaluate(data, prefix="test")``; with a ``run_dir``, rank 0 also writes ``test.json``."""
        self.apply_init_from()
        return self._evaluator.test(data, self.run_dir, self.global_step, self.is_main_process)

    def predict(self, data: Any, out: str | Path | None = None) -> Any:
        """``predict_step``'s outputs for every sample in order (on rank 0); ``out``: a .pt/.safetensors file."""
        self.apply_init_from()
        return self._evaluator.predict(data, out, self.is_main_process, self.sharded)

    def _validate(self, epoch: int) -> None:
        with self._evaluator.validating(self.global_step):
            metrics = self.evaluate()
        self._records.emit({"step": self.global_step, "epoch": epoch, **metrics})


__all__ = ["Trainer", "HOOKS"]
