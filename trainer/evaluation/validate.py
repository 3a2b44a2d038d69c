"""One pass of ``validation_step`` over a data source: metrics averaged over samples, exact over
ranks (sums and counts, not a mean of means), one host read per evaluation. A ``loss_sum`` with its
``count`` (``trainer.losses``) gives ``loss``: the sum over every batch and rank divided by the
total count. Metric objects (``update``/``compute``/``reset``, such as torchmetrics') that the step
returns are computed once after the pass, over the whole set (``trainer.observability.metric_objects``)."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from trainer.parallel import distributed
from trainer.observability import metric_objects
from trainer.data.batches import batch_size_of, describe, to_device
from trainer.losses import COUNT, SUM, summed


def evaluate(step: Callable[[Any], dict[str, Any]], batches: Any, device: torch.device,
             dtype: torch.dtype | None = None, metrics: dict[str, Any] | None = None) -> dict[str, float]:
    """``{name: mean over samples}`` of ``step``'s per-batch means, ``loss`` of its summed losses,
    and the computed value of each metric object it returns. ``batches`` yields ``(batch, counted)``
    pairs (an uncounted batch keeps ranks in lockstep, see ``strategy.FSDP``); ``dtype`` (bf16-true)
    is what their floating-point tensors become. ``metrics``: the metric objects known before the
    pass (reset by the caller), to which those the step returns are added. The caller sets eval
    mode, no_grad and autocast."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    kind: bool | None = None  # whether the batches return summed losses
    known = metrics if metrics is not None else {}
    returned: set[str] = set()  # the metric objects this pass reports
    for batch, counted in batches:
        batch = to_device(batch, device, device.type == "cuda", dtype)
        with contextlib.nullcontext() if counted else metric_objects.untouched(known):
            out = step(batch)
        if not isinstance(out, dict):
            raise TypeError(f"validation_step must return a dict of metric tensors, got {describe(out)}")
        objects = {name: value for name, value in out.items() if metric_objects.is_metric(value)}
        if objects:
            if not counted and not set(objects) <= set(known):
                raise ValueError(f"validation_step returned metric objects {sorted(set(objects) - set(known))} for "
                                 "the first time on a batch run only to keep the ranks in step; return them on every "
                                 "batch")
            metric_objects.join(known, objects)
            returned.update(objects)
            out = {name: value for name, value in out.items() if name not in objects}
        if (SUM in out) is not kind:
            if kind is not None:
                raise TypeError("validation_step returned 'loss_sum' for some batches and not for others; return "
                                "one kind for every batch")
            kind = SUM in out
        if kind:
            loss_sum, items = summed(out, "validation_step")
            out = {name: value for name, value in out.items() if name not in (SUM, COUNT)}
        if not counted:
            continue
        if kind:
            # Keyed by the names returned: the same on every rank that has a batch (see below).
            for name, value in ((SUM, loss_sum), (COUNT, items)):
                value = value.detach().double()
                sums[name] = sums[name] + value if name in sums else value
        n = batch_size_of(batch)
        for name, value in out.items():
            # float64 whatever the default dtype (bf16 inside bf16-true's context) would make of a number
            value = torch.as_tensor(value, dtype=torch.float64, device=device).mean() * n
            sums[name] = sums[name] + value if name in sums else value
        count += n
    # The same names in the same order on every rank, even on one whose share was empty (fewer
    # validation samples than ranks): it adds zeros rather than skipping the collective.
    ranks = distributed.all_gather_objects((sorted(sums), sorted(returned), sorted(known)))
    names = sorted(set().union(*(r[0] for r in ranks)))
    computed = sorted(set().union(*(r[1] for r in ranks)))
    # compute() is a collective: a rank that holds no object for a name would leave the others
    # waiting in it. Every rank sees the same lists, so all of them raise together.
    missing = [(rank, name) for rank, (_, _, held) in enumerate(ranks) for name in computed if name not in held]
    if missing:
        rank, name = missing[0]
        raise ValueError(f"rank {rank} holds no metric object {name!r}: it had no validation batch, and validation_step "
                         "returned the object on the other ranks only; pass it to the Trainer (Trainer(..., "
                         f"metrics={{{name!r}: ...}})) so that every rank holds it, or give every rank a validation batch")
    if not names and not computed:
        return {}
    zero = torch.zeros((), dtype=torch.float64, device=device)
    totals = distributed.all_sum(torch.stack([sums.get(n, zero) for n in names] + [zero + count]))
    with torch.autocast(device.type, enabled=False):  # computed in the states' own precision
        metric_names, metric_values = metric_objects.computed({n: known[n] for n in computed}, device)
    # note: CPU-GPU sync point, once per evaluation (a metric's compute may read the device itself)
    read = torch.cat([totals, metric_values]).tolist()
    values, total, metric_values = read[:len(names)], read[len(names)], read[len(names) + 1:]
    clash = sorted(set(metric_names) & (set(names) | ({"loss"} if SUM in names else set())))
    if clash:
        raise ValueError(f"validation_step returned {clash} both as a value and as a metric object; give them "
                         "different names")
    results = dict(zip(names, values))
    if SUM in results:
        loss_sum, items = results.pop(SUM), results.pop(COUNT)
        if items <= 0:
            warnings.warn(f"validation_step's counts sum to {items:g} over the whole set: there is no item to average "
                          "the loss over, so val/loss is nan; check the mask that makes 'count'", stacklevel=3)
        means = {name: v / total for name, v in results.items()}
        means["loss"] = loss_sum / items if items > 0 else math.nan
    else:
        means = {name: v / total for name, v in results.items()}
    means.update(zip(metric_names, metric_values))
    return dict(sorted(means.items()))
