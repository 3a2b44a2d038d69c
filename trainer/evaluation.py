"""One pass of ``validation_step`` over a data source: metrics averaged over samples, exact over
ranks (sums and counts, not a mean of means), one host read per evaluation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from trainer import distributed
from trainer.data import batch_size_of, describe, to_device


def evaluate(step: Callable[[Any], dict[str, torch.Tensor]], batches: Any, device: torch.device,
             dtype: torch.dtype | None = None) -> dict[str, float]:
    """``{name: mean over samples}`` of ``step``'s per-batch means. ``batches`` yields ``(batch,
    counted)`` pairs (an uncounted batch keeps ranks in lockstep, see ``strategy.FSDP``); ``dtype``
    (bf16-true) is what their floating-point tensors become. The caller sets eval mode, no_grad and
    autocast."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for batch, counted in batches:
        batch = to_device(batch, device, device.type == "cuda", dtype)
        out = step(batch)
        if not isinstance(out, dict):
            raise TypeError(f"validation_step must return a dict of metric tensors, got {describe(out)}")
        if not counted:
            continue
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
    return {name: v / total for name, v in zip(names, values)}
