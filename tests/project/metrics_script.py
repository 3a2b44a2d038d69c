"""A user's script, launched by torchrun, whose validation returns torchmetrics objects.

The validation sets (37 and 23 samples) do not divide evenly over two ranks; batches of 6 give one
rank a batch more than the other. Writes report-<rank>.json in the working directory with what each evaluation returned:
under DDP two evaluations of different sets and the first again; under FSDP (whose rank with fewer
batches runs its last one again, uncounted, to keep in step) the first set; a set of one sample
with the metric passed to the Trainer (held by the rank without a batch), and with it only returned
by validation_step (refused, on every rank).
"""

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAUROC, MulticlassConfusionMatrix, MulticlassF1Score

from trainer import Trainer


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, torch.randint(0, 3, (n,), generator=g)


SETS = {"first": (37, 1), "second": (23, 2)}


class Scored(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.f1 = MulticlassF1Score(num_classes=3, average="macro")
        self.auroc = MulticlassAUROC(num_classes=3)
        self.confmat = MulticlassConfusionMatrix(num_classes=3)

    def validation_step(self, batch):
        x, y = batch
        logits = self.model(x)
        for metric in (self.f1, self.auroc, self.confmat):
            metric.update(logits, y)
        return {"f1": self.f1, "auroc": self.auroc, "confmat": self.confmat, "loss": F.cross_entropy(logits, y)}


def build(cls, strategy: str, **kwargs) -> Trainer:
    net = model()
    return cls(net, torch.optim.SGD(net.parameters(), lr=0.1), data(32, 0), val_data=data(*SETS["first"]),
               loss_fn=F.cross_entropy, config={"batch_size": 6, "progress": "off", "strategy": strategy}, **kwargs)


def main() -> None:
    ddp = build(Scored, "ddp")
    ddp.sanity_check()  # leaves nothing in the metrics
    report = {"rank": ddp.layout.rank, "ddp": [ddp.evaluate(), ddp.evaluate(data(*SETS["second"]), prefix="second"),
                                               ddp.evaluate()]}
    fsdp = build(Scored, "fsdp")
    report["fsdp"] = fsdp.evaluate()
    held = build(Trainer, "ddp", metrics={"f1": MulticlassF1Score(num_classes=3, average="macro")})
    report["one_sample"] = held.evaluate(data(1, 3), prefix="one")
    fresh = build(Scored, "ddp")
    try:
        fresh.evaluate(data(1, 3), prefix="one")
    except ValueError as exc:
        report["refused"] = str(exc)
    # (a file per rank: the ranks share stdout, where their lines could interleave)
    Path(f"report-{ddp.layout.rank}.json").write_text(json.dumps(report))
    for t in (fsdp, held, fresh, ddp):  # the first one built joined the process group: it leaves it last
        t.close()


if __name__ == "__main__":
    main()
