"""trainer/data.py: moving batches, and the seeded, resumable, rank-split training order."""

import dataclasses
import random
from fractions import Fraction
import warnings
from collections import OrderedDict, defaultdict, namedtuple

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, TensorDataset, get_worker_info

from trainer.data.batches import batch_size_of, to_device

from trainer.data.sources import (epoch_permutation, IterableSource, last_step, LoaderSource, make_source,
                                  ResumableSampler, TensorSource)

CPU = torch.device("cpu")
META = torch.device("meta")  # a device every machine has: a moved tensor says where it went


def source(data, batch_size=3, seed=0, shuffle=True, num_workers=0, rank=0, world_size=1, pad=True):
    return make_source(data, batch_size=batch_size, num_workers=num_workers, seed=seed, shuffle=shuffle,
                       device=CPU, rank=rank, world_size=world_size, pad=pad)


def plain(batches):
    """Batches as nested lists, comparable with ==."""
    out = []
    for b in batches:
        if isinstance(b, dict):
            out.append({k: v.tolist() for k, v in b.items()})
        elif isinstance(b, (list, tuple)):
            out.append([v.tolist() for v in b])
        else:
            out.append(b.tolist())
    return out


class Pairs(Dataset):
    """A map-style Dataset over tensors, not a TensorDataset: goes through the DataLoader."""

    def __init__(self, *tensors):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors[0])

    def __getitem__(self, i):
        return tuple(t[i] for t in self.tensors)


class Stream(IterableDataset):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(torch.arange(self.n))


class OneShotFree:
    """An iterable that is neither a Sequence nor a DataLoader: resumable only by reading."""

    def __init__(self, items):
        self.items = items
        self.iterations = 0

    def __iter__(self):
        self.iterations += 1
        return iter(self.items)


def xy(n=10):
    return torch.arange(n, dtype=torch.float32), torch.arange(n) * 10


# to_device


Pair = namedtuple("Pair", "x y")


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    mask: list
    name: str = "b"


def test_to_device_moves_tensors_inside_every_container_and_keeps_the_types():
    t = torch.ones(2)
    batch = {
        "tuple": (t, 1),
        "list": [t, [t, "s"]],
        "pair": Pair(t, y=(t,)),
        "ordered": OrderedDict(a=t),
        "dc": Batch(t, [t], name="n"),
        "none": None,
    }
    moved = to_device(batch, META)
    assert moved["tuple"][0].device == META and moved["tuple"][1] == 1 and type(moved["tuple"]) is tuple
    assert moved["list"][0].device == META and moved["list"][1][0].device == META and moved["list"][1][1] == "s"
    assert type(moved["pair"]) is Pair and moved["pair"].x.device == META and moved["pair"].y[0].device == META
    assert type(moved["ordered"]) is OrderedDict and moved["ordered"]["a"].device == META
    assert type(moved["dc"]) is Batch and moved["dc"].x.device == META and moved["dc"].mask[0].device == META
    assert moved["dc"].name == "n"
    assert moved["none"] is None
    assert batch["dc"].x.device == CPU  # the input is not modified


def test_to_device_leaves_a_tensor_already_there_untouched():
    t = torch.ones(2)
    assert to_device(t, CPU) is t
    assert to_device([t], CPU)[0] is t


def test_to_device_with_a_dtype_converts_floating_point_tensors_only():
    batch = {"x": torch.ones(2), "x64": [torch.ones(2, dtype=torch.float64)], "ids": torch.arange(3),
             "mask": torch.ones(2, dtype=torch.bool), "dc": Batch(torch.ones(1), [torch.arange(2)], name="n")}
    moved = to_device(batch, CPU, dtype=torch.bfloat16)
    assert moved["x"].dtype == moved["x64"][0].dtype == moved["dc"].x.dtype == torch.bfloat16
    assert moved["ids"] is batch["ids"] and moved["mask"] is batch["mask"]  # token ids and masks as they were
    assert moved["dc"].mask[0] is batch["dc"].mask[0]
    assert batch["x"].dtype == torch.float32  # the input is not modified


def test_to_device_moves_a_defaultdict_and_keeps_its_factory():
    batch = defaultdict(list, x=torch.ones(2))
    moved = to_device(batch, META)
    assert moved["x"].device == META
    assert type(moved) is defaultdict and moved.default_factory is list
    assert batch["x"].device == CPU  # the input is not modified


class Named(dict):
    """A dict subclass whose constructor does not take key-value pairs."""

    def __init__(self, name):
        super().__init__()
        self.name = name


class ReadOnly(dict):
    def __setitem__(self, key, value):
        raise TypeError("read-only")

    def update(self, *args, **kwargs):
        raise TypeError("read-only")


def test_to_device_keeps_a_dict_subclass_with_another_constructor():
    batch = Named("train")
    dict.__setitem__(batch, "x", torch.ones(2))
    moved = to_device(batch, META)
    assert type(moved) is Named and moved.name == "train"
    assert moved["x"].device == META
    assert batch["x"].device == CPU


def test_to_device_makes_a_plain_dict_of_a_subclass_it_cannot_write_to():
    batch = ReadOnly()
    dict.__setitem__(batch, "x", torch.ones(2))
    moved = to_device(batch, META)
    assert type(moved) is dict and moved["x"].device == META


# batch_size_of


@pytest.mark.parametrize("batch, expected", [
    (torch.zeros(5, 3), 5),
    (torch.tensor(2.0), 1),  # a scalar is one sample
    ((torch.zeros(4), torch.zeros(9)), 4),  # the first tensor decides
    ([torch.zeros(6, 2)], 6),
    ({"x": torch.zeros(7), "y": torch.zeros(1)}, 7),
    (Pair(torch.zeros(2), torch.zeros(3)), 2),
    (Batch(torch.zeros(8), []), 8),
    (([torch.zeros(3)], torch.zeros(5)), 3),  # nested
    ("text", 1),  # no tensor at all
    ((), 1),
    ({}, 1),
])
def test_batch_size_of(batch, expected):
    assert batch_size_of(batch) == expected


@pytest.mark.parametrize("batch", [
    {"ids": ["a", "b", "c"], "x": torch.zeros(3, 2)},
    (0, torch.zeros(3)),
    {"name": "b", "x": torch.zeros(3)},
    {"meta": {"ids": [1, 2], "lang": "en"}, "x": (torch.zeros(3), torch.zeros(9))},  # depth first
    Batch(x=[], mask=[torch.zeros(3)]),
])
def test_batch_size_of_skips_values_that_are_not_tensors(batch):
    assert batch_size_of(batch) == 3


# make_source: the kind of source for each kind of data


def test_tensor_data_becomes_index_slices():
    x, y = xy(7)
    for data in (TensorDataset(x, y), (x, y)):
        src = source(data, batch_size=3, shuffle=False)
        assert isinstance(src, TensorSource)
        assert len(src) == 3
        assert plain(src.epoch(0, 0)) == [[[0.0, 1.0, 2.0], [0, 10, 20]], [[3.0, 4.0, 5.0], [30, 40, 50]], [[6.0], [60]]]


def test_a_dict_of_tensors_yields_dicts_with_the_same_keys():
    x, y = xy(4)
    src = source({"inp": x, "target": y}, batch_size=3, shuffle=False)
    assert isinstance(src, TensorSource)
    assert plain(src.epoch(0, 0)) == [{"inp": [0.0, 1.0, 2.0], "target": [0, 10, 20]}, {"inp": [3.0], "target": [30]}]


def test_tensor_data_moves_to_the_device_once():
    x, y = xy(4)
    src = make_source((x, y), batch_size=3, num_workers=0, seed=0, shuffle=True, device=META)
    assert all(t.device == META for t in src.tensors)
    assert all(t.device == META for b in src.epoch(0, 0) for t in b)


def test_tensors_of_different_lengths_are_rejected():
    with pytest.raises(ValueError, match=r"different lengths \[3, 4\]"):
        source((torch.zeros(4), torch.zeros(3)))


def test_a_dataset_goes_through_the_trainers_dataloader():
    x, y = xy(5)
    src = source(Pairs(x, y), batch_size=2, shuffle=False)
    assert isinstance(src, LoaderSource)
    assert len(src) == 3
    assert plain(src.epoch(0, 0)) == [[[0.0, 1.0], [0, 10]], [[2.0, 3.0], [20, 30]], [[4.0], [40]]]


def test_tensor_data_with_workers_goes_through_the_dataloader():
    assert isinstance(source(TensorDataset(*xy(4)), num_workers=2), LoaderSource)


def test_a_users_dataloader_is_iterated_as_given():
    loader = DataLoader(TensorDataset(*xy(5)), batch_size=2)
    src = source(loader)
    assert isinstance(src, IterableSource)
    assert not src.exact_resume
    assert src.epoch(0, 0) is loader
    assert len(src) == 3


def test_a_list_of_batches_is_indexed():
    batches = [(torch.full((2,), float(i)),) for i in range(4)]
    src = source(batches)
    assert isinstance(src, IterableSource)
    assert src.exact_resume
    assert len(src) == 4
    assert list(src.epoch(0, 0)) == batches


def test_an_iterable_dataset_is_batched_by_a_dataloader():
    src = source(Stream(5), batch_size=2)
    assert isinstance(src, IterableSource)
    assert plain(src.epoch(0, 0)) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("data", ["a string", b"bytes", torch.zeros(3), 42])
def test_data_that_is_no_source_is_rejected(data):
    with pytest.raises(TypeError, match="must be a torch Dataset, a DataLoader or an iterable of batches; got"):
        source(data)


# The seeded order


def test_epoch_permutation_is_a_permutation_fixed_by_seed_and_epoch():
    order = epoch_permutation(20, seed=3, epoch=2, shuffle=True)
    assert sorted(order.tolist()) == list(range(20))
    assert torch.equal(order, epoch_permutation(20, seed=3, epoch=2, shuffle=True))
    assert not torch.equal(order, epoch_permutation(20, seed=3, epoch=3, shuffle=True))
    assert epoch_permutation(5, seed=3, epoch=2, shuffle=False).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("make", [lambda x, y: (x, y), lambda x, y: Pairs(x, y)], ids=["tensors", "dataset"])
def test_the_order_repeats_for_the_same_seed_and_epoch_and_changes_across_epochs(make):
    x, y = xy(12)
    first = plain(source(make(x, y), seed=5).epoch(1, 0))
    again = plain(source(make(x, y), seed=5).epoch(1, 0))  # a fresh source: nothing carried over
    next_epoch = plain(source(make(x, y), seed=5).epoch(2, 0))
    other_seed = plain(source(make(x, y), seed=6).epoch(2, 0))
    assert first == again
    assert first != next_epoch
    assert next_epoch != other_seed
    assert sorted(v for b in first for v in b[0]) == [float(i) for i in range(12)]  # every sample once
    # the same source, asked for the epoch again after another one, repeats it too
    src = source(make(x, y), seed=5)
    assert plain(src.epoch(1, 0)) == first
    plain(src.epoch(2, 0))
    assert plain(src.epoch(1, 0)) == first


def test_the_dataloader_path_and_the_tensor_path_give_the_same_batches():
    x, y = xy(11)
    for kw in ({}, {"world_size": 2, "rank": 1}, {"world_size": 3, "rank": 2, "pad": False}):
        for epoch, skip in ((0, 0), (1, 0), (2, 2)):
            tensors = plain(source((x, y), seed=9, **kw).epoch(epoch, skip))
            loaded = plain(source(Pairs(x, y), seed=9, **kw).epoch(epoch, skip))
            assert tensors == loaded, (kw, epoch, skip)


# Resuming inside an epoch


@pytest.mark.parametrize("make", [lambda x, y: (x, y), lambda x, y: {"x": x, "y": y}, lambda x, y: Pairs(x, y)],
                         ids=["tensors", "dict", "dataset"])
@pytest.mark.parametrize("shard", [{}, {"rank": 1, "world_size": 2}, {"rank": 0, "world_size": 3, "pad": False}])
def test_resuming_yields_exactly_the_remaining_batches(make, shard):
    x, y = xy(11)
    src = source(make(x, y), batch_size=2, seed=1, **shard)
    for epoch in (0, 1):
        full = plain(src.epoch(epoch, 0))
        assert len(full) == len(src)
        for skip in range(len(full) + 1):
            assert plain(source(make(x, y), batch_size=2, seed=1, **shard).epoch(epoch, skip)) == full[skip:]


def test_resuming_a_list_of_batches_indexes_it_without_a_warning():
    batches = [(torch.full((1,), float(i)),) for i in range(5)]
    src = source(batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(src.epoch(0, 2)) == batches[2:]
        assert list(src.epoch(0, 5)) == []


def test_resuming_a_plain_iterable_reads_and_discards_and_warns_once():
    items = [torch.tensor([i]) for i in range(5)]
    data = OneShotFree(items)
    src = source(data)
    assert not src.exact_resume
    with pytest.warns(UserWarning, match=r"resuming inside epoch 0 of a OneShotFree .* discarding its batches 0-2 "
                                         r"\(3 batches\) to get back to batch 3. .*StatefulDataLoader"):
        assert list(src.epoch(0, 3)) == items[3:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once is enough
        assert list(src.epoch(1, 1)) == items[1:]
    assert data.iterations == 2


def test_a_distributed_sampler_in_a_users_dataloader_gets_the_epoch():
    sampler = DistributedSampler(TensorDataset(*xy(8)), num_replicas=2, rank=1, shuffle=True, seed=0)
    loader = DataLoader(TensorDataset(*xy(8)), batch_size=2, sampler=sampler)
    src = source(loader)
    first = plain(src.epoch(4, 0))
    assert sampler.epoch == 4
    assert plain(src.epoch(4, 0)) == first
    assert plain(src.epoch(5, 0)) != first
    assert sampler.epoch == 5


# Splitting across ranks


def rank_shares(n, world_size, pad, epoch=0, batch_size=3):
    x, y = xy(n)
    shares, lengths = [], []
    for rank in range(world_size):
        src = source((x, y), batch_size=batch_size, seed=2, rank=rank, world_size=world_size, pad=pad)
        batches = list(src.epoch(epoch, 0))
        lengths.append((len(src), len(batches)))
        shares.append([int(v) for b in batches for v in b[0].tolist()])
    return shares, lengths


@pytest.mark.parametrize("n", [10, 11])
def test_without_padding_the_ranks_shares_are_disjoint_and_cover_every_sample(n):
    for epoch in (0, 1):
        (a, b), lengths = rank_shares(n, 2, pad=False, epoch=epoch)
        assert not set(a) & set(b)
        assert sorted(a + b) == list(range(n))
        assert all(declared == yielded for declared, yielded in lengths)
    assert rank_shares(n, 2, pad=False, epoch=0)[0] != rank_shares(n, 2, pad=False, epoch=1)[0]


@pytest.mark.parametrize("n, world_size", [(10, 2), (11, 2), (10, 3), (4, 3)])
def test_with_padding_the_ranks_take_equal_shares_repeating_only_the_padding(n, world_size):
    shares, lengths = rank_shares(n, world_size, pad=True)
    share = -(-n // world_size)
    assert [len(s) for s in shares] == [share] * world_size  # equal steps on every rank
    assert len({declared for declared, _ in lengths}) == 1 and all(d == y for d, y in lengths)
    every = [i for s in shares for i in s]
    assert set(every) == set(range(n))  # every sample is seen
    assert len(every) - len(set(every)) == share * world_size - n  # only the padding repeats


def test_the_shares_interleave_one_order():
    """Rank r takes every world_size-th sample of the epoch's order, starting at r."""
    shares, _ = rank_shares(9, 3, pad=False)
    order = epoch_permutation(9, seed=2, epoch=0, shuffle=True).tolist()
    assert shares == [order[0::3], order[1::3], order[2::3]]


def test_sampler_length_matches_its_indices():
    for n, ws, pad in [(10, 3, True), (10, 3, False), (7, 2, False), (7, 1, True)]:
        for rank in range(ws):
            sampler = ResumableSampler(n, seed=0, rank=rank, world_size=ws, pad=pad)
            assert len(sampler) == len(list(sampler)), (n, ws, pad, rank)
            sampler.set_epoch(0, start=2)
            assert list(sampler) == ResumableSampler(n, seed=0, rank=rank, world_size=ws, pad=pad).indices().tolist()[2:]


@pytest.mark.parametrize("n, world_size", [(1, 3), (2, 5), (3, 8)])
def test_with_padding_every_rank_gets_a_share_even_with_fewer_samples_than_ranks(n, world_size):
    shares, lengths = rank_shares(n, world_size, pad=True)
    assert [len(s) for s in shares] == [1] * world_size
    assert all(declared == yielded for declared, yielded in lengths)
    order = epoch_permutation(n, seed=2, epoch=0, shuffle=True).tolist()
    assert [s[0] for s in shares] == [order[r % n] for r in range(world_size)]  # the order, repeated


# Worker seeding


class WorkerSeeds(Dataset):
    """Each sample reports the worker that read it and that worker's seeds."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        info = get_worker_info()
        return f"{info.id} {torch.initial_seed()} {random.random()!r} {np.random.rand()!r}"


def worker_seeds(src, epoch, skip=0):
    """{worker id: (torch seed, first python draw, first numpy draw)} from one epoch."""
    out = {}
    for (text,) in src.epoch(epoch, skip):
        worker, seed, py, npy = text.split()
        out.setdefault(int(worker), (int(seed), py, npy))
    return out


def test_workers_get_distinct_seeds_that_repeat_for_the_same_epoch():
    src = source(WorkerSeeds(), batch_size=1, num_workers=2, shuffle=False, seed=7)
    assert isinstance(src, LoaderSource)
    first = worker_seeds(src, 0)
    assert sorted(first) == [0, 1]
    (seed0, py0, np0), (seed1, py1, np1) = first[0], first[1]
    assert seed0 != seed1 and py0 != py1 and np0 != np1  # python and numpy seeded per worker too
    for seed, py, npy in first.values():  # both derived from the worker's torch seed
        assert py == repr(random.Random(seed % 2**32).random())
        assert npy == repr(np.random.RandomState(seed % 2**32).rand())
    later = worker_seeds(src, 1)
    assert {s for s, _, _ in later.values()}.isdisjoint({seed0, seed1})  # a new epoch, new seeds
    # epoch 0 again, on the same source after epoch 1: its seeds come back
    assert worker_seeds(src, 0) == first
    # resuming part-way into epoch 0 starts its workers with epoch 0's seeds
    resumed = worker_seeds(src, 0, skip=1)
    assert {w: s for w, (s, _, _) in resumed.items()} == {0: seed0, 1: seed1}
    other = worker_seeds(source(WorkerSeeds(), batch_size=1, num_workers=2, shuffle=False, seed=8), 0)
    assert {s for s, _, _ in other.values()}.isdisjoint({seed0, seed1})  # the run's seed decides


def test_an_evaluation_loader_whose_sampler_repeats_samples_is_named():
    """A DistributedSampler pads 5 samples to 6 for two ranks: validation would count one twice."""
    data = TensorDataset(torch.arange(5.0))
    padded = DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=0, shuffle=False))
    with pytest.warns(UserWarning, match=r"DistributedSampler repeats 1 sample\(s\).*Pass the Dataset itself"):
        make_source(padded, batch_size=2, num_workers=0, seed=0, shuffle=False, device=torch.device("cpu"), pad=False)
    exact = DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=0, shuffle=False, drop_last=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_source(exact, batch_size=2, num_workers=0, seed=0, shuffle=False, device=torch.device("cpu"), pad=False)
        make_source(padded, batch_size=2, num_workers=0, seed=0, shuffle=False, device=torch.device("cpu"))  # training


@pytest.mark.parametrize("n", [48, 45])
def test_the_first_samples_of_an_epoch_are_consumed_whatever_the_number_of_ranks(n):
    """Ranks take the permutation in turn, so k micro-batches of b on each of w ranks consume its first
    k*b*w samples on any w; a resume on w' ranks from there deals the rest out to them, each sample once
    (padding repeats a few on the last batch only, to give the ranks equal steps)."""
    order = epoch_permutation(n, seed=4, epoch=1, shuffle=True).tolist()
    for world, batch in ((1, 8), (2, 4), (3, 4), (4, 2)):
        shares = [ResumableSampler(n, seed=4, rank=r, world_size=world) for r in range(world)]
        for share in shares:
            share.set_epoch(1)
        for k in range(1, 3):
            consumed = [i for share in shares for i in share.indices()[:k * batch].tolist()]
            assert sorted(consumed) == sorted(order[:k * batch * world]), (world, k)
        for new_world in (1, 2, 3, 4):
            done = 24  # a multiple of every global batch here: a step boundary on both layouts
            rest = []
            for r in range(new_world):
                share = ResumableSampler(n, seed=4, rank=r, world_size=new_world)
                share.set_epoch(1, start=done // new_world)
                rest += share.indices().tolist()
            padding = len(rest) - (n - done)
            assert 0 <= padding < new_world and sorted(rest) == sorted(order[done:] + order[:padding]), new_world


@pytest.mark.parametrize("n", [96, 100])
def test_a_resume_on_another_layout_warns_exactly_when_an_epochs_last_step_differs(n):
    """Two epochs at a global batch of 16, resumed after step 3 in micro-batches of 8, two to a step.
    96 samples: every step is full and the weights end where the uninterrupted run's do. 100: the
    epoch's last step holds one micro-batch of 4, whose mean loss is halved for accumulation where
    the uninterrupted run takes it whole; the resume says so, and the weights part."""
    import torch.nn.functional as F

    from helpers import mlp, quiet
    from trainer import Trainer

    g = torch.Generator().manual_seed(1)
    data = (torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))

    def trainer(batch_size, accum, **config):
        model = mlp()
        return Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), data, loss_fn=F.cross_entropy,
                       config=quiet(batch_size=batch_size, grad_accum_steps=accum, seed=5, **config))

    whole = trainer(16, 1, max_epochs=2)
    whole.fit()
    first = trainer(16, 1, max_steps=3)
    first.fit()
    resumed = trainer(8, 2, max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.fit(resume_from=first.state_dict())
    said = [str(w.message) for w in caught if "last, short step" in str(w.message)]
    parted = not all(torch.allclose(a, b, rtol=1e-5, atol=1e-6)
                     for a, b in zip(whole.module.parameters(), resumed.module.parameters()))
    assert resumed.global_step == whole.global_step == (12 if n == 96 else 14)
    assert (len(said), parted) == ((0, False) if n == 96 else (1, True))
    if said:
        assert said[0].startswith("resumed with a global batch of 16 = batch_size 8 x grad_accum_steps 2 x 1 rank a "
                                  "run trained with 16 = batch_size 16 x grad_accum_steps 1 x 1 rank: its 100 samples")


def test_an_epochs_last_step_as_each_layout_takes_it():
    steps, weights = last_step(500, 8, 1, 2)  # two ranks of 8: 2 samples each, their means averaged
    assert steps == 32 and weights == {i: Fraction(1, 4) for i in range(496, 500)}
    assert last_step(500, 16, 1, 1) == (steps, weights)  # one micro-batch of 4: its mean
    assert last_step(500, 8, 2, 1) == (32, {i: Fraction(1, 8) for i in range(496, 500)})  # that mean halved
    assert last_step(512, 8, 2, 1) == last_step(512, 8, 1, 2)  # full steps: 1/16 each
    # 501 on two ranks: the last rank's share is padded with the permutation's first sample.
    assert last_step(501, 8, 1, 2) == (32, {496: Fraction(1, 6), 498: Fraction(1, 6), 500: Fraction(1, 6),
                                            497: Fraction(1, 6), 499: Fraction(1, 6), 0: Fraction(1, 6)})
    assert last_step(501, 16, 1, 1) == (32, {i: Fraction(1, 5) for i in range(496, 501)})
