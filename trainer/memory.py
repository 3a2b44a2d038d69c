"""Activation memory: recomputing chosen submodules in backward instead of keeping what their
forward saved (activation checkpointing), and counting what autograd keeps for backward.

A training step keeps, for every layer, the tensors its backward needs (inputs of matmuls,
normalisations, attention) until backward reaches it; for a deep model at a large batch that is most
of the memory. A checkpointed module keeps only its inputs: its forward runs again in backward,
inside the same autograd graph, with the random state of the first run (dropout draws the same
masks), so gradients do not change. The cost is that module's forward once more per step.

The module itself is not replaced or wrapped: its ``forward`` runs through
``torch.utils.checkpoint.checkpoint`` (non-reentrant), so parameter names, state dicts, optimizer
groups and patterns such as ``unfreeze("blocks.0.*")`` see the same model. Apply it before FSDP
shards the model (each checkpointed block then gathers its parameters again for the recompute, as
torchtitan does it) and before ``torch.compile``, which traces the checkpoint into its graph. The
Trainer does both in that order for ``activation_checkpointing:``.
"""

from __future__ import annotations

import difflib
import fnmatch
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpoint_activations(module: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Recompute in backward the activations of ``module``'s submodules that match ``patterns``:
    module-name globs (``"blocks.*"``) or class names (``"TransformerBlock"``, also globs). Where a
    module and modules inside it match, the outermost is checkpointed (it covers the rest). Returns
    the names of the checkpointed modules ("" for ``module`` itself); calling it again on a
    checkpointed module changes nothing. A pattern that matches no module is a ``ValueError`` that
    lists some of the names and classes there are."""
    chosen = matching_modules(module, [patterns] if isinstance(patterns, str) else list(patterns))
    for name, sub in chosen:
        own = sub.__dict__.get("forward")
        if own is not None and not _is_ours(own):
            raise ValueError(
                f"activation checkpointing: module {name or '(the model)'!r} ({type(sub).__name__}) has a forward "
                "set on the instance; checkpointing recomputes its class's forward, so choose another module"
            )
        # A bound method, not a closure: copy.deepcopy (frozen copies, EMA teachers) binds the copy's
        # forward to the copy.
        sub.forward = types.MethodType(_checkpointed_forward, sub)
    return [name for name, _ in chosen]


def checkpointed(module: nn.Module) -> list[str]:
    """The names of ``module``'s submodules whose activations are recomputed in backward."""
    return [name for name, sub in module.named_modules() if _is_ours(sub.__dict__.get("forward"))]


def suggestion(module: nn.Module, patterns: Sequence[str]) -> str | None:
    """What to suggest for ``activation_checkpointing`` when memory runs out: ``None`` when
    ``patterns`` checkpoint something already, else the blocks of the model's first ``nn.ModuleList``
    (``"blocks.*"``), or a placeholder for a model without one."""
    if patterns:
        return None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.ModuleList) and len(sub):
            return f"{name}.*" if name else "*"
    return "<block class>"


def matching_modules(module: nn.Module, patterns: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The outermost submodules (``(name, module)``, in the model's order) whose name or class name
    matches a pattern; a pattern that matches none is an error naming it."""
    named = list(module.named_modules())
    for pattern in patterns:
        if not any(_matches(pattern, name, sub) for name, sub in named):
            classes = list(dict.fromkeys(type(sub).__name__ for _, sub in named))
            close = difflib.get_close_matches(pattern, [n for n, _ in named if n] + classes, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"activation_checkpointing pattern {pattern!r} matches no module name or class{hint}; "
                f"modules are: {_sample(n for n, _ in named if n and n.count('.') <= 1)}; "
                f"classes are: {_sample(classes)}"
            )
    chosen: list[tuple[str, nn.Module]] = []
    for name, sub in named:  # parents come before their children
        inside = any(outer == "" or name.startswith(outer + ".") for outer, _ in chosen)
        if not inside and any(_matches(p, name, sub) for p in patterns):
            chosen.append((name, sub))
    for name, sub in chosen:
        # The recompute runs the forward again in train mode: batch norm would update its running
        # statistics twice per step, and the run would quietly differ from one without checkpointing.
        norms = [f"{name}.{inner}".strip(".") for inner, m in sub.named_modules()
                 if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
        if norms:
            raise ValueError(
                f"activation_checkpointing: {name or '(the model)'!r} holds batch norm ({_sample(norms, 3)}), whose "
                "running statistics the recompute in backward would update a second time; checkpoint modules "
                "without batch norm (or use track_running_stats=False, LayerNorm or GroupNorm there)"
            )
    return chosen


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    if name and fnmatch.fnmatchcase(name, pattern):
        return True
    # The class and its own bases (FSDP2's sharded classes subclass the model's), not nn.Module's.
    classes = [c for c in type(module).__mro__ if c not in (nn.Module, object)]
    return any(fnmatch.fnmatchcase(c.__name__, pattern) for c in classes)


def _sample(names: Any, n: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "") if names else "(none)"


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(self).forward
    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)  # no backward follows: nothing is kept either way
    # Non-reentrant: works with keyword arguments, inputs that need no gradient, torch.compile and
    # FSDP2; preserve_rng_state (the default) makes the recomputed dropout masks the first ones.
    return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)


def _is_ours(forward: Any) -> bool:
    return isinstance(forward, types.MethodType) and forward.__func__ is _checkpointed_forward


class SavedForBackward:
    """Counts what autograd saves for backward inside ``with``: ``bytes``, each storage once
    (tensors saved by several operations, and views, share one), parameters and buffers of
    ``module`` left out (they are held anyway). What a checkpointed module saves stays inside it, so
    it does not count; the inputs the checkpoint keeps for the recompute are those of the module
    before it, usually counted already.

    ``with SavedForBackward(model) as saved: loss = loss_fn(model(x), y)`` then ``saved.bytes``."""

    def __init__(self, module: nn.Module | None = None):
        held = [*module.parameters(), *module.buffers()] if module is not None else []
        self._held = {t.untyped_storage().data_ptr() for t in held}
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._held:
            self._storages[ptr] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedForBackward:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor
