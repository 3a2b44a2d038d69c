"""A step skipped for a non-finite loss means one thing, whether the host or the device decides it."""

import math
import warnings

import pytest
import torch
from torch.nn import functional as F

from helpers import classification, mlp, quiet
from trainer import EMAWeights, Trainer
from trainer.observability.timing import is_timing


class NaNAt(Trainer):
    """The loss is NaN on the micro-batches of the given optimizer steps (1-based)."""

    def __init__(self, *args, bad_steps=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_steps = set(bad_steps)

    def training_step(self, batch):
        loss = super().training_step(batch)
        return loss * float("nan") if self.global_step + 1 in self.bad_steps else loss


def run(check, bad_steps, accum=1, log_every=3, policy="skip"):
    x, y = classification(256)
    model = mlp(seed=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    ema = EMAWeights(decay=0.8)
    t = NaNAt(model, optimizer, (x, y), loss_fn=F.cross_entropy, scheduler=scheduler, callbacks=[ema],
              bad_steps=bad_steps,
              config=quiet(max_steps=10, batch_size=8, grad_accum_steps=accum, log_every_n_steps=log_every,
                           on_nonfinite=policy, nonfinite_check=check, eval_every_n_epochs=None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip warnings come at different times on the two paths
        t.fit()
    assert t._guard.on_device == (check == "device")
    return t, ema


def without_clock(history):
    return [{k: v for k, v in r.items() if not is_timing(k)} for r in history]


def same_floats(a, b):
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("bad_steps", [(2,), (4, 5, 6), (3, 9)])
def test_host_and_device_paths_skip_a_step_the_same_way(accum, bad_steps):
    host, host_ema = run("host", bad_steps, accum)
    device, device_ema = run("device", bad_steps, accum)
    assert host.global_step == device.global_step == 10
    assert host.skipped_steps == device.skipped_steps == len(bad_steps)
    for a, b in zip(host.module.parameters(), device.module.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(host_ema.ema.parameters(), device_ema.ema.parameters()):
        assert torch.equal(a, b)
    ha, da = host.optimizer.state_dict(), device.optimizer.state_dict()
    for key in ha["state"]:
        for name in ha["state"][key]:
            assert torch.equal(ha["state"][key][name], da["state"][key][name]), (key, name)
    assert host.scheduler.get_last_lr() == device.scheduler.get_last_lr()
    assert host.scheduler.last_epoch == 10  # the scheduler stepped on skipped steps too
    h, d = without_clock(host.history), without_clock(device.history)
    assert [sorted(r) for r in h] == [sorted(r) for r in d]
    for rh, rd in zip(h, d):
        assert all(same_floats(rh[k], rd[k]) for k in rh), (rh, rd)


def test_a_skipped_step_leaves_weights_and_optimizer_alone_and_its_loss_out_of_the_log():
    t, _ = run("device", (4,), log_every=2)
    # Steps 3-4 form one log interval: its train/loss is step 3's alone, not NaN.
    assert [r["step"] for r in t.history] == [2, 4, 6, 8, 10]
    assert all(math.isfinite(r["train/loss"]) for r in t.history)
    assert t.optimizer.state_dict()["state"][0]["step"] == 9  # AdamW's own counter skipped one


@pytest.mark.parametrize("check", ["host", "device"])
def test_an_interval_whose_steps_were_all_skipped_has_no_loss(check):
    t, _ = run(check, (4, 5, 6), log_every=3)
    by_step = {r["step"]: r for r in t.history}
    assert "train/loss" not in by_step[6] and "lr" in by_step[6]
    assert math.isfinite(by_step[3]["train/loss"]) and math.isfinite(by_step[9]["train/loss"])


def test_the_device_path_needs_a_fused_optimizer():
    model = mlp()
    with pytest.raises(ValueError, match="nonfinite_check: device needs a fused optimizer"):
        Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), loss_fn=F.cross_entropy,
                config=quiet(nonfinite_check="device"))


class NaNGradientAt(Trainer):
    """A finite loss whose gradient for the first layer's weight is NaN at the given steps."""

    def __init__(self, *args, bad_steps=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_steps = set(bad_steps)
        first = next(self.module.parameters())
        first.register_hook(lambda grad: grad * float("nan") if self.global_step + 1 in self.bad_steps else grad)


@pytest.mark.parametrize("check", ["host", "device"])
def test_a_nan_gradient_with_a_finite_loss_is_skipped_like_a_nan_loss(check):
    x, y = classification(128)

    def train(bad_steps, policy="skip"):
        model = mlp(seed=5)
        t = NaNGradientAt(model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), (x, y),
                          loss_fn=F.cross_entropy, bad_steps=bad_steps,
                          config=quiet(max_steps=6, batch_size=8, on_nonfinite=policy, nonfinite_check=check,
                                       clip_grad_norm=1.0, eval_every_n_epochs=None))
        return t

    t = train((3,))
    with pytest.warns(UserWarning, match="step 3: (a gradient is not finite|train/loss or a gradient is not finite)"):
        t.fit()
    assert t.skipped_steps == 1 and all(torch.isfinite(p).all() for p in t.module.parameters())
    logged = {r["step"]: r.get("train/loss") for r in t.history}  # a log point every step
    assert logged[3] is None and all(math.isfinite(v) for s, v in logged.items() if s != 3)

    t = train((3,), policy="error")
    with pytest.raises(FloatingPointError, match="step 3: (a gradient is not finite \\(train/loss|train/loss or a gradient)"):
        t.fit()
    assert all(torch.isfinite(p).all() for p in t.module.parameters())
    # The weights are those of step 2: the bad step never reached them.
    reference = train(())
    reference.config.max_steps = 2
    reference.fit()
    for a, b in zip(t.module.parameters(), reference.module.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- what the message names


def first_nan_error(model, x, check="host", init_from=None, log_every=1):
    """The FloatingPointError of a run of ``model`` on ``x`` (a NaN somewhere), batches of 8 in order."""
    data = [(xs, torch.zeros(len(xs), dtype=torch.long)) for xs in x.split(8)]  # a list of batches: in order
    t = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), data, loss_fn=F.cross_entropy,
                config=quiet(max_steps=6, nonfinite_check=check, init_from=init_from,
                             log_every_n_steps=log_every, eval_every_n_epochs=None, sanity_check=False))
    with pytest.raises(FloatingPointError) as raised:
        t.fit()
    return str(raised.value)


def test_non_finite_inputs_are_named_with_the_tensor_of_the_batch():
    x = torch.randn(64, 8)
    x[19, 2] = float("inf")  # the third batch
    message = first_nan_error(mlp(seed=4), x)
    assert message.startswith("step 3: train/loss is nan; stopped before the optimizer step; the weights are those "
                              "of step 2. Its inputs are not finite: batch[0] of step 3's batch holds 1 non-finite "
                              "value of 64 (inf); clean the data")
    assert "Lower the learning rate" not in message
    # On the device the flags are read at the log point: the batch kept then is its step's only.
    assert "batch[0] of step 3's batch holds 1 non-finite value" in first_nan_error(mlp(seed=4), x, "device", log_every=3)
    assert "Lower the learning rate" in first_nan_error(mlp(seed=4), x, "device", log_every=4)  # step 4's batch is clean


def test_non_finite_initial_weights_are_named_from_init_from_or_the_model(tmp_path):
    model = mlp(seed=4)
    state = model.state_dict()
    state["2.bias"][1] = float("nan")
    torch.save(state, tmp_path / "start.pt")
    message = first_nan_error(mlp(seed=4), torch.randn(64, 8), init_from=str(tmp_path / "start.pt"))
    assert message.startswith("step 1: train/loss is nan; stopped before the optimizer step; the weights are those "
                              f"of step 0. The initial weights are not finite: init_from's tensor 2.bias (the model's "
                              f"2.bias, from {tmp_path / 'start.pt'}) holds 1 non-finite value of 3 (nan); load finite")
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    assert "the model's 0.weight holds 1 non-finite value of 128 (nan) before the first step" in first_nan_error(
        model, torch.randn(64, 8))
