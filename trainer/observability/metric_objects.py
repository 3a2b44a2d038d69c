"""Metrics that are not batch means: objects with ``update``, ``compute`` and ``reset`` (torchmetrics'
``Metric`` and ``MetricCollection``, or a class of one's own) that gather state over a whole
evaluation and give their value once, after it: F1, AUROC, perplexity, a confusion matrix.

Across ranks ``compute()`` gathers every rank's state itself (torchmetrics syncs over the default
process group), so the value is the whole set's, exactly: every rank calls it, for the same names in
the same order. Evaluation data is split over ranks without padding (``trainer.data``), so no sample
is counted twice.

A value becomes logged numbers here: a number or a one-element tensor is ``<name>``; a tensor of up
to ``MAX_LOGGED`` elements is flattened into ``<name>/<i>_<j>`` (a confusion matrix's row and column);
a dict (a ``MetricCollection``) gives ``<name>/<key>`` for each entry.
"""

from __future__ import annotations

import contextlib
import itertools
import numbers
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from trainer.data.batches import describe

MAX_LOGGED = 1024  # elements of one tensor result logged as separate values; beyond, too many columns


def is_metric(value: Any) -> bool:
    """Whether ``value`` is a metric object (``update``, ``compute`` and ``reset`` methods), not a value."""
    kind = type(value)
    return not isinstance(value, torch.Tensor) and all(callable(getattr(kind, n, None)) for n in ("update", "compute", "reset"))


def check(metrics: dict[str, Any], where: str) -> dict[str, Any]:
    """``metrics`` as a plain dict, each value a metric object, or a TypeError naming the one that is not."""
    if not isinstance(metrics, dict):
        raise TypeError(f"{where} must be a dict of metric objects by name, such as "
                        f"{{'f1': torchmetrics.classification.MulticlassF1Score(10)}}, got {describe(metrics)}")
    for name, metric in metrics.items():
        if not isinstance(name, str) or not is_metric(metric):
            raise TypeError(f"{where}[{name!r}] is {describe(metric)}, not a metric object with update(), compute() "
                            "and reset(), such as torchmetrics.classification.MulticlassF1Score(num_classes=10)")
    return dict(metrics)


def for_run(metrics: dict[str, Any] | None, device: torch.device) -> dict[str, Any]:
    """``Trainer(metrics=...)``, checked (``check``) and on the run's device."""
    checked = check(metrics if metrics is not None else {}, "metrics")
    to_device(checked.values(), device)
    return checked


def to_device(metrics: Iterable[Any], device: torch.device) -> None:
    """torchmetrics' objects are modules: their state follows ``.to`` (a no-op when it is there)."""
    for metric in metrics:
        if isinstance(metric, nn.Module):
            metric.to(device)


def join(known: dict[str, Any], returned: dict[str, Any]) -> None:
    """Add the metric objects a step returned to ``known``; a name is bound to one object for good."""
    for name, metric in returned.items():
        held = known.setdefault(name, metric)
        if held is not metric:
            raise ValueError(f"validation_step returned another object as metric {name!r} ({type(metric).__name__}) "
                             f"than before ({type(held).__name__}): create each metric object once (in __init__) and "
                             "return that same object every time")


@contextlib.contextmanager
def untouched(metrics: dict[str, Any]) -> Iterator[None]:
    """Put the state of ``metrics`` back as it was before the block: a batch run only to keep FSDP's
    ranks in lockstep (``strategy.FSDP.eval_batches``) goes through ``validation_step`` like any
    other, and its update must not count. torchmetrics' states (``metric_state``: tensors and lists
    of tensors) are copied before it and restored after it."""
    saved = []
    library = sys.modules.get("torchmetrics")  # imported by whoever made a torchmetrics object
    for name, metric in metrics.items():
        leaves = ([m for m in metric.modules() if isinstance(m, library.Metric)]
                  if library is not None and isinstance(metric, nn.Module) else [])
        if not leaves:
            raise TypeError(
                f"metric {name!r} ({type(metric).__name__}) is not a torchmetrics Metric, whose state the Trainer can "
                "copy and put back: under strategy: fsdp a rank whose validation share has run out runs its last batch "
                "again only to keep the ranks in step, and that update must not count. Use a torchmetrics Metric, or "
                "give every rank as many validation batches (a set size divisible by batch_size x ranks)")
        for leaf in leaves:
            saved.append((leaf, {key: _copy(value) for key, value in leaf.metric_state.items()}))
    yield
    for leaf, state in saved:
        for key, value in state.items():
            setattr(leaf, key, value)


def _copy(value: Any) -> Any:
    # Sum states are added to in place (``self.tp += tp``); list states (``cat``) are appended to.
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return list(value)


def computed(metrics: dict[str, Any], device: torch.device) -> tuple[list[str], torch.Tensor]:
    """``compute()`` of each metric, in name order (the same on every rank: it is a collective), as
    the logged names and one float64 tensor of their values on ``device`` (read with the evaluation's
    other numbers, in one copy)."""
    names: list[str] = []
    parts: list[torch.Tensor] = []
    for name in sorted(metrics):
        metric = metrics[name]
        _flatten(name, metric.compute(), names, parts, type(metric).__name__, device)
    values = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    return names, values


def _flatten(name: str, value: Any, names: list[str], parts: list[torch.Tensor], kind: str,
             device: torch.device) -> None:
    if isinstance(value, dict):
        for key, entry in value.items():
            _flatten(f"{name}/{key}", entry, names, parts, kind, device)
        return
    if isinstance(value, numbers.Real):
        value = torch.tensor(float(value))  # a Python or NumPy number
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{kind}.compute() of metric {name!r} returned {describe(value)}; a metric logs a number, "
                        "a tensor or a dict of them: plot curves (ROC, precision-recall) from the metric object itself")
    value = value.detach()
    if value.numel() == 1:
        names.append(name)
    elif value.numel() == 0:
        raise ValueError(f"{kind}.compute() of metric {name!r} returned an empty tensor of shape {tuple(value.shape)}")
    elif value.numel() > MAX_LOGGED:
        warnings.warn(f"metric {name!r} ({kind}) is a tensor of shape {tuple(value.shape)}: too many values "
                      f"(more than {MAX_LOGGED}) to log one by one, so it is not logged; read it from the metric "
                      "object after the evaluation (its compute() is cached until the next one resets it)",
                      stacklevel=4)
        return
    else:
        names.extend(f"{name}/{'_'.join(map(str, index))}" for index in itertools.product(*map(range, value.shape)))
    parts.append(value.to(device=device, dtype=torch.float64).reshape(-1))
