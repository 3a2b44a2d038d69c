"""The training loop.

``Trainer.fit`` reads top to bottom: epochs of micro-batches, each one forward, backward and,
every ``grad_accum_steps`` micro-batches, one optimizer step. Everything optional hangs off the
hooks listed in ``trainer.hooks``. A subclass overrides a step (``training_step``,
``validation_step``, ``backward``, ``configure_optimizers``), not the loop.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer import checkpoint as ckpt
from trainer import distributed
from trainer import run_dir as run_files
from trainer.callbacks import GradNormLogger
from trainer.config import TrainerConfig
from trainer.data import EpochSource, batch_size_of, make_source, to_device
from trainer.device import Precision, enable_tf32, resolve_device, seed_everything, set_deterministic
from trainer.hooks import HOOKS, collect_hooks
from trainer.metrics import CsvLogger, JsonlLogger, Logger, MetricBuffer
from trainer.modes import detach, eval_mode
from trainer.nonfinite import NonFiniteGuard
from trainer.progress import ProgressBar


def _same(value: Any) -> Any:
    return value


def _ignore(*args: Any) -> None:
    return None


def _same_batch(batch: Any, device: torch.device, non_blocking: bool) -> Any:
    return batch


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"a Tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} items ({', '.join(type(b).__name__ for b in batch[:4])})"
    if isinstance(batch, dict):
        return f"a dict with keys {list(batch)[:6]}"
    return f"a {type(batch).__name__}"


class Trainer:
    """Trains ``model`` on ``train_data`` with ``optimizer``.

    ``train_data`` / ``val_data``: a ``Dataset`` (the Trainer builds the DataLoader with a seeded,
    resumable order), a ``TensorDataset`` or tuple/dict of tensors (batched by index slicing on
    the device), a ``DataLoader``, or any iterable of batches.

    ``optimizer``: an optimizer, or a function of the trainable parameters that builds one (called
    once the model is on its device and wrapped or sharded, so it sees the parameters it will
    step); ``None`` calls ``configure_optimizers()``. ``scheduler``: a scheduler, or a function of
    the optimizer. ``run_config``: the configuration saved in checkpoints (default: ``config``'s
    fields; the command line passes the whole resolved YAML config).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
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
    ):
        if isinstance(config, dict):
            config = TrainerConfig(**config)
        self.config = config if config is not None else TrainerConfig()
        if not isinstance(self.config, TrainerConfig):
            raise TypeError(f"config must be a TrainerConfig or a dict of its fields, got {type(config).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        cfg = self.config

        self.layout = distributed.from_env()  # rank 0 of 1 outside torchrun
        self.device = resolve_device(cfg.device, self.layout.local_rank if self.layout.enabled else None)
        self.precision = Precision(cfg.precision, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            enable_tf32()
        self._joined_group = distributed.init(self.layout, self.device)  # close() leaves it then

        self.module = model.to(self.device)  # the plain (or, under fsdp, sharded) module
        self._ddp: DistributedDataParallel | None = None
        self.sharded = self.layout.enabled and cfg.strategy == "fsdp"  # FSDP2: DTensor parameters
        if self.sharded:
            # fully_shard replaces each parameter with a sharded one; an optimizer built from the
            # model's parameters beforehand is pointed at the replacements by name.
            names = {id(p): n for n, p in self.module.named_parameters()}
            self.configure_sharding(self.module)
            if isinstance(optimizer, torch.optim.Optimizer):
                distributed.remap_optimizer(optimizer, names, self.module)
        elif self.layout.enabled:
            self._ddp = DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        stepped = self._ddp if self._ddp is not None else self.module
        self.model = torch.compile(stepped) if cfg.compile else stepped  # what training steps call
        self.loss_fn = loss_fn
        self.train_data = train_data
        self.val_data = val_data
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.is_main_process = self.layout.rank == 0  # writes files, shows progress
        # saved in checkpoints
        self.resolved_config: dict[str, Any] = run_config if run_config is not None else cfg.model_dump(mode="json")

        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and callable(optimizer):
            optimizer = optimizer(self.trainable_parameters())  # a factory: built on the final parameters
        self.optimizer = optimizer
        self.scheduler = scheduler
        if self.optimizer is None:
            configured = self.configure_optimizers()
            self.optimizer, self.scheduler = (
                configured if isinstance(configured, tuple) else (configured, self.scheduler)
            )
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"configure_optimizers() must return a torch.optim.Optimizer (or an (optimizer, scheduler) "
                f"tuple), got {type(self.optimizer).__name__}"
            )
        if callable(self.scheduler) and not hasattr(self.scheduler, "step"):
            self.scheduler = self.scheduler(self.optimizer)  # a factory of the optimizer
        if self.sharded and isinstance(self.optimizer, torch.optim.SGD) and any(
                g.get("fused") for g in self.optimizer.param_groups):
            raise ValueError(
                "fused SGD has no kernel for sharded parameters; under strategy: fsdp build SGD with "
                "foreach=True (the default a config gets) or use fused Adam/AdamW"
            )

        self.callbacks = list(callbacks)
        if cfg.grad_logging.every_n_steps:
            grad = cfg.grad_logging
            self.callbacks.append(GradNormLogger(grad.every_n_steps, grad.per_layer, grad.histograms))
        if cfg.progress_bar:
            self.callbacks.append(ProgressBar())
        self._hooks = collect_hooks(self, self.callbacks, Trainer)

        self.loggers: list[Logger] = list(loggers) if self.is_main_process else []
        self._files_open = False
        self.history: list[dict[str, float]] = []
        self._metrics = MetricBuffer()

        # Progress, saved in checkpoints.
        self.global_step = 0  # optimizer steps done
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of the current epoch consumed
        self.should_stop = False
        self.stop_reason: str | None = None
        self.stopped_by_signal: int | None = None
        self._signal: int | None = None

        # Between log points.
        self._loss_sum: torch.Tensor | None = None
        self._step_loss: torch.Tensor | None = None
        self._step_micro = 0
        self._loss_count = 0
        self._guard = NonFiniteGuard(cfg.on_nonfinite, cfg.max_consecutive_skips, self.optimizer, self.device,
                                     fp16=cfg.precision == "fp16")
        # The precision's step, resolved once: fp16 goes through the scaler, the others straight to
        # the optimizer (no scaler calls per step).
        scaler = self.precision.scaler
        if scaler.is_enabled():
            self._scale, self._unscale = scaler.scale, scaler.unscale_

            def step_optimizer() -> None:
                scaler.step(self.optimizer)  # skipped by the scaler on an fp16 overflow
                scaler.update()

            self._step_optimizer = step_optimizer
        else:
            self._scale, self._unscale, self._step_optimizer = _same, _ignore, self.optimizer.step
        self._clip_params = self.trainable_parameters()
        self._last_batch: Any = None
        self._extra_sums: dict[str, Any] = {}
        self._extra_count = 0
        self._log_clock = time.perf_counter()
        self._first_step_clock: float | None = None

        self._last_val_step: int | None = None
        self._resumed_skips = (0, 0)
        self._source: EpochSource | None = None
        self._val_source: EpochSource | None = None

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

        The default makes every block of every ``nn.ModuleList`` a unit, then the root; with
        ``precision: bf16`` parameters are gathered in bf16 and gradients reduced in fp32. Override
        to choose other units; the root must be sharded last.
        """
        policy = None
        if self.config.precision == "bf16":
            from torch.distributed.fsdp import MixedPrecisionPolicy

            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        distributed.shard_model(module, policy)

    def training_step(self, batch: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """Return the loss, or a dict with ``"loss"`` and extra metrics (logged as ``train/<name>``)."""
        x, y = self._unpack(batch, "training_step")
        return self._loss(self.model(x), y)

    def validation_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Return per-batch mean metrics; they are averaged over samples as ``val/<name>``.

        The default reports ``loss`` and, for class logits ``(N, C)`` with integer targets, ``acc``.
        """
        x, y = self._unpack(batch, "validation_step")
        out = self.model(x)
        metrics = {"loss": self._loss(out, y)}
        if out.ndim == 2 and y.ndim == 1 and not y.is_floating_point():
            metrics["acc"] = (out.argmax(dim=-1) == y).float().mean()
        return metrics

    def backward(self, loss: torch.Tensor) -> None:
        """Fill ``.grad``. ``loss`` is already divided by ``grad_accum_steps`` and, for fp16, scaled.

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

    def log(self, name: str, value: torch.Tensor | float) -> None:
        """Record a value; tensors stay on the device and become numbers at the next log point."""
        self._metrics.put(name, value)

    def _unpack(self, batch: Any, where: str) -> tuple[Any, Any]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(
                f"the default {where} expects each batch to be (inputs, targets), got {_describe(batch)}; "
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

    def fit(self, resume_from: str | Path | dict[str, Any] | None = None) -> list[dict[str, float]]:
        """Train until ``max_steps`` or ``max_epochs``; returns ``history`` (every log record).

        ``resume_from``: a checkpoint path (or a loaded checkpoint) to continue from exactly.
        SIGTERM / SIGINT stop the run at the next optimizer-step boundary after a checkpoint
        (``stopped_by_signal`` then holds the signal number).
        """
        cfg = self.config
        if cfg.checkpoint.every_n_steps and self.run_dir is None:
            raise ValueError("checkpoint.every_n_steps needs a run_dir: Trainer(..., run_dir='runs/my-run')")
        self._train_source()
        seed_everything(cfg.seed)
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        set_deterministic(cfg.deterministic)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        self._guard.start(self.global_step, *self._resumed_skips, log_every=cfg.log_every_n_steps)
        if self.run_dir is not None and self.is_main_process and not self._files_open:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            files = [JsonlLogger(self.run_dir / run_files.METRICS_JSONL), CsvLogger(self.run_dir / run_files.METRICS_CSV)]
            self.loggers = files + self.loggers
            self._files_open = True
        if hasattr(self.scheduler, "set_total_steps"):  # schedules that need the run's length
            self.scheduler.set_total_steps(self.total_steps())

        previous_handlers = self._install_signal_handlers()
        # With compile: true the first step includes compilation; it is timed on its own.
        self._first_step_clock = time.perf_counter() if cfg.compile else None
        self._log_clock = time.perf_counter()
        self._call("on_fit_start")
        try:
            try:
                while not self._done():
                    self._train_epoch()
            except torch.OutOfMemoryError as exc:
                raise torch.OutOfMemoryError(self._oom_message(exc)) from exc
            self._flush_logs()
            if self.val_data is not None and self._last_val_step != self.global_step and self.stopped_by_signal is None:
                self._validate(epoch=self.epoch - (self.batch_in_epoch == 0))  # final metrics
            if cfg.checkpoint.save_final and self.run_dir is not None and self.stopped_by_signal is None:
                self.save_checkpoint()
        except BaseException as exc:
            self._call("on_exception", exc)
            raise
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            torch.use_deterministic_algorithms(was_deterministic)
            for logger in self.loggers:
                logger.close()
            self.loggers = [lg for lg in self.loggers if not isinstance(lg, (JsonlLogger, CsvLogger))]
            self._files_open = False
        self._call("on_fit_end")
        return self.history

    def close(self) -> None:
        """Under torchrun, on every rank after the last ``fit``/``evaluate``: leave the process group.

        The DDP wrapper goes first. Its C++ reducer holds the process group, and a group destroyed
        from there (the GIL held) can deadlock with a gloo thread still freeing the last collective's
        tensors, which needs the GIL: the process then never exits. Dropped while torch's registry
        still holds the group, the wrapper frees nothing; ``distributed.shutdown`` then meets the
        other ranks and destroys the group from the registry, which releases the GIL. A group the
        script joined itself is left to the script. Outside torchrun this does nothing. With
        ``compile: true`` this clears torch.compile's caches: compiled code and its guards hold
        the wrapper too (through reference cycles, hence the collection).
        """
        if self._ddp is not None:
            self.model, self._ddp = self.module, None
            if self.config.compile:
                torch._dynamo.reset()
                gc.collect()
        if self._joined_group:
            distributed.shutdown()
            self._joined_group = False

    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGTERM and SIGINT only set a flag; the loop acts on it at the next step boundary."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            self._signal = self._signal or signum

        return {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}

    def _train_epoch(self) -> None:
        cfg = self.config
        accum = cfg.grad_accum_steps
        h = self._hooks
        autocast = self.precision.autocast
        scale = self._scale
        non_blocking = self.device.type == "cuda"
        # On CPU, batches are already where they belong: no per-step walk over them.
        move = to_device if self.device.type != "cpu" else _same_batch
        no_sync = None  # gradients stay local on the micro-batches before a step
        if accum > 1 and self._ddp is not None:
            no_sync = self._ddp.no_sync
        elif accum > 1 and self.sharded:
            no_sync = functools.partial(distributed.fsdp_no_sync, self.module)
        nullcontext = contextlib.nullcontext()
        try:
            epoch_len: int | None = len(self._source)
        except TypeError:
            epoch_len = None

        self._call("on_train_epoch_start")
        for batch in self._source.epoch(self.epoch, self.batch_in_epoch):
            self.batch_in_epoch += 1
            step_now = self.batch_in_epoch % accum == 0 or self.batch_in_epoch == epoch_len
            batch = move(batch, self.device, non_blocking)
            for fn in h["on_train_batch_start"]:
                fn(self, batch)
            with autocast:
                outputs = self.training_step(batch)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if not isinstance(loss, torch.Tensor):
                raise TypeError(
                    f"training_step must return a loss Tensor or a dict with a 'loss' Tensor, got {_describe(outputs)}"
                )
            for fn in h["on_before_backward"]:
                fn(self, loss)
            # Under DDP / FSDP the micro-batches before the step skip the gradient all-reduce.
            with no_sync() if no_sync is not None and not step_now else nullcontext:
                self.backward(scale(loss / accum if accum > 1 else loss))
            self._track(loss, outputs, batch)
            if step_now:
                self._step()
            if h["on_train_batch_end"]:
                outputs = detach(outputs)
                for fn in h["on_train_batch_end"]:
                    fn(self, outputs, batch)
            if step_now and self._after_step():
                if self.batch_in_epoch != epoch_len:
                    return
                break  # stopping on the epoch's last batch still ends the epoch
        if self.batch_in_epoch % accum and epoch_len is None:
            self._step()  # the last, partial window of an iterable of unknown length
            self._after_step()
        self.epoch += 1
        self.batch_in_epoch = 0
        self._call("on_train_epoch_end")
        every = self.config.eval_every_n_epochs
        if every and self.val_data is not None and self.epoch % every == 0:
            self._validate(epoch=self.epoch - 1)  # tagged with the epoch it evaluates

    def _step(self) -> None:
        """One optimizer step, unless the step's loss is not finite (see ``trainer.nonfinite``)."""
        step_loss, micro = self._step_loss, self._step_micro
        self._step_loss, self._step_micro = None, 0
        # Under torchrun the ranks' losses differ. Under DDP their all-reduced gradients agree, so
        # checking the gradient norm makes every rank take the same decision without a collective;
        # under FSDP each rank holds a shard, and the norm costs one scalar all-reduce.
        checked = step_loss if not self.layout.enabled else self._grad_norm()
        if not self._guard.allow(checked, self.global_step + 1):  # host mode, policy skip
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1  # a skipped step still counts, so data and schedule stay aligned
            return
        self._loss_sum = step_loss if self._loss_sum is None else self._loss_sum + step_loss
        self._loss_count += micro
        self._optimizer_step()
        self._guard.done()

    def _grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self._clip_params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.linalg.vector_norm(distributed.norms(grads))

    def _optimizer_step(self) -> None:
        h = self._hooks
        optimizer = self.optimizer
        self._unscale(optimizer)  # fp16: unscale so the hooks and clipping see true gradients
        for fn in h["on_after_backward"]:
            fn(self)
        if self.config.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._clip_params, self.config.clip_grad_norm, foreach=True)
        for fn in h["on_before_optimizer_step"]:
            fn(self, optimizer)
        self._step_optimizer()
        if self.scheduler is not None:
            self.scheduler.step()
        for fn in h["on_before_zero_grad"]:
            fn(self, optimizer)
        optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def _after_step(self) -> bool:
        """Log, validate, checkpoint and decide whether to stop, at an optimizer-step boundary."""
        cfg = self.config
        step = self.global_step
        if self._first_step_clock is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # note: CPU-GPU sync point, once, to time compilation
            self.log("time/first_step_s", time.perf_counter() - self._first_step_clock)
            self._first_step_clock = None
            self._log_clock = time.perf_counter()  # throughput without the compile
        log_point = step % cfg.log_every_n_steps == 0
        if log_point:
            self._flush_logs()
        if cfg.eval_every_n_steps and self.val_data is not None and step % cfg.eval_every_n_steps == 0:
            self._validate(epoch=self.epoch)
        save_point = bool(cfg.checkpoint.every_n_steps) and step % cfg.checkpoint.every_n_steps == 0
        if self._agreed_signal(log_point or save_point):
            self._stop_on_signal()
        elif save_point:
            self.save_checkpoint()
        return self._done()

    def _agreed_signal(self, collective_ok: bool) -> int | None:
        """The signal to stop for. Alone: as soon as it arrives. Under torchrun all ranks must stop at the
        same step, so they agree at log points and checkpoint steps, where a collective is affordable."""
        if not self.layout.enabled:
            return self._signal
        if not collective_ok:
            return None
        agreed = distributed.all_max(self._signal or 0, self.device)
        self._signal = agreed or None
        return self._signal

    def _oom_message(self, exc: BaseException) -> str:
        cfg = self.config
        figures = ""
        if self.device.type == "cuda":
            gib = 2**30
            free, total = torch.cuda.mem_get_info(self.device)
            figures = (f" On {torch.cuda.get_device_name(self.device)}: {total / gib:.1f} GiB in all, "
                       f"{torch.cuda.memory_allocated(self.device) / gib:.1f} GiB allocated by tensors, "
                       f"{torch.cuda.memory_reserved(self.device) / gib:.1f} GiB reserved, "
                       f"peak {torch.cuda.max_memory_allocated(self.device) / gib:.1f} GiB, {free / gib:.1f} GiB free.")
        hint = "precision: bf16" if cfg.precision == "fp32" else "a smaller model"
        return (
            f"out of memory at step {self.global_step + 1} with batch_size {cfg.batch_size} "
            f"(x grad_accum_steps {cfg.grad_accum_steps}) in {cfg.precision}.{figures} Try a smaller batch_size with a "
            f"larger grad_accum_steps (same effective batch), {hint}, or compile: true. ({str(exc).splitlines()[0]})"
        )

    def _stop_on_signal(self) -> None:
        signum = self._signal
        self._flush_logs()
        path = self.save_checkpoint() if self.run_dir is not None else None
        self.stopped_by_signal = signum
        self.should_stop = True
        name = signal.Signals(signum).name
        self.stop_reason = f"stopped by {name}" + (f", checkpoint {path}" if path else "")

    def _done(self) -> bool:
        cfg = self.config
        if self.should_stop:
            return True
        if cfg.max_steps is not None and self.global_step >= cfg.max_steps:
            return True
        max_epochs = cfg.max_epochs if cfg.max_epochs is not None else (1 if cfg.max_steps is None else None)
        return max_epochs is not None and self.epoch >= max_epochs

    def total_steps(self) -> int | None:
        """Optimizer steps this run takes, when the data length says so (for progress and schedules)."""
        cfg = self.config
        try:
            per_epoch = math.ceil(len(self._train_source()) / cfg.grad_accum_steps)
        except TypeError:
            per_epoch = None
        max_epochs = cfg.max_epochs if cfg.max_epochs is not None else (1 if cfg.max_steps is None else None)
        by_epochs = per_epoch * max_epochs if per_epoch is not None and max_epochs is not None else None
        limits = [n for n in (cfg.max_steps, by_epochs) if n is not None]
        return min(limits) if limits else None

    def _train_source(self) -> EpochSource:
        if self._source is None:
            if self.train_data is None:
                raise ValueError("fit() needs training data: Trainer(model, optimizer, train_data=...)")
            cfg = self.config
            self._source = make_source(
                self.train_data, batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed,
                shuffle=True, device=self.device, rank=self.layout.rank, world_size=self.layout.world_size,
            )
        return self._source

    # ----------------------------------------------------------------- metrics

    def _track(self, loss: torch.Tensor, outputs: Any, batch: Any) -> None:
        value = loss.detach()
        if value.ndim:
            value = value.mean()  # a non-scalar loss is logged as its mean
        self._step_loss = value if self._step_loss is None else self._step_loss + value
        self._step_micro += 1
        self._last_batch = batch
        if isinstance(outputs, dict):  # extra metrics: also means over the log interval
            sums = self._extra_sums
            self._extra_count += 1
            for name, extra in outputs.items():
                if name != "loss":
                    extra = extra.detach() if isinstance(extra, torch.Tensor) else extra
                    sums[name] = sums[name] + extra if name in sums else extra

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for a non-finite loss (device mode: as of the last log point)."""
        return self._guard.skipped

    def _flush_logs(self) -> None:
        if self._loss_sum is None and not self._metrics:
            return
        record: dict[str, float] = {"step": self.global_step, "epoch": self.epoch}
        if self._loss_sum is not None:
            self._metrics.put("train/loss", self._loss_sum / self._loss_count)
        for name, total in self._extra_sums.items():
            self._metrics.put(f"train/{name}", total / self._extra_count)
        self._extra_sums, self._extra_count = {}, 0
        lr = self.optimizer.param_groups[0]["lr"]
        self._metrics.put("lr", lr)
        values, flags = self._metrics.flush(extra=self._guard.pending(), reduce=self._mean_over_ranks)
        # (note: the flush is the CPU-GPU sync point of the log interval)
        record.update(values)
        if flags is not None:
            self._guard.read(flags)
        now = time.perf_counter()
        # Samples: micro-batches times the size of the last one (exact but for an epoch's short last batch).
        samples = self._loss_count * batch_size_of(self._last_batch) if self._last_batch is not None else 0
        record["samples_per_sec"] = samples / max(now - self._log_clock, 1e-9)
        if self.device.type == "cuda":
            record["cuda_peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._loss_sum, self._loss_count, self._log_clock = None, 0, now
        self._emit(record)

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """Logged values averaged over ranks: one collective per log point, none per step."""
        world = distributed.world_size()
        return distributed.all_sum(values) / world if world > 1 else values

    def _emit(self, record: dict[str, float]) -> None:
        self.history.append(record)
        self._call("on_log", record)
        for logger in self.loggers:
            logger.log(record)

    def _call(self, hook: str, *args: Any) -> None:
        for fn in self._hooks[hook]:
            fn(self, *args)

    # ----------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimizer, scheduler, scaler, progress,
        RNG states and stateful callbacks, as plain data (``weights_only``-loadable).

        Under torchrun every rank calls it together (it gathers each rank's part of the log
        interval in progress); under ``strategy: fsdp``, ``model`` and ``optimizer`` hold this
        rank's shards."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_state, optimizer_state = get_state_dict(self.module, self.optimizer)
        else:
            model_state, optimizer_state = self.module.state_dict(), self.optimizer.state_dict()
        return {
            "version": ckpt.VERSION,
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.precision.scaler.state_dict(),
            "trainer_state": {
                "global_step": self.global_step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "consecutive_skips": self._guard.consecutive,
                "skipped_steps": self._guard.skipped,
                **self._interval_state(),
            },
            "rng": ckpt.rng_state(),
            "callbacks": {
                f"{i}:{type(cb).__name__}": cb.state_dict()
                for i, cb in enumerate(self.callbacks)
                if hasattr(cb, "state_dict")
            },
            "config": self.resolved_config,
        }

    def _interval_state(self) -> dict[str, Any]:
        """The log interval in progress, every rank's, so that the next logged ``train/loss`` (and
        extras) after a resume is the same number as without the interruption."""
        names = sorted(self._extra_sums)
        extras = [torch.as_tensor(self._extra_sums[n]).double().mean() for n in names]
        loss = self._loss_sum.double() if self._loss_sum is not None else torch.zeros((), dtype=torch.float64)
        mine = torch.stack([t.cpu() for t in [loss, *extras]]).tolist()  # note: CPU-GPU sync point, per checkpoint
        ranks = distributed.all_gather_floats([float(self._loss_sum is not None), *mine], self.device)
        return {
            "loss_sums": [r[1] if r[0] else None for r in ranks],
            "loss_count": self._loss_count,
            "extra_sums": [dict(zip(names, r[2:])) for r in ranks],
            "extra_types": {n: str(v.dtype) if isinstance(v, torch.Tensor) else "float" for n, v in self._extra_sums.items()},
            "extra_count": self._extra_count,
        }

    def _restore_interval(self, ts: dict[str, Any]) -> None:
        rank = self.layout.rank if self.layout.rank < len(ts["loss_sums"]) else 0  # fewer ranks than saved
        loss = ts["loss_sums"][rank]
        self._loss_sum = torch.tensor(loss, device=self.device) if loss is not None else None
        self._loss_count = ts["loss_count"]
        self._extra_sums = {
            name: value if ts["extra_types"][name] == "float"
            else torch.tensor(value, dtype=getattr(torch, ts["extra_types"][name].removeprefix("torch.")), device=self.device)
            for name, value in ts["extra_sums"][rank].items()
        }
        self._extra_count = ts["extra_count"]

    def load_checkpoint(self, source: str | Path | dict[str, Any]) -> None:
        """Restore everything ``state_dict`` saved, from a checkpoint (file or sharded directory) or an
        already loaded one."""
        state, where = self._read_checkpoint(source)
        if state.get("sharded"):
            self._load_sharded(state, where)
        else:
            self.load_model_state(state["model"], where)
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError, RuntimeError) as exc:
                raise ckpt.CheckpointError(
                    f"checkpoint {where}: the optimizer state does not fit this optimizer ({exc}); "
                    "resume with the config the run was started with"
                ) from None
        if (state["scheduler"] is None) != (self.scheduler is None):
            raise ckpt.CheckpointError(
                f"checkpoint {where} was written {'without' if state['scheduler'] is None else 'with'} a scheduler "
                f"but this run has {'one' if self.scheduler is not None else 'none'}"
            )
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.precision.scaler.load_state_dict(state["scaler"])
        ts = state["trainer_state"]
        self.global_step, self.epoch, self.batch_in_epoch = ts["global_step"], ts["epoch"], ts["batch_in_epoch"]
        self._resumed_skips = (ts["consecutive_skips"], ts["skipped_steps"])
        self._restore_interval(ts)
        saved_callbacks = state["callbacks"]
        for i, cb in enumerate(self.callbacks):
            key = f"{i}:{type(cb).__name__}"
            if key in saved_callbacks and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(saved_callbacks[key])
        ckpt.set_rng_state(state["rng"])

    def _load_sharded(self, state: dict[str, Any], where: str) -> None:
        """Model and optimizer state from a DCP directory, into this run's layout (sharded or not)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(self.module, self.optimizer)
        tensors = {"model": model_state, "optimizer": optimizer_state["state"]}
        ckpt.load_sharded(tensors, state["sharded"])
        try:
            set_state_dict(self.module, self.optimizer, model_state_dict=tensors["model"],
                           optim_state_dict={"state": tensors["optimizer"],
                                             "param_groups": state["optimizer"]["param_groups"]})
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ckpt.CheckpointError(
                f"checkpoint {where}: the saved state does not fit this model and optimizer ({exc}); "
                "resume with the config the run was started with"
            ) from None

    def _read_checkpoint(self, source: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
        """The checkpoint's state and where it came from (for messages). A file checkpoint holds full
        tensors keyed for the plain module, which a sharded run does not take."""
        state = source if isinstance(source, dict) else ckpt.load_checkpoint(source)
        where = str(state.get("path", source if not isinstance(source, dict) else "given"))
        if self.sharded and not state.get("sharded"):
            raise ckpt.CheckpointError(
                f"checkpoint {where} is a single file, written without strategy: fsdp; an fsdp run loads "
                "its own checkpoints (directories). Use this one with strategy: ddp or in a single process"
            )
        return state, where

    def load_weights(self, source: str | Path | dict[str, Any]) -> None:
        """Only the model's weights from a checkpoint (file or sharded directory, or a loaded one)."""
        state, where = self._read_checkpoint(source)
        if not state.get("sharded"):
            self.load_model_state(state["model"], where)
            return
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        tensors = {"model": get_model_state_dict(self.module)}
        ckpt.load_sharded(tensors, state["sharded"])
        set_model_state_dict(self.module, tensors["model"])

    def load_model_state(self, saved: dict[str, torch.Tensor], where: str = "given") -> None:
        ckpt.check_model_state(self.module, saved, where)
        self.module.load_state_dict(saved)

    def save_checkpoint(self, path: str | Path | None = None, rotate: bool = True) -> Path | None:
        """Write ``<run_dir>/checkpoints/step-<step>.pt`` (or ``path``) atomically and rotate old
        periodic ones; under ``strategy: fsdp``, the directory ``step-<step>/``. Under torchrun every
        rank calls it together: rank 0 writes the file (with fsdp, each rank its shards) and the
        others get ``None``."""
        if self.run_dir is None:
            raise ValueError("save_checkpoint() needs a run_dir: Trainer(..., run_dir='runs/my-run')")
        self._guard.flush()
        params = [p.detach() for p in self.module.parameters() if p.is_floating_point()]
        if params and not all(math.isfinite(n) for n in distributed.norms(params).tolist()):
            raise FloatingPointError(
                f"step {self.global_step}: the weights hold NaN/Inf; refusing to write a checkpoint of them"
            )
        state = self.state_dict()
        directory = run_files.checkpoint_dir(self.run_dir)
        path = Path(path) if path is not None else directory / ckpt.checkpoint_name(self.global_step, self.sharded)
        try:
            if self.sharded:
                tensors = {"model": state["model"], "optimizer": state["optimizer"]["state"]}
                state = {**state, "model": None, "optimizer": {"param_groups": state["optimizer"]["param_groups"]}}
                ckpt.save_sharded(state, tensors, path, self.is_main_process)
            elif self.is_main_process:
                ckpt.save_checkpoint(state, path)
            if rotate and self.is_main_process:
                ckpt.rotate(directory, self.config.checkpoint.keep_last)
        finally:
            distributed.barrier()  # no rank runs ahead of a checkpoint that is not complete
        return path if self.is_main_process else None

    # ----------------------------------------------------------------- evaluation

    def evaluate(self, data: Any = None) -> dict[str, float]:
        """Run ``validation_step`` over ``data`` (default: ``val_data``) under ``eval_mode``.

        Returns ``{"val/<name>": mean over samples}``.
        """
        if data is None and self.val_data is None:
            raise ValueError("evaluate() needs data: evaluate(data) or Trainer(..., val_data=...)")
        cfg = self.config
        # Under torchrun each rank evaluates its own share, no sample twice (no padding).
        shard = {"rank": self.layout.rank, "world_size": self.layout.world_size, "pad": False}
        if data is None:
            if self._val_source is None:
                self._val_source = make_source(
                    self.val_data, batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed,
                    shuffle=False, device=self.device, **shard,
                )
            source = self._val_source
        else:
            source = make_source(data, batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed,
                                 shuffle=False, device=self.device, **shard)
        self._call("on_validation_start")
        sums: dict[str, torch.Tensor] = {}
        count = 0
        # DDP's forward would synchronise buffers across ranks; evaluation runs on the plain module.
        stepped, self.model = self.model, (self.module if self._ddp is not None else self.model)
        try:
            with eval_mode(self.module), self.precision.autocast:
                for batch, counted in self._eval_batches(source):
                    batch = to_device(batch, self.device, self.device.type == "cuda")
                    out = self.validation_step(batch)
                    if not isinstance(out, dict):
                        raise TypeError(f"validation_step must return a dict of metric tensors, got {_describe(out)}")
                    if not counted:
                        continue
                    n = batch_size_of(batch)
                    for name, value in out.items():
                        value = torch.as_tensor(value, device=self.device).double().mean() * n
                        sums[name] = sums[name] + value if name in sums else value
                    count += n
        finally:
            self.model = stepped
        metrics: dict[str, float] = {}
        # The same names in the same order on every rank, even on one whose share was empty (fewer
        # validation samples than ranks): it adds zeros rather than skipping the collective.
        names = distributed.union_of_names(sums)
        if names:
            zero = torch.zeros((), dtype=torch.float64, device=self.device)
            # Exact over ranks: sums and counts, not a mean of means.
            totals = distributed.all_sum(torch.stack([sums.get(n, zero) for n in names] + [zero + count]))
            *values, total = totals.tolist()  # note: CPU-GPU sync point, once per evaluation
            metrics = {f"val/{name}": v / total for name, v in zip(names, values)}
        self._call("on_validation_end", metrics)
        return metrics

    def _eval_batches(self, source: EpochSource) -> Iterator[tuple[Any, bool]]:
        """``(batch, counted)`` pairs. Under fsdp every forward gathers parameters from all ranks, so
        every rank must run as many as the others: a rank whose (unpadded) share has run out repeats
        its last batch without counting it."""
        if not self.sharded:
            for batch in source.epoch(0, 0):
                yield batch, True
            return
        try:
            rounds: int | None = distributed.all_max(len(source), self.device)
        except TypeError:
            rounds = None  # unknown length: the ranks agree batch by batch
        batches = iter(source.epoch(0, 0))
        last, done = None, 0
        while rounds is None or done < rounds:
            batch = next(batches, None)
            if rounds is None and not distributed.all_max(int(batch is not None), self.device):
                return
            if batch is None and last is None:
                raise ValueError(
                    f"rank {self.layout.rank} has no validation batch: under strategy: fsdp every rank needs at "
                    "least one (there are fewer validation samples than ranks)"
                )
            if batch is not None:
                last = batch
            yield (batch, True) if batch is not None else (last, False)
            done += 1

    def _validate(self, epoch: int) -> None:
        self._last_val_step = self.global_step
        metrics = self.evaluate()
        self._emit({"step": self.global_step, "epoch": epoch, **metrics})


__all__ = ["Trainer", "HOOKS"]
