"""Where a step's time goes (trainer.timing): the shares of wall time, tokens/s and MFU."""

import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import classification, mlp, quiet
from trainer import Trainer
from trainer.observability.timing import is_timing, table_peak_flops, tokens_in

SHARES = ("time/data", "time/compute", "time/optimizer", "time/other")


class Samples(torch.utils.data.Dataset):
    """A map-style dataset whose items take ``delay`` seconds each to read."""

    def __init__(self, delay: float):
        self.x, self.y = classification(64)
        self.delay = delay

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.delay:
            time.sleep(self.delay)
        return self.x[i], self.y[i]


def shares(delay, every=3):
    t = Trainer(mlp(), lambda p: torch.optim.SGD(p, lr=0.1), Samples(delay), loss_fn=F.cross_entropy,
                config=quiet(max_steps=2 * every, batch_size=4, log_every_n_steps=every, eval_every_n_epochs=None,
                             sanity_check=False))
    t.fit()
    assert [r["step"] for r in t.history] == [every, 2 * every]
    for record in t.history:
        assert sum(record[name] for name in SHARES) == pytest.approx(1.0)
        assert all(record[name] >= 0 for name in SHARES)
        assert record["time/step_s"] > 0
        assert "time/gpu_busy" not in record and "mfu" not in record and "tokens_per_sec" not in record  # CPU, floats
    return t.history[-1]


def test_a_slow_dataset_shows_as_data_wait_and_a_fast_one_does_not():
    slow = shares(delay=0.03)  # 0.12 s of reading per step, against a forward and backward of microseconds
    assert slow["time/data"] > 0.5 and slow["time/data"] > slow["time/compute"]
    fast = shares(delay=0.0, every=100)  # an interval long enough that one preemption of the process is noise
    assert fast["time/data"] < 0.5


class TokenModel(nn.Module):
    """Token ids (batch, sequence) in, one class per sequence out; knows its FLOPs per sample."""

    flops_per_sample = 1.5e6

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(dim=1))


def token_run(**config):
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 16, (48, 12), generator=g), torch.randint(0, 3, (48,), generator=g)
    t = Trainer(TokenModel(), lambda p: torch.optim.SGD(p, lr=0.1), (ids, y), loss_fn=F.cross_entropy,
                config=quiet(max_steps=4, batch_size=6, log_every_n_steps=2, eval_every_n_epochs=None, **config))
    t.fit()
    return t.history


def test_tokens_per_second_and_mfu_from_the_models_flops_and_a_given_peak():
    history = token_run(throughput={"peak_flops": 2e9})
    assert [r["step"] for r in history] == [2, 4]  # the log points
    for record in history:
        # Both rates count the same micro-batches over the same interval, read from one clock reading.
        assert record["tokens_per_sec"] / record["samples_per_sec"] == pytest.approx(12)
        assert record["mfu"] == pytest.approx(1.5e6 * record["samples_per_sec"] / 2e9)
    configured = token_run(throughput={"flops_per_sample": 3e6, "peak_flops": 2e9})  # the config wins
    assert configured[-1]["mfu"] == pytest.approx(3e6 * configured[-1]["samples_per_sec"] / 2e9)
    plain = token_run()
    assert [r["step"] for r in plain] == [2, 4] and all("tokens_per_sec" in r for r in plain)
    assert all("mfu" not in r for r in plain)  # on CPU without a peak: no MFU


def test_mfu_from_the_models_flops_per_token():
    class PerToken(TokenModel):
        flops_per_sample = None

        def flops_per_token(self):
            return 2e5

    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 16, (24, 12), generator=g), torch.randint(0, 3, (24,), generator=g)
    t = Trainer(PerToken(), lambda p: torch.optim.SGD(p, lr=0.1), (ids, y), loss_fn=F.cross_entropy,
                config=quiet(max_steps=2, batch_size=6, log_every_n_steps=2, eval_every_n_epochs=None,
                             throughput={"peak_flops": 1e9}))
    [record] = t.fit()
    assert record["mfu"] == pytest.approx(2e5 * record["tokens_per_sec"] / 1e9)


def test_a_model_attribute_that_is_not_a_number_is_refused():
    model = mlp()
    model.flops_per_sample = "6N"
    with pytest.raises(TypeError, match=r"Sequential.flops_per_sample must be a positive number.*got '6N'"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), classification(8), loss_fn=F.cross_entropy)


def test_tokens_are_counted_only_for_integer_ids_of_two_dimensions():
    assert tokens_in((torch.zeros(4, 7, dtype=torch.long), torch.zeros(4))) == 28
    assert tokens_in({"input_ids": torch.zeros(2, 5, dtype=torch.int32)}) == 10
    assert tokens_in((torch.zeros(4, 7), torch.zeros(4, dtype=torch.long))) == 0  # features, not ids
    assert tokens_in((torch.zeros(4, dtype=torch.long),)) == 0  # one id per sample: samples/s says it


def test_peak_flops_table():
    assert table_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert table_peak_flops("NVIDIA H100 PCIe", "bf16-true") == 756e12
    assert table_peak_flops("NVIDIA A100-SXM4-80GB", "fp16") == 312e12
    assert table_peak_flops("NVIDIA A10G", "bf16") == 70e12  # not the A10's, nor the A100's
    assert table_peak_flops("NVIDIA H100 80GB HBM3", "fp32") is None  # TF32 or not: not known
    assert table_peak_flops("Some Future GPU", "bf16") is None


def test_timing_names():
    assert all(is_timing(n) for n in (*SHARES, "time/gpu_busy", "samples_per_sec", "tokens_per_sec", "mfu"))
    assert not any(is_timing(n) for n in ("train/loss", "lr", "step"))


@pytest.mark.cuda
def test_gpu_busy_share_shows_a_gpu_waiting_for_its_loader():
    """On CUDA the GPU's busy share comes from events read at log points, without a sync between them
    (sync debug mode raises on one); a slow loader leaves the GPU mostly idle."""
    from trainer import Callback

    class NoSync(Callback):
        def on_train_batch_start(self, trainer, batch):
            if trainer.global_step >= 2:
                torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, trainer, outputs, batch):
            torch.cuda.set_sync_debug_mode("default")

    def run(delay):
        model = mlp(sizes=(8, 1024, 1024, 3))
        t = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), Samples(delay),
                    loss_fn=F.cross_entropy, callbacks=[NoSync()],
                    config=quiet(device="cuda", max_steps=12, batch_size=4, log_every_n_steps=4,
                                 eval_every_n_epochs=None, throughput={"flops_per_sample": 1e6}))
        try:
            t.fit()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return t.history[-1]

    slow, fast = run(0.02), run(0.0)
    assert 0 < slow["time/gpu_busy"] < 0.5 < slow["time/data"]
    assert fast["time/gpu_busy"] > slow["time/gpu_busy"]
    # fp32 has no table peak: no MFU unless peak_flops is given.
    assert "mfu" not in fast


def test_gpu_spans_are_reused_and_a_step_in_progress_carries_over(monkeypatch):
    """The bookkeeping of the CUDA events, with stand-ins for them (the real ones: the test above)."""
    from trainer.observability import timing

    clock = iter(range(100))
    created = []

    class Event:
        def __init__(self, enable_timing):
            self.at = None
            created.append(self)

        def record(self):
            self.at = next(clock) * 1000.0  # milliseconds, as CUDA's

        def query(self):
            return True

        def elapsed_time(self, end):
            return end.at - self.at

    monkeypatch.setattr(torch.cuda, "Event", Event)
    spans = timing._GpuSpans()
    for _ in range(3):
        spans.start()
        spans.start()  # a later micro-batch of the same step: no new span
        spans.end()
    assert spans.busy_seconds() == 3.0 and len(created) == 6  # three spans, a pair of events each
    spans.start()
    spans.end()
    spans.start()  # a step in progress at the log point
    assert spans.busy_seconds() == 1.0
    spans.end()
    assert spans.busy_seconds() == 1.0 and len(created) == 6  # the carried span: the same events, reused
    assert spans.busy_seconds() is None  # nothing in the interval


def test_the_last_partial_interval_counts_its_own_samples():
    """Five steps of 8, 8, 8, 8 and 3 samples, a log point every 3: the last interval (steps 4 and 5)
    holds 11 samples, not two of its last batch's 3. Its rate times its time is what it counted."""
    x, y = classification(35)
    t = Trainer(mlp(), lambda p: torch.optim.SGD(p, lr=0.1), (x, y), loss_fn=F.cross_entropy,
                config=quiet(max_steps=5, batch_size=8, log_every_n_steps=3, eval_every_n_epochs=None,
                             sanity_check=False))
    history = t.fit()
    assert [r["step"] for r in history] == [3, 5]
    counted = [r["samples_per_sec"] * r["time/step_s"] * steps for r, steps in zip(history, [3, 2])]
    assert counted == [pytest.approx(24), pytest.approx(11)]
