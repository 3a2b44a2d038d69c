"""From a validated config to objects: each component built (``trainer.components``: import its
``_target_``, check its arguments against the target's signature and type hints, call it), and the
results handed to the Trainer.

Every failure is a ``ConfigError`` that points at the line of the value responsible.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from trainer.checkpoint import weights
from trainer.cli.run_config import TRACKERS, RunConfig, TrackerLogger, trainer_config
from trainer.components import Component, bind, check_arguments, import_target, instantiate
from trainer.config import CompileConfig, compile_settings
from trainer.device import model_init, resolve_device, seed_everything
from trainer.freezing import matching_names
from trainer.loop.compilation import check_backend
from trainer.loop.manual import GivenOverConfigured
from trainer.loop.sanity import functional_of
from trainer.memory import matching_modules
from trainer.observability.metric_objects import is_metric
from trainer.observability.tensorboard import TensorBoardLogger
from trainer.observability.trackers import MLflowLogger, WandbLogger
from trainer.parallel import distributed
from trainer.run_dir import TENSORBOARD
from trainer.trainer import Trainer
from trainer.yaml_source import ConfigError, Source

SPLITS = ("train", "val", "test")
# What build passes every Trainer, from the config's other sections: not arguments of trainer: itself.
TRAINER_ARGUMENTS = ("model", "optimizer", "train_data", "val_data", "loss_fn", "scheduler", "callbacks", "config",
                     "run_dir", "loggers", "run_config", "metrics")


def split_data(data: Any, source: Source) -> tuple[Any, Any]:
    """``{'train': ..., 'val': ..., 'test': ...}`` (val and test optional), ``(train, val)`` or the
    training data alone; the train and val data (``data_splits`` has them all)."""
    splits = data_splits(data, source)
    return splits["train"], splits.get("val")


def data_splits(data: Any, source: Source) -> dict[str, Any]:
    """The data callable's splits by name: those of its dict, or train (and val) otherwise."""
    if isinstance(data, dict) and "train" in data:
        extra = set(data) - set(SPLITS)
        if extra:
            raise source.at(("data",), f"the data callable returned unknown keys {sorted(extra)}; expected 'train', "
                            "'val' and 'test'")
        return {name: data[name] for name in SPLITS if data.get(name) is not None}
    if isinstance(data, dict):
        raise source.at(("data",), f"the data callable returned a dict without 'train' (keys: {sorted(data)})")
    if isinstance(data, list) and len(data) == 2 and not hasattr(data[0], "shape"):
        return {name: d for name, d in zip(SPLITS, data) if d is not None}
    if isinstance(data, tuple) and len(data) == 2 and not all(hasattr(d, "shape") for d in data):
        return {name: d for name, d in zip(SPLITS, data) if d is not None}
    return {"train": data}


KERNEL_CHOICES = {"fused", "foreach", "differentiable", "capturable"}


def kernel_defaults(target: Any, params: list[Any]) -> dict[str, Any]:
    """Fused kernels for the optimizers that have them (one kernel for all parameters instead of a
    Python loop; about twice as fast for a small model on CPU). Sharded (FSDP) parameters are
    DTensors: fused Adam/AdamW take them, SGD has no fused kernel for them and runs foreach."""
    if target in (torch.optim.Adam, torch.optim.AdamW):
        return {"fused": True}
    if target is torch.optim.SGD:
        return {"foreach": True} if any(distributed.is_dtensor(p) for p in params) else {"fused": True}
    return {}


def optimizer_factory(component: Component, source: Source, compiled: bool = False) -> Callable[[Any], Any]:
    """The optimizer as a function of the parameters, checked now and called by the Trainer on the
    parameters it will step (after DDP wrapping or FSDP sharding). The kernel is chosen from those
    parameters unless the config chose one; with ``compiled`` (``compile: {optimizer: true}``)
    torch.compile generates it from the optimizer's own code, which a fused kernel would hide."""
    path = ("optimizer",)
    call = bind(component, source, path, skip=1)
    target = import_target(component.target, source, path + ("_target_",))
    chosen = bool(KERNEL_CHOICES & set(component.kwargs))
    if compiled and component.kwargs.get("fused"):
        raise source.at(path + ("fused",), "compile: {optimizer: true} compiles the optimizer's own code, which a "
                        "fused kernel replaces; remove fused: true, or set compile.optimizer: false")

    def build_optimizer(params: Any) -> Any:
        params = list(params)
        return call(params, **({} if chosen or compiled else kernel_defaults(target, params)))

    return build_optimizer


def optimizers_factory(entries: dict[str, Any], model: Any, source: Source) -> tuple[Callable[[Any], Any], list[Any]]:
    """Several optimizers (``optimizers:``), each over the parameters its patterns name, checked now:
    the function that builds them from the Trainer's trainable parameters, and their schedulers
    (functions of their optimizer, or None)."""
    made, schedulers = [], []
    for name, entry in entries.items():
        path = ("optimizers", name)
        patterns = [entry.params] if isinstance(entry.params, str) else list(entry.params)
        try:
            names = matching_names(model, patterns, "the")
        except ValueError as exc:
            raise source.at(path + ("params",), str(exc)) from None
        call = bind(entry.optimizer, source, path + ("optimizer",), skip=1)
        target = import_target(entry.optimizer.target, source, path + ("optimizer", "_target_"))
        chosen = bool(KERNEL_CHOICES & set(entry.optimizer.kwargs))
        made.append((names, call, target, chosen))
        schedulers.append(bind(entry.scheduler, source, path + ("scheduler",), skip=1) if entry.scheduler else None)
    named = dict(model.named_parameters())

    def build_optimizers(params: Any) -> list[Any]:
        trainable = {id(p) for p in params}
        built = []
        for names, call, target, chosen in made:
            held = [named[n] for n in names if id(named[n]) in trainable]
            built.append(call(held, **({} if chosen else kernel_defaults(target, held))))
        return built

    return build_optimizers, schedulers


def check_patterns(model: Any, patterns: list[str], source: Source) -> None:
    """Each ``activation_checkpointing`` pattern matches a module of the model, or the error points at it."""
    listed = isinstance(source.data.get("activation_checkpointing"), list)
    for i, pattern in enumerate(patterns):
        try:
            matching_modules(model, [pattern])
        except ValueError as exc:
            path = ("activation_checkpointing", i) if listed else ("activation_checkpointing",)
            raise source.at(path, str(exc).removeprefix("activation_checkpointing ")) from None


@dataclass
class Built:
    trainer: Any
    train_data: Any
    val_data: Any
    splits: dict[str, Any] = field(default_factory=dict)  # train, val, test: those the data callable returned
    notes: list[str] = field(default_factory=list)  # said once when the run starts


def build(source: Source, run: RunConfig, run_dir: Path | None) -> Built:
    """Build the model, data, loss, optimizer, scheduler, callbacks and Trainer of a run."""
    try:
        resolve_device(run.device)
    except ValueError as exc:
        raise source.at(("device",), str(exc)) from None
    seed_everything(run.seed)  # the model's initial weights repeat run to run

    if isinstance(run.trainer, Component):
        trainer_path, trainer_at = run.trainer.target, ("trainer", "_target_")
        trainer_kwargs = check_arguments(import_target(trainer_path, source, trainer_at), run.trainer.kwargs,
                                         source, ("trainer",), 0, trainer_path, filled=TRAINER_ARGUMENTS)
    else:
        trainer_path, trainer_at, trainer_kwargs = run.trainer, ("trainer",), {}
    trainer_cls = import_target(trainer_path, source, trainer_at)
    if not (inspect.isclass(trainer_cls) and issubclass(trainer_cls, Trainer)):
        raise source.at(trainer_at, f"'{trainer_path}' is not a subclass of trainer.Trainer")
    # With init_from under fsdp no rank builds the whole model: it is built on the meta device and
    # the Trainer gives each rank memory for its own shards, which the weights file then fills.
    on_meta = torch.device("meta") if weights.builds_on_meta(run, distributed.from_env()) else contextlib.nullcontext()
    with on_meta, model_init(run.precision):  # bf16-true: the weights are made in bf16, as a model factory's are
        model = instantiate(run.model, source, ("model",))
    if not isinstance(model, torch.nn.Module):
        raise source.at(("model",), f"'{run.model.target}' returned a {type(model).__name__}, not a torch.nn.Module")
    check_patterns(model, run.activation_checkpointing, source)
    if isinstance(run.compile, CompileConfig):
        try:
            check_backend(run.compile.backend)
        except ValueError as exc:
            raise source.at(("compile", "backend"), str(exc)) from None
    splits = data_splits(instantiate(run.data, source, ("data",)), source)
    train_data, val_data = splits.get("train"), splits.get("val")

    if train_data is None:
        raise source.at(("data",), f"{run.data.target}(...) returned no training data; return a Dataset, tensors, "
                        "a DataLoader or a list of batches, or {'train': ..., 'val': ...}")

    if isinstance(run.loss, str):
        loss_fn = import_target(run.loss, source, ("loss",))
        if inspect.isclass(loss_fn):  # called as loss_fn(output, target) it would build an object, not a loss
            functional = functional_of(loss_fn)
            raise source.at(("loss",), f"{run.loss} is a class; use {{_target_: {run.loss}}} to build an instance"
                            + (f", or {functional}" if functional else ""))
    elif run.loss is not None:
        loss_fn = instantiate(run.loss, source, ("loss",))
    else:
        loss_fn = None
        defaults = [step for step in ("training_step", "validation_step")
                    if getattr(trainer_cls, step) is getattr(Trainer, step)
                    and (step == "training_step" and trainer_cls.manual_step is Trainer.manual_step
                         or step == "validation_step" and val_data is not None)]
        if defaults:
            raise ConfigError(
                f"{source.file}: no 'loss:' entry, and the default {' and '.join(defaults)} of {trainer_path} "
                f"{'needs' if len(defaults) == 1 else 'need'} one: add loss: torch.nn.functional.cross_entropy "
                f"(or {{_target_: torch.nn.CrossEntropyLoss}}), or define {defaults[0]}(self, batch) in a Trainer subclass"
            )

    optimizer = scheduler = None
    overrides_optimizers = trainer_cls.configure_optimizers is not Trainer.configure_optimizers
    if run.optimizers is not None:
        if run.optimizer is not None or run.scheduler is not None:
            where = ("optimizer",) if run.optimizer is not None else ("scheduler",)
            raise source.at(where, "give either optimizer: (with scheduler:) or optimizers: (each with its own "
                            "scheduler:), not both")
        optimizer, scheduler = optimizers_factory(run.optimizers, model, source)
    elif run.optimizer is not None:
        settings = compile_settings(run.compile)
        optimizer = optimizer_factory(run.optimizer, source, compiled=settings is not None and settings.optimizer)
        if run.scheduler is not None:
            scheduler = bind(run.scheduler, source, ("scheduler",), skip=1)
    elif run.scheduler is not None and overrides_optimizers:
        raise source.at(("scheduler",), f"with optimizer: null, {trainer_path}.configure_optimizers() builds the "
                        "optimizer and a scheduler of the config has none to drive: return (optimizer, scheduler) "
                        "from configure_optimizers(), or set scheduler=null")
    elif run.scheduler is not None:
        raise source.at(("scheduler",), "a scheduler needs an optimizer section")
    elif not overrides_optimizers:
        raise ConfigError(
            f"{source.file}: no optimizer: add an 'optimizer:' section such as "
            "{_target_: torch.optim.AdamW, lr: 1.0e-3}, or define configure_optimizers() in your Trainer subclass"
        )
    notes = [optimizers_note(run, source, trainer_path)] if overrides_optimizers and optimizer is not None else []
    callbacks = [instantiate(c, source, ("callbacks", i)) for i, c in enumerate(run.callbacks)]
    metrics = {}
    for name, spec in run.metrics.items():
        metrics[name] = instantiate(spec, source, ("metrics", name))
        if not is_metric(metrics[name]):
            raise source.at(("metrics", name), f"'{spec.target}' returned a {type(metrics[name]).__name__}, not a metric "
                            "object with update(), compute() and reset() (such as a torchmetrics Metric)")
    loggers = []
    for i, spec in enumerate(run.loggers if run_dir is not None else []):
        if spec == "tensorboard":
            try:
                loggers.append(TensorBoardLogger(run_dir / TENSORBOARD))
            except ImportError as exc:
                raise source.at(("loggers", i), str(exc)) from None
        elif spec in TRACKERS or isinstance(spec, TrackerLogger):
            name, settings = spec.settings if isinstance(spec, TrackerLogger) else (spec, None)
            options = settings.model_dump(exclude_none=True) if settings is not None else {}
            try:
                loggers.append({"mlflow": MLflowLogger, "wandb": WandbLogger}[name](run_dir, **options))
            except ImportError as exc:
                raise source.at(("loggers", i), str(exc)) from None
        else:
            loggers.append(instantiate(spec, source, ("loggers", i), run_dir))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GivenOverConfigured)  # the note says it, with the config's line
            trainer = trainer_cls(
                model, optimizer, train_data, val_data, loss_fn=loss_fn, scheduler=scheduler, callbacks=callbacks,
                config=trainer_config(run), run_dir=run_dir, loggers=loggers,
                run_config=run.model_dump(mode="json", by_alias=True), **trainer_kwargs,
                **({"metrics": metrics} if metrics else {}),  # a subclass without the argument builds as before
            )
    except ConfigError:
        raise  # from the optimizer or scheduler factory, already at its own line
    except weights.WeightsError as exc:  # a model built on the meta device that cannot be given values
        raise source.at(("model",), str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise source.at(("trainer",), f"building {trainer_path} failed: {exc}") from exc
    return Built(trainer, train_data, val_data, splits, notes)


def optimizers_note(run: RunConfig, source: Source, trainer_path: str) -> str:
    """The line that says a config's optimizer wins over the subclass's ``configure_optimizers()``:
    as under LightningCLI, and so that ``optimizer.lr=...`` on the command line does what it says;
    ``optimizer=null`` gives the choice back to the subclass."""
    given = [key for key in ("optimizers", "optimizer", "scheduler") if getattr(run, key) is not None]
    sections = " and ".join(f"{key}:" for key in given)
    return (f"{source.where((given[0],))}: {sections} of the config {'are' if len(given) > 1 else 'is'} used; "
            f"{trainer_path}.configure_optimizers() is not called (to train with it, set "
            f"{' '.join(f'{key}=null' for key in given)})")
