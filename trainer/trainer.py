"""The training loop.

``Trainer.fit`` reads top to bottom: epochs of micro-batches, each one forward, backward and,
every ``grad_accum_steps`` micro-batches, one optimizer step. Everything optional hangs off the
hooks listed in ``trainer.hooks``. A subclass overrides a step (``training_step``,
``validation_step``, ``backward``, ``configure_optimizers``, or ``manual_step`` to back and step
several optimizers itself), not the loop.

The Trainer wires its parts: the strategy (one process, DDP or FSDP), the log interval, the
non-finite guard, the checkpointer, evaluation and stop signals each live in a module of their own.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer import checkpoint as ckpt
from trainer import memory
from trainer.loop import compilation
from trainer.parallel import distributed
from trainer.loop import manual
from trainer.checkpoint.saving import RunCheckpoints
from trainer.loop.placement import place
from trainer.loop.run_length import RunLength
from trainer.observability import metric_objects
from trainer import callbacks as builtin_callbacks
from trainer.loop import sanity
from trainer.loop import signals
from trainer.observability import timing
from trainer.checkpoint import weights
from trainer import run_dir as run_files
from trainer.config import TrainerConfig, compile_settings
from trainer.data.batches import describe, mover
from trainer.data.run_data import RunData
from trainer.data.sources import LoaderStates, empty_epoch, is_stateful_loader, length_of
from trainer.evaluation.evaluator import Evaluator
from trainer.device import (
    out_of_memory_message, seed_everything, torch_settings,
)
from trainer.freezing import UnfrozenGroups, detach
from trainer.hooks import HOOKS, collect_hooks
from trainer.loop.step import OptimizerStep, split_loss
from trainer.observability.metrics import Logger, MetricBuffer
from trainer.observability.records import Records
from trainer.observability.telemetry import Telemetry
from trainer.loop.nonfinite import NonFiniteGuard
from trainer.observability.profiling import RunProfiler, snapshot_note


class Trainer:
    """Trains ``model`` on ``train_data`` with ``optimizer``: the public API, and the wiring of the
    components that decide for themselves (placement, data, the optimizer step, telemetry,
    checkpoints, evaluation, run length, stop signals).

    ``model``: a module, or a function that builds one after seeding (``config.init_from`` names
    weights to start from instead). ``train_data`` / ``val_data``: a ``Dataset``, tensors, a
    ``DataLoader``, a stateful loader, an ``IterableDataset`` or any iterable of batches
    (docs/data.md). ``optimizer``: an optimizer, or a function of the trainable parameters; ``None``
    calls ``configure_optimizers()``; several need ``manual_step`` (docs/loop.md). ``scheduler``: a
    scheduler, or a function of the optimizer. ``run_config``: the configuration saved in
    checkpoints (default: ``config``'s fields). ``metrics``: metric objects by name, which the
    default ``validation_step`` updates (docs/observability.md).

    What callbacks and subclasses may read is listed in docs/callbacks.md ("What a callback or
    subclass may read"); the rest is internal. To end the run, call ``stop(reason)``.
    """

    def __init__(
        self,
        model: nn.Module | Callable[[], nn.Module],
        optimizer: torch.optim.Optimizer | Any = None,
        train_data: Any = None,
        val_data: Any = None,
        *,
        loss_fn: Any = None,
        scheduler: Any = None,
        callbacks: Sequence[Any] = (),
        config: TrainerConfig | dict[str, Any] | None = None,
        run_dir: str | Path | None = None,
        loggers: Sequence[Logger] = (),
        run_config: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
    ):
        if isinstance(config, dict):
            config = TrainerConfig(**config)
        self.config = config if config is not None else TrainerConfig()
        if not isinstance(self.config, TrainerConfig):
            raise TypeError(f"config must be a TrainerConfig or a dict of its fields, got {type(config).__name__}")
        cfg = self.config
        self.layout = distributed.from_env()  # rank 0 of 1 outside torchrun
        manual_mode = type(self).manual_step is not Trainer.manual_step
        placed = place(model, optimizer, cfg, self.layout, self.configure_sharding, steps_itself=manual_mode)
        self.device, self.precision, self.strategy = placed.device, placed.precision, placed.strategy
        self.module = placed.module  # the plain (under fsdp, sharded) module
        self._joined_group = placed.joined_group  # close() leaves it then
        self._move = mover(self.device, self.precision.param_dtype)  # a batch onto the device
        self._init_from = weights.InitFrom(cfg.init_from, self.module, reset_missing=placed.built_on_meta)
        compiled = compile_settings(cfg.compile)
        self.model = compilation.compile_model(placed.stepped, compiled)  # what training steps call
        self.loss_fn = loss_fn
        self.metrics = metric_objects.check(metrics if metrics is not None else {}, "metrics")
        metric_objects.to_device(self.metrics.values(), self.device)
        self._data = RunData(train_data, val_data, cfg, self.device, self.layout.rank, self.layout.world_size)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.is_main_process = self.layout.rank == 0  # writes files, shows progress
        # saved in checkpoints
        self.resolved_config: dict[str, Any] = run_config if run_config is not None else cfg.model_dump(mode="json")

        # Every optimizer with its scheduler (None where it has none); the first is ``optimizer``.
        self.optimizers, self.schedulers = manual.resolve_optimizers(
            optimizer, scheduler, self.configure_optimizers, self.trainable_parameters)
        self.optimizer, self.scheduler = self.optimizers[0], self.schedulers[0]
        manual.check_optimizers(self.optimizers, self.module, self.strategy, steps_itself=manual_mode)

        self.callbacks = [*callbacks, *builtin_callbacks.from_config(cfg)]
        self._hooks = collect_hooks(self, self.callbacks, Trainer)

        self._records = Records(loggers, self.run_dir, self.is_main_process, lambda record: self._call("on_log", record))
        self.loggers, self.history = self._records.loggers, self._records.history  # the same lists
        self._profiler = RunProfiler(cfg.profile, self.device, self.run_dir, self.layout.rank)

        # Progress, saved in checkpoints.
        self.global_step = 0  # optimizer steps done
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of the current epoch consumed
        self.should_stop = False
        self.stop_reason: str | None = None
        self.stopped_by_signal: int | None = None
        self._signals = signals.StopSignals()
        self._closed = False

        self._guard = NonFiniteGuard(cfg.on_nonfinite, cfg.max_consecutive_skips, self.optimizers, self.device,
                                     fp16=cfg.precision == "fp16", check=cfg.nonfinite_check)
        # The optimizer step, for the automatic loop and manual_step alike (trainer.loop.step).
        steppers = {}
        if compiled is not None and compiled.optimizer:  # fp16 is refused by the config: the scaler steps eagerly
            steppers[id(self.optimizer)] = compilation.compile_step(self.optimizer, compiled, self.strategy.sharded)
        self._step = OptimizerStep(self, self._hooks, self.strategy, self._guard, self.precision.scaler,
                                   self.optimizers, self.schedulers, self.device, cfg.clip_grad_norm, steppers)
        if not manual_mode:  # clipping and the non-finite check see every trainable parameter
            self._step.set_params(self.optimizer, self.trainable_parameters())
        self._telemetry = self._build_telemetry(compiled is not None)
        self._unfrozen = UnfrozenGroups(self.module, self.optimizer, self.scheduler, others=self.optimizers[1:])
        self._checkpointer = ckpt.Checkpointer(
            self.strategy, self.module, self.optimizers, self.schedulers, self.precision.scaler, self.callbacks,
            # batch_size and grad_accum_steps as trained: a resume on other ranks may have set them (the
            # checkpointer restores the values this run takes, see load_checkpoint).
            train_state=[ckpt.Attributes(self, "global_step", "epoch", "batch_in_epoch", "validated_step"),
                         ckpt.Attributes(self._records, "logged_records"),
                         ckpt.Attributes(cfg, "batch_size", "grad_accum_steps"),
                         self._guard, self._telemetry.interval,
                         LoaderStates(lambda: self._data.train_source() if is_stateful_loader(self._data.train) else None)],
            config=self.resolved_config, unfrozen=self._unfrozen, loggers=self.loggers,
        )
        self._evaluator = Evaluator(self, self._data, self.strategy, self.precision, cfg.deterministic, self.callbacks,
                                    self._hooks, self.metrics)
        self._saves = RunCheckpoints(self._checkpointer, self.run_dir, cfg.checkpoint, self._signals.deferred,
                                     self.is_main_process, self.strategy.sharded)
        self._length = RunLength(cfg, self._data)
        self.validated_step: int | None = None  # the step of the last validation (saved: not repeated on resume)
        self._started = False  # a later fit() continues; it does not seed again
        self._sanity_checked = False  # fit() runs the sanity pass once per Trainer
        self._manual = (manual.ManualSteps(self, self._step, self.optimizers, self._hooks, self.precision,
                                           self.layout.world_size, lambda: cfg.grad_accum_steps)
                        if manual_mode else None)  # the subclass's own step
        # What the sanity pass and culprit() need beyond the public attributes (trainer.loop.sanity).
        self.sanity_parts = sanity.Parts(
            self._data, self._evaluator, self._manual,
            overridden=frozenset(s for s in sanity.STEPS if getattr(type(self), s) is not getattr(Trainer, s)),
            defaults={Trainer._loss.__code__: "loss", Trainer._unpack.__code__: "data", Trainer.backward.__code__: "backward"},
            monitoring=(builtin_callbacks.EarlyStopping, builtin_callbacks.BestCheckpoints))

    def _build_telemetry(self, compiled: bool) -> Telemetry:
        """The log records' sources (trainer.observability.telemetry): each optimizer's lr, CUDA's peak
        memory, recompilations."""
        cfg = self.config
        times = timing.for_run(cfg.throughput, self.module, self.device, cfg.precision)  # time/*, tokens/s, mfu
        telemetry = Telemetry(self.device, times, self._guard)
        optimizers = self.optimizers

        def learning_rates(metrics: MetricBuffer) -> None:
            metrics.put("lr", optimizers[0].param_groups[0]["lr"])
            for i, opt in enumerate(optimizers[1:], start=1):  # several optimizers: the others' as lr/<i>
                metrics.put(f"lr/{i}", opt.param_groups[0]["lr"])

        telemetry.register(before_copy=learning_rates)
        if self.device.type == "cuda":
            device = self.device
            telemetry.register(after_copy=lambda: {"cuda_peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30})
        if compiled:
            recompiles = compilation.Recompiles()
            telemetry.register(after_copy=lambda: {"compile/recompiles": recompiles.count()},
                               on_first_step=recompiles.start)  # compilations from then on are recompilations
        return telemetry

    # ----------------------------------------------------------------- override points

    def configure_optimizers(self) -> Any:
        """Return an optimizer, or ``(optimizer, scheduler)``. Called once when no optimizer is passed.

        ``self.trainable_parameters()`` gives the parameters that require gradients.
        """
        raise TypeError(
            "no optimizer: pass Trainer(model, optimizer=...) or override configure_optimizers() "
            "in your Trainer subclass, e.g. return torch.optim.AdamW(self.trainable_parameters(), lr=1e-3)"
        )

    def configure_sharding(self, module: nn.Module) -> None:
        """Apply ``torch.distributed.fsdp.fully_shard`` to ``module`` (``strategy: fsdp`` under torchrun).
        The default makes every block of every ``nn.ModuleList`` a unit, then the root, gathering in
        the run's precision (``distributed.shard_model``). Override to choose other units; the root
        must be sharded last."""
        distributed.shard_model(module, self.config.precision)

    def training_step(self, batch: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """Return the mean loss, or a dict with ``"loss"`` and extra metrics (logged as
        ``train/<name>``), or a dict with ``"loss_sum"`` (summed over the batch's items: tokens,
        samples) and ``"count"`` (their number, a tensor) instead of ``"loss"``: each step's
        gradient is then that of the mean over every item of the step, across micro-batches and
        ranks, and ``train/loss`` the mean over the items of the log interval (``trainer.losses``)."""
        x, y = self._unpack(batch, "training_step")
        return self._loss(self.model(x), y)

    def validation_step(self, batch: Any) -> dict[str, Any]:
        """Return per-batch mean metrics; they are averaged over samples as ``val/<name>``. A
        ``"loss_sum"`` with its ``"count"`` gives ``val/loss``: the sum over the whole set and every
        rank divided by the total count.

        A value may also be a metric object (``update``/``compute``/``reset``: a torchmetrics
        ``Metric``) updated here, created once (``self.f1`` in ``__init__``, or ``metrics=``): its
        ``compute()`` after the pass, over the whole set and every rank, is ``val/<name>``; it is
        reset before each evaluation (``trainer.observability.metric_objects``).

        The default reports the loss (a ``loss_fn`` may return ``loss_sum`` and ``count``, as
        ``trainer.losses.summed_cross_entropy`` does), for class logits ``(N, C)`` with integer
        targets ``acc``, and each of ``metrics`` updated with ``(outputs, targets)``.
        """
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
        """What ``predict`` collects for a batch: a tensor, or a dict or tuple of tensors, each with one
        row per sample. The default runs the model on the inputs: the batch when it is a tensor, its
        first item when it is a tuple or list (``(inputs, targets)``, or inputs alone)."""
        if isinstance(batch, torch.Tensor):
            return self.model(batch)
        if isinstance(batch, (tuple, list)) and batch:
            return self.model(batch[0])
        raise TypeError(f"the default predict_step expects each batch to be a tensor of inputs or a tuple starting "
                        f"with them, got {describe(batch)}; override predict_step(self, batch) in a Trainer subclass")

    def manual_step(self, batch: Any) -> dict[str, torch.Tensor] | None:
        """Override to take over the whole training step (GANs, actor-critic, alternating updates):
        called once per micro-batch instead of ``training_step``, ``backward`` and the optimizer
        step. Back each loss with ``self.manual_backward(loss, optimizer)`` and step each optimizer
        with ``self.optimizer_step(optimizer)``; return ``None`` or a dict of values, each logged as
        ``train/<name>`` (its mean over the log interval's micro-batches). ``self.optimizers`` holds
        every optimizer, in the order ``configure_optimizers()`` gave them. ``global_step`` counts
        accumulation windows, not optimizer steps (``trainer.loop.manual``, docs/loop.md)."""
        raise NotImplementedError  # never called: the automatic step runs unless a subclass overrides this

    def manual_backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """In ``manual_step``: backward of ``loss`` as the automatic step does it (divided by
        ``grad_accum_steps``, scaled under fp16, ``on_before_backward`` first). With ``optimizer``
        the gradients go only into the parameters it holds (a generator's loss leaves the
        discriminator's gradients alone)."""
        self._manual_steps("manual_backward").backward(loss, optimizer)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """In ``manual_step``: on the accumulation window's last micro-batch, step ``optimizer`` as
        the automatic step does (gradients averaged over ranks, fp16 unscale, ``on_after_backward``,
        the non-finite check, clipping, ``on_before_optimizer_step``, the step, its scheduler,
        ``on_before_zero_grad``, ``zero_grad``) and return True; before it, return False and let the
        gradients accumulate."""
        return self._manual_steps("optimizer_step").step(optimizer)

    def _manual_steps(self, helper: str) -> manual.ManualSteps:
        if self._manual is None:
            raise RuntimeError(
                f"{helper}() belongs in manual_step(batch): this {type(self).__name__} does not override manual_step, "
                "so the automatic step backs and steps; override manual_step instead of training_step to call it"
            )
        return self._manual

    def backward(self, loss: torch.Tensor) -> None:
        """Fill ``.grad``. ``loss`` is already divided by ``grad_accum_steps`` (a ``loss_sum`` is not:
        the step divides the gradients by the count) and, for fp16, scaled.

        Override to call ``loss.backward(v)`` for a non-scalar loss.
        """
        if loss.ndim != 0:
            raise ValueError(
                f"training_step returned a non-scalar loss of shape {tuple(loss.shape)}; reduce it "
                "(e.g. loss.mean()) or override backward(loss) to call loss.backward(gradient)"
            )
        loss.backward()

    # ----------------------------------------------------------------- helpers for steps

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def unfreeze(self, what: nn.Module | str | Sequence[str], **hyperparameters: Any) -> list[str]:
        """Unfreeze a submodule of the model, or the parameters whose names match glob patterns
        (``"encoder.*"``), and add those the optimizer does not hold as one new parameter group with
        ``hyperparameters`` (``lr=1e-4``; unset ones: the first group's). Modules go to train mode.

        Checkpoints record the group, and a resume rebuilds it before restoring the optimizer. Under
        a scheduler with per-group base rates the new group follows the schedule from its ``lr``.
        Returns the names added to the optimizer (empty when it held them all already).
        """
        if self.layout.world_size > 1:
            # DDP and FSDP decide at wrapping time which parameters they reduce gradients for.
            raise NotImplementedError(
                "trainer.unfreeze under torchrun: DDP/FSDP reduce only the gradients of parameters that "
                "required them when the model was wrapped; unfreeze before building the Trainer instead"
            )
        added = self._unfrozen.unfreeze(what, **hyperparameters)
        if self._manual is None:  # clipping and the non-finite check see them too
            self._step.set_params(self.optimizer, self.trainable_parameters())
        return added

    def register_state(self, name: str, obj: Any) -> None:
        """Keep ``obj`` (anything with ``state_dict()`` and ``load_state_dict()``: a module, an
        optimizer, a small class) in checkpoints under ``name``; ``load_checkpoint`` and ``trainer
        eval`` give its state back. A resume warns about a saved name nothing registered, and about
        a registered one the checkpoint lacks."""
        self._checkpointer.register(name, obj)

    def apply_init_from(self) -> str | None:
        """Load ``config.init_from`` into the model now; returns one line saying what was loaded, or
        ``None`` when there is nothing to load. ``fit``, ``evaluate`` and ``sanity_check`` call it first,
        so it runs once, before the first step, and not at all when a checkpoint's weights were
        loaded before it (``load_checkpoint``, ``fit(resume_from=...)``, ``load_weights``,
        ``load_model_state``): a resumed run continues from its checkpoint. Under torchrun every rank calls it together. Raises
        ``WeightsError`` (prefixed ``init_from:``) for a file that is missing, unreadable or does not fit."""
        return self._init_from.apply()

    def log(self, name: str, value: torch.Tensor | float) -> None:
        """Record a value; tensors stay on the device and become numbers at the next log point."""
        self._telemetry.log(name, value)

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

    def _unpack(self, batch: Any, where: str) -> tuple[Any, Any]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(
                f"the default {where} expects each batch to be (inputs, targets), got {describe(batch)}; "
                f"override {where}(self, batch) in a Trainer subclass to handle this batch"
            )
        return batch[0], batch[1]

    def _loss(self, output: Any, target: Any) -> torch.Tensor:
        if self.loss_fn is None:
            raise TypeError(
                "no loss_fn: pass Trainer(..., loss_fn=torch.nn.functional.cross_entropy) "
                "or override training_step(batch) to compute the loss"
            )
        return self.loss_fn(output, target)

    # ----------------------------------------------------------------- the loop

    def fit(self, resume_from: str | Path | dict[str, Any] | None = None, overwrite: bool = False) -> list[dict[str, float]]:
        """Train until ``max_steps`` or ``max_epochs``; returns ``history`` (every log record).

        ``resume_from``: a checkpoint path (or a loaded checkpoint) to continue from exactly.
        SIGTERM / SIGINT stop the run at the next optimizer-step boundary after a checkpoint
        (``stopped_by_signal`` then holds the signal number). A second ``fit()`` continues from
        where the first stopped (raise ``max_steps`` or ``max_epochs`` first), appending to the
        same metric files.

        A ``run_dir`` that holds another run's metrics or checkpoints is refused, unless this fit
        resumes it (``resume_from``, or ``load_checkpoint`` first) or ``overwrite=True``, which
        deletes that run's metric files and checkpoints first.
        """
        cfg = self.config
        self._check_open()
        if cfg.checkpoint.every_n_steps and self.run_dir is None:
            raise ValueError("checkpoint.every_n_steps needs a run_dir: Trainer(..., run_dir='runs/my-run')")
        # A later fit continues, also after an early stop or a signal (raise the limits first).
        self.should_stop, self.stop_reason, self.stopped_by_signal = False, None, None
        self._signals.reset()
        self._data.check_not_empty()
        if resume_from is None and not self._started and self.run_dir is not None:
            self._claim_run_dir(overwrite)
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
        for scheduler in self.schedulers:
            if hasattr(scheduler, "set_total_steps"):  # schedules that need the run's length
                scheduler.set_total_steps(self.total_steps())
        self._records.open()
        with self._signals.installed(), torch_settings(self.device, cfg.deterministic):
            try:
                self._records.start(self.resolved_config)
                # With compile: true the first step includes compilation; it is timed on its own.
                self._telemetry.start(self.global_step, time_first_step=bool(cfg.compile))
                self._call("on_fit_start")
                self._profiler.begin(self.global_step + 1, self.total_steps())
                self._saves.background = cfg.checkpoint.async_
                try:
                    while not self._done():
                        self._train_epoch()
                        self._unfrozen.warn_unheld()  # a plain unfreeze() in a hook during the epoch
                except torch.OutOfMemoryError as exc:
                    raise torch.OutOfMemoryError(out_of_memory_message(
                        exc, self.device, self.global_step + 1, cfg.batch_size, cfg.grad_accum_steps,
                        cfg.precision, memory.suggestion(self.module, cfg.activation_checkpointing))
                        + snapshot_note(self._profiler.out_of_memory())) from exc
                stopped = self.stopped_by_signal is not None
                if not (stopped and self.run_dir is not None):
                    # Stopped by a signal, the log interval in progress is in the checkpoint: the resumed
                    # run logs it at its log point, as the uninterrupted run does (logged now, a tracker
                    # would keep a point that run never logged).
                    self._flush_logs()
                if self.val_data is not None and self.validated_step != self.global_step and not stopped:
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
        return self.history

    def sanity_check(self) -> None:
        """One training micro-batch forward and backward (no optimizer step) and one validation batch
        through ``validation_step``, whose metric names must include what ``EarlyStopping`` and
        ``BestCheckpoints`` monitor. Raises ``SanityCheckError`` naming the part that failed (model,
        loss, data, a step, a callback), from the original exception. Leaves weights, gradients,
        buffers, train/eval flags, RNG states and optimizer exactly as they were, so a run trains
        the same with it or without. ``fit()`` runs it first (once) unless ``sanity_check: false``;
        under torchrun every rank runs it. See ``trainer.loop.sanity``."""
        self._check_open()
        self.apply_init_from()
        sanity.run(self)
        self._sanity_checked = True

    def close(self) -> None:
        """Under torchrun, on every rank after the last ``fit``/``evaluate``: leave the process group
        (a group the script joined itself is left to the script). Outside torchrun this does nothing.

        A wrapper that holds the group (DDP's) goes first, so that the group is destroyed from
        torch's registry, never from the wrapper (see ``strategy.DDP.unwrap``). With ``compile:
        true`` under DDP this clears torch.compile's caches, which hold the wrapper too.
        """
        self._checkpointer.close()  # a write in flight first; then its process group goes
        if self.strategy.unwrap():
            self.model = self.module
            if self.config.compile:
                # Compiled code and its guards hold the wrapper too, through reference cycles.
                torch._dynamo.reset()
                gc.collect()
        if self._joined_group:
            distributed.shutdown()
            self._joined_group = False
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Trainer was closed (close() left the process group); build a new one to go on")

    def _claim_run_dir(self, overwrite: bool) -> None:
        """A fresh fit never appends to another run's metrics or replaces its checkpoints."""
        earlier = run_files.earlier_run(self.run_dir)
        if not earlier:
            return
        if not overwrite:
            raise FileExistsError(
                f"run_dir {self.run_dir} already holds a run ({', '.join(earlier)}); continue it with "
                "fit(resume_from=<checkpoint>), replace it with fit(overwrite=True), or pass another run_dir"
            )
        if self.is_main_process:
            run_files.remove_run_outputs(self.run_dir)
        distributed.barrier()

    def _train_epoch(self) -> None:
        cfg, source, telemetry, h = self.config, self._data.train_source(), self._telemetry, self._hooks
        accum = cfg.grad_accum_steps
        no_sync = self.strategy.no_sync() if accum > 1 else None  # local gradients before a step
        move = self._move
        epoch_len = length_of(source)
        self._call("on_train_epoch_start")
        fresh = self.batch_in_epoch == 0
        step_now = True  # an epoch starts, or resumes, at a step boundary
        for batch in telemetry.batches(source.epoch(self.epoch, self.batch_in_epoch)):
            self.batch_in_epoch += 1
            step_now = self.batch_in_epoch % accum == 0 or self.batch_in_epoch == epoch_len or source.last_batch
            batch = move(batch)
            telemetry.fetched()
            for fn in h["on_train_batch_start"]:
                fn(self, batch)
            if self._manual is None:
                with self.precision.autocast:
                    outputs = self.training_step(batch)
                loss, divided, count = split_loss(outputs, accum)
                for fn in h["on_before_backward"]:
                    fn(self, loss)
                if no_sync is None or step_now:
                    self.backward(self.precision.scale(divided))
                else:  # under DDP / FSDP the micro-batches before the step skip the gradient all-reduce
                    with no_sync():
                        self.backward(self.precision.scale(divided))
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
                if self.batch_in_epoch != epoch_len:
                    return
                break  # stopping on the epoch's last batch still ends the epoch
        if fresh and self.batch_in_epoch == 0:  # looping on would never reach max_steps
            raise empty_epoch(source, self.epoch, self.train_data, self.layout.world_size)
        if not step_now and epoch_len is None:  # the last, partial window of an iterable of unknown length
            self._optimizer_step()
            self._after_step()
        self.epoch += 1
        self.batch_in_epoch = 0
        self._call("on_train_epoch_end")
        every = self.config.eval_every_n_epochs
        if every and self.val_data is not None and self.epoch % every == 0 and self.validated_step != self.global_step:
            self._validate(epoch=self.epoch - 1)  # tagged with the epoch it evaluates

    def _optimizer_step(self) -> None:
        """The accumulation window's optimizer step (under ``manual_step``, the steps it asked for),
        then the step count (trainer.loop.step)."""
        if self._manual is None:
            skipped = self._step(self.optimizer, self.global_step + 1, *self._telemetry.step_loss())
        else:
            self._manual.end_window()
            skipped = True  # manual_step's values are tracked already: the window has no loss of its own
        self._step.end_window()
        self._telemetry.stepped(skipped)
        self.global_step += 1

    def _after_step(self) -> bool:
        """Log, validate, checkpoint and decide whether to stop, at an optimizer-step boundary."""
        cfg = self.config
        step = self.global_step
        self._telemetry.boundary(step)
        log_point = step % cfg.log_every_n_steps == 0
        if log_point:
            self._flush_logs()
        if cfg.eval_every_n_steps and self.val_data is not None and step % cfg.eval_every_n_steps == 0:
            self._validate(epoch=self.epoch)
        save_point = self._saves.due(step)
        if self._signals.agreed(log_point or save_point, self.device):
            self._stop_on_signal()
        elif save_point:
            self.save_checkpoint()
        done = self._done()
        self._profiler.at_boundary(step + 1, last=done)
        return done

    def _stop_on_signal(self) -> None:
        # The log interval in progress goes into the checkpoint, not to the logs: the resumed run
        # logs it at the same log point, with the same values, as an uninterrupted run.
        signum = self._signals.received
        path = self.save_checkpoint() if self.run_dir is not None else None
        self.stopped_by_signal = signum
        self.should_stop = True
        self.stop_reason = f"stopped by {signals.name(signum)}" + (f", checkpoint {path}" if path else "")

    def stop(self, reason: str) -> None:
        """End the run at the next optimizer-step boundary (after the step in progress, or at once
        between steps), as ``max_steps`` would: the final validation and checkpoint follow.
        ``reason`` becomes ``stop_reason``, which opens the summary line of ``trainer run`` and is the
        ``reason`` in ``status.json``; when several ask, the first reason given is kept."""
        self.should_stop = True
        if self.stop_reason is None:
            self.stop_reason = reason

    @property
    def last_step_epoch(self) -> int:
        """The epoch (from 0) the latest optimizer step belongs to, which its records carry:
        ``epoch`` during an epoch; between epochs, when ``epoch`` already counts the one that
        ended, that one."""
        return self.epoch - 1 if self.batch_in_epoch == 0 and self.epoch > 0 else self.epoch

    def _done(self) -> bool:
        return self.should_stop or self._length.done(self.global_step, self.epoch)

    def total_epochs(self) -> int | None:
        """Epochs this run may take: ``max_epochs``, or one when neither limit is set (None: only
        ``max_steps`` limits the run)."""
        return self._length.total_epochs()

    def total_steps(self) -> int | None:
        """Optimizer steps this run takes, when the data length says so (for progress and schedules)."""
        return self._length.total_steps()

    # ----------------------------------------------------------------- metrics

    def _flush_logs(self) -> None:
        """The log point: the record of the interval (trainer.observability.telemetry) goes to the
        history, the ``on_log`` hook and the loggers."""
        record = self._telemetry.record(self.global_step, self.last_step_epoch)
        if record is not None:
            self._records.emit(record)

    def _call(self, hook: str, *args: Any) -> None:
        for fn in self._hooks[hook]:
            fn(self, *args)

    # ----------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimizer, scheduler, scaler, progress,
        RNG states and stateful callbacks, as plain data (``weights_only``-loadable). Under torchrun
        every rank calls it together; under ``strategy: fsdp`` it holds this rank's shards."""
        return self._checkpointer.state_dict()

    def load_checkpoint(self, source: str | Path | dict[str, Any], accept_changes: bool = False) -> list[str]:
        """Restore everything ``state_dict`` saved, from a checkpoint (file or sharded directory) or an
        already loaded one; ``fit()`` then continues from it.

        A checkpoint written with another seed, global batch (batch size x accumulation x world
        size), precision, model, data or optimizer is refused with every difference listed, unless
        ``accept_changes``: then this Trainer's values apply from here on (the optimizer's
        hyperparameters, a new optimizer class with fresh state, the data position mapped by samples
        seen). On another number of ranks, with the batch_size and grad_accum_steps the checkpoint
        was written with, ``config.on_world_size_change`` keeps the global batch: it sets
        ``config.grad_accum_steps`` (or ``batch_size``) and rank 0 prints one line that says so.
        Returns the differences, one line each."""
        cfg = self.config
        configured = ckpt.BatchLayout(cfg.batch_size, cfg.grad_accum_steps, self.layout.world_size)
        resumed = self._checkpointer.load(source, accept_changes, configured, cfg.on_world_size_change)
        self._init_from.cancel()  # the checkpoint's weights win over init_from
        self._started = True  # the random state is the checkpoint's: fit() must not seed again
        if resumed.notice and self.is_main_process:
            print(f"trainer: {resumed.notice}", flush=True)
        if cfg.batch_size != configured.batch_size:
            self._data.rebuild()  # built with the configured batch_size
        saved, now = resumed.saved, resumed.layout
        if saved is not None and (saved.batch_size, saved.world_size) != (now.batch_size, now.world_size):
            self.batch_in_epoch = self._data.position(self.batch_in_epoch * saved.batch_size * saved.world_size)
        return resumed.describe()

    def load_weights(self, source: str | Path | dict[str, Any], states: bool = False) -> None:
        """The model's weights from a checkpoint (file or sharded directory, or a loaded one). With
        ``states``, also what evaluation uses besides them: the callbacks' state (``EMAWeights``'
        average) and the registered objects' (``register_state``); not the optimizer or progress."""
        self._checkpointer.load_weights(source, states)
        self._init_from.cancel()

    def load_model_state(self, saved: dict[str, torch.Tensor], where: str = "given") -> None:
        """A model state dict (a checkpoint's ``"model"``) into the model, naming every missing,
        unexpected or reshaped key first; ``where`` names its origin in the message."""
        self._checkpointer.load_model(saved, where)
        self._init_from.cancel()

    def save_checkpoint(self, path: str | Path | None = None, rotate: bool = True,
                        on_written: Callable[[Path], None] | None = None) -> Path | None:
        """Write ``<run_dir>/checkpoints/step-<step>.pt`` (or ``path``) atomically and rotate old
        periodic ones; under ``strategy: fsdp``, the directory ``step-<step>/``. Under torchrun every
        rank calls it together: rank 0 writes the file (with fsdp, each rank its shards) and the
        others get ``None``. ``on_written(path)`` runs on rank 0 once the checkpoint is complete.

        With ``checkpoint.async`` a save inside ``fit`` returns once the state is copied into CPU
        memory; a thread writes it, then rotates and calls ``on_written``. A save waits for the write
        before it, and ``fit`` for the last; a failed write is raised by the save or fit that waits
        for it. Outside ``fit`` a save returns with the checkpoint on disk."""
        self._guard.flush()  # its unread device flags go into the checkpoint read
        return self._saves.save(self.global_step, path, rotate, on_written)

    # ----------------------------------------------------------------- evaluation

    def evaluate(self, data: Any = None, prefix: str = "val") -> dict[str, float]:
        """Run ``validation_step`` over ``data`` under ``eval_mode``; returns ``{"<prefix>/<name>":
        mean over samples}``, and the computed value of each metric object it returned (reset first).

        Without ``data`` this is the run's own validation on ``val_data``: the validation hooks
        fire, so ``EarlyStopping`` and ``BestCheckpoints`` act on it. With ``data`` (a test set,
        say, with ``prefix="test"``) no hook fires and nothing about the run changes. Either way
        the evaluation weights of callbacks such as ``EMAWeights`` are used.
        """
        self._check_open()
        self.apply_init_from()
        return self._evaluator.evaluate(data, prefix)

    def test(self, data: Any) -> dict[str, float]:
        """``evaluate(data, prefix="test")``: ``{"test/<name>": mean over samples}``, exact over ranks.
        Nothing about the run changes: no hook fires, the history, metric files, best checkpoint and
        early stopping stay as they were. With a ``run_dir``, rank 0 also writes the report to
        ``<run_dir>/test.json`` (``{"step": ..., "test/...": ...}``, replacing an earlier one)."""
        self._check_open()
        self.apply_init_from()
        return self._evaluator.test(data, self.run_dir, self.global_step, self.is_main_process)

    def predict(self, data: Any, out: str | Path | None = None) -> Any:
        """``predict_step``'s outputs for every sample of ``data``, in data order, each sample once,
        concatenated along dim 0: a tensor, or a dict or tuple of tensors as ``predict_step`` returns.
        Eval mode, no_grad, autocast as in training, and the evaluation weights of callbacks such
        as ``EMAWeights``, as ``evaluate`` uses them; no hook fires.

        Under torchrun every rank calls it; each predicts its share and rank 0 receives the shares
        batch by batch and returns the whole; the other ranks return ``None`` (``trainer.evaluation.prediction``
        says which data can be split, and how a padded share's repeats are dropped).

        ``out``: write them instead (rank 0), atomically, and return a ``prediction.Written`` (path,
        samples, shapes): ``NAME.pt`` is ``torch.save`` of what would be returned; ``NAME.safetensors``
        is streamed through a temp file beside it and never held in memory whole (a tensor is stored
        as ``"predictions"``, a dict under its keys, a tuple as ``"0"``, ``"1"``, ...)."""
        self._check_open()
        self.apply_init_from()
        return self._evaluator.predict(data, out, self.is_main_process, self.sharded)

    def _validate(self, epoch: int) -> None:
        self.validated_step = self.global_step
        metrics = self.evaluate()
        self._records.emit({"step": self.global_step, "epoch": epoch, **metrics})


__all__ = ["Trainer", "HOOKS"]
