"""Launched by torchrun (two gloo ranks): summed losses over padded sequences under DDP and FSDP.

Eight sequences with 1, 2, 3, 4, 5, 6, 7 and 30 valid tokens make one optimizer step (two ranks,
two micro-batches of two): however they are dealt out, the ranks and the micro-batches hold
different numbers of valid tokens. For each strategy, a run whose loss_fn returns the sum and the
count, and the same run with per-micro-batch mean losses, each print one line per rank: whether
the first step's gradients (as the hooks see them) match one process's gradient of the per-token
mean over all eight sequences, the logged train/loss and val/loss against that mean, and the
scalar all-reduces the run made.
"""

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from trainer import Callback, Trainer
from trainer.losses import summed_cross_entropy
from lines import say

VOCAB, LENGTH, IGNORE = 11, 32, -100
VALID = [1, 2, 3, 4, 5, 6, 7, 30]


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))  # FSDP units
        self.head = nn.Linear(16, VOCAB)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h)


def mean_ce(logits, y):
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)


class FirstGrads(Callback):
    def __init__(self):
        self.grads = None

    def on_after_backward(self, trainer):
        if self.grads is None:  # whole gradients (a gather under FSDP, on every rank)
            self.grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
                          for n, p in trainer.module.named_parameters()}


def main() -> None:
    dist.init_process_group("gloo")  # the script's own group: several Trainers share it
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (len(VALID), LENGTH), generator=g)
    y = torch.randint(0, VOCAB, (len(VALID), LENGTH), generator=g)
    for row, n in enumerate(VALID):
        y[row, n:] = IGNORE
    torch.manual_seed(0)
    initial = TinyLM()
    reference = copy.deepcopy(initial)
    loss = F.cross_entropy(reference(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
    mean = loss / (y != IGNORE).sum()
    mean.backward()
    expected = {n: p.grad for n, p in reference.named_parameters()}

    scalar_reduces = []
    all_reduce = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        if tensor.ndim == 0:
            scalar_reduces.append(1)
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting
    for strategy in ("ddp", "fsdp"):
        for kind, loss_fn in (("summed", summed_cross_entropy), ("mean", mean_ce)):
            model = copy.deepcopy(initial)
            seen = FirstGrads()
            # lr 0: the weights stay the initial ones, so the logged losses are those of the reference.
            trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), (x, y), val_data=(x, y),
                              loss_fn=loss_fn, callbacks=[seen],
                              config={"strategy": strategy, "batch_size": 2, "grad_accum_steps": 2, "max_steps": 3,
                                      "log_every_n_steps": 3, "progress": "off", "eval_every_n_epochs": None})
            before = len(scalar_reduces)
            trainer.fit()
            reduces = len(scalar_reduces) - before
            match = all(torch.allclose(seen.grads[n], grad, rtol=1e-5, atol=1e-7) for n, grad in expected.items())
            train, val = trainer.history[0]["train/loss"], trainer.history[-1]["val/loss"]
            trainer.close()
            say(f"rank {rank} {strategy} {kind}: grads_match={match} train_loss={train:.7f} val_loss={val:.7f} "
                f"mean={mean.item():.7f} scalar_all_reduces={reduces}")
    dist.all_reduce = all_reduce
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
