"""Launched by torchrun (two gloo ranks, two DataLoader workers each): streaming data.

* ``split``: an IterableDataset of 48 numbered items, split by the Trainer's rule; each rank prints
  the items it trained on in each of two epochs.
* ``uneven``: a dataset that splits itself (``shards_itself``) and gives rank 0 ten batches and rank
  1 six, with four micro-batches a step; each rank prints its steps and a digest of its weights
  (the last, partial window must be all-reduced like any other step).
* ``liar``: a dataset that says it splits itself but gives every rank the same items; each rank
  prints the error it got.
* ``empty``: a dataset that splits itself and gives rank 1 nothing; each rank prints the error.
* ``unequal``: a DataLoader with a length that differs between the ranks (5 batches and 2); each
  rank prints the error it got.
* ``stateful``: a StatefulDataLoader per rank, each shuffled by a generator of its own, stopped
  after step 5 (its final checkpoint) and resumed to step 12 by a new Trainer; each rank prints the
  samples it had read when the first resumed micro-batch started, whether the items it trained on
  after the resume are those the uninterrupted run trained on after step 5, and whether the
  weights are the uninterrupted run's.
"""

import hashlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from trainer import Callback, Trainer
from trainer.checkpoint import list_checkpoints
from lines import say


class Numbered(IterableDataset):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(torch.arange(self.n, dtype=torch.float32))


class OwnShare(IterableDataset):
    """Splits itself by worker, and by rank unless ``same_on_every_rank``."""

    shards_itself = True

    def __init__(self, batches_by_rank, batch_size, same_on_every_rank=False):
        self.batches_by_rank, self.batch_size, self.same = batches_by_rank, batch_size, same_on_every_rank

    def __iter__(self):
        rank = 0 if self.same else dist.get_rank()
        info = get_worker_info()
        items = range(1000 * rank, 1000 * rank + self.batches_by_rank[rank] * self.batch_size)
        return iter(torch.tensor(float(i)) for i in items[info.id :: info.num_workers])


class Squares(Trainer):
    def training_step(self, batch):
        return self.model(batch.unsqueeze(-1) / 1000).pow(2).mean()


class Seen(Callback):
    """The items each epoch trained on (the sanity pass's batch is not one of them)."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, batch):
        self.seen.setdefault(trainer.epoch, []).extend(int(v) for v in batch.tolist())


def fit(data, **config):
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    seen = Seen()
    trainer = Squares(model, torch.optim.SGD(model.parameters(), lr=0.1), data, callbacks=[seen],
                      config={"batch_size": 3, "num_workers": 2, "progress": "off", "log_every_n_steps": 1,
                              "eval_every_n_epochs": None, **config})
    trainer.seen = seen.seen
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


class Counting(torch.utils.data.Dataset):
    reads = 0

    def __init__(self, rank):
        self.items = torch.arange(24, dtype=torch.float32) + 100 * rank

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        Counting.reads += 1
        return self.items[i]


class Reads(Callback):
    def __init__(self):
        self.at_start = []

    def on_train_batch_start(self, trainer, batch):
        self.at_start.append(Counting.reads)


def stateful(rank, run_dir, steps, resume_from=None):
    from torchdata.stateful_dataloader import StatefulDataLoader

    loader = StatefulDataLoader(Counting(rank), batch_size=3, shuffle=True,
                                generator=torch.Generator().manual_seed(rank))  # 8 batches an epoch, its own order
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    seen, reads = Seen(), Reads()
    trainer = Squares(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, callbacks=[seen, reads],
                      run_dir=run_dir, config={"max_steps": steps, "progress": "off", "log_every_n_steps": 1,
                                               "eval_every_n_epochs": None})
    Counting.reads = 0
    try:
        trainer.fit(resume_from=resume_from)
    finally:
        trainer.close()
    items = [i for epoch in sorted(seen.seen) for i in seen.seen[epoch]]
    return items, reads.at_start, [p.detach().clone() for p in trainer.module.parameters()]


def main():
    dist.init_process_group("gloo")  # the script's own group: several Trainers share it
    rank = dist.get_rank()
    out = Path(sys.argv[1])

    whole, _, weights = stateful(rank, out / "whole", 12)
    stateful(rank, out / "stopped", 5)
    checkpoint = list_checkpoints(out / "stopped" / "checkpoints")[-1]
    resumed, reads, resumed_weights = stateful(rank, out / "stopped", 12, resume_from=checkpoint)
    say(f"stateful rank {rank}: reads at the first batches {reads[:2]} same items {resumed == whole[5 * 3:]} "
        f"same weights {all(torch.equal(a, b) for a, b in zip(weights, resumed_weights))}")

    t = fit(Numbered(48), max_epochs=2)
    for epoch, items in sorted(t.seen.items()):
        say(f"split rank {rank} epoch {epoch}: {' '.join(map(str, items))}")

    t = fit(OwnShare({0: 10, 1: 6}, batch_size=3), max_epochs=2, grad_accum_steps=4)
    digest = hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in t.module.parameters())).hexdigest()[:12]
    say(f"uneven rank {rank}: steps {t.global_step} batches {len(t.seen[0])} {len(t.seen[1])} weights {digest}")

    try:
        fit(OwnShare({0: 4, 1: 4}, batch_size=3, same_on_every_rank=True), max_epochs=1)
        say(f"liar rank {rank}: no error")
    except Exception as exc:
        say(f"liar rank {rank}: {type(exc).__name__}: {exc}")
    try:
        fit(OwnShare({0: 4, 1: 0}, batch_size=3), max_epochs=1)
        say(f"empty rank {rank}: no error")
    except Exception as exc:
        say(f"empty rank {rank}: {type(exc).__name__}: {exc}")
    try:
        items = torch.arange(20.0 if rank == 0 else 8.0)
        fit(torch.utils.data.DataLoader(items, batch_size=4), max_epochs=1, num_workers=0)
        say(f"unequal rank {rank}: no error")
    except Exception as exc:
        say(f"unequal rank {rank}: {type(exc).__name__}: {exc}")
    dist.barrier()  # every rank meets before any leaves: a rank that left first could abort a peer
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
