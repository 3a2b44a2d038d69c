"""No host syncs between log points: every tensor-to-host conversion is counted over 20 steps."""

import pytest
import torch
from torch.nn import functional as F

from helpers import classification, count_conversions, mlp
from trainer import ProgressBar, Trainer


@pytest.mark.parametrize("accum, precision, checkpointed",
                         [(1, "fp32", False), (2, "fp32", False), (2, "bf16-true", False), (1, "fp32", True)])
def test_at_most_one_conversion_per_log_point(accum, precision, checkpointed):
    x, y = classification(20 * 8 * accum)
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    config = {"max_steps": 20, "batch_size": 8, "grad_accum_steps": accum, "log_every_n_steps": 5,
              "grad_logging": {"every_n_steps": 5, "per_layer": True}, "clip_grad_norm": 1.0,
              "eval_every_n_epochs": None, "progress": "off", "precision": precision,
              "activation_checkpointing": ["Linear"] if checkpointed else [],  # recomputed in backward
              "throughput": {"flops_per_sample": 1e3, "peak_flops": 1e12}}  # time shares and MFU: host clocks only
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    # The path a CUDA run with a fused optimizer takes (on CPU the Trainer reads the loss each step,
    # which costs nothing there): the non-finite check stays on the device.
    config["nonfinite_check"] = "device"
    # The sanity pass before the first step copies the random generators' states to the host and
    # back, once; this test counts what the loop does.
    config["sanity_check"] = False
    t = Trainer(model, optimizer, (x, y), loss_fn=F.cross_entropy, scheduler=scheduler,
                callbacks=[ProgressBar(force=True)], config=config)
    with count_conversions() as counts:
        t.fit()
    assert len(t.history) == 4
    assert all("grad_norm/total" in r and "train/loss" in r for r in t.history)
    assert all("time/data" in r and "time/other" in r and "mfu" in r for r in t.history)
    assert counts["tolist"] >= 1  # the log points themselves are seen
    assert sum(counts.values()) <= 4, counts


@pytest.mark.parametrize("strategy", ["single", "ddp"])
def test_summed_losses_add_no_conversion(strategy, monkeypatch):
    """Summed losses (``loss_sum`` and ``count``) keep the count on the device: the division of the
    gradients, the logged per-item mean and the non-finite check read nothing between log points.
    Under DDP (one gloo rank here, the same code path) the count is summed over the ranks by one
    scalar all-reduce per step, whose result stays on the device too."""
    from trainer.parallel import strategy as strategies
    from trainer.losses import summed_cross_entropy

    reduced = []
    if strategy == "ddp":
        import torch.distributed as dist

        from trainer.parallel import distributed

        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        monkeypatch.setattr(distributed, "active", lambda: True)  # a group of one, counted as torchrun's
        all_reduce = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: (reduced.append(t.shape), all_reduce(t, *a, **k))[1])
        monkeypatch.setattr(strategies, "choose", lambda *a: strategies.DDP(distributed.Layout(0, 1, 0), torch.device("cpu")))
    try:
        x, y = classification(20 * 8 * 2)
        y[::3] = -100  # micro-batches hold different numbers of counted samples
        model = mlp()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        config = {"max_steps": 20, "batch_size": 8, "grad_accum_steps": 2, "log_every_n_steps": 5,
                  "clip_grad_norm": 1.0, "eval_every_n_epochs": None, "progress": "off",
                  "nonfinite_check": "device", "sanity_check": False}
        t = Trainer(model, optimizer, (x, y), loss_fn=summed_cross_entropy, config=config)
        with count_conversions() as counts:
            t.fit()
    finally:
        if strategy == "ddp":
            t.close()
            dist.destroy_process_group()
    assert len(t.history) == 4
    assert all("train/loss" in r and r["train/count"] > 0 for r in t.history)
    # Under torchrun each log point also reads the ranks' agreement on stop signals.
    assert sum(counts.values()) <= (8 if strategy == "ddp" else 4), counts
    if strategy == "ddp":
        # One scalar all-reduce per step (the count); the rest are the log points' own.
        assert reduced.count(torch.Size([])) == 20, reduced


def test_the_count_catches_a_per_step_read():
    """The counter itself works: on the host path the Trainer reads the loss every step."""
    x, y = classification(20 * 8)
    model = mlp()
    t = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), (x, y), loss_fn=F.cross_entropy,
                config={"max_steps": 20, "batch_size": 8, "log_every_n_steps": 5, "progress": "off",
                        "eval_every_n_epochs": None})
    with count_conversions() as counts:
        t.fit()
    assert counts["item"] >= 20


@pytest.mark.parametrize("progress", ["bar", "lines"])
def test_progress_adds_no_conversion_in_training_or_validation(progress, capsys):
    """The bar and the lines show only what the log point and the evaluation already read: a run
    with validation every 5 steps converts exactly as often with them as without."""

    def conversions(mode):
        x, y = classification(20 * 8)
        model = mlp()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        t = Trainer(model, optimizer, (x, y), val_data=(x[:40], y[:40]), loss_fn=F.cross_entropy,
                    config={"max_steps": 20, "batch_size": 8, "log_every_n_steps": 5, "eval_every_n_steps": 5,
                            "eval_every_n_epochs": None, "nonfinite_check": "device", "progress": mode,
                            "sanity_check": False})
        with count_conversions() as counts:
            t.fit()
        return counts

    shown = conversions(progress)
    assert shown == conversions("off")
    assert shown["tolist"] == 8  # four log points and four evaluations, one read each
    captured = capsys.readouterr()
    assert ("val/loss" in captured.err) if progress == "bar" else (captured.out.count("val/loss") == 4)


def test_a_stream_adds_no_conversion_in_one_process():
    """The ranks' agreement on the end of a stream (a read per micro-batch) is for torchrun only:
    one process reads an IterableDataset with no conversion between log points."""
    x, y = classification(20 * 8)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return zip(x, y)

    model = mlp()
    t = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), Stream(), loss_fn=F.cross_entropy,
                config={"max_steps": 20, "batch_size": 8, "log_every_n_steps": 5, "eval_every_n_epochs": None,
                        "nonfinite_check": "device", "progress": "off", "sanity_check": False})
    with count_conversions() as counts:
        t.fit()
    assert len(t.history) == 4
    # The log points, and the DataLoader drawing its base seed (on the CPU) as its one epoch starts.
    assert counts["tolist"] == 4 and counts["item"] == 1 and sum(counts.values()) == 5, counts


@pytest.mark.slow
def test_tracker_loggers_add_no_conversion(tmp_path, offline_trackers):
    """MLflow and W&B get floats at the log points, from a thread of their own: the loop reads
    nothing more with them attached."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from trainer import MLflowLogger, WandbLogger

    x, y = classification(20 * 8)
    model = mlp()
    loggers = [MLflowLogger(tmp_path), WandbLogger(tmp_path)]
    config = {"max_steps": 20, "batch_size": 8, "log_every_n_steps": 5, "eval_every_n_epochs": None,
              "progress": "off", "nonfinite_check": "device", "sanity_check": False,
              "grad_logging": {"every_n_steps": 5}, "checkpoint": {"save_final": False}}  # a checkpoint reads the state
    t = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), (x, y), loss_fn=F.cross_entropy,
                run_dir=tmp_path, loggers=loggers, config=config)
    try:
        with count_conversions() as counts:
            t.fit()
    finally:
        for logger in loggers:
            logger.close()
    assert len(t.history) == 4
    assert sum(counts.values()) <= 4, counts
    from mlflow import MlflowClient

    assert len(MlflowClient(loggers[0].tracking_uri).get_metric_history(loggers[0].run_id, "train/loss")) == 4


def test_manual_step_adds_no_conversion():
    """Two fused optimizers stepped by ``manual_step`` under accumulation, clipping and the device-side
    non-finite check: their backward, averaging, check, clipping, steps and the returned losses read
    nothing between log points."""

    class TwoHeads(Trainer):
        def configure_optimizers(self):
            first, second = self.module[0], self.module[2]
            return [torch.optim.AdamW(first.parameters(), lr=1e-3, fused=True),
                    torch.optim.AdamW(second.parameters(), lr=1e-3, fused=True)]

        def manual_step(self, batch):
            x, y = batch
            opt_first, opt_second = self.optimizers
            first = F.cross_entropy(self.model(x), y)
            self.manual_backward(first, opt_first)
            self.optimizer_step(opt_first)
            second = F.cross_entropy(self.model(x), y)
            self.manual_backward(second, opt_second)
            self.optimizer_step(opt_second)
            return {"first": first, "second": second}

    x, y = classification(20 * 8 * 2)
    model = mlp()
    assert isinstance(model[0], torch.nn.Linear) and isinstance(model[2], torch.nn.Linear)
    t = TwoHeads(model, None, (x, y), config={
        "max_steps": 20, "batch_size": 8, "grad_accum_steps": 2, "log_every_n_steps": 5, "clip_grad_norm": 1.0,
        "eval_every_n_epochs": None, "progress": "off", "nonfinite_check": "device", "sanity_check": False})
    with count_conversions() as counts:
        t.fit()
    assert len(t.history) == 4 and all("train/first" in r and "train/second" in r for r in t.history)
    assert sum(counts.values()) <= 4, counts
