import random

import numpy as np
import pytest
import torch

from trainer import Precision, resolve_device, seed_everything
from trainer.data.sources import LoaderSource


def test_cpu_and_auto_without_cuda():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_requested_without_cuda_says_so(spec):
    with pytest.raises(ValueError, match=f"device '{spec}' was requested but CUDA is not available.*device: cpu"):
        resolve_device(spec)


def test_cuda_index_beyond_the_devices_lists_what_exists(monkeypatch):
    # A mock only for what this machine cannot have: two GPUs.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"'cuda:7' was requested but this machine has 2 CUDA device\(s\): cuda:0, cuda:1"):
        resolve_device("cuda:7")


def test_unknown_spec():
    with pytest.raises(ValueError, match="'tpu'"):
        resolve_device("tpu")


def test_precision_objects():
    cpu = torch.device("cpu")
    assert not Precision("fp32", cpu).scaler.is_enabled()
    assert not Precision("bf16", cpu).scaler.is_enabled()
    assert Precision("fp16", cpu).scaler.is_enabled()
    with Precision("bf16", cpu).autocast:
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    true = Precision("bf16-true", cpu)
    assert not true.scaler.is_enabled() and true.param_dtype is torch.bfloat16
    assert Precision("bf16", cpu).param_dtype is None
    with true.autocast:  # no autocast: fp32 stays fp32; what a step makes without a dtype is bf16
        assert torch.mm(torch.ones(2, 2, dtype=torch.float32), torch.ones(2, 2, dtype=torch.float32)).dtype == torch.float32
        assert torch.zeros(2).dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32
    with pytest.raises(ValueError, match="fp8.*'bf16-true'"):
        Precision("fp8", cpu)


def test_seed_everything_repeats_python_numpy_and_torch():
    seed_everything(11)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(11)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


class RandomSample(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor([random.random(), float(np.random.rand()), torch.rand(1).item()])


def worker_draws(seed):
    source = LoaderSource(RandomSample(), batch_size=2, num_workers=2, seed=seed, shuffle=False, pin_memory=False)
    return torch.cat(list(source.epoch(0, 0)))


@pytest.mark.slow
def test_dataloader_workers_get_distinct_reproducible_seeds():
    a, b = worker_draws(3), worker_draws(3)
    assert torch.equal(a, b)
    # worker 0 served batches 0 and 2, worker 1 batches 1 and 3: their draws differ in every library
    for column in range(3):
        assert a[0, column] != a[2, column]
    assert not torch.equal(worker_draws(4), a)
