"""What a checkpoint holds: assembled from the run's stateful parts, and given back to them.

The Trainer hands the ``Checkpointer`` its parts (model, optimizers, schedulers, scaler, callbacks,
and the objects whose small dicts make up ``trainer_state``: its own counters, the non-finite
guard, the log interval in progress); the checkpointer owns the layout of the checkpoint, the
file or sharded write, and restoring every part from it. Saved state that no part claims, and a
stateful callback that finds none, are reported, never passed over in silence.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.hooks import Callback
from trainer.parallel import distributed
from trainer.checkpoint import files
from trainer.checkpoint.background import BackgroundWriter
from trainer.checkpoint.files import CheckpointError
from trainer.data.batches import BatchLayout, rank_count

# torch.distributed.checkpoint.state_dict is imported inside the functions of sharded checkpoints: a
# process that handles none does not load it, nor FSDP and DTensor with it.

_LEGACY_KEY = re.compile(r"^(\d+):(.+)$")  # "<position>:<class name>", written before state keys
_UNNAMED = "(not in the model)"  # an optimizer's parameter that the model does not hold
# The state that torch.optim's optimizers keep element by element, of their parameter's shape. A
# checkpoint written before parameter names were saved is checked by these: a fused or foreach
# kernel given one of another shape reads and writes past its end.
ELEMENTWISE = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "sum", "square_avg",
                         "acc_delta", "grad_avg", "exp_inf", "ax", "prev", "step_size"})

# Config entries whose change breaks exact resume: the data order, what a step computes, what the
# saved state means. A change to any other entry (limits, logging, checkpoints, callbacks, how the
# ranks hold the model) is fine. batch_size, grad_accum_steps and world_size count as one: their
# product, the global batch, fixes which samples make a step (see BatchLayout).
EXACT = ("seed", "precision", "model", "optimizer", "scheduler", "data", "loss", "trainer")
BATCH_KEYS = ("batch_size", "grad_accum_steps", "world_size")


def keep_global_batch(saved: BatchLayout, configured: BatchLayout, policy: str, accept_changes: bool,
                      where: str) -> tuple[BatchLayout, str | None]:
    """The layout a resumed run takes, and a one-line notice when it is not the configured one.

    ``saved``: the layout the checkpoint was trained with; ``configured``: this run's config on
    this run's ranks, with batch_size and grad_accum_steps as the checkpoint's config had them (a
    config that changes them says what it wants, and is compared as any other change). When the
    rank count alone changes the global batch, ``policy`` (``on_world_size_change``) keeps it:
    ``scale_accumulation`` or ``scale_batch_size``; ``error`` refuses. A global batch that cannot
    be kept is an error, unless ``accept_changes``: the configured layout then applies as it is."""
    if saved.global_batch == configured.global_batch or accept_changes:
        return configured, None
    target, world = saved.global_batch, configured.world_size
    # The single value of batch_size or of grad_accum_steps that keeps the global batch on these ranks.
    fits = {name: target // (other * world) for name, other in
            (("grad_accum_steps", configured.batch_size), ("batch_size", configured.grad_accum_steps))
            if target % (other * world) == 0}
    written = (f"checkpoint {where} was trained with a global batch of {saved}; on {rank_count(world)} this config "
               f"makes it {configured.global_batch}")
    accept = "accept a new global batch (trainer run --accept-changes; in code load_checkpoint(..., accept_changes=True))"
    scaled = {"scale_accumulation": "grad_accum_steps", "scale_batch_size": "batch_size"}.get(policy)
    if scaled not in fits:
        # The ranks that can keep it with this config's batch_size (with grad_accum_steps for scale_batch_size).
        kept = configured.grad_accum_steps if scaled == "batch_size" else configured.batch_size
        worlds = [n for n in range(1, target // kept + 1) if target % (kept * n) == 0] if target % kept == 0 else []
        if policy == "error" and fits:
            policy_that_fits = "scale_accumulation" if "grad_accum_steps" in fits else "scale_batch_size"
            fix = f"set {' or '.join(f'{k}: {v}' for k, v in fits.items())} to keep it, or on_world_size_change: " \
                  f"{policy_that_fits}, or"
        else:
            fix = (f"{target} is not a multiple of {'grad_accum_steps' if scaled == 'batch_size' else 'batch_size'} {kept} "
                   f"x {rank_count(world)}. Resume on {', '.join(map(str, worlds[:12])) or saved.world_size} rank(s), "
                   f"or set batch_size and grad_accum_steps so that batch_size x grad_accum_steps x {world} = "
                   f"{target}, or")
        raise CheckpointError(f"{written} (on_world_size_change: {policy}): {fix} {accept}")
    layout = dataclasses.replace(configured, **{scaled: fits[scaled]})
    notice = (f"resumed on {rank_count(world)} a run trained on {rank_count(saved.world_size)}: {scaled} "
              f"{getattr(configured, scaled)} -> {fits[scaled]} keeps its global batch of {layout} "
              f"(on_world_size_change: {policy})")
    return layout, notice


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Every entry that differs between two configs, as ``(dotted key, saved, current)``."""
    old, new = _flat(saved), _flat(current)
    missing = object()
    return [(key, old.get(key, missing), new.get(key, missing)) for key in sorted(set(old) | set(new))
            if old.get(key, missing) != new.get(key, missing)]


def _shown(value: Any) -> str:
    return "(absent)" if type(value) is object else repr(value)


class Resumed:
    """What a resume found: the config entries that changed, the batch layout the checkpoint was
    trained with (``saved``, None when an old checkpoint's config does not say) and the one this
    run takes (``layout``), with the notice that says why they differ, if they do."""

    def __init__(self, changes: list[tuple[str, Any, Any]], saved: BatchLayout | None, layout: BatchLayout | None,
                 notice: str | None = None):
        self.changes, self.saved, self.layout, self.notice = changes, saved, layout, notice

    def describe(self) -> list[str]:
        return [f"{key}: {_shown(old)} -> {_shown(new)}" for key, old, new in self.changes]


def state_key(callback: Any) -> str:
    """Where a callback's state is kept in a checkpoint: its ``state_key`` attribute if set, else
    its class name. Two callbacks of one class that keep state need distinct ``state_key``s."""
    return getattr(callback, "state_key", None) or type(callback).__name__


def is_stateful(callback: Any) -> bool:
    """A callback that keeps state: it defines ``state_dict`` (beyond ``Callback``'s empty one) and
    ``load_state_dict``; one without the other would be saved and never restored, an error."""
    def own(name: str) -> bool:
        method = getattr(type(callback), name, None)
        return method is not None and method is not getattr(Callback, name)

    if own("state_dict") != own("load_state_dict"):
        has, lacks = ("state_dict", "load_state_dict") if own("state_dict") else ("load_state_dict", "state_dict")
        raise TypeError(f"callback {type(callback).__name__} defines {has}() but not {lacks}(): its state would "
                        "never make the round trip through a checkpoint; define both")
    return own("state_dict")


def stateful_callbacks(callbacks: list[Any]) -> dict[str, Any]:
    """The callbacks that keep state, by key; two under one key is an error that says the fix."""
    keyed: dict[str, Any] = {}
    for cb in callbacks:
        if not is_stateful(cb):
            continue
        key = state_key(cb)
        if key in keyed:
            raise ValueError(
                f"two callbacks keep their state under the key {key!r} ({type(keyed[key]).__name__} and "
                f"{type(cb).__name__}); give each its own state_key, e.g. {type(cb).__name__}(..., state_key='{key}-2')"
            )
        keyed[key] = cb
    return keyed


class Attributes:
    """Some attributes of an object (the Trainer's counters) as a part of ``trainer_state``."""

    def __init__(self, obj: Any, *names: str):
        self.obj, self.names = obj, names

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self.obj, name) for name in self.names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.names:
            if name in state:  # an attribute added later keeps its value from an older checkpoint
                setattr(self.obj, name, state[name])


class Checkpointer:
    """Assembles, writes and restores the checkpoint of one run.

    ``optimizers``: every optimizer of the run (several under ``Trainer.manual_step``), and
    ``schedulers`` the scheduler of each, ``None`` where one has none. A checkpoint holds their
    states as ``_as_saved`` says: one optimizer's as it is, several as a list in that order.
    ``train_state``: objects whose ``state_dict()`` dicts together form the checkpoint's
    ``trainer_state`` (each takes its own keys back in ``load_state_dict``).
    """

    def __init__(self, strategy: Any, module: nn.Module, optimizers: list[torch.optim.Optimizer],
                 schedulers: list[Any], scaler: Any, callbacks: list[Any], train_state: list[Any],
                 config: dict[str, Any], unfrozen: Any = None, loggers: list[Any] | None = None,
                 init_from: Any = None):
        if len(schedulers) != len(optimizers):
            raise ValueError(f"{len(optimizers)} optimizer(s) and {len(schedulers)} scheduler(s): give one scheduler "
                             "per optimizer, None where it has none")
        self.optimizers, self.schedulers = list(optimizers), list(schedulers)
        self.strategy, self.module, self.scaler = strategy, module, scaler
        # rank 0's loggers (the list itself: fit adds its files to it); those with a state_dict, such
        # as a tracker's run id, are kept like callbacks' states
        self.loggers = loggers if loggers is not None else []
        self.callbacks = stateful_callbacks(callbacks)
        self.train_state = train_state
        self.config = config
        self.unfrozen = unfrozen  # parameter groups added after the optimizer was built (UnfrozenGroups)
        self.states: dict[str, Any] = {}  # objects registered by name (Trainer.register_state)
        self.init_from = init_from  # config.init_from (weights.InitFrom): a checkpoint's weights win over it
        self._writer = BackgroundWriter(strategy.device)

    def register(self, name: str, obj: Any) -> None:
        """Keep ``obj``'s ``state_dict()`` in checkpoints under ``name`` and give it back on resume."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"register_state needs a non-empty string name, got {name!r}")
        missing = [m for m in ("state_dict", "load_state_dict") if not callable(getattr(obj, m, None))]
        if missing:
            raise TypeError(f"register_state({name!r}, ...): a {type(obj).__name__} has no {' and no '.join(m + '()' for m in missing)}; "
                            "register an object with both (a module, an optimizer, a class of your own)")
        if name in self.states and self.states[name] is not obj:
            raise ValueError(f"register_state: the name {name!r} is taken by a {type(self.states[name]).__name__}; "
                             "give each object its own name")
        self.states[name] = obj

    # ------------------------------------------------------------------ assemble and write

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly, as plain data (``weights_only``-loadable). Under
        torchrun every rank calls it together (the log interval gathers every rank's part)."""
        model_state, first = self.strategy.state_dicts(self.module, self.optimizers[0])
        # Several optimizers train a whole model on every rank (manual_step refuses fsdp): plain state dicts.
        optimizer_states = [first, *(opt.state_dict() for opt in self.optimizers[1:])]
        trainer_state: dict[str, Any] = {"world_size": self.strategy.layout.world_size,
                                         "optimizer_class": _as_saved([type(opt).__name__ for opt in self.optimizers]),
                                         "optimizer_params": self.parameters()}  # a list even of one
        for part in self.train_state:
            trainer_state.update(part.state_dict())
        return {
            "version": files.VERSION,
            "model": model_state,
            "optimizer": _as_saved(optimizer_states),
            "scheduler": _as_saved([s.state_dict() if s is not None else None for s in self.schedulers]),
            "scaler": self.scaler.state_dict(),
            "trainer_state": trainer_state,
            "rng": files.rng_state(),
            "callbacks": {key: cb.state_dict() for key, cb in self.callbacks.items()},
            "loggers": {key: lg.state_dict() for key, lg in self._stateful_loggers().items()},
            "states": {name: obj.state_dict() for name, obj in self.states.items()},
            "unfrozen": self.unfrozen.state_dict() if self.unfrozen is not None else None,
            "config": self.config,
        }

    def parameters(self) -> list[list[list[list[Any]]]]:
        """Each optimizer's parameters, group by group, as ``[name, shape]``: what its state belongs
        to. Saved beside the state, since ``torch.optim`` keys it by position alone."""
        names = self._param_names()
        return [[[[names.get(id(p), _UNNAMED), list(p.shape)] for p in group["params"]]
                 for group in opt.param_groups] for opt in self.optimizers]

    def save(self, path: Path, is_main: bool, step: int, background: bool = False,
             on_written: Callable[[], None] | None = None) -> None:
        """Write the checkpoint to ``path`` (a file, or under fsdp a directory every rank writes to),
        then call ``on_written`` (rank 0's rotation, a link to it). The write in flight, if any, is
        finished first. ``background``: return once the state is copied into CPU memory; a thread
        writes it and calls ``on_written``, and ``wait`` (or the next save) raises its error."""
        self._writer.wait(at_step=step if background else None)  # at most one write in flight, in step order
        params = [p.detach() for p in self.module.parameters() if p.is_floating_point()]
        if params and not all(math.isfinite(n) for n in distributed.norms(params).tolist()):
            raise FloatingPointError(f"step {step}: the weights hold NaN/Inf; refusing to write a checkpoint of them")
        state = self.state_dict()
        then = on_written or (lambda: None)
        if self.strategy.sharded:
            tensors = {"model": state["model"], "optimizer": state["optimizer"]["state"]}
            state = {**state, "model": None, "optimizer": {"param_groups": state["optimizer"]["param_groups"]}}
            if not background:
                files.save_sharded(state, tensors, path, is_main)
                then()
                return
            if self._writer.group is None:  # the writes' collectives run beside the loop's: a group of their own
                self._writer.group = dist.new_group(backend="gloo")
            state = self._writer.snapshot(state) if is_main else state
            finish = files.start_sharded(state, tensors, path, is_main, self._writer.group, self._writer.stager)
            self._writer.start(step, lambda: (finish(), then()))
        elif is_main and not background:
            files.save_checkpoint(state, path)
            then()
        elif is_main:
            staged = self._writer.snapshot(state)
            self._writer.start(step, lambda: (files.save_checkpoint(staged, path), then()))

    def wait(self) -> None:
        """Block until the checkpoint being written in the background is on disk; raise its error."""
        self._writer.wait()

    def release(self) -> None:
        """``wait``, then free the CPU copy of the state that background writes reuse (end of a fit)."""
        self._writer.release()

    def close(self) -> None:
        """``release``, and leave the process group of the background writes (fsdp)."""
        self._writer.close()

    # ------------------------------------------------------------------ read and restore

    def read(self, source: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
        """The checkpoint's state and where it came from (for messages). A file checkpoint holds full
        tensors keyed for the plain module, which a sharded run does not take."""
        state = source if isinstance(source, dict) else files.load_checkpoint(source)
        where = str(state.get("path", source if not isinstance(source, dict) else "given"))
        return state, where

    def load(self, source: str | Path | dict[str, Any], accept_changes: bool = False,
             layout: BatchLayout | None = None, on_world_size_change: str = "scale_accumulation") -> Resumed:
        """Restore every part from a checkpoint (file or sharded directory) or an already loaded one.

        The checkpoint's config is compared with this run's first, before anything is restored: a
        change that breaks exact resume (``EXACT``, or a new global batch) is refused, every difference
        listed, unless ``accept_changes``; then the new values are used for real (the optimizer's
        hyperparameters from this run's optimizer, a new optimizer class starting from fresh state).

        ``layout``: this run's batch_size and grad_accum_steps as configured, on its ranks. On
        another number of ranks the global batch is kept as ``on_world_size_change`` says
        (``keep_global_batch``); ``Resumed.layout`` is the layout to train with, which the parts of
        ``trainer_state`` receive as ``batch_size`` and ``grad_accum_steps``, and ``regroup`` (where a
        part has it) turns the saved ranks' parts into this run's."""
        state, where = self.read(source)
        saved_config = state.get("config") or {}
        ts = dict(state["trainer_state"])
        world = self.strategy.layout.world_size
        current = {**self.config, "world_size": world}
        saved = {**saved_config, "world_size": ts.get("world_size", world)}
        saved_layout = _trained_layout(ts, saved_config) if layout is not None else None
        notice = None
        if saved_layout is not None:
            # A config that keeps the checkpoint's batch_size and grad_accum_steps leaves the global
            # batch to on_world_size_change; one that changes them asks for its values.
            if [layout.batch_size, layout.grad_accum_steps] == _setting(saved_config, BATCH_KEYS[:2]):
                layout, notice = keep_global_batch(saved_layout, layout, on_world_size_change, accept_changes, where)
            saved.update(dataclasses.asdict(saved_layout))
            current.update(dataclasses.asdict(layout))
            ts.update(batch_size=layout.batch_size, grad_accum_steps=layout.grad_accum_steps)
        saved_class = ts.get("optimizer_class") or _optimizer_class(saved_config)
        several = len(self.optimizers) > 1
        new_class = saved_class is not None and saved_class != _as_saved([type(opt).__name__ for opt in self.optimizers])
        saved_states = _per_optimizer(state["optimizer"])
        if several or isinstance(saved_class, list):
            # Several optimizers (built in code or by configure_optimizers): their number, classes and groups.
            saved["optimizers"] = {str(i): _optimizer_summary(s["param_groups"], c)
                                   for i, (s, c) in enumerate(zip(saved_states, _per_optimizer(saved_class)))}
            current["optimizers"] = {str(i): _optimizer_summary(opt.param_groups, type(opt).__name__)
                                     for i, opt in enumerate(self.optimizers)}
        elif "optimizer" not in self.config:  # built in code: the optimizer itself says what it is
            # Groups added by unfreezing are the run's progress, not its config: compared are the
            # groups the optimizer was built with.
            saved_groups = state["optimizer"]["param_groups"]
            saved_groups = saved_groups[:len(saved_groups) - len((state.get("unfrozen") or {}).get("groups", []))]
            groups = self.optimizers[0].param_groups
            groups = groups[:len(groups) - (len(self.unfrozen.groups) if self.unfrozen is not None else 0)]
            saved["optimizer"] = _optimizer_summary(saved_groups, saved_class)
            current["optimizer"] = _optimizer_summary(groups, type(self.optimizers[0]).__name__)
        changes = config_changes(saved, current)
        resumed = Resumed(changes, saved_layout, layout, notice)
        breaking = [c for c in changes if c[0].split(".")[0] in EXACT + ("optimizers",)]
        if _global_batch(saved) != _global_batch(current):
            breaking += [c for c in changes if c[0] in BATCH_KEYS]
        if breaking and not accept_changes:
            lines = "; ".join(f"{line}{' (breaks exact resume)' if c in breaking else ''}"
                              for c, line in zip(changes, resumed.describe()))
            raise CheckpointError(
                f"checkpoint {where} was written with another config: {lines}. Resume with the config the run "
                "was started with, or accept the changes (trainer run --accept-changes; in code "
                "load_checkpoint(..., accept_changes=True)), which applies them from here on"
            )
        hyper = [[{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
                 for opt in self.optimizers]
        if state.get("unfrozen") and self.unfrozen is not None:
            try:  # the groups first, then the optimizer state that fills them
                self.unfrozen.load_state_dict(state["unfrozen"])
            except ValueError as exc:
                raise CheckpointError(f"checkpoint {where}: {exc}; resume with the model the run was started with") from None
        which = _optimizer_names(self.config, len(self.optimizers))
        saved_params = ts.get("optimizer_params")
        if saved_params is not None and not (new_class and accept_changes):
            if not state.get("sharded"):  # a model of other shapes is named as such, before its optimizers
                files.check_model_state(self.module, state["model"], where)
            for i, (mine, theirs) in enumerate(zip(self.parameters(), saved_params)):
                _check_parameters(theirs, mine, which[i], where, _params_fix(saved_config, self.config, i))
        if state.get("sharded"):
            self._load_sharded(state, where)
        elif self.strategy.sharded:
            self._shard_full(state, where, optimizer=not (new_class and accept_changes))
        else:
            self.load_model(state["model"], where)
            if len(saved_states) != len(self.optimizers):
                raise CheckpointError(
                    f"checkpoint {where} holds the state of {len(saved_states)} optimizer(s) but this run has "
                    f"{len(self.optimizers)}; resume with the optimizers the run was started with"
                )
            if not (new_class and accept_changes):
                for i, (opt, saved_state) in enumerate(zip(self.optimizers, saved_states)):
                    _check_state_shapes([p for g in opt.param_groups for p in g["params"]], saved_state,
                                        self._param_names(), which[i], where)
                    try:
                        opt.load_state_dict(saved_state)
                    except (ValueError, KeyError, RuntimeError) as exc:
                        which = f"optimizer {i}" if several else "optimizer"
                        raise CheckpointError(
                            f"checkpoint {where}: the {which} state does not fit this {which} ({exc}); "
                            "resume with the config the run was started with"
                        ) from None
        for i, (scheduler, saved_state) in enumerate(zip(self.schedulers, _per_optimizer(state["scheduler"]))):
            if (saved_state is None) != (scheduler is None):
                which = f"optimizer {i}" if several else "this run"
                raise CheckpointError(
                    f"checkpoint {where} was written {'without' if saved_state is None else 'with'} a scheduler "
                    f"but {which} has {'one' if scheduler is not None else 'none'}"
                )
            if scheduler is not None:
                scheduler.load_state_dict(saved_state)
        if accept_changes and any(c[0].startswith(("optimizer.", "optimizers.")) for c in changes):
            for opt, scheduler, groups in zip(self.optimizers, self.schedulers, hyper):
                _apply_hyperparameters(opt, scheduler, groups)
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if saved_layout is not None and (saved_layout.world_size, saved_layout.grad_accum_steps) != (
                layout.world_size, layout.grad_accum_steps):
            for part in self.train_state:
                if hasattr(part, "regroup"):  # state kept per rank, or counted in micro-batches
                    ts = part.regroup(ts, saved_layout, layout)
        for part in self.train_state:
            part.load_state_dict(ts)
        self.load_states(state, where)
        self._load_loggers(state.get("loggers") or {}, where)  # not with load_weights: evaluation continues no run
        files.set_rng_state(state["rng"])
        self._weights_loaded()
        return resumed

    def load_states(self, state: dict[str, Any], where: str) -> None:
        """The callbacks' and the registered objects' state, each by its key; what nobody claims,
        and what finds nothing saved, is reported."""
        _give_back(self.callbacks, _legacy_keys(state["callbacks"], list(self.callbacks.items())),
                   lambda key: f"checkpoint {where} holds no state for callback {key!r}; it starts afresh",
                   lambda keys: f"checkpoint {where} holds state for callback(s) {keys} that no callback of this run "
                                "claims; it is ignored (a callback removed, or its state_key changed?)", stacklevel=3)
        _give_back(self.states, state.get("states") or {},
                   lambda name: f"checkpoint {where} holds no state registered as {name!r}; it starts afresh",
                   lambda names: f"checkpoint {where} holds state registered as {names} that nothing in this run "
                                 "registered (trainer.register_state); it is ignored", stacklevel=4)

    def _stateful_loggers(self) -> dict[str, Any]:
        return {state_key(lg): lg for lg in self.loggers if callable(getattr(lg, "state_dict", None))}

    def _load_loggers(self, saved: dict[str, Any], where: str) -> None:
        """Only rank 0 has loggers; the other ranks leave the saved states alone."""
        if self.strategy.layout.rank != 0:
            return
        _give_back(self._stateful_loggers(), saved,
                   lambda key: f"checkpoint {where} holds no state for logger {key!r}; it starts a new run",
                   lambda keys: f"checkpoint {where} holds state for logger(s) {keys} that no logger of this run "
                                "claims; it is ignored (a logger removed?)", stacklevel=4)

    def _load_sharded(self, state: dict[str, Any], where: str) -> None:
        """Model and optimizer state from a DCP directory, into this run's layout (sharded or not)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        optimizer = self.optimizers[0]  # fsdp: one optimizer (manual_step refuses it)
        model_state, optimizer_state = get_state_dict(self.module, optimizer)
        tensors = {"model": model_state, "optimizer": optimizer_state["state"]}
        files.load_sharded(tensors, state["sharded"])
        try:
            set_state_dict(self.module, optimizer, model_state_dict=tensors["model"],
                           optim_state_dict={"state": tensors["optimizer"],
                                             "param_groups": state["optimizer"]["param_groups"]})
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"checkpoint {where}: the saved state does not fit this model and optimizer ({exc}); "
                "resume with the config the run was started with"
            ) from None

    def _shard_full(self, state: dict[str, Any], where: str, optimizer: bool = True) -> None:
        """A file checkpoint's full tensors (written by one process or under DDP) into this run's
        shards: every rank read the file and keeps its own part of each tensor. The optimizer's state
        is keyed by position, as ``torch.optim`` saves it; positions name the same parameters in the
        same order as in the run that wrote it (as for ``Optimizer.load_state_dict``)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
        )

        files.check_model_state(self.module, state["model"], where)
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.module, state["model"], options=full)
        if not optimizer:
            return
        first = self.optimizers[0]  # fsdp: one optimizer (manual_step refuses it)
        names = {id(p): name for name, p in self.module.named_parameters()}
        order = [names[id(p)] for group in first.param_groups for p in group["params"]]
        saved = state["optimizer"]
        _check_state_shapes([p for group in first.param_groups for p in group["params"]], saved, names,
                            "the optimizer", where)
        try:
            keyed = {"state": {order[i]: value for i, value in saved["state"].items()},
                     "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
            set_optimizer_state_dict(self.module, first, keyed, options=full)
        except (ValueError, KeyError, IndexError, RuntimeError) as exc:
            raise CheckpointError(
                f"checkpoint {where}: the optimizer state does not fit this optimizer ({exc}); "
                "resume with the config the run was started with"
            ) from None

    def _param_names(self) -> dict[int, str]:
        return {id(p): name for name, p in self.module.named_parameters()}

    def load_weights(self, source: str | Path | dict[str, Any], states: bool = False) -> None:
        """The model's weights (file or sharded directory, or a loaded checkpoint); with ``states``
        also the callbacks' and the registered objects' state (an EMA of the weights, a teacher)."""
        state, where = self.read(source)
        if states:
            self.load_states(state, where)
        if not state.get("sharded"):
            if self.strategy.sharded:
                self._shard_full(state, where, optimizer=False)
            else:
                self.load_model(state["model"], where)
        else:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

            tensors = {"model": get_model_state_dict(self.module)}
            files.load_sharded(tensors, state["sharded"])
            set_model_state_dict(self.module, tensors["model"])
        self._weights_loaded()

    def load_model(self, saved: dict[str, torch.Tensor], where: str = "given") -> None:
        files.check_model_state(self.module, saved, where)
        self.module.load_state_dict(saved)
        self._weights_loaded()

    def apply_init_from(self) -> str | None:
        """``config.init_from``'s weights into the model, unless a checkpoint's came first: one line
        saying what was loaded, or None (``weights.InitFrom.apply``)."""
        return self.init_from.apply() if self.init_from is not None else None

    def _weights_loaded(self) -> None:
        if self.init_from is not None:
            self.init_from.cancel()  # the checkpoint's weights win: init_from is not applied after them


def _give_back(parts: dict[str, Any], saved: dict[str, Any], missing: Callable[[str], str],
               unclaimed: Callable[[str], str], stacklevel: int) -> None:
    """Each part's saved state, by its key. A part that finds none, and saved state that no part
    claims, are warned of (``missing(key)``, ``unclaimed(keys listed)``) at the caller's
    ``stacklevel``: never passed over in silence."""
    for key, part in parts.items():
        if key in saved:
            part.load_state_dict(saved[key])
        else:
            warnings.warn(missing(key), stacklevel=stacklevel + 1)
    left = sorted(set(saved) - set(parts))
    if left:
        warnings.warn(unclaimed(", ".join(map(repr, left))), stacklevel=stacklevel + 1)


def _as_saved(values: list[Any]) -> Any:
    """Values of each optimizer (states, schedulers' states, class names) as a checkpoint holds
    them: one optimizer's value as it is, several as a list (the layout of every checkpoint so far)."""
    return values if len(values) > 1 else values[0]


def _per_optimizer(value: Any) -> list[Any]:
    """``_as_saved``'s inverse: a checkpoint's value as one per optimizer."""
    return value if isinstance(value, list) else [value]


def _apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any, hyper: list[dict[str, Any]]) -> None:
    """This run's optimizer settings over the restored ones. A learning rate under a scheduler
    keeps the schedule's factor at the step reached: base and current lr scale together."""
    bases = getattr(scheduler, "base_lrs", None)
    for i, (group, new) in enumerate(zip(optimizer.param_groups, hyper)):
        old_base = bases[i] if bases is not None else group["lr"]
        factor = group["lr"] / old_base if old_base else 1.0
        group.update({k: v for k, v in new.items() if k not in ("lr", "initial_lr")})
        group["lr"] = new.get("initial_lr", new["lr"]) * factor
        if bases is not None:
            bases[i] = new.get("initial_lr", new["lr"])
            group["initial_lr"] = bases[i]


def _legacy_keys(saved: dict[str, Any], callbacks: list[tuple[str, Any]]) -> dict[str, Any]:
    """Checkpoints written before state keys keyed every callback as ``"<position>:<class name>"``
    (empty states included). The n-th saved state of a class goes to the n-th stateful callback of
    that class; empty states of callbacks that keep none are dropped."""
    matches = [_LEGACY_KEY.match(key) for key in saved]
    if not saved or not all(matches):
        return saved
    by_class: dict[str, list[str]] = {}
    for key, cb in callbacks:
        by_class.setdefault(type(cb).__name__, []).append(key)
    keyed: dict[str, Any] = {}
    ordered = sorted(zip(matches, saved.values()), key=lambda pair: int(pair[0].group(1)))
    for match, value in ordered:
        keys = by_class.get(match.group(2))
        if keys:
            keyed[keys.pop(0)] = value
        elif value:
            keyed[match.group(0)] = value  # unclaimed: reported as such
    return keyed


def _optimizer_names(config: dict[str, Any], count: int) -> list[str]:
    """The optimizers as messages name them: by their ``optimizers:`` entry, else by position."""
    entries = config.get("optimizers")
    if isinstance(entries, dict) and len(entries) == count:
        return [f"optimizer {name!r}" for name in entries]
    return [f"optimizer {i}" for i in range(count)] if count > 1 else ["the optimizer"]


def _params_fix(saved: dict[str, Any], current: dict[str, Any], index: int) -> str:
    """How to resume an optimizer whose parameters changed: the ``optimizers:`` entry's ``params``
    as the checkpoint's config had them, when this config changed them."""
    entries = [c.get("optimizers") for c in (saved, current)]
    if all(isinstance(e, dict) and len(e) > index for e in entries):
        (name, old), new = list(entries[0].items())[index], list(entries[1].values())[index]
        if isinstance(old, dict) and isinstance(new, dict) and old.get("params") != new.get("params"):
            return f"set optimizers.{name}.params back to {old.get('params')!r}, as the run was started"
    return "resume with the model and optimizers the run was started with"


def _trained(groups: list[list[list[Any]]]) -> str:
    """An optimizer's parameters in a few words: their top-level modules and how many."""
    names = [name for group in groups for name, _ in group]
    tops = list(dict.fromkeys(name.split(".")[0] + (".*" if "." in name else "") for name in names))
    return f"{', '.join(tops[:4])}{', ...' if len(tops) > 4 else ''} ({len(names)} tensors)"


def _check_parameters(saved: list[list[list[Any]]], current: list[list[list[Any]]], which: str, where: str,
                      fix: str) -> None:
    """The parameters an optimizer's saved state belongs to are this run's, group by group, name and
    shape; otherwise each network would go on with another's state (or a kernel with the wrong shapes)."""
    saved = [[[name, list(shape)] for name, shape in group] for group in saved]
    if saved == current:
        return
    old = {name: tuple(shape) for group in saved for name, shape in group}
    new = {name: tuple(shape) for group in current for name, shape in group}

    def shown(items: list[str]) -> str:
        return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    gone, added = [n for n in old if n not in new], [n for n in new if n not in old]
    reshaped = [f"{n} {old[n]} -> {new[n]}" for n in old if n in new and old[n] != new[n]]
    differs = ([f"only the checkpoint's trains {shown(gone)}"] if gone else []) + \
              ([f"only this run's trains {shown(added)}"] if added else []) + \
              ([f"other shapes: {shown(reshaped)}"] if reshaped else [])
    if not differs:
        differs = [f"the same tensors in another order or grouping ({len(saved)} group(s) saved, {len(current)} now)"]
    raise CheckpointError(
        f"checkpoint {where}: {which} of the checkpoint trains {_trained(saved)}, this run's trains "
        f"{_trained(current)} ({'; '.join(differs)}); the optimizers' parameters must match to resume their "
        f"state: {fix}, or start a new run from its weights (init_from: {where})"
    )


def _check_state_shapes(params: list[torch.Tensor], saved: dict[str, Any], names: dict[int, str], which: str,
                        where: str) -> None:
    """Each saved state tensor kept element by element (``ELEMENTWISE``) has its parameter's shape:
    checked before ``load_state_dict``, which copies it in whatever its shape, even for a checkpoint
    that names no parameters."""
    for index, values in saved.get("state", {}).items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(values, dict):
            continue  # load_state_dict reports it
        param = params[index]
        for key, value in values.items():
            if key in ELEMENTWISE and isinstance(value, torch.Tensor) and value.shape != param.shape:
                raise CheckpointError(
                    f"checkpoint {where}: the state of {which} does not fit this run's parameters: its {key} "
                    f"of tensor {index} has shape {tuple(value.shape)}, this run's parameter "
                    f"{names.get(id(param), index)} {tuple(param.shape)}; the optimizers' parameters must match "
                    "to resume their state: resume with the model and optimizers the run was started with"
                )


def _optimizer_class(config: dict[str, Any]) -> str | None:
    """The optimizer class a config names (``optimizer._target_``), if it names one."""
    target = (config.get("optimizer") or {}).get("_target_") if isinstance(config.get("optimizer"), dict) else None
    return target.rsplit(".", 1)[-1] if target else None


def _optimizer_summary(param_groups: list[dict[str, Any]], name: str | None) -> dict[str, Any]:
    """An optimizer's class and hyperparameters, group by group, as a config would list them (the
    learning rate as set, before any schedule: ``initial_lr`` where a scheduler recorded it)."""
    summary: dict[str, Any] = {"class": name}
    for i, group in enumerate(param_groups):
        for key, value in group.items():
            if key in ("params", "initial_lr") or (key == "lr" and "initial_lr" in group):
                continue
            summary[f"{i}.{key}"] = value
        if "initial_lr" in group:
            summary[f"{i}.lr"] = group["initial_lr"]
    return summary


def _setting(config: dict[str, Any], keys: tuple[str, ...]) -> list[Any]:
    """The config's values of batch layout keys (grad_accum_steps defaults to 1; the others to None)."""
    return [config.get(k, 1 if k == "grad_accum_steps" else None) for k in keys]


def _trained_layout(trainer_state: dict[str, Any], config: dict[str, Any]) -> BatchLayout | None:
    """The layout a checkpoint was trained with: ``trainer_state`` records it (since runs could move
    between rank counts); older checkpoints have their config's values. None when unknown."""
    values = [trainer_state.get(k, v) for k, v in zip(BATCH_KEYS, _setting(config, BATCH_KEYS))]
    return BatchLayout(*values) if all(isinstance(v, int) for v in values) else None


def _global_batch(config: dict[str, Any]) -> Any:
    values = _setting(config, BATCH_KEYS)
    return math.prod(values) if all(isinstance(v, int) for v in values) else values
