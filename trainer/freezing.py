"""Taking things out of the graph: eval mode, detaching, freezing, frozen copies and EMA targets.

``requires_grad_(False)``, ``detach()`` and ``torch.no_grad()`` as tools
that undo what they change.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
from collections.abc import Iterator
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
    """Parameters require gradients again and the module goes to train mode. Returns the module."""
    module.requires_grad_(True)
    module.train()
    return module


def freeze_matching(module: nn.Module, *patterns: str) -> list[str]:
    """Freeze the parameters whose names match any glob pattern (``"encoder.*"``).

    Returns the frozen names. A pattern that matches no parameter is an error: a typo must not
    silently train what was meant to be frozen.
    """
    names = [name for name, _ in module.named_parameters()]
    frozen: list[str] = []
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ValueError(f"freeze pattern {pattern!r} matches no parameter; parameters are: {sample}")
        frozen.extend(h for h in hits if h not in frozen)
    params = dict(module.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen


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
