"""Streaming data: an IterableDataset split over ranks and DataLoader workers by one rule, a dataset
that says it splits itself checked at its first batches, ranks whose streams end at different
lengths ending together under torchrun, and each rank's stateful loader resumed from its own state."""

import re
import sys

import pytest
import torch
from torch.utils.data import IterableDataset

from helpers import PROJECT, run_or_stacks
from trainer.data.sources import DataError, make_source, SplitStream



class Numbered(IterableDataset):
    def __init__(self, n, splits=None):
        self.n = n
        if splits is not None:
            self.shards_itself = splits

    def __iter__(self):
        return iter(torch.arange(self.n))


def items(source, epoch=0):
    return [int(v) for batch in source.epoch(epoch, 0) for v in batch]


def source(data, num_workers=0, rank=0, world_size=1, stream_split="trainer"):
    return make_source(data, batch_size=2, num_workers=num_workers, seed=0, shuffle=True, device=torch.device("cpu"),
                       rank=rank, world_size=world_size, pad=False, stream_split=stream_split)


def test_item_i_goes_to_global_worker_i_mod_the_workers_of_every_rank_rank_major():
    # Without workers each rank is one worker: rank r of 3 takes items r, r+3, ...
    assert [list(SplitStream(Numbered(10), rank, 3)) for rank in range(3)] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    # Two workers on rank 1 of 2: global workers 2 and 3 of 4; the DataLoader takes their batches in turn.
    assert sorted(items(source(Numbered(16), num_workers=2, rank=1, world_size=2))) == [2, 3, 6, 7, 10, 11, 14, 15]


def test_one_process_with_workers_reads_every_item_once():
    assert sorted(items(source(Numbered(13), num_workers=2))) == list(range(13))


def test_a_dataset_that_splits_itself_is_left_to_it_and_its_workers_checked():
    # One process, no workers: nothing to split, nothing it could duplicate.
    assert items(source(Numbered(5, splits=True))) == [0, 1, 2, 3, 4]
    assert items(source(Numbered(5), stream_split="dataset")) == [0, 1, 2, 3, 4]
    # With two workers a dataset that does not read get_worker_info() is read whole by each.
    with pytest.raises(DataError, match=r"Numbered says it splits itself .* DataLoader workers 0 and 1 delivered "
                                        r"the same first batch"):
        items(source(Numbered(8, splits=True), num_workers=2))
    # The dataset's own attribute wins over the setting.
    assert sorted(items(source(Numbered(8, splits=False), num_workers=2, stream_split="dataset"))) == list(range(8))


@pytest.mark.distributed
def test_two_ranks_with_two_workers_each_see_every_item_once_and_uneven_streams_end_together(tmp_path):
    pytest.importorskip("torchdata")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(PROJECT / "streams_script.py"), str(tmp_path)]
    proc = run_or_stacks(cmd, timeout=240)  # a hang fails here, with every process's stacks
    assert proc.returncode == 0, proc.stderr[-3000:]
    # (the two ranks share stdout: each line is written whole, in any order)
    split = dict(((int(r), int(e)), list(map(int, s.split())))
                 for r, e, s in re.findall(r"split rank (\d) epoch (\d): ([\d ]+)", proc.stdout))
    assert sorted(split) == [(0, 0), (0, 1), (1, 0), (1, 1)], proc.stdout
    for epoch in (0, 1):
        assert sorted(split[0, epoch] + split[1, epoch]) == list(range(48))  # every item once, on one rank
        assert {i % 4 for i in split[0, epoch]} == {0, 1} and {i % 4 for i in split[1, epoch]} == {2, 3}  # rank-major
    # Rank 0's stream holds 10 batches, rank 1's 6: both end each epoch after 6 micro-batches (18 items), the
    # sixth taking the step of its partial window (2 steps an epoch of 4 micro-batches each), all-reduced on both.
    uneven = re.findall(r"uneven rank (\d): steps (\d+) batches (\d+) (\d+) weights (\w+)", proc.stdout)
    assert sorted(u[:4] for u in uneven) == [("0", "4", "18", "18"), ("1", "4", "18", "18")], proc.stdout
    assert uneven[0][4] == uneven[1][4]
    # Rank 0, whose stream was longer, says once per run that it left the rest unread (the uneven run's two
    # epochs, then the run whose rank 1 has nothing); rank 1 has nothing to say.
    assert proc.stderr.count("rank 0: another rank's training stream ended first in epoch 0") == 2, proc.stderr
    assert "rank 1: another rank's training stream" not in proc.stderr
    # Each rank's StatefulDataLoader state came back to that rank (their orders differ): nothing was read
    # to get back, and the items and weights after the resume are the uninterrupted run's.
    for rank in (0, 1):
        expected = f"stateful rank {rank}: reads at the first batches [3, 6] same items True same weights True"
        assert expected in proc.stdout, proc.stdout
    for rank in (0, 1):
        assert re.search(rf"liar rank {rank}: DataError: the OwnShare says it splits itself .* ranks 0 and 1 read "
                         "the same first batch", proc.stdout), proc.stdout
        assert (f"empty rank {rank}: DataError: epoch 0 of the training stream yielded no batch on at least one of "
                "the 2 ranks") in proc.stdout, proc.stdout
        assert (f"unequal rank {rank}: DataError: the training data gives the ranks different numbers of batches per "
                "epoch (rank 0: 5, rank 1: 2), so they would not step together") in proc.stdout, proc.stdout
