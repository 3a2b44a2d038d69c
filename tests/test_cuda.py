"""Checks that need a GPU; skipped without one (run them with scripts/gpu_check.sh)."""

import pytest
import torch
from torch.nn import functional as F

from helpers import batches, classification, mlp, quiet
from trainer import Trainer, resolve_device

pytestmark = pytest.mark.cuda


def test_auto_picks_cuda():
    assert resolve_device("auto").type == "cuda"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_fit_on_cuda_in_each_precision(precision):
    x, y = classification(256)
    model = mlp(sizes=(8, 64, 3))
    t = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), torch.utils.data.TensorDataset(x, y),
                val_data=(x, y), loss_fn=F.cross_entropy,
                config=quiet(device="cuda", precision=precision, max_epochs=5, batch_size=32, log_every_n_steps=8))
    t.fit()
    assert next(model.parameters()).device.type == "cuda"
    assert t.history[-1]["val/acc"] > 0.6
    assert "cuda_peak_mem_gb" in t.history[0]


def test_dataset_batches_are_pinned_and_moved():
    devices = []

    class Peek(Trainer):
        def training_step(self, batch):
            devices.append(batch[0].device.type)
            return F.cross_entropy(self.model(batch[0]), batch[1])

    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return torch.randn(8), torch.tensor(i % 3)

    model = mlp()
    t = Peek(model, torch.optim.SGD(model.parameters(), lr=0.1), Plain(), config=quiet(device="cuda", batch_size=4))
    assert t._train_source().loader.pin_memory
    t.fit()
    assert devices == ["cuda"] * 4


def test_list_of_cpu_batches_moves_to_cuda():
    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(3, 8), loss_fn=F.cross_entropy,
                config=quiet(device="cuda"))
    t.fit()
    assert t.global_step == 3
