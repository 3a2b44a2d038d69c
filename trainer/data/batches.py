"""Batches: moving them to the device, their size, and a few words or a digest of them for messages;
how a run's steps are made of them on its ranks (``BatchLayout``)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch


def to_device(obj: Any, device: torch.device, non_blocking: bool = False, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor inside tuples, lists, dicts and dataclasses to ``device``; with ``dtype``
    (bf16-true), floating-point tensors become ``dtype`` too, in the same copy. Integer tensors
    (token ids, labels) stay as they are."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device, dtype, non_blocking=non_blocking)
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, tuple):
        moved = [to_device(v, device, non_blocking, dtype) for v in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else tuple(moved)
    if isinstance(obj, list):
        return [to_device(v, device, non_blocking, dtype) for v in obj]
    if isinstance(obj, dict):
        moved = {k: to_device(v, device, non_blocking, dtype) for k, v in obj.items()}
        if type(obj) is dict:
            return moved
        # A subclass's constructor may not take pairs (defaultdict takes its factory first), so the
        # moved values go into a shallow copy, which keeps the type and its attributes; a subclass
        # that cannot be copied or written to becomes a plain dict.
        try:
            kept = copy.copy(obj)
            kept.update(moved)
        except Exception:
            return moved
        return kept
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj,
            **{f.name: to_device(getattr(obj, f.name), device, non_blocking, dtype)
               for f in dataclasses.fields(obj) if f.init},
        )
    return obj


def mover(device: torch.device, dtype: torch.dtype | None) -> Callable[[Any], Any] | None:
    """``to_device`` for the training loop, resolved once; ``None`` on the CPU, where batches are
    already where they belong (no per-step walk over them), unless bf16-true (``dtype``) has
    floating-point tensors to convert. On CUDA copies from pinned memory do not wait for the GPU."""
    if device.type == "cpu" and dtype is None:
        return None
    non_blocking = device.type == "cuda"
    return lambda batch: to_device(batch, device, non_blocking, dtype)


def describe(batch: Any) -> str:
    """A batch (or a step's output) in a few words, for error messages."""
    if isinstance(batch, torch.Tensor):
        return f"a Tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} items ({', '.join(type(b).__name__ for b in batch[:4])})"
    if isinstance(batch, dict):
        return f"a dict with keys {list(batch)[:6]}"
    return f"a {type(batch).__name__}"


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor, depth first (1 when it holds none). The
    training loop asks this of every micro-batch, so the usual one, a tuple or list that starts with
    a tensor, is answered without a search."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        tensor = batch[0]
    else:
        tensor = first_tensor(batch)
        if tensor is None:
            return 1
    shape = tensor.shape
    return shape[0] if shape else 1


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor of a batch, depth first (``None`` when it holds none). Containers are tested
    first: ``isinstance(x, torch.Tensor)`` is a slow test for an ``x`` that is not a tensor."""
    if isinstance(obj, (tuple, list)):
        children: Iterable[Any] = obj
    elif isinstance(obj, dict):
        children = obj.values()
    elif isinstance(obj, torch.Tensor):
        return obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        children = (getattr(obj, f.name) for f in dataclasses.fields(obj))
    else:
        return None
    for child in children:
        found = child if isinstance(child, torch.Tensor) else first_tensor(child)
        if found is not None:
            return found
    return None


def fingerprint(batch: Any) -> str | None:
    """A short digest of a batch's tensors on the host (``None`` for a batch without one)."""
    digest = hashlib.sha1()
    found = False
    for t in _tensors(batch):
        found = True
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16] if found else None


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How a run makes its optimizer steps: micro-batches of ``batch_size`` samples,
    ``grad_accum_steps`` of them per step on each of ``world_size`` ranks.

    Step ``s`` of an epoch takes the samples ``global_batch * s`` up to ``global_batch * (s + 1)``
    of the epoch's permutation, whatever the three numbers are (``ResumableSampler`` deals the
    permutation out to the ranks in turn), so two layouts with one global batch train alike."""

    batch_size: int
    grad_accum_steps: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum_steps * self.world_size

    def __str__(self) -> str:
        return (f"{self.global_batch} = batch_size {self.batch_size} x grad_accum_steps {self.grad_accum_steps} "
                f"x {rank_count(self.world_size)}")


def rank_count(n: int) -> str:
    """``1 rank``, ``2 ranks``: a number of ranks in words."""
    return f"{n} rank" if n == 1 else f"{n} ranks"
