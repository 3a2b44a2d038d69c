"""Losses summed over items: the mean over every token of a step, whatever the padding.

A step that returns a mean loss per micro-batch, divided by ``grad_accum_steps``, weighs every
micro-batch the same: with padding or packed sequences, a token of a short micro-batch then
counts more than one of a long one, and the ranks' shares are weighed the same way. A step that
returns ``{"loss_sum": <sum over its items>, "count": <number of items>}`` instead lets the Trainer
make each optimizer step's gradient exactly that of the mean over every item of the step, over
its micro-batches and ranks (see ``Trainer._step``), and log and validate per-item means.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from trainer.data.batches import describe

SUM, COUNT = "loss_sum", "count"
EXAMPLE = "{'loss_sum': F.cross_entropy(logits, labels, reduction='sum'), 'count': (labels != -100).sum()}"


def summed(outputs: dict[str, Any], where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, count)`` of a step's output that holds ``"loss_sum"``, checked: a wrong one is
    one ``TypeError`` that names what is wrong and shows the form. Reads metadata only (no host sync)."""
    wrong = problem(outputs)
    if wrong is not None:
        raise TypeError(f"{where} returned {wrong}: return {EXAMPLE}")
    return outputs[SUM].reshape(()), outputs[COUNT].reshape(())


def problem(outputs: dict[str, Any]) -> str | None:
    """What is wrong with an output that holds ``"loss_sum"``, or ``None``."""
    loss_sum, count = outputs[SUM], outputs.get(COUNT)
    if "loss" in outputs:
        return "both 'loss' and 'loss_sum' (return a mean 'loss', or 'loss_sum' with 'count')"
    if count is None:
        return "'loss_sum' without 'count', the number of items it sums over"
    if not isinstance(loss_sum, torch.Tensor) or loss_sum.numel() != 1 or not loss_sum.is_floating_point():
        return f"'loss_sum' as {_what(loss_sum)}, not a floating-point scalar Tensor"
    if not isinstance(count, torch.Tensor) or count.numel() != 1 or count.dtype == torch.bool or count.is_complex():
        # A Python number would be copied to the device every micro-batch; a count computed from
        # the batch (a mask's sum) is on the device already.
        return f"'count' as {_what(count)}, not a scalar Tensor of a number"
    return None


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """Cross-entropy summed over every target that is not ``ignore_index``, with their number:
    a ``loss_fn`` for the default steps (``loss: trainer.losses.summed_cross_entropy``) that makes
    ``train/loss``, ``val/loss`` and the gradients per-token means. ``logits`` ``(..., classes)``,
    ``targets`` ``(...)``."""
    flat = targets.reshape(-1)
    return {
        SUM: F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat, ignore_index=ignore_index, reduction="sum"),
        COUNT: (flat != ignore_index).sum(),
    }


def _what(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} Tensor of shape {tuple(value.shape)}"
    return f"{describe(value)} ({value!r:.40})"
