"""Launched by torchrun: after a short DDP fit, predictions and a test report over a set of 37
samples, which two ranks cannot split evenly, checked on rank 0 against one process's answers
(the plain model on the whole set). Prints one line per check; ``OUT`` is a folder for files."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from trainer import Trainer
from lines import say


class Rows(Dataset):
    """A map-style dataset that is not a TensorDataset: the Trainer's DataLoader path."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Both(Trainer):
    def predict_step(self, batch):
        logits = self.model(batch[0])
        return {"logits": logits, "label": logits.argmax(dim=-1)}


def main(out: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(37, 8)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 2))
    trainer = Both(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), loss_fn=F.cross_entropy,
                   config={"max_steps": 3, "batch_size": 4, "progress": "off"})
    trainer.fit()
    rank = trainer.layout.rank
    with torch.no_grad():
        model.eval()
        expected = model(x)
        loss, acc = F.cross_entropy(expected, y).item(), (expected.argmax(-1) == y).float().mean().item()
        model.train()
    # A user's DataLoader whose DistributedSampler pads rank 1's share with sample 0 again.
    padded = DataLoader(TensorDataset(x, y), batch_size=5,
                        sampler=DistributedSampler(TensorDataset(x, y), shuffle=True, seed=3))
    for name, data in (("tensors", (x, y)), ("dataset", Rows(x, y)), ("sampler", padded)):
        got = trainer.predict(data)
        if rank == 0:
            same = torch.allclose(got["logits"], expected, atol=1e-6) and torch.equal(got["label"], expected.argmax(-1))
            say(f"rank 0: {name} rows={len(got['logits'])} same={same}")
        else:
            say(f"rank 1: {name} got={got}")
    written = trainer.predict(Rows(x, y), out=Path(out) / "preds.safetensors")
    if rank == 0:
        stored = load_file(written.path)
        say(f"rank 0: file rows={written.samples} same={torch.allclose(stored['logits'], expected, atol=1e-6)}")
    records = len(trainer.history)
    metrics = trainer.test(Rows(x, y))
    if rank == 0:
        same = abs(metrics["test/loss"] - loss) < 1e-5 and abs(metrics["test/acc"] - acc) < 1e-6
        say(f"rank 0: test same={same} history kept={len(trainer.history) == records}")
    trainer.close()
    assert not dist.is_initialized()


if __name__ == "__main__":
    main(*sys.argv[1:])
