"""Checks that need a GPU; skipped without one (run them with scripts/gpu_check.sh)."""

import pytest
import torch
from torch.nn import functional as F

from helpers import batches, classification, mlp, project_module, quiet
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


def test_no_host_sync_between_log_points():
    """torch raises on any CPU-GPU sync inside the checked window: every step's forward, backward,
    gradient logging, clipping, non-finite check and optimizer step, log points excepted."""
    from trainer import Callback, ProgressBar

    class SyncCheck(Callback):
        def __init__(self):
            self.checked = 0

        def on_train_batch_start(self, trainer, batch):
            if trainer.global_step >= 5:  # steady state
                torch.cuda.set_sync_debug_mode("error")
                self.checked += 1

        def on_train_batch_end(self, trainer, outputs, batch):
            torch.cuda.set_sync_debug_mode("default")  # the log point itself may sync, once

    x, y = classification(4096)
    model = mlp(sizes=(8, 256, 256, 3))
    check = SyncCheck()
    t = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True),
                torch.utils.data.TensorDataset(x, y), loss_fn=F.cross_entropy,
                callbacks=[check, ProgressBar(force=True)],
                config=quiet(device="cuda", precision="bf16", max_steps=40, batch_size=64, log_every_n_steps=10,
                             clip_grad_norm=1.0, grad_logging={"every_n_steps": 10, "per_layer": True},
                             eval_every_n_epochs=None))
    try:
        assert t._guard.on_device
        t.fit()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert check.checked == 35 and len(t.history) == 4


def test_nan_is_skipped_on_the_device_and_reported_at_the_log_point():
    NaNTrainer = project_module("killers").NaNTrainer

    model = mlp()
    t = NaNTrainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), batches(8, 8),
                   loss_fn=F.cross_entropy, nan_step=3, config=quiet(device="cuda", log_every_n_steps=4))
    with pytest.raises(FloatingPointError, match="step 3: train/loss or a gradient is not finite; the optimizer skipped that step"):
        t.fit()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_compile_on_cuda():
    x, y = classification(512)
    model = mlp(sizes=(8, 64, 3))
    t = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), (x, y), loss_fn=F.cross_entropy,
                config=quiet(device="cuda", precision="bf16", compile=True, max_steps=20, batch_size=32,
                             log_every_n_steps=10))
    t.fit()
    assert t.history[0]["time/first_step_s"] > 0


def test_async_checkpoints_copy_into_pinned_memory_and_equal_sync_ones(tmp_path, monkeypatch):
    # The copy off the device lands in pinned CPU memory, and the files equal a synchronous run's.
    from trainer.checkpoint import list_checkpoints, load_checkpoint

    import threading

    pinned = []  # for each write in a background thread: whether the weights it writes are pinned
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (
        pinned.append(obj["model"]["0.weight"].is_pinned())
        if threading.current_thread() is not threading.main_thread() else None, real(obj, f, *a, **k)))
    for mode in (False, True):
        model = mlp()
        Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), batches(8, 8), loss_fn=F.cross_entropy,
                run_dir=tmp_path / str(mode),
                config=quiet(device="cuda", checkpoint={"every_n_steps": 2, "keep_last": None, "async": mode})).fit()
    assert pinned == [True] * 4  # the async run's periodic checkpoints; its final one is synchronous
    for path in list_checkpoints(tmp_path / "False" / "checkpoints"):
        a, b = load_checkpoint(path), load_checkpoint(tmp_path / "True" / "checkpoints" / path.name)
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), key
        for index, state in a["optimizer"]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)
