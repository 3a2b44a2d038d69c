"""Evaluation: the run's validation drives the run's decisions; evaluating other data never does."""

import pytest
import torch
from torch.nn import functional as F

from helpers import classification, mlp, quiet
from trainer import BestCheckpoints, Callback, EarlyStopping, EMAWeights, Trainer
from trainer.checkpoint import load_checkpoint


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_validation_start(self, trainer):
        self.calls.append("start")

    def on_validation_end(self, trainer, metrics):
        self.calls.append(sorted(metrics))


def trained(tmp_path, callbacks, **config):
    x, y = classification(64)
    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5), (x, y), val_data=(x[:32], y[:32]),
                loss_fn=F.cross_entropy, callbacks=callbacks, run_dir=tmp_path,
                config=quiet(**{"max_epochs": 2, "batch_size": 16, **config}))
    t.fit()
    return t


def test_evaluating_other_data_reports_under_its_prefix_and_drives_nothing(tmp_path):
    recorder = Recorder()
    stopper = EarlyStopping(monitor="val/loss", patience=1)
    best = BestCheckpoints(monitor="val/loss")
    t = trained(tmp_path, [recorder, stopper, best])
    calls, state = list(recorder.calls), (stopper.best, stopper.wait, list(best.kept))
    link = tmp_path / "checkpoints" / "best.pt"
    before = link.stat().st_ino

    # Test data on which the loss is far worse: had it driven the run, EarlyStopping would count it
    # and BestCheckpoints would rank it.
    x, y = classification(40, seed=7)
    metrics = t.evaluate((x, (y + 1) % 3), prefix="test")

    assert sorted(metrics) == ["test/acc", "test/loss"]
    assert recorder.calls == calls and (stopper.best, stopper.wait, best.kept) == state
    assert link.stat().st_ino == before
    # The run's own validation still fires the hooks and keeps the val/ names.
    assert sorted(t.evaluate()) == ["val/acc", "val/loss"] and recorder.calls[-2:] == ["start", ["val/acc", "val/loss"]]


def test_other_data_is_evaluated_with_the_ema_weights_and_the_trained_weights_come_back(tmp_path):
    ema = EMAWeights(decay=0.5)
    t = trained(tmp_path, [ema])
    x, y = classification(40, seed=7)
    trained_weights = [p.detach().clone() for p in t.module.parameters()]

    with_ema = t.evaluate((x, y), prefix="test")
    plain = Trainer(ema.ema, torch.optim.SGD(ema.ema.parameters(), lr=0.1), loss_fn=F.cross_entropy,
                    config=quiet(batch_size=16)).evaluate((x, y), prefix="test")
    assert with_ema == pytest.approx(plain)
    assert all(torch.equal(a, b) for a, b in zip(t.module.parameters(), trained_weights))


def test_trained_weights_come_back_when_validation_step_raises(tmp_path):
    class Failing(Trainer):
        def validation_step(self, batch):
            raise RuntimeError("broken metric")

    ema = EMAWeights(decay=0.5)
    t = trained(tmp_path, [ema])
    failing = Failing(t.module, t.optimizer, loss_fn=F.cross_entropy, callbacks=[ema], config=quiet(batch_size=16))
    trained_weights = [p.detach().clone() for p in t.module.parameters()]
    x, y = classification(40, seed=7)
    with pytest.raises(RuntimeError, match="broken metric"):
        failing.evaluate((x, y))
    assert all(torch.equal(a, b) for a, b in zip(t.module.parameters(), trained_weights))
    assert t.module.training  # eval mode undone as well


def test_best_checkpoint_holds_the_trained_weights_whatever_the_callback_order(tmp_path):
    """Validation sees the EMA weights, but the checkpoint BestCheckpoints writes after it holds the
    trained ones in ``model`` (and the average in the callback's state), in either order."""
    for order in ("ema-first", "best-first"):
        ema, best = EMAWeights(decay=0.5), BestCheckpoints(monitor="val/loss")
        run_dir = tmp_path / order
        t = trained(run_dir, [ema, best] if order == "ema-first" else [best, ema], max_epochs=1)
        state = load_checkpoint(run_dir / "checkpoints" / "best.pt")
        for name, value in t.module.state_dict().items():
            assert torch.equal(state["model"][name], value), (order, name)
            assert torch.equal(state["callbacks"]["EMAWeights"]["ema"][name], ema.ema.state_dict()[name])


def evaluator_of(val, **config):
    """The Evaluator alone, over a run's data with ``val`` as its validation data."""
    from trainer import TrainerConfig
    from trainer.data.run_data import RunData
    from trainer.device import Precision
    from trainer.evaluation.evaluator import Evaluator
    from trainer.parallel import distributed

    cfg = TrainerConfig(**config)
    data = RunData(None, val, cfg, torch.device("cpu"), torch.float32, distributed.Layout(0, 1, 0))
    return Evaluator(None, data, None, Precision("fp32", torch.device("cpu")), cfg, [], {}, {}), cfg


def test_the_evaluator_decides_when_the_run_validates():
    x, y = classification(8)
    evaluator, cfg = evaluator_of((x, y), eval_every_n_steps=3, eval_every_n_epochs=2)
    assert [step for step in range(1, 10) if evaluator.due(step)] == [3, 6, 9]
    assert [epochs for epochs in range(1, 6) if evaluator.due(100 + epochs, epochs_done=epochs)] == [2, 4]
    assert evaluator.due(7, end=True)
    with evaluator.validating(6):  # at step 6 (also when an epoch ends there, and at the end of fit), once
        assert not evaluator.due(6)  # already while it runs: a checkpoint written then holds it
    assert not evaluator.due(6) and not evaluator.due(6, epochs_done=2) and not evaluator.due(6, end=True)
    assert evaluator.due(9) and evaluator.due(8, epochs_done=4)
    cfg.eval_every_n_steps, cfg.eval_every_n_epochs = None, None  # the config as it is when asked
    assert not any(evaluator.due(step) or evaluator.due(step, epochs_done=step) for step in range(1, 10))
    assert evaluator.due(9, end=True)  # the end of fit validates whatever the intervals


def test_without_validation_data_the_run_never_validates():
    evaluator, _ = evaluator_of(None, eval_every_n_steps=1, eval_every_n_epochs=1)
    assert not any(evaluator.due(step) or evaluator.due(step, epochs_done=1) or evaluator.due(step, end=True)
                   for step in range(1, 5))


def test_a_validation_that_raises_is_not_counted_as_done():
    """The step counts as validated while its validation runs (a checkpoint written then must not
    repeat it), but a validation that raises did not happen: a later fit runs it."""

    class FailsOnce(Trainer):
        failed = False

        def validation_step(self, batch):
            if self.global_step == 4 and not self.failed:  # not in the sanity pass, at step 0
                self.failed = True
                raise RuntimeError("validation failed once")
            return super().validation_step(batch)

    x, y = classification(32)
    model = mlp()
    t = FailsOnce(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), val_data=(x, y), loss_fn=F.cross_entropy,
                  config=quiet(max_steps=4, batch_size=8, eval_every_n_epochs=None))
    with pytest.raises(RuntimeError, match="failed once"):
        t.fit()
    t.fit()
    assert [r["step"] for r in t.history if "val/loss" in r] == [4]
