"""Summed losses (``loss_sum`` and ``count``): the gradient, ``train/loss`` and ``val/loss`` of the
mean over every token, however the tokens fall into micro-batches."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from trainer import Callback, SanityCheckError, Trainer
from trainer.losses import summed_cross_entropy
from trainer.observability.timing import is_timing

VOCAB, LENGTH, IGNORE = 7, 12, -100
# Valid tokens per sequence: however six sequences are paired into micro-batches of two, the pairs
# hold different numbers of tokens, so a mean per micro-batch weighs tokens unequally.
VALID = [1, 2, 12, 12, 12, 12]


def padded(valid=VALID, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (len(valid), LENGTH), generator=g)
    y = torch.randint(0, VOCAB, (len(valid), LENGTH), generator=g)
    for row, n in enumerate(valid):
        y[row, n:] = IGNORE
    return x, y


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)))


def mean_ce(logits, y):
    """The usual per-micro-batch mean over the valid tokens."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)


def token_mean(model, x, y):
    """The reference: one batch of everything, summed over the valid tokens, divided by their number."""
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum") / (y != IGNORE).sum()


def reference_grads(x, y):
    model = TinyLM()
    token_mean(model, x, y).backward()
    return {n: p.grad for n, p in model.named_parameters()}


class SummedLM(Trainer):
    """The documented form: a subclass whose training_step returns the sum and the count."""

    def training_step(self, batch):
        x, y = batch
        logits = self.model(x)
        return {"loss_sum": F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum"),
                "count": (y != IGNORE).sum()}


class FirstGrads(Callback):
    """The gradients the hooks see at the first step (after the division by the count)."""

    def __init__(self):
        self.grads = None

    def on_after_backward(self, trainer):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in trainer.module.named_parameters()}


def config(**overrides):
    cfg = {"progress": "off", "batch_size": 2, "grad_accum_steps": 3, "max_steps": 1, "log_every_n_steps": 1,
           "eval_every_n_epochs": None}
    cfg.update(overrides)
    return cfg


def first_step_grads(trainer_class=SummedLM, loss_fn=None, **overrides):
    model = TinyLM()
    seen = FirstGrads()
    t = trainer_class(model, torch.optim.SGD(model.parameters(), lr=0.1), padded(), loss_fn=loss_fn,
                      callbacks=[seen], config=config(**overrides))
    t.fit()
    return seen.grads, t


def test_accumulated_micro_batches_give_the_gradient_of_the_token_mean():
    expected = reference_grads(*padded())
    grads, t = first_step_grads()  # three micro-batches of two sequences: the whole data in one step
    assert t.global_step == 1
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7)
    # A loss_fn that returns the sum and the count works through the default steps the same way.
    via_loss_fn, _ = first_step_grads(Trainer, loss_fn=summed_cross_entropy)
    for name, grad in expected.items():
        torch.testing.assert_close(via_loss_fn[name], grad, rtol=1e-5, atol=1e-7)
    # The mean per micro-batch, divided by grad_accum_steps, is not that gradient on this data.
    means, _ = first_step_grads(Trainer, loss_fn=mean_ce)
    assert not torch.allclose(means["head.weight"], expected["head.weight"], rtol=1e-3)


def test_one_micro_batch_per_step_gives_the_token_mean_too():
    x, y = padded()
    grads, _ = first_step_grads(batch_size=6, grad_accum_steps=1)
    for name, grad in reference_grads(x, y).items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7)


def test_the_logged_loss_is_the_token_mean_of_the_log_interval():
    """Two steps per log point, with weights that do not move (lr 0): train/loss is the mean over
    every token of both steps (the whole data, twice), train/count their number."""
    x, y = padded()
    model = TinyLM()

    class WithExtra(SummedLM):
        def training_step(self, batch):
            out = super().training_step(batch)
            return {**out, "padding": (batch[1] == IGNORE).float().mean()}  # an extra metric, as with "loss"

    t = WithExtra(model, torch.optim.SGD(model.parameters(), lr=0.0), (x, y),
                  config=config(batch_size=2, grad_accum_steps=1, max_steps=6, log_every_n_steps=6))
    t.fit()
    (record,) = t.history
    assert {k for k in record if k.startswith("train/")} == {"train/loss", "train/count", "train/padding"}
    assert record["train/padding"] == pytest.approx((y == IGNORE).float().mean().item())
    assert record["train/count"] == 2 * sum(VALID)
    with torch.no_grad():
        assert record["train/loss"] == pytest.approx(token_mean(TinyLM(), x, y).item(), rel=1e-6)
        means = [mean_ce(TinyLM()(x[i:i + 2]), y[i:i + 2]).item() for i in range(0, 6, 2)]
    assert record["train/loss"] != pytest.approx(sum(means) / 3, rel=1e-3)  # not the mean of micro-batch means


def test_the_validation_loss_is_weighted_by_count():
    x, y = padded()
    model = TinyLM()

    class WithAccuracy(SummedLM):
        def validation_step(self, batch):
            x, y = batch
            logits = self.model(x)
            valid = y != IGNORE
            correct = ((logits.argmax(-1) == y) & valid).sum() / valid.sum()
            return {**summed_cross_entropy(logits, y, IGNORE), "token_acc": correct}

    t = WithAccuracy(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), val_data=(x, y),
                     config=config(batch_size=2))
    metrics = t.evaluate()
    assert set(metrics) == {"val/loss", "val/token_acc"}
    with torch.no_grad():
        assert metrics["val/loss"] == pytest.approx(token_mean(model, x, y).item(), rel=1e-6)
        means = [mean_ce(model(x[i:i + 2]), y[i:i + 2]).item() for i in range(0, 6, 2)]
    assert metrics["val/loss"] != pytest.approx(sum(means) / 3, rel=1e-3)
    # The default validation_step with a loss_fn that returns the sum and the count: the same.
    plain = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), val_data=(x, y),
                    loss_fn=summed_cross_entropy, config=config(batch_size=2))
    assert plain.evaluate()["val/loss"] == pytest.approx(metrics["val/loss"], rel=1e-12)


def test_a_step_without_valid_tokens_leaves_the_weights_and_logs_no_loss():
    """A count of 0 counts as 1: the gradient of no token is zero, never NaN, and the step is taken
    (plain SGD then leaves the weights as they were); the log point shows the count, not a loss."""
    model = TinyLM()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = padded([0, 0])
    seen = FirstGrads()
    t = SummedLM(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), callbacks=[seen],
                 config=config(grad_accum_steps=1))
    t.fit()
    assert all(torch.equal(g, torch.zeros_like(g)) for g in seen.grads.values())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    (record,) = t.history
    assert record["train/count"] == 0 and "train/loss" not in record and t.skipped_steps == 0


def test_a_validation_set_without_valid_tokens_warns_and_reports_nan():
    model = TinyLM()
    x, y = padded([0, 0])
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), val_data=(x, y),
                loss_fn=summed_cross_entropy, config=config())
    with pytest.warns(UserWarning, match="counts sum to 0 over the whole set"):
        metrics = t.evaluate()
    assert math.isnan(metrics["val/loss"])


def test_a_run_resumed_between_log_points_logs_the_same_numbers(tmp_path):
    """The log interval in progress (summed losses and their count) goes into the checkpoint."""
    x, y = padded(seed=3)

    def build(run_dir):
        model = TinyLM()
        return SummedLM(model, torch.optim.SGD(model.parameters(), lr=0.5), (x, y), run_dir=run_dir,
                        config=config(batch_size=2, grad_accum_steps=1, max_steps=4, log_every_n_steps=4,
                                      checkpoint={"every_n_steps": 2, "keep_last": None}))

    whole = build(tmp_path / "whole")
    whole.fit()
    resumed = build(tmp_path / "resumed")
    resumed.fit(resume_from=tmp_path / "whole" / "checkpoints" / "step-00000002.pt")  # saved mid-interval
    assert [{k: v for k, v in r.items() if not is_timing(k)} for r in resumed.history] == \
           [{k: v for k, v in r.items() if not is_timing(k)} for r in whole.history]
    assert whole.history[0]["train/count"] > 0


GOOD_SUM = torch.tensor(1.0, requires_grad=True)


@pytest.mark.parametrize(("outputs", "message"), [
    ({"loss_sum": GOOD_SUM}, "'loss_sum' without 'count'"),
    ({"loss_sum": GOOD_SUM, "count": 3}, r"'count' as a int \(3\), not a scalar Tensor"),
    ({"loss_sum": GOOD_SUM, "count": torch.ones(2)}, r"'count' as a torch.float32 Tensor of shape \(2,\)"),
    ({"loss_sum": 1.5, "count": torch.tensor(3)}, "'loss_sum' as a float"),
    ({"loss_sum": GOOD_SUM, "count": torch.tensor(3), "loss": GOOD_SUM}, "both 'loss' and 'loss_sum'"),
])
@pytest.mark.parametrize("sanity", [False, True])
def test_a_wrong_summed_return_is_one_clear_error(outputs, message, sanity):
    class Wrong(Trainer):
        def training_step(self, batch):
            loss = self.model(batch[0]).sum() * 0
            return {k: (v + loss if v is GOOD_SUM else v) for k, v in outputs.items()}

    model = TinyLM()
    t = Wrong(model, torch.optim.SGD(model.parameters(), lr=0.1), padded(), config=config(sanity_check=sanity))
    expected = SanityCheckError if sanity else TypeError
    with pytest.raises(expected, match=message) as caught:
        t.fit()
    assert "return {'loss_sum': F.cross_entropy(logits, labels, reduction='sum'), 'count': (labels != -100).sum()}" \
        in str(caught.value)
    assert t.global_step == 0


def test_a_mean_loss_and_a_summed_one_in_the_same_log_interval_is_an_error():
    class Alternating(Trainer):
        def training_step(self, batch):
            x, y = batch
            out = summed_cross_entropy(self.model(x), y, IGNORE)
            return out if self.batch_in_epoch % 2 else out["loss_sum"] / out["count"]

    model = TinyLM()
    t = Alternating(model, torch.optim.SGD(model.parameters(), lr=0.1), padded(),
                    config=config(grad_accum_steps=2, sanity_check=False))
    with pytest.raises(TypeError, match="returned a mean 'loss' after 'loss_sum' in the same log interval"):
        t.fit()


def test_under_fp16_the_gradients_are_unscaled_then_divided():
    """The scaler's factor comes off before the count's is applied: the hooks see the token mean's
    gradient (to fp16's precision), not one 65536 times larger. A sum's gradients are larger than a
    mean's, so the first steps overflow at the scaler's initial scale and are skipped (the weights
    stay as they were) until it has lowered its scale."""

    class FirstFinite(Callback):
        grads = None

        def on_after_backward(self, trainer):
            grads = {n: p.grad.clone() for n, p in trainer.module.named_parameters()}
            if self.grads is None and all(g.isfinite().all() for g in grads.values()):
                self.grads = grads

    seen = FirstFinite()
    model = TinyLM()
    t = SummedLM(model, torch.optim.SGD(model.parameters(), lr=0.1), padded(), callbacks=[seen],
                 config=config(precision="fp16", max_steps=4))
    t.fit()
    assert t.precision.scaler.get_scale() < 2.0**16  # it overflowed, and backed off
    for name, grad in reference_grads(*padded()).items():
        torch.testing.assert_close(seen.grads[name], grad, rtol=2e-2, atol=2e-3)


def test_a_validation_step_that_mixes_kinds_or_forgets_the_count_is_one_clear_error():
    class Wrong(Trainer):
        forget = True

        def validation_step(self, batch):
            out = summed_cross_entropy(self.model(batch[0]), batch[1], IGNORE)
            if self.forget:
                return {"loss_sum": out["loss_sum"]}
            return out if len(batch[0]) == 2 else {"loss": out["loss_sum"] / out["count"]}

    model = TinyLM()
    t = Wrong(model, torch.optim.SGD(model.parameters(), lr=0.1), padded(), val_data=padded(VALID[:5]),
              config=config(batch_size=2))
    with pytest.raises(TypeError, match="validation_step returned 'loss_sum' without 'count'"):
        t.evaluate()
    t.forget = False  # batches of 2, 2, then 1: the last returns a mean 'loss'
    with pytest.raises(TypeError, match="'loss_sum' for some batches and not for others"):
        t.evaluate()
