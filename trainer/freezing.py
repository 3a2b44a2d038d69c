"""Taking things out of the graph: eval mode, detaching, freezing, frozen copies and EMA targets.

``requires_grad_(False)``, ``detach()`` and ``torch.no_grad()`` as tools
that undo what they change.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


@contextlib.contextmanager
def eval_mode(module: nn.Module, inference: bool = False) -> Iterator[nn.Module]:
    """``module.eval()`` plus ``torch.no_grad()`` (``torch.inference_mode()`` with ``inference=True``).

    On exit every submodule gets back its own previous train/eval flag (a frozen submodule
    that was in eval mode inside a training model stays in eval mode), and the previous grad
    mode returns, also when the body raises.
    """
    flags = [(m, m.training) for m in module.modules()]
    grad_ctx = torch.inference_mode() if inference else torch.no_grad()
    module.eval()
    try:
        with grad_ctx:
            yield module
    finally:
        for m, training in flags:
            m.training = training


def detach(obj: Any) -> Any:
    """Detach every tensor inside tuples, lists, dicts and dataclasses; other values pass through."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, dict):
        return type(obj)((k, detach(v)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(detach(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(detach(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: detach(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
        )
    return obj


def freeze(module: M) -> M:
    """Parameters stop requiring gradients and the module goes to eval mode. Returns the module."""
    module.requires_grad_(False)
    module.eval()
    return module


def unfreeze(module: M) -> M:
    """Parameters require gradients again and the module goes to train mode. Returns the module.

    An optimizer built before steps only the parameters it was given: in a run, use
    ``trainer.unfreeze(module, lr=...)``, which adds them to the optimizer."""
    module.requires_grad_(True)
    module.train()
    return module


def freeze_matching(module: nn.Module, *patterns: str) -> list[str]:
    """Freeze the parameters whose names match any glob pattern (``"encoder.*"``), and put in eval
    mode, as ``freeze`` does, every submodule whose name matches or whose parameters are all frozen
    now (so a frozen BatchNorm's running statistics stop moving).

    Returns the frozen names. A pattern that matches no parameter is an error: a typo must not
    silently train what was meant to be frozen.
    """
    frozen = matching_names(module, patterns, "freeze")
    params = dict(module.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    for sub in _covered_modules(module, frozen, patterns):
        sub.eval()
    return frozen


def matching_names(module: nn.Module, patterns: Sequence[str], verb: str) -> list[str]:
    """The names of ``module``'s parameters that match any glob pattern, in the module's order; a
    pattern that matches none is an error naming it and some of the names there are."""
    names = [name for name, _ in module.named_parameters()]
    found: list[str] = []
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ValueError(f"{verb} pattern {pattern!r} matches no parameter; parameters are: {sample}")
        found.extend(h for h in hits if h not in found)
    return found


def _covered_modules(module: nn.Module, names: Sequence[str], patterns: Sequence[str] = ()) -> list[nn.Module]:
    """Submodules whose name matches a pattern, or that hold parameters and all of them in ``names``."""
    chosen = set(names)
    covered = []
    for prefix, sub in module.named_modules():
        own = [f"{prefix}.{n}" if prefix else n for n, _ in sub.named_parameters()]
        if (prefix and any(fnmatch.fnmatchcase(prefix, p) for p in patterns)) or (own and chosen.issuperset(own)):
            covered.append(sub)
    return covered


class UnfrozenGroups:
    """Parameters unfrozen after the optimizer was built, each call one new parameter group (as
    Lightning's ``BackboneFinetuning`` does): an optimizer steps only the parameters it holds, so
    unfreezing alone would train nothing. ``Trainer.unfreeze`` is the way in.

    Its state is the parameter names of each group it added; a checkpoint keeps it so that a
    resume rebuilds the same groups before the optimizer's state goes back into them.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                 others: Sequence[torch.optim.Optimizer] = ()):
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.others = list(others)  # the run's other optimizers (manual_step): what they hold is held too
        self.groups: list[list[str]] = []
        self.warned: set[str] = set()  # the unheld parameters already named

    def unfreeze(self, what: nn.Module | str | Sequence[str], world_size: int = 1, **hyper: Any) -> list[str]:
        """``Trainer.unfreeze``: a submodule of the model, or the parameters whose names match glob
        patterns, unfrozen and added to the optimizer (``add``). Not under torchrun."""
        if world_size > 1:
            # DDP and FSDP decide at wrapping time which parameters they reduce gradients for.
            raise NotImplementedError(
                "trainer.unfreeze under torchrun: DDP/FSDP reduce only the gradients of parameters that "
                "required them when the model was wrapped; unfreeze before building the Trainer instead"
            )
        if isinstance(what, nn.Module):
            ids = {id(p) for p in what.parameters()}
            names = [n for n, p in self.module.named_parameters() if id(p) in ids]
            if not names:
                raise ValueError(f"unfreeze: the {type(what).__name__} given holds no parameter of trainer.module; "
                                 "pass a submodule of the model, or a name pattern such as 'encoder.*'")
            patterns: Sequence[str] = ()
        else:
            patterns = [what] if isinstance(what, str) else list(what)
            names = matching_names(self.module, patterns, "unfreeze")
        return self.add(names, patterns, **hyper)

    def add(self, names: Sequence[str], patterns: Sequence[str] = (), **hyper: Any) -> list[str]:
        """Unfreeze the parameters ``names`` (their modules to train mode) and give the optimizer
        those it does not hold yet as one new group with ``hyper`` (``lr=...``; defaults: the
        first group's). Returns the names added to the optimizer (none: nothing was missing)."""
        params = dict(self.module.named_parameters())
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        for name in names:
            params[name].requires_grad_(True)
        for sub in _covered_modules(self.module, names, patterns):
            sub.train()
        new = [name for name in names if id(params[name]) not in held]
        if new:
            # add_param_group fills every hyperparameter not given from the optimizer's defaults;
            # the first group's values are what this run trains with, so they are the better default.
            first = {k: v for k, v in self.optimizer.param_groups[0].items() if k not in ("params", "initial_lr")}
            self.optimizer.add_param_group({**first, **hyper, "params": [params[n] for n in new]})
            bases = getattr(self.scheduler, "base_lrs", None)
            if bases is not None and len(bases) == len(self.optimizer.param_groups) - 1:
                # Schedules that scale each group's base lr (cosine, step, WarmupDecay's warmup
                # factor) then scale this one too, from its own lr.
                group = self.optimizer.param_groups[-1]
                group["initial_lr"] = group["lr"]
                bases.append(group["lr"])
                if hasattr(self.scheduler, "lr_lambdas"):
                    self.scheduler.lr_lambdas.append(self.scheduler.lr_lambdas[-1])
                if hasattr(self.scheduler, "_last_lr"):
                    self.scheduler._last_lr.append(group["lr"])
            self.groups.append(new)
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"groups": [list(g) for g in self.groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the saved groups this run does not have yet (it may have unfrozen them itself
        before the resume); the optimizer's saved state then fills them."""
        have = [sorted(g) for g in self.groups]
        names = dict(self.module.named_parameters())
        for group in state.get("groups", []):
            missing = [n for n in group if n not in names]
            if missing:
                raise ValueError(f"the checkpoint unfroze parameters this model lacks: {', '.join(missing[:5])}")
            if sorted(group) not in have:
                self.add(group)

    def unheld(self) -> list[str]:
        """Parameters that require gradients but that no group of the optimizer holds: they get
        gradients and are never stepped."""
        held = {id(p) for opt in [self.optimizer, *self.others] for group in opt.param_groups for p in group["params"]}
        return [n for n, p in self.module.named_parameters() if p.requires_grad and id(p) not in held]

    def warn_unheld(self) -> None:
        """Parameters that require gradients but no optimizer group holds get gradients and never
        change: say so once per parameter (one pass over the parameters, at fit and epoch starts)."""
        unheld = [n for n in self.unheld() if n not in self.warned]
        if unheld:
            self.warned.update(unheld)
            shown = ", ".join(unheld[:8]) + (f" and {len(unheld) - 8} more" if len(unheld) > 8 else "")
            warnings.warn(
                f"{len(unheld)} parameter(s) require gradients but the optimizer does not hold them, so they will "
                f"not train: {shown}; add them with trainer.unfreeze(module_or_pattern, lr=...), or freeze them",
                stacklevel=3,
            )


def frozen_copy(module: M) -> M:
    """A deep copy that is frozen: the target network of a teacher or an EMA."""
    return freeze(copy.deepcopy(module))


def ema_pairs(target: nn.Module, source: nn.Module) -> tuple[list, list, list, list]:
    """The tensors ``ema_update`` works on: floating parameters and buffers of both (averaged), and
    the other buffers (copied). Take them once and pass them to every update."""
    t_params, s_params = list(target.parameters()), list(source.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(
            f"ema_update: target has {len(t_params)} parameters, source has {len(s_params)}; "
            "build the target with frozen_copy(source)"
        )
    t_float, s_float, t_other, s_other = t_params, s_params, [], []
    for t, s in zip(target.buffers(), source.buffers()):
        if t.is_floating_point():
            t_float.append(t)
            s_float.append(s)
        else:
            t_other.append(t)
            s_other.append(s)
    return t_float, s_float, t_other, s_other


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float, pairs: tuple | None = None) -> None:
    """``target = decay * target + (1 - decay) * source`` in place, for parameters and floating buffers.

    Non-floating buffers (counters such as BatchNorm's ``num_batches_tracked``) are copied. One
    fused ``lerp`` over all floating tensors; ``pairs`` (from ``ema_pairs``, taken once) saves
    collecting the tensors on every call.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema decay must be in [0, 1], got {decay}")
    t_float, s_float, t_other, s_other = pairs if pairs is not None else ema_pairs(target, source)
    if t_other:
        torch._foreach_copy_(t_other, s_other)
    if t_float:
        torch._foreach_lerp_(t_float, s_float, 1.0 - decay)
