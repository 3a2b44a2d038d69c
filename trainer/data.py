"""Batches: moving them to the device, and iterating training data in a seeded, resumable order.

Every training source is turned into one of three ``EpochSource`` objects, each of which can
start an epoch at a given micro-batch:

* ``LoaderSource`` for a ``Dataset``: the Trainer's own DataLoader over a ``ResumableSampler``
  whose order depends only on ``(seed, epoch)`` and which skips consumed indices without
  reading them;
* ``TensorSource`` for a ``TensorDataset`` or a tuple/dict of equal-length tensors: the
  tensors go to the device once and batches are index slices, in the same order the
  DataLoader path would produce;
* ``IterableSource`` for a user's DataLoader, a list of batches or any other iterable: a
  sequence is indexed, anything else is fast-forwarded (and says so once).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, TensorDataset

from trainer.device import seed_worker


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
    """Samples in a batch: the length of its first tensor, depth first (1 when it holds none)."""
    tensor = _first_tensor(batch)
    if tensor is None:
        return 1
    return tensor.shape[0] if tensor.ndim else 1


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        children: Iterable[Any] = obj
    elif isinstance(obj, dict):
        children = obj.values()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        children = (getattr(obj, f.name) for f in dataclasses.fields(obj))
    else:
        return None
    for child in children:
        found = _first_tensor(child)
        if found is not None:
            return found
    return None


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The sample order of one epoch: a function of ``(seed, epoch)`` alone."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n, generator=g)


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch order, split across ranks, able to start part-way into an epoch.

    Like ``DistributedSampler`` (order from ``seed + epoch``, ``set_epoch`` every epoch, the
    order padded to a multiple of ``world_size`` so every rank takes equal steps) plus
    ``start``: the number of this rank's indices already consumed, skipped without being read.

    The ranks take the order in turn (rank r: positions r, r + world_size, ...), so ``start`` on
    every rank consumes the order's first ``start * world_size`` samples, whatever ``world_size``
    is: a position counted in samples carries over to another number of ranks.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 pad: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.pad = pad  # training pads so ranks take equal steps; evaluation must not count a sample twice
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.n / self.world_size)
        return len(range(self.rank, self.n, self.world_size))

    def indices(self) -> torch.Tensor:
        """This rank's remaining indices of the current epoch, as a tensor."""
        order = epoch_permutation(self.n, self.seed, self.epoch, self.shuffle)
        if self.world_size > 1:
            total = math.ceil(self.n / self.world_size) * self.world_size
            if total > self.n and self.pad:
                # The whole order repeated as often as the padding needs, as DistributedSampler
                # does: with fewer samples than ranks one copy would leave the last ranks empty.
                order = order.repeat(math.ceil(total / self.n))[:total]
            order = order[self.rank :: self.world_size]
        return order[self.start :]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())


class DataError(ValueError):
    """Training or validation data that cannot be used (empty, exhausted, unequal lengths); the
    message says what was found and what to pass instead."""


class EpochSource:
    """Training batches for one epoch at a time, starting after ``skip`` micro-batches."""

    exact_resume = True
    sampler: ResumableSampler | None = None

    def __len__(self) -> int:  # micro-batches per epoch; may raise TypeError when unknown
        raise TypeError

    def epoch(self, epoch: int, skip: int) -> Iterable[Any]:
        raise NotImplementedError


class LoaderSource(EpochSource):
    def __init__(self, dataset: Dataset, *, batch_size: int, num_workers: int, seed: int,
                 shuffle: bool, pin_memory: bool, rank: int = 0, world_size: int = 1, pad: bool = True,
                 timeout: float = 0):
        self.batch_size = batch_size
        self.timeout = timeout if num_workers else 0
        self.sampler = ResumableSampler(len(dataset), seed, shuffle, rank, world_size, pad)
        self.seed = seed
        self.generator = torch.Generator()
        self.loader = DataLoader(
            dataset,
            batch_sampler=BatchSampler(self.sampler, batch_size, drop_last=False),
            num_workers=num_workers,
            pin_memory=pin_memory,
            worker_init_fn=seed_worker if num_workers else None,
            generator=self.generator,
            # Fresh workers each epoch, so their seeds depend on (seed, epoch) alone and repeat on resume.
            persistent_workers=False,
            timeout=self.timeout,  # a worker that hangs becomes an error, not a stuck run
        )

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, skip: int) -> Iterable[Any]:
        self.sampler.set_epoch(epoch, skip * self.batch_size)
        # Worker seeds are drawn from this generator when the iterator starts: seeding it
        # from (seed, epoch) makes them repeat on resume.
        self.generator.manual_seed(self.seed + epoch)
        return self._timed(self.loader) if self.timeout else self.loader

    def _timed(self, loader: DataLoader) -> Iterator[Any]:
        try:
            yield from loader
        except RuntimeError as exc:
            if "timed out" not in str(exc):
                raise
            raise DataError(
                f"a DataLoader worker took longer than data_timeout ({self.timeout:g} s) to deliver a batch: "
                "it hangs or is too slow; raise data_timeout or fix the dataset's __getitem__"
            ) from exc


class TensorSource(EpochSource):
    """Batches by index slicing of tensors that live on the device: no per-sample indexing,
    no collate. Produces the same batches, in the same order, as ``LoaderSource``."""

    def __init__(self, tensors: tuple[torch.Tensor, ...] | dict[str, torch.Tensor], *, batch_size: int,
                 seed: int, shuffle: bool, device: torch.device, rank: int = 0, world_size: int = 1,
                 pad: bool = True):
        values = list(tensors.values()) if isinstance(tensors, dict) else list(tensors)
        lengths = {t.shape[0] for t in values}
        if len(lengths) != 1:
            raise DataError(f"tensors given as training data have different lengths {sorted(lengths)}")
        self.keys = list(tensors) if isinstance(tensors, dict) else None
        self.tensors = [t.to(device) for t in values]
        self.device = device
        self.batch_size = batch_size
        self.sampler = ResumableSampler(lengths.pop(), seed, shuffle, rank, world_size, pad)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def epoch(self, epoch: int, skip: int) -> Iterator[Any]:
        self.sampler.set_epoch(epoch, skip * self.batch_size)
        order = self.sampler.indices().to(self.device)
        if not len(order):  # resumed at the end of the epoch (split would yield one empty batch)
            return
        for index in order.split(self.batch_size):
            batch = [t[index] for t in self.tensors]
            yield dict(zip(self.keys, batch)) if self.keys is not None else batch


class IterableSource(EpochSource):
    def __init__(self, data: Iterable[Any]):
        self.data = data
        self.exact_resume = isinstance(data, Sequence)
        self._warned = False

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def epoch(self, epoch: int, skip: int) -> Iterable[Any]:
        sampler = getattr(getattr(self.data, "batch_sampler", None), "sampler", None) or getattr(self.data, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # a DistributedSampler in a user's DataLoader
        if skip == 0:
            return self.data
        if isinstance(self.data, Sequence):
            return itertools.islice(self.data, skip, None)
        if not self._warned:
            warnings.warn(
                f"resuming inside an epoch of a {type(self.data).__name__} whose position cannot be restored: "
                f"reading and discarding {skip} batches to get back to it. Pass a Dataset instead "
                "and the Trainer skips them without reading.",
                stacklevel=2,
            )
            self._warned = True
        return itertools.islice(iter(self.data), skip, None)


def is_tensor_data(data: Any) -> bool:
    if isinstance(data, TensorDataset):
        return True
    if isinstance(data, dict) and data:
        return all(isinstance(v, torch.Tensor) for v in data.values())
    if isinstance(data, tuple) and data:
        return all(isinstance(v, torch.Tensor) for v in data)
    return False


def make_source(data: Any, *, batch_size: int, num_workers: int, seed: int, shuffle: bool,
                device: torch.device, rank: int = 0, world_size: int = 1, pad: bool = True,
                timeout: float = 0) -> EpochSource:
    """Pick the fastest source that keeps the seeded order and exact resume. Under torchrun each
    rank gets its share of every epoch (``pad``: equal shares, repeating a few samples)."""
    if is_tensor_data(data) and num_workers == 0:
        tensors = data.tensors if isinstance(data, TensorDataset) else data
        return TensorSource(tensors, batch_size=batch_size, seed=seed, shuffle=shuffle,
                            device=device, rank=rank, world_size=world_size, pad=pad)
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset) and hasattr(data, "__len__"):
        return LoaderSource(data, batch_size=batch_size, num_workers=num_workers, seed=seed, shuffle=shuffle,
                            pin_memory=device.type == "cuda", rank=rank, world_size=world_size, pad=pad,
                            timeout=timeout)
    if isinstance(data, torch.utils.data.IterableDataset):
        return IterableSource(DataLoader(data, batch_size=batch_size, num_workers=num_workers))
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, torch.Tensor)):
        return IterableSource(data)
    raise TypeError(
        f"training/validation data must be a torch Dataset, a DataLoader or an iterable of batches; "
        f"got {type(data).__name__}"
    )
