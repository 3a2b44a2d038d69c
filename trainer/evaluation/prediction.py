"""Predictions: ``predict_step``'s outputs for every sample of a data source, in data order, each
sample once, held in memory or streamed to a file.

Under torchrun each rank predicts its share, and rank 0 collects the shares batch by batch
(one gather per round of batches) and puts every row back at its sample's index, so the result is
the one process's, whatever the world size. A sample that a rank's share repeats (a user's
``DistributedSampler`` pads the last round with samples from the start) is kept once. Which sample
a row belongs to is known for the data the Trainer splits itself (a ``Dataset``, tensors) and for a
``DataLoader`` whose sampler is a ``DistributedSampler``; any other iterable (a list of batches) is
taken to yield the same batches on every rank, as evaluation takes it, and rank 0 keeps its own.

Outputs: a tensor, or a dict or tuple of tensors, each with one row per sample (concatenated along
dim 0). ``out=NAME.pt``: the same structure, ``torch.save``'d atomically (held in memory first).
``out=NAME.safetensors``: streamed, rows appended to a temp file beside it as they come and
reordered from there, so a set larger than memory fits; a tensor is stored as ``predictions``, a
dict under its keys, a tuple as ``0``, ``1``, ...; written atomically as well.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.parallel import distributed
from trainer.parallel.strategy import lockstep
from trainer import run_dir as run_files
from trainer.data.batches import batch_size_of, describe, to_device

SUFFIXES = (".pt", ".safetensors")
TENSOR_NAME = "predictions"  # a single tensor's name in a .safetensors file
# safetensors' names of dtypes (its format specification)
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_CHUNK = 1 << 16  # rows copied at a time when reordering a streamed file


class PredictionError(ValueError):
    """An output or destination predict cannot use; the message says what to change."""


@dataclass
class Written:
    """What ``predict(..., out=...)`` wrote."""

    path: Path
    samples: int
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]  # name: (shape, dtype)

    def describe(self) -> str:
        return ", ".join(f"{name} {tuple(shape)} {str(dtype).removeprefix('torch.')}"
                         for name, (shape, dtype) in self.tensors.items())


def check_out(out: str | Path, label: str = "out") -> Path:
    """The destination of predictions, or a ``PredictionError`` naming the problem and the fix
    (``label``: what the messages call it, ``--out`` on the command line)."""
    out = Path(out)
    parent = out.resolve().parent
    own = (run_files.CONFIG, run_files.STATUS, run_files.METRICS_JSONL, run_files.METRICS_CSV, run_files.TEST,
           run_files.LOCK)
    if parent.name == run_files.CHECKPOINTS and run_files.is_run_dir(parent.parent):
        raise PredictionError(f"{label} {out} is in the run's checkpoints folder, which the run rotates and "
                              f"resumes from; write predictions elsewhere, e.g. {parent.parent / 'preds.pt'}")
    if run_files.is_run_dir(parent) and out.name in own:
        raise PredictionError(f"{label} {out} would replace the run's own {out.name}; pick another name, "
                              f"e.g. {parent / 'preds.pt'}")
    if out.suffix not in SUFFIXES:
        raise PredictionError(f"{label} {out}: name the file NAME.pt (torch.save, held in memory) or "
                              "NAME.safetensors (streamed to disk, for sets larger than memory)")
    if out.is_dir():
        raise PredictionError(f"{label} {out} is a folder; pass a file name such as {out / ('preds' + out.suffix)}")
    if not out.parent.is_dir():
        raise PredictionError(f"{label} {out}: the folder {out.parent} does not exist; create it first or pick another")
    return out


def flatten(output: Any) -> tuple[str, dict[str, torch.Tensor]]:
    """``predict_step``'s output as ``(kind, {name: tensor})``; kind is tensor, dict or tuple."""
    if isinstance(output, torch.Tensor):
        kind, named = "tensor", {TENSOR_NAME: output}
    elif isinstance(output, dict) and output and all(isinstance(k, str) for k in output):
        kind, named = "dict", dict(output)
    elif isinstance(output, (tuple, list)) and output:
        kind, named = "tuple", {str(i): v for i, v in enumerate(output)}
    else:
        named = {}
    if not named or not all(isinstance(v, torch.Tensor) and v.ndim > 0 for v in named.values()):
        raise PredictionError(f"predict_step must return a tensor, or a dict (str keys) or tuple of tensors, each "
                              f"with one row per sample; got {describe(output)}")
    rows = {v.shape[0] for v in named.values()}
    if len(rows) != 1:
        counts = ", ".join(f"{k}: {v.shape[0]}" for k, v in named.items())
        raise PredictionError(f"predict_step returned tensors with different numbers of rows ({counts}); return one "
                              "row per sample")
    return kind, named


def rebuild(kind: str, named: dict[str, torch.Tensor]) -> Any:
    if kind == "tensor":
        return named[TENSOR_NAME]
    return named if kind == "dict" else tuple(named.values())


def sample_order(source: Any) -> torch.Tensor | None:
    """The dataset indices of this rank's rows, in the order its batches hold them; None when the
    Trainer cannot know them (an iterable it does not split: every rank is taken to see all of it)."""
    sampler = getattr(source, "sampler", None)
    if sampler is not None:  # the Trainer's own split (pad=False: no sample twice)
        sampler.set_epoch(0)
        return sampler.indices()
    data = getattr(source, "data", None)
    user = getattr(getattr(data, "batch_sampler", None), "sampler", None) or getattr(data, "sampler", None)
    if isinstance(user, torch.utils.data.DistributedSampler):
        user.set_epoch(0)  # as IterableSource.epoch(0, 0) sets it
        return torch.tensor(list(user), dtype=torch.int64)
    return None


def predict(step: Callable[[Any], Any], batches: Any, device: torch.device, dtype: torch.dtype | None,
            order: torch.Tensor | None, gather: bool, collector: Collector | None) -> None:
    """Run ``step`` over ``batches`` (``(batch, counted)`` pairs) and hand every counted batch's rows,
    with their sample indices (``order``: this rank's, or None), to rank 0's ``collector``; with
    ``gather``, one gather of the ranks' rows per round. The caller sets eval mode, no_grad and autocast."""
    offset = 0
    for batch, counted in batches:
        piece = None
        if batch is not None:
            batch = to_device(batch, device, device.type == "cuda", dtype)
            output = step(batch)
            if counted:
                kind, named = to_host(output, batch, order is not None)
                rows = next(iter(named.values())).shape[0]
                piece = (kind, named, order[offset:offset + rows] if order is not None else None)
                offset += rows
        pieces = distributed.gather_to_main(piece) if gather else [piece]  # None off rank 0
        if collector is not None:
            for got in pieces:
                if got is not None:
                    collector.add(*got)


def rounds(source: Any, sharded: bool, device: torch.device) -> Iterator[tuple[Any, bool]]:
    """``(batch, counted)`` for the same number of rounds on every rank: a rank whose share has run
    out yields ``(None, False)``, or under FSDP (where every forward gathers from all ranks) its
    last batch again, uncounted (``strategy.lockstep``)."""
    return lockstep(source, device, repeat_last=sharded, no_batch=lambda: PredictionError(
        f"rank {distributed.rank()} has no batch to predict: under strategy: fsdp every rank needs at least one "
        "(there are fewer samples than ranks)"))


class Collector:
    """Rank 0's rows in the order they arrive, each with its sample index: in memory, or appended to
    one raw temp file per output beside ``out`` (``.safetensors``)."""

    def __init__(self, out: Path | None):
        self.out = out
        self.stream = out is not None and out.suffix == ".safetensors"
        self.kind: str | None = None
        self.rows: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}  # name: (shape of a row, dtype)
        self.held: dict[str, list[torch.Tensor]] = {}
        self.files: dict[str, Any] = {}
        self.indices: list[torch.Tensor] = []
        self.count = 0

    def add(self, kind: str, named: dict[str, torch.Tensor], indices: torch.Tensor | None) -> None:
        if self.kind is None:
            self.kind = kind
            self.rows = {name: (tuple(t.shape[1:]), t.dtype) for name, t in named.items()}
            if self.stream:
                bad = [f"{n} ({d})" for n, (_, d) in self.rows.items() if d not in _DTYPES]
                if bad:
                    raise PredictionError(f"safetensors cannot store {', '.join(bad)}; write NAME.pt instead, or "
                                          "convert these outputs in predict_step")
                for i, name in enumerate(self.rows):
                    self.files[name] = open(self._raw(i), "wb")
        seen = {name: (tuple(t.shape[1:]), t.dtype) for name, t in named.items()}
        if seen != self.rows:
            raise PredictionError(
                "predict_step returned outputs of another form than before: "
                f"{_form(self.rows)} then {_form(seen)}; outputs are concatenated along dim 0, so their names, "
                "other dims and dtypes must agree for every batch (pad varying lengths)")
        n = next(iter(named.values())).shape[0]
        self.indices.append(indices if indices is not None else torch.arange(self.count, self.count + n))
        self.count += n
        for name, t in named.items():
            if self.stream:
                self.files[name].write(_bytes(t))
            else:
                self.held.setdefault(name, []).append(t)

    def _raw(self, i: int) -> Path:
        return self.out.with_name(f".{self.out.name}.{i}.tmp-{os.getpid()}")

    def close(self) -> None:
        """Remove the temp files (after ``finish``, or when predicting failed)."""
        for i, f in enumerate(self.files.values()):
            f.close()
            self._raw(i).unlink(missing_ok=True)
        self.files = {}

    def finish(self) -> tuple[Any, Written | None]:
        """The outputs in data order (in memory), and what was written to ``out``."""
        if self.kind is None:
            raise PredictionError("the data held no batch to predict")
        order = _order(torch.cat(self.indices))
        keep = None if torch.equal(order, torch.arange(self.count)) else order
        n = len(order)
        shapes = {name: ((n, *row), dtype) for name, (row, dtype) in self.rows.items()}
        if self.stream:
            for f in self.files.values():
                f.flush()
            run_files.write_atomic(self.out, lambda tmp: self._write_safetensors(tmp, keep, shapes))
            return None, Written(self.out, n, shapes)
        named = {}
        for name in self.rows:
            joined = torch.cat(self.held.pop(name))
            named[name] = joined if keep is None else joined[keep]
        result = rebuild(self.kind, named)
        if self.out is None:
            return result, None
        run_files.write_atomic(self.out, lambda tmp: torch.save(result, tmp))
        return result, Written(self.out, n, shapes)

    def _write_safetensors(self, tmp: Path, keep: torch.Tensor | None, shapes: dict[str, Any]) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt", "structure": self.kind}}
        offset = 0
        for name, (shape, dtype) in shapes.items():
            size = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for i, (name, (shape, _)) in enumerate(shapes.items()):
                raw = self._raw(i)
                if keep is None:
                    with open(raw, "rb") as src:
                        shutil.copyfileobj(src, f)
                    continue
                width = os.path.getsize(raw) // self.count if self.count else 0
                if width == 0:
                    continue
                rows = np.memmap(raw, dtype=np.uint8, mode="r", shape=(self.count, width))
                for chunk in keep.split(_CHUNK):
                    f.write(rows[chunk.numpy()].tobytes())
                del rows


def _order(indices: torch.Tensor) -> torch.Tensor:
    """Positions of the rows to keep, in index order: the first row of every index."""
    ordered, positions = torch.sort(indices, stable=True)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return positions[first]


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _form(rows: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> str:
    return ", ".join(f"{n}: rows of shape {tuple(s)} {str(d).removeprefix('torch.')}" for n, (s, d) in rows.items())


def to_host(output: Any, batch: Any, indexed: bool) -> tuple[str, dict[str, torch.Tensor]]:
    """One batch's outputs, checked, detached and on the CPU."""
    kind, named = flatten(output)
    rows = next(iter(named.values())).shape[0]
    if indexed and rows != batch_size_of(batch):
        raise PredictionError(f"predict_step returned {rows} rows for a batch of {batch_size_of(batch)} samples; "
                              "return one row per sample (rows are put back at their samples' places)")
    # note: CPU-GPU sync point, once per batch: predictions leave the device as they are made, so a
    # large set never fills its memory
    return kind, {name: t.detach().to("cpu") for name, t in named.items()}
