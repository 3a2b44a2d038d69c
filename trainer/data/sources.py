"""Batches: moving them to the device, and iterating training data in a seeded, resumable order.

Every training source is turned into one of three ``EpochSource`` objects, each of which can
start an epoch at a given micro-batch:

* ``LoaderSource`` for a ``Dataset``: the Trainer's own DataLoader over a ``ResumableSampler``
  whose order depends only on ``(seed, epoch)`` and which skips consumed indices without
  reading them;
* ``TensorSource`` for a ``TensorDataset`` or a tuple/dict of equal-length tensors: the
  tensors go to the device once and batches are index slices, in the same order the
  DataLoader path would produce;
* ``StatefulSource`` for a loader that keeps its own position (``state_dict`` and
  ``load_state_dict``: torchdata's ``StatefulDataLoader``): every rank's state goes into the
  checkpoint and comes back to that rank, and a resume reads nothing to get back;
* ``IterableSource`` for a user's DataLoader, a list of batches, an ``IterableDataset`` or any
  other iterable: a sequence is indexed, anything else is fast-forwarded (and says so once).

An ``IterableDataset`` is split across ranks and DataLoader workers by one rule (``SplitStream``),
unless it splits itself (``shards_itself``; ``check_split`` then looks at its first batches).
Under torchrun a training source of unknown length ends on every rank at the same micro-batch
(``EndTogether``): one small all-reduce per micro-batch, read by the host, instead of a rank that
runs dry leaving the others waiting in the gradient all-reduce. See docs/data.md.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from fractions import Fraction
from typing import Any

import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler,
                              TensorDataset, get_worker_info)

from trainer.parallel import distributed
from trainer.data.batches import fingerprint
from trainer.data.workers import adopt, worker_settings
from trainer.device import seed_worker


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


def last_step(n: int, batch_size: int, grad_accum_steps: int, world_size: int) -> tuple[int, dict[int, Fraction]]:
    """An epoch of ``n`` samples dealt out as ``ResumableSampler`` deals them (padded) and stepped in
    windows of ``grad_accum_steps`` micro-batches: its number of steps, and each sample of its last
    step with its weight in a mean loss (each micro-batch's mean divided by ``grad_accum_steps``,
    averaged over the ranks). Two layouts of one global batch whose last steps differ here train
    that step differently: a short window of several micro-batches, or padding on one of them."""
    share = math.ceil(n / world_size)  # per rank, padded
    window = batch_size * grad_accum_steps
    steps = math.ceil(share / window)
    start = (steps - 1) * window
    weights: dict[int, Fraction] = {}
    for t in range(start, share):
        size = min(batch_size, share - start - (t - start) // batch_size * batch_size)  # its micro-batch's
        weight = Fraction(1, size * grad_accum_steps * world_size)
        for rank in range(world_size):
            sample = (rank + t * world_size) % n  # the padding repeats the order from its start
            weights[sample] = weights.get(sample, 0) + weight
    return steps, weights


class DataError(ValueError):
    """Training or validation data that cannot be used (empty, exhausted, unequal lengths); the
    message says what was found and what to pass instead."""


def timed(batches: Iterable[Any], timeout: float) -> Iterator[Any]:
    """``batches`` of a loader whose workers run under ``timeout``: a worker that took longer is a
    ``DataError`` that says what to do."""
    try:
        yield from batches
    except RuntimeError as exc:
        if "timed out" not in str(exc):
            raise
        raise DataError(
            f"a DataLoader worker took longer than data_timeout ({timeout:g} s) to deliver a batch: "
            "it hangs or is too slow; raise data_timeout or fix the dataset's __getitem__"
        ) from exc


class EpochSource:
    """Training batches for one epoch at a time, starting after ``skip`` micro-batches."""

    exact_resume = True
    sampler: ResumableSampler | None = None
    # Whether the batch just yielded is the epoch's last on every rank, when only reading ahead
    # tells (``EndTogether``): that micro-batch then takes the optimizer step.
    last_batch = False

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
            **worker_settings(seed_worker if num_workers else None, num_workers),
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
        return timed(self.loader, self.timeout) if self.timeout else self.loader


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
    """``timeout``: the one its DataLoader's workers run under (0: none)."""

    def __init__(self, data: Iterable[Any], timeout: float = 0):
        self.data = data
        self.timeout = timeout
        self.exact_resume = isinstance(data, Sequence)
        self._warned = False

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def epoch(self, epoch: int, skip: int) -> Iterable[Any]:
        _set_epoch(self.data, epoch)
        batches = self._skipped(epoch, skip)
        return timed(batches, self.timeout) if self.timeout else batches

    def _skipped(self, epoch: int, skip: int) -> Iterable[Any]:
        if skip == 0:
            return self.data
        if isinstance(self.data, Sequence):
            return itertools.islice(self.data, skip, None)
        if not self._warned:
            warnings.warn(skip_warning(self.data, epoch, skip), stacklevel=3)
            self._warned = True
        return itertools.islice(iter(self.data), skip, None)


def skip_warning(data: Any, epoch: int, skip: int) -> str:
    """The one warning of a resume that reads batches only to discard them (it can take hours)."""
    return (f"resuming inside epoch {epoch} of a {type(data).__name__} whose position cannot be restored: "
            f"reading and discarding its batches 0-{skip - 1} ({skip} batches) to get back to batch {skip}. "
            "Pass a map-style Dataset (skipped by index, nothing read) or a loader with state_dict() and "
            "load_state_dict() (torchdata's StatefulDataLoader: restored, nothing read) instead")


def _set_epoch(data: Any, epoch: int) -> None:
    sampler = getattr(getattr(data, "batch_sampler", None), "sampler", None) or getattr(data, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)  # a DistributedSampler in a user's DataLoader


def is_stateful_loader(data: Any) -> bool:
    """A loader that saves and restores its own position (torchdata's ``StatefulDataLoader``, or
    any iterable with ``state_dict`` and ``load_state_dict``). A map-style Dataset is not one: the
    Trainer's own order skips it by index."""
    if isinstance(data, Dataset) or isinstance(data, (str, bytes, torch.Tensor)) or not isinstance(data, Iterable):
        return False
    return callable(getattr(data, "state_dict", None)) and callable(getattr(data, "load_state_dict", None))


class StatefulSource(EpochSource):
    """A loader that keeps its own position: checkpoints hold its ``state_dict()`` (every rank's,
    see ``LoaderStates``), and a resume gives it back with ``load_state_dict``, reading nothing.

    The restored iterator is made without drawing from torch's global generator (a DataLoader
    draws its seeds when it makes an iterator), which the checkpoint restored to where the
    uninterrupted run was: mid-epoch, that run made its iterator long before.
    """

    exact_resume = True

    def __init__(self, loader: Iterable[Any], timeout: float = 0):
        self.loader = loader
        self.timeout = timeout  # the one its workers run under (0: none)
        self.pending: dict[str, Any] | None = None  # a checkpoint's state, given to the loader at the next epoch()
        self.ran_out = False  # this epoch's iterator has ended (a checkpoint after that resumes past the end)
        self.reads_ahead = False  # under EndTogether: the state is the one before the batch read ahead
        self._held: Any = None
        self._warned = False
        self._why = ""

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        loader = self._held if self._held is not None else self.loader.state_dict()  # type: ignore[attr-defined]
        return {"loader": loader, "ran_out": self.ran_out, "num_workers": getattr(self.loader, "num_workers", None),
                "generators": [g.get_state() for g in loader_generators(self.loader)]}

    def load_state_dict(self, state: dict[str, Any] | None, why: str = "the checkpoint holds no state of the "
                        "training loader") -> None:
        """``None``: no saved state fits this loader (``why`` says why); the epoch is then read from
        its start up to the position, with one warning."""
        workers = getattr(self.loader, "num_workers", None)
        if state is not None and state.get("num_workers", workers) != workers:
            # A loader's state has the shape of its worker count (torchdata refuses another one).
            state, why = None, (f"the checkpoint's training loader ran {state['num_workers']} worker(s) and this "
                                f"one runs {workers}, and a loader's state fits its own number of workers only")
        self.pending = state if state is not None else {}
        self._why = why

    def epoch(self, epoch: int, skip: int) -> Iterable[Any]:
        _set_epoch(self.loader, epoch)  # before a restored iterator is made: a DistributedSampler's order needs it
        pending, self.pending = self.pending, None
        self._held = None
        if pending:
            self.loader.load_state_dict(pending["loader"])  # type: ignore[attr-defined]
            with torch.random.fork_rng(devices=[]):
                self.loader.state_dict()  # type: ignore[attr-defined]  # makes the restored iterator now
            # Making it drew from the loader's own generators too (a DataLoader draws its base seed
            # from the one it was given, which is also its sampler's); torchdata's state holds where
            # they were when the epoch began, not where the epoch's start left them: put them there.
            for g, state in zip(loader_generators(self.loader), pending.get("generators", [])):
                g.set_state(state)
            if pending["ran_out"] and skip:
                self.ran_out = True
                return iter(())  # saved after the epoch's last batch; the next epoch() starts a new one
        self.ran_out = False
        loaded = iter(self.loader)
        batches = self._batches(timed(loaded, self.timeout) if self.timeout else loaded)
        if pending is not None and not pending and skip:
            if not self._warned:
                warnings.warn(f"{self._why}; {skip_warning(self.loader, epoch, skip)}", stacklevel=2)
                self._warned = True
            return itertools.islice(batches, skip, None)
        return batches

    def _batches(self, iterator: Iterator[Any]) -> Iterator[Any]:
        length = length_of(self)
        count = 0
        while True:
            if self.reads_ahead:
                self._held = self.loader.state_dict()  # type: ignore[attr-defined]
            try:
                batch = next(iterator)
            except StopIteration:
                self.ran_out, self._held = True, None  # saved from here on: the loader's own, ended state
                return
            count += 1
            if count == length:
                # The loop stops reading at the epoch's last batch. The loader learns that its epoch
                # is over only when asked for one more (nothing is read: its sampler has run out), and
                # a checkpoint from here on must hold that: a resume then starts a new epoch, as the
                # uninterrupted run does.
                after = next(iterator, _END)
                self.ran_out = after is _END
                yield batch
                if after is _END:
                    return
                batch = after  # a loader longer than its len(): read on
                count += 1
            yield batch


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The generators a loader draws its order and worker seeds from (its own, its sampler's)."""
    found: list[torch.Generator] = []
    sampler = getattr(loader, "sampler", None)
    for owner in (loader, sampler, getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


class LoaderStates:
    """The training loader's own position, a part of ``trainer_state`` (``loader_states``: one
    state per rank, in rank order, gathered at checkpoints only). Each rank takes its own back;
    the Trainer's map-style sources keep none (``epoch`` and ``batch_in_epoch`` place them)."""

    def __init__(self, source: Callable[[], EpochSource | None]):
        self.source = source  # the training source when it keeps its own position, else None

    def state_dict(self) -> dict[str, Any]:
        source = _unwrapped(self.source())
        if not isinstance(source, StatefulSource):
            return {}
        return {"loader_states": distributed.all_gather_objects(source.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("loader_states")
        source = _unwrapped(self.source())
        if not isinstance(source, StatefulSource):
            if saved:
                warnings.warn("the checkpoint holds the position of a stateful training loader, but this run's "
                              "training data keeps none; it is ignored (epoch and batch_in_epoch place the data)",
                              stacklevel=4)
            return
        world = distributed.world_size()
        if saved is not None and len(saved) != world:
            source.load_state_dict(None, f"the checkpoint holds the training loader's position on {len(saved)} "
                                         f"rank(s) and this run has {world}, and a rank's loader state fits that rank "
                                         f"only (resume on {len(saved)} rank(s) to restore it without reading)")
        else:
            source.load_state_dict(saved[distributed.rank()] if saved is not None else None)


def _unwrapped(source: EpochSource | None) -> EpochSource | None:
    return source.inner if isinstance(source, EndTogether) else source


class SplitStream(IterableDataset):
    """An ``IterableDataset``'s items dealt out over every rank's DataLoader workers: with ``W``
    workers per rank (1 without workers) item ``i`` of the stream goes to global worker
    ``i mod (world_size * W)``, where rank ``r``'s worker ``w`` is global worker ``r * W + w``
    (rank-major). Every worker reads the whole stream and keeps its share; a dataset that can
    read only its share (files by rank, shards by worker) declares ``shards_itself = True``."""

    def __init__(self, dataset: IterableDataset, rank: int, world_size: int):
        self.dataset, self.rank, self.world_size = dataset, rank, world_size

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return itertools.islice(iter(self.dataset), self.rank * workers + worker, None, self.world_size * workers)


def shards_itself(dataset: IterableDataset, setting: str) -> bool:
    """Whether an ``IterableDataset`` splits itself across ranks and workers: its own
    ``shards_itself`` attribute, else the ``stream_split`` setting (``dataset`` or ``trainer``)."""
    declared = getattr(dataset, "shards_itself", None)
    return bool(declared) if declared is not None else setting == "dataset"


class CheckedSplit(IterableSource):
    """An ``IterableDataset`` that says it splits itself: in the first epoch this process reads,
    its first batch on every rank (one gather) and the first batch of each DataLoader worker of a
    rank are compared by digest; two equal ones mean a rank or a worker reads another's share."""

    def __init__(self, data: Iterable[Any], workers: int, timeout: float = 0):
        super().__init__(data, timeout)
        self.workers = max(workers, 1)
        self.checked = False

    def epoch(self, epoch: int, skip: int) -> Iterable[Any]:
        batches = super().epoch(epoch, skip)
        return batches if self.checked else self._checked(iter(batches))

    def _checked(self, batches: Iterator[Any]) -> Iterator[Any]:
        self.checked = True
        first = list(itertools.islice(batches, self.workers))  # the workers take turns: one batch each
        prints = [fingerprint(b) for b in first]
        name = type(getattr(self.data, "dataset", self.data)).__name__
        fix = ("read torch.utils.data.get_worker_info() and the rank (torch.distributed.get_rank()) to pick "
               "its share, or let the Trainer split it: stream_split: trainer and no shards_itself attribute")
        for i, p in enumerate(prints):
            if p is not None and p in prints[:i]:
                raise DataError(f"the {name} says it splits itself (shards_itself / stream_split: dataset), but "
                                f"DataLoader workers {prints.index(p)} and {i} delivered the same first batch: "
                                f"each worker reads the whole stream. Make it {fix}")
        ranks = distributed.all_gather_objects(prints[0] if prints else None)
        for r, p in enumerate(ranks):
            if p is not None and p in ranks[:r]:
                raise DataError(f"the {name} says it splits itself (shards_itself / stream_split: dataset), but "
                                f"ranks {ranks.index(p)} and {r} read the same first batch: every rank reads the "
                                f"whole stream. Make it {fix}")
        yield from first
        yield from batches


class EndTogether(EpochSource):
    """Under torchrun, a training source of unknown length read one batch ahead: every rank
    learns at each micro-batch whether every rank has another one, and all end the epoch at the
    first micro-batch after which some rank has none (that micro-batch takes the step; the batches
    other ranks read ahead are dropped). Costs one one-element all-reduce per micro-batch, whose
    result the host reads: on CUDA a sync point per micro-batch, for sources of unknown length
    under torchrun only (a Dataset, tensors or a loader with a length never pay it)."""

    def __init__(self, source: EpochSource, device: torch.device):
        self.inner, self.device = source, device
        self.exact_resume = source.exact_resume
        self._told = False  # this rank's stream outlasted another's: said once per run
        if isinstance(source, StatefulSource):
            source.reads_ahead = True  # its checkpointed state is the one before the batch read ahead

    def __len__(self) -> int:
        raise TypeError

    def epoch(self, epoch: int, skip: int) -> Iterator[Any]:
        self.last_batch = False
        batches = iter(self.inner.epoch(epoch, skip))
        ahead = next(batches, _END)
        if not self._everyone_has(ahead):
            self._tell(ahead, epoch)
            return
        while True:
            batch, ahead = ahead, next(batches, _END)
            self.last_batch = not self._everyone_has(ahead)
            yield batch
            if self.last_batch:
                self._tell(ahead, epoch)
                return

    def _tell(self, ahead: Any, epoch: int) -> None:
        if ahead is not _END and not self._told:
            self._told = True
            warnings.warn(f"rank {distributed.rank()}: another rank's training stream ended first in epoch {epoch}, "
                          "so this rank leaves the rest of its stream unread in that epoch (every rank ends an "
                          "epoch with the shortest stream; said once per run)", stacklevel=2)

    def _everyone_has(self, batch: Any) -> bool:
        # note: CPU-GPU sync point, per micro-batch, only here (torchrun and a stream of unknown length)
        return not distributed.all_max(int(batch is _END), self.device)


_END = object()


def padded_samples(data: Any) -> int:
    """Samples a user's DataLoader repeats: its ``DistributedSampler`` pads the order to a multiple
    of the ranks, so that every rank gets as many."""
    sampler = getattr(data, "sampler", None)
    if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
        return sampler.total_size - len(sampler.dataset)
    return 0


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
                timeout: float = 0, stream_split: str = "trainer") -> EpochSource:
    """Pick the fastest source that keeps the seeded order and exact resume. Under torchrun each
    rank gets its share of every epoch (``pad``: equal shares, repeating a few samples; for a
    stream, its share by ``SplitStream``'s rule, and every rank ends the epoch together)."""
    if is_tensor_data(data) and num_workers == 0:
        tensors = data.tensors if isinstance(data, TensorDataset) else data
        return TensorSource(tensors, batch_size=batch_size, seed=seed, shuffle=shuffle,
                            device=device, rank=rank, world_size=world_size, pad=pad)
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset) and hasattr(data, "__len__"):
        return LoaderSource(data, batch_size=batch_size, num_workers=num_workers, seed=seed, shuffle=shuffle,
                            pin_memory=device.type == "cuda", rank=rank, world_size=world_size, pad=pad,
                            timeout=timeout)
    if isinstance(data, IterableDataset):
        timeout = timeout if num_workers else 0
        own_split = shards_itself(data, stream_split)
        # One process without workers reads the stream as it is (and keeps its length, if it has one).
        whole = own_split or (world_size == 1 and num_workers == 0)
        loader = DataLoader(data if whole else SplitStream(data, rank, world_size), batch_size=batch_size,
                            num_workers=num_workers, timeout=timeout, **worker_settings(None, num_workers))
        source: EpochSource = CheckedSplit(loader, num_workers, timeout) if own_split else IterableSource(loader, timeout)
    elif is_stateful_loader(data):
        source = StatefulSource(data, adopt(data, timeout))
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, torch.Tensor)):
        repeated = padded_samples(data)
        if repeated and not pad:
            warnings.warn(
                f"the evaluation DataLoader's DistributedSampler repeats {repeated} sample(s) so that every rank gets "
                "as many: validation counts them twice. Pass the Dataset itself (the Trainer splits evaluation data "
                "over ranks without repeating any), or a sampler with drop_last=True", stacklevel=3)
        source = IterableSource(data, adopt(data, timeout))
    else:
        raise TypeError(
            f"training/validation data must be a torch Dataset, a DataLoader or an iterable of batches; "
            f"got {type(data).__name__}"
        )
    if world_size > 1 and pad and length_of(source) is None:
        source = EndTogether(source, device)  # training only: evaluation has no collective per batch
    return source


def length_of(source: EpochSource) -> int | None:
    try:
        return len(source)
    except TypeError:
        return None


def empty_epoch(source: EpochSource, epoch: int, data: Any, world_size: int) -> DataError:
    """The error for an epoch of the training data that yielded no batch (looping on would never
    reach ``max_steps``)."""
    if isinstance(source, EndTogether):
        return DataError(
            f"epoch {epoch} of the training stream yielded no batch on at least one of the {world_size} ranks, and "
            "every rank ends an epoch with the shortest stream: give each rank (and each DataLoader worker) at "
            "least one batch of items"
        )
    return DataError(
        f"epoch {epoch} of the training data yielded no batch; a {type(data).__name__} that can be read only once "
        "(a generator, an iterator) runs dry after the first epoch: pass a Dataset, a DataLoader or a list"
    )
