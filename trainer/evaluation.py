"""One pass of ``validation_step`` over a data source: metrics averaged over samples, exact over
ranks (sums and counts, not a mean of means), one host read per evaluation. A ``loss_sum`` with its
``count`` (``trainer.losses``) gives ``loss``: the sum over every batch and rank divided by the
total count."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from trainer import distributed
from trainer.data import batch_size_of, describe, to_device
from trainer.losses import COUNT, SUM, summed


def evaluate(step: Callable[[Any], dict[str, torch.Tensor]], batches: Any, device: torch.device,
             dtype: torch.dtype | None = None) -> dict[str, float]:
    """``{name: mean over samples}`` of ``step``'s per-batch means, and ``loss`` of its summed
    losses. ``batches`` yields ``(batch, counted)`` pairs (an uncounted batch keeps ranks in lockstep,
    see ``strategy.FSDP``); ``dtype`` (bf16-true) is what their floating-point tensors become. The
    caller sets eval mode, no_grad and autocast."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    kind: bool | None = None  # whether the batches return summed losses
    for batch, counted in batches:
        batch = to_device(batch, device, device.type == "cuda", dtype)
        out = step(batch)
        if not isinstance(out, dict):
            raise TypeError(f"validation_step must return a dict of metric tensors, got {describe(out)}")
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
    names = distributed.union_of_names(sums)
    if not names:
        return {}
    zero = torch.zeros((), dtype=torch.float64, device=device)
    totals = distributed.all_sum(torch.stack([sums.get(n, zero) for n in names] + [zero + count]))
    *values, total = totals.tolist()  # note: CPU-GPU sync point, once per evaluation
    results = dict(zip(names, values))
    if SUM in results:
        loss_sum, items = results.pop(SUM), results.pop(COUNT)
        if items <= 0:
            warnings.warn(f"validation_step's counts sum to {items:g} over the whole set: there is no item to average "
                          "the loss over, so val/loss is nan; check the mask that makes 'count'", stacklevel=3)
        means = {name: v / total for name, v in results.items()}
        means["loss"] = loss_sum / items if items > 0 else math.nan
        return dict(sorted(means.items()))
    return {name: v / total for name, v in results.items()}
