"""A run's data: its training and validation sources, built once, and sources for other data.

The Trainer holds one ``RunData``. Training data is split so that every rank steps together
(equal shares of a ``Dataset``, one check that loaders of known length agree); evaluation data is
split without padding, so no sample counts twice.
"""

from __future__ import annotations

import warnings
from dataclasses import astuple
from typing import Any

from trainer.config import TrainerConfig
from trainer.data.batches import BatchLayout, mover
from trainer.data.sources import DataError, EpochSource, last_step, length_of, make_source
from trainer.parallel import distributed


class RunData:
    def __init__(self, train: Any, val: Any, config: TrainerConfig, device: Any, dtype: Any, layout: Any):
        self.config, self.device, self.rank, self.world_size = config, device, layout.rank, layout.world_size
        self.train, self.val = train, val
        # A batch onto the device (floating tensors in the parameters' dtype); None: batches are in place.
        self.move = mover(device, dtype)

    @property
    def train(self) -> Any:
        return self._train_data

    @train.setter
    def train(self, data: Any) -> None:  # new data: its source is built when first needed
        self._train_data, self._train = data, None

    @property
    def val(self) -> Any:
        return self._val_data

    @val.setter
    def val(self, data: Any) -> None:
        self._val_data, self._val = data, None

    def source(self, data: Any, shuffle: bool = False, pad: bool = False) -> EpochSource:
        """``pad``: under torchrun equal shares per rank (training); without, no sample twice (evaluation)."""
        cfg = self.config
        return make_source(data, batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed,
                           shuffle=shuffle, device=self.device, rank=self.rank, world_size=self.world_size, pad=pad,
                           timeout=cfg.data_timeout or 0, stream_split=cfg.stream_split)

    def train_source(self) -> EpochSource:
        if self._train is None:
            if self.train is None:
                raise ValueError("fit() needs training data: Trainer(model, optimizer, train_data=...)")
            source = self.source(self.train, shuffle=True, pad=True)
            if self.world_size > 1:
                # Every rank steps together: a loader with a length must give each rank as many batches
                # (one object gather, once per Trainer; streams of unknown length end together, EndTogether).
                lengths = distributed.all_gather_objects(length_of(source))
                if len(set(lengths)) > 1:
                    shown = ", ".join(f"rank {r}: {n if n is not None else 'unknown'}" for r, n in enumerate(lengths))
                    raise DataError(
                        f"the training data gives the ranks different numbers of batches per epoch ({shown}), so "
                        "they would not step together; pass the Dataset itself (the Trainer gives every rank an "
                        "equal share), a DataLoader with a DistributedSampler (it pads the shares to equal "
                        "lengths), or an IterableDataset (ranks end each epoch together at the shortest stream)")
            self._train = source
        return self._train

    def val_source(self) -> EpochSource:
        if self._val is None:
            self._val = self.source(self.val)
        return self._val

    def check_not_empty(self) -> None:
        """Of unknown length, an epoch that yields nothing is caught where it happens."""
        if length_of(self.train_source()) == 0:
            raise DataError(f"the training data ({type(self.train).__name__}) holds no batch: it is empty")

    def rebuild(self) -> None:
        """The batch size changed (a resume on another number of ranks): sources are built anew."""
        self._train = None

    def resumed(self, batch_in_epoch: int, configured: BatchLayout, saved: BatchLayout | None,
                now: BatchLayout) -> int:
        """After a checkpoint was loaded: the sources follow a batch size the resume changed, and a
        position saved under another batch layout becomes this run's micro-batches (``position``); a
        layout that takes an epoch's last step otherwise than the checkpoint's is warned about."""
        if self.config.batch_size != configured.batch_size:
            self.rebuild()  # built with the configured batch_size
        if saved is not None and saved != now and saved.global_batch == now.global_batch:
            self._warn_if_last_step_differs(saved, now)
        if saved is not None and (saved.batch_size, saved.world_size) != (now.batch_size, now.world_size):
            return self.position(batch_in_epoch * saved.batch_size * saved.world_size)
        return batch_in_epoch

    def _warn_if_last_step_differs(self, saved: BatchLayout, now: BatchLayout) -> None:
        """An exact resume on another layout holds for every step but an epoch's last, short one,
        which the two layouts may take differently (docs/distributed.md): said when they do."""
        source = self.train_source() if self.train is not None else None
        if source is None or source.sampler is None or self.rank != 0:
            return
        n = source.sampler.n
        if last_step(n, *astuple(saved)) == last_step(n, *astuple(now)):
            return
        warnings.warn(
            f"resumed with a global batch of {now} a run trained with {saved}: its {n} samples per epoch do not "
            "divide by it, and the two layouts take an epoch's last, short step differently (each micro-batch's "
            "mean loss divided by grad_accum_steps however few the window holds, or samples repeated on ranks that "
            "do not divide the epoch), so losses and weights part from the uninterrupted run's at that step; every "
            "step before it matches within float32 rounding. Exact with samples per epoch a multiple of the global "
            "batch (docs/distributed.md, \"Resuming on a different number of ranks\")", stacklevel=4)

    def position(self, consumed: int) -> int:
        """The micro-batches of this run that consume the epoch's first ``consumed`` samples (all
        ranks together): ``ResumableSampler`` deals the epoch's permutation out to the ranks in turn,
        so after ``k`` micro-batches of ``b`` samples on each of ``n`` ranks its first ``k * b * n``
        samples are consumed, whatever ``n`` is. Exact at optimizer-step boundaries, where every
        checkpoint of ``fit`` is written: the global batch divides ``consumed``."""
        source = self.train_source() if consumed and self.train is not None else None
        if source is not None and source.sampler is None:
            warnings.warn(
                f"resuming on another batch layout inside an epoch of a {type(self.train).__name__}: its "
                "position is mapped by samples seen, which is exact only if it deals samples out to the ranks as "
                "the Trainer's sampler does; pass a Dataset for an exact resume", stacklevel=4)
        elif source is not None and consumed >= source.sampler.n:
            return len(source)  # the checkpoint ended the epoch's data (its last step padded on some ranks)
        return consumed // (self.config.batch_size * self.world_size)


__all__ = ["RunData"]
