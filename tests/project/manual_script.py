"""Two optimizers stepped by a Trainer subclass's own ``manual_step``, as a user's script: under
torchrun (two gloo ranks, ``BATCH`` each) or as one process (twice the batch). Rank 0 saves the
final weights, the optimizers' states and the metric history to ``OUT/<name>.pt``.

Usage: manual_script.py OUT NAME BATCH
"""

import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from trainer import Trainer
from lines import say


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.b = nn.Linear(4, 1)


class Alternating(Trainer):
    def configure_optimizers(self):
        return [torch.optim.Adam(self.module.a.parameters(), lr=1e-2),
                torch.optim.SGD(self.module.b.parameters(), lr=1e-2, momentum=0.9)]

    def manual_step(self, batch):
        x, y = batch
        opt_a, opt_b = self.optimizers
        a_loss = F.mse_loss(self.model.a(x), y)
        self.manual_backward(a_loss, opt_a)
        self.optimizer_step(opt_a)
        b_loss = F.mse_loss(self.model.b(x) * self.model.a(x), y)
        self.manual_backward(b_loss, opt_b)
        self.optimizer_step(opt_b)
        return {"a_loss": a_loss, "b_loss": b_loss}


def main(out: Path, name: str, batch: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(64, 1, generator=g)
    t = Alternating(Pair, None, (x, y), config={
        "max_steps": 6, "batch_size": batch, "grad_accum_steps": 2, "clip_grad_norm": 1.0, "log_every_n_steps": 3,
        "progress": "off", "eval_every_n_epochs": None, "seed": 1})
    t.fit()
    if t.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"model": t.module.state_dict(), "optimizers": [o.state_dict() for o in t.optimizers],
                    "history": t.history, "world_size": t.layout.world_size, "step": t.global_step}, out / f"{name}.pt")
    if t.layout.world_size > 1:  # strategy: fsdp is refused before anything is sharded
        try:
            Alternating(Pair, None, (x, y), config={"strategy": "fsdp", "progress": "off"})
        except ValueError as exc:
            say(f"rank {t.layout.rank} fsdp refused: {exc}")
    t.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
