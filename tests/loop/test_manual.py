"""Several optimizers and a step of a subclass's own (``Trainer.manual_step``, trainer/manual.py)."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from trainer import Callback, Trainer
from trainer.observability.timing import is_timing


class Pair(nn.Module):
    """Two parts with one optimizer each; ``b``'s loss also runs through ``a``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 1)
        self.b = nn.Linear(4, 1)


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)


def losses(model, batch):
    x, y = batch
    a_loss = F.mse_loss(model.a(x), y)
    b_loss = F.mse_loss(model.b(x) * model.a(x), y)  # reaches a's parameters too
    return a_loss, b_loss


class Alternating(Trainer):
    """a steps on its loss, then b on its own (backed into b's parameters only)."""

    nan_at: set[int] = set()

    def configure_optimizers(self):
        m = self.module
        opt_a = torch.optim.Adam(m.a.parameters(), lr=1e-2)
        opt_b = torch.optim.SGD(m.b.parameters(), lr=1e-2, momentum=0.9)
        return ([opt_a, opt_b], [torch.optim.lr_scheduler.StepLR(opt_a, 3, gamma=0.5),
                                 torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 1 / (1 + s))])

    def manual_step(self, batch):
        opt_a, opt_b = self.optimizers
        a_loss, b_loss = losses(self.model, batch)
        if self.global_step + 1 in self.nan_at:
            b_loss = b_loss * float("nan")
        self.manual_backward(a_loss, opt_a)
        self.optimizer_step(opt_a)
        self.manual_backward(b_loss, opt_b)
        self.optimizer_step(opt_b)
        return {"a_loss": a_loss, "b_loss": b_loss}


CONFIG = {"max_steps": 12, "batch_size": 8, "log_every_n_steps": 4, "progress": "off", "eval_every_n_epochs": None,
          "seed": 3}


def build(cls=Alternating, run_dir=None, **config):
    torch.manual_seed(0)
    return cls(Pair(), None, data(), config={**CONFIG, **config}, run_dir=run_dir)


def without_clock(history):
    return [{k: v for k, v in r.items() if not is_timing(k)} for r in history]


def test_several_optimizers_with_schedulers_resume_bit_for_bit(tmp_path):
    whole = build(run_dir=tmp_path / "whole")
    whole.fit()
    first = build(run_dir=tmp_path / "cut", max_steps=7, checkpoint={"every_n_steps": 6})
    first.fit()
    second = build(run_dir=tmp_path / "cut")
    second.fit(resume_from=tmp_path / "cut" / "checkpoints" / "step-00000006.pt")

    assert second.global_step == whole.global_step == 12
    for key, value in whole.module.state_dict().items():
        assert torch.equal(second.module.state_dict()[key], value), key
    for mine, theirs in zip(second.optimizers, whole.optimizers):
        torch.testing.assert_close(mine.state_dict(), theirs.state_dict(), rtol=0, atol=0)
    assert [s.state_dict() for s in second.schedulers[:1]] == [s.state_dict() for s in whole.schedulers[:1]]
    assert second.schedulers[1].last_epoch == whole.schedulers[1].last_epoch == 12
    # The interval of steps 5-8 was cut at 6 (the checkpoint holds it) and resumed: logged as if never cut.
    assert without_clock(second.history) == without_clock(whole.history[1:])
    assert [r["step"] for r in whole.history] == [4, 8, 12]
    assert {"train/a_loss", "train/b_loss", "lr", "lr/1"} <= set(whole.history[0])

    # Another learning rate for the second optimizer is a change that breaks exact resume, named.
    class Faster(Alternating):
        def configure_optimizers(self):
            optimizers, schedulers = super().configure_optimizers()
            optimizers[1].param_groups[0]["lr"] = optimizers[1].param_groups[0]["initial_lr"] = 2e-2
            return optimizers, schedulers

    from trainer.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"optimizers\.1\.0\.lr: 0\.01 -> 0\.02 \(breaks exact resume\)"):
        build(Faster).load_checkpoint(tmp_path / "cut" / "checkpoints" / "step-00000006.pt")
    faster = build(Faster)
    changes = faster.load_checkpoint(tmp_path / "cut" / "checkpoints" / "step-00000006.pt", accept_changes=True)
    assert "optimizers.1.0.lr: 0.01 -> 0.02" in changes
    # The new rate, at the schedule's factor of step 6 (LambdaLR: 1 / (1 + 6)); the first optimizer's as saved.
    assert faster.optimizers[1].param_groups[0]["lr"] == pytest.approx(0.02 / 7)
    assert faster.optimizers[0].param_groups[0]["lr"] == second.optimizers[0].param_groups[0]["lr"] * 4  # StepLR at 6 vs 12

    # A run with one optimizer does not take this checkpoint (nor the other way round), saying why.
    class One(Trainer):
        def manual_step(self, batch):
            self.manual_backward(losses(self.model, batch)[0])
            self.optimizer_step(self.optimizer)

    torch.manual_seed(0)
    one = One(Pair(), lambda p: torch.optim.Adam(p), data(), config=CONFIG)
    with pytest.raises(CheckpointError, match=r"optimizers\.1\.class: 'SGD' -> \(absent\) \(breaks exact resume\)"):
        one.load_checkpoint(tmp_path / "cut" / "checkpoints" / "step-00000006.pt")


class Recorded(Callback):
    def __init__(self):
        self.batches, self.calls = [], []

    def on_train_batch_start(self, trainer, batch):
        self.batches.append([t.clone() for t in batch])

    def on_before_backward(self, trainer, loss):
        self.calls.append("backward")

    def on_after_backward(self, trainer):
        self.calls.append("after_backward")

    def on_before_optimizer_step(self, trainer, optimizer):
        self.calls.append(f"step {trainer.optimizers.index(optimizer)}")

    def on_before_zero_grad(self, trainer, optimizer):
        self.calls.append(f"zero_grad {trainer.optimizers.index(optimizer)}")


def test_manual_step_under_accumulation_equals_a_hand_written_loop():
    recorded = Recorded()
    torch.manual_seed(0)
    t = Alternating(Pair(), None, data(), callbacks=[recorded],
                    config={**CONFIG, "max_steps": 5, "grad_accum_steps": 2, "clip_grad_norm": 0.5})
    start = copy.deepcopy(t.module)
    t.fit()
    assert t.global_step == 5 and len(recorded.batches) == 10  # one step per window of two micro-batches

    # What a user writes by hand: gradients of each loss / 2 summed into its own parameters, clip,
    # step, schedule, zero, at the end of each window.
    m = start
    opt_a = torch.optim.Adam(m.a.parameters(), lr=1e-2)
    opt_b = torch.optim.SGD(m.b.parameters(), lr=1e-2, momentum=0.9)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, 3, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 1 / (1 + s))
    for window in range(5):
        for i in range(2):
            batch = recorded.batches[2 * window + i]
            a_loss, b_loss = losses(m, batch)  # both before a's step, as the manual step computes them
            for p, g in zip(m.a.parameters(), torch.autograd.grad(a_loss / 2, list(m.a.parameters()))):
                p.grad = g if p.grad is None else p.grad + g
            if i == 1:
                nn.utils.clip_grad_norm_(list(m.a.parameters()), 0.5)
                opt_a.step()
                sched_a.step()
                opt_a.zero_grad()
            for p, g in zip(m.b.parameters(), torch.autograd.grad(b_loss / 2, list(m.b.parameters()))):
                p.grad = g if p.grad is None else p.grad + g
            if i == 1:
                nn.utils.clip_grad_norm_(list(m.b.parameters()), 0.5)
                opt_b.step()
                sched_b.step()
                opt_b.zero_grad()
    for key, value in m.state_dict().items():
        torch.testing.assert_close(t.module.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    # The hooks around each optimizer's step, per window: backward on every micro-batch.
    assert recorded.calls[:8] == ["backward", "backward", "backward", "after_backward", "step 0", "zero_grad 0",
                                  "backward", "after_backward"]


def test_nonfinite_gradients_skip_that_optimizers_step_only():
    torch.manual_seed(0)
    t = build(on_nonfinite="skip", max_steps=4)
    t.nan_at = {3}
    with pytest.warns(UserWarning, match=r"step 3: a gradient of optimizer 1 \(SGD\) is not finite; skipped"):
        t.fit()
    assert t.skipped_steps == 1 and t.global_step == 4
    assert torch.isfinite(t.module.b.weight).all()

    # error: the run stops naming the step and the optimizer; max_consecutive_skips counts too
    t = build(on_nonfinite="error", max_steps=4)
    t.nan_at = {2}
    with pytest.raises(FloatingPointError, match=r"step 2: a gradient of optimizer 1 \(SGD\) is not finite"):
        t.fit()
    t = build(on_nonfinite="skip", max_consecutive_skips=1, max_steps=6)
    t.nan_at = {2, 3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FloatingPointError, match=r"not finite for 2 steps in a row"):
            t.fit()


def test_a_skipped_step_leaves_that_optimizers_weights_and_state():
    t = build(on_nonfinite="skip", max_steps=3)
    t.nan_at = {3}
    reference = build(max_steps=2)
    reference.fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit()
    assert torch.equal(t.module.b.weight, reference.module.b.weight)  # b's third step skipped
    assert not torch.equal(t.module.a.weight, reference.module.a.weight)  # a's taken
    assert torch.equal(t.optimizers[1].state_dict()["state"][0]["momentum_buffer"],
                       reference.optimizers[1].state_dict()["state"][0]["momentum_buffer"])


def test_fp16_one_scaler_for_every_optimizer():
    """On CPU: fp16 autocast and ``GradScaler("cpu")``. An overflowing gradient of b skips b's step
    only, and the shared scale is lowered once for the window."""
    t = build(precision="fp16", max_steps=3, on_nonfinite="skip")
    t.nan_at = {3}
    reference = build(precision="fp16", max_steps=2)
    for run in (t, reference):  # a scale these tiny gradients never overflow at (fp16 tops out at 65504)
        state = run.precision.scaler.state_dict()
        run.precision.scaler.load_state_dict({**state, "scale": 16.0, "growth_interval": 1000})
    reference.fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that b's scheduler stepped without its (skipped) optimizer
        t.fit()
    scaler = t.precision.scaler
    assert scaler.is_enabled() and reference.precision.scaler.get_scale() == 16.0 and scaler.get_scale() == 8.0
    assert torch.equal(t.module.b.weight, reference.module.b.weight)
    assert not torch.equal(t.module.a.weight, reference.module.a.weight)
    assert torch.isfinite(t.module.b.weight).all()


class Broken(Alternating):
    def manual_step(self, batch):
        raise KeyError("no such part")


def test_the_sanity_pass_runs_manual_step_without_stepping():
    from trainer.loop.sanity import SanityCheckError

    t = build(max_steps=1)
    before = copy.deepcopy(t.module.state_dict())
    t.sanity_check()
    assert all(torch.equal(v, before[k]) for k, v in t.module.state_dict().items())
    assert all(p.grad is None for p in t.module.parameters()) and t.global_step == 0
    with pytest.raises(SanityCheckError, match=r"Broken\.manual_step failed on the first training batch: KeyError"):
        build(Broken).sanity_check()


class NeverSteps(Trainer):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.module.a.parameters(), lr=0.1), torch.optim.SGD(self.module.b.parameters(), lr=0.1)]

    def manual_step(self, batch):
        self.manual_backward(sum(losses(self.model, batch)))


def test_misuse_is_one_clear_line():
    with pytest.raises(RuntimeError, match=r"manual_step ended optimizer step 1 without stepping an optimizer: call "
                                           r"self.optimizer_step\(optimizer\)"):
        build(NeverSteps).fit()

    class Shared(NeverSteps):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.module.parameters(), lr=0.1), torch.optim.SGD(self.module.b.parameters(), lr=0.1)]

    with pytest.raises(ValueError, match=r"optimizers 0 and 1 both hold the parameter 'b.weight'; give each parameter "
                                         r"to one optimizer"):
        build(Shared)

    class Mismatched(NeverSteps):
        def configure_optimizers(self):
            opts = super().configure_optimizers()
            return opts, [torch.optim.lr_scheduler.StepLR(opts[0], 2)]

    with pytest.raises(ValueError, match=r"gave 2 optimizer\(s\) and 1 scheduler\(s\); give one scheduler per "
                                         r"optimizer, in the same order, with None"):
        build(Mismatched)

    class Pairwise(NeverSteps):  # a tuple of two optimizers is two optimizers, not (optimizer, scheduler)
        def configure_optimizers(self):
            return tuple(super().configure_optimizers())

    assert len(build(Pairwise).optimizers) == 2 and build(Pairwise).schedulers == [None, None]

    class Automatic(Trainer):
        configure_optimizers = NeverSteps.configure_optimizers

    with pytest.raises(ValueError, match=r"2 optimizers were given, and the automatic training step steps one: "
                                         r"override manual_step\(batch\)"):
        build(Automatic)

    class Foreign(NeverSteps):
        def manual_step(self, batch):
            self.manual_backward(losses(self.model, batch)[0])
            self.optimizer_step(torch.optim.SGD(self.module.a.parameters(), lr=0.1))

    with pytest.raises(ValueError, match=r"optimizer_step: the SGD given is not one of this Trainer's optimizers"):
        build(Foreign).fit()

    class Mixed(Trainer):
        def training_step(self, batch):
            self.manual_backward(losses(self.model, batch)[0])

    with pytest.raises(RuntimeError, match=r"manual_backward\(\) belongs in manual_step\(batch\): this Mixed does not "
                                           r"override manual_step"):
        Mixed(Pair(), lambda p: torch.optim.SGD(p, lr=0.1), data(), config={**CONFIG, "sanity_check": False}).fit()


class Turns(Alternating):
    """Steps a on a window's first micro-batch and b on its second: each asks once per window."""

    def manual_step(self, batch):
        opt_a, opt_b = self.optimizers
        a_loss, b_loss = losses(self.model, batch)
        first = self.batch_in_epoch % 2 == 1
        self.manual_backward(a_loss if first else b_loss, opt_a if first else opt_b)
        self.optimizer_step(opt_a if first else opt_b)


class Counted(Callback):
    def __init__(self):
        self.steps = {}

    def on_before_optimizer_step(self, trainer, optimizer):
        self.steps[type(optimizer).__name__] = self.steps.get(type(optimizer).__name__, 0) + 1


def test_a_step_asked_for_before_the_windows_last_micro_batch_is_taken_at_its_end():
    counted = Counted()
    torch.manual_seed(0)
    t = Turns(Pair(), None, data(), callbacks=[counted], config={**CONFIG, "max_steps": 4, "grad_accum_steps": 2})
    t.fit()
    assert counted.steps == {"Adam": 4, "SGD": 4}  # a's request on each first micro-batch is not dropped


def test_an_optimizer_stepped_twice_in_a_window_steps_twice_but_not_under_fp16_and_values_are_numbers():
    class Twice(Alternating):
        def manual_step(self, batch):
            opt_a = self.optimizers[0]
            self.manual_backward(losses(self.model, batch)[0], opt_a)
            self.optimizer_step(opt_a)
            self.optimizer_step(opt_a)

    counted = Counted()
    torch.manual_seed(0)
    Twice(Pair(), None, data(), callbacks=[counted], config={**CONFIG, "max_steps": 2}).fit()
    assert counted.steps == {"Adam": 4}  # as a WGAN's critic steps several times a window (docs/loop.md)
    with pytest.raises(RuntimeError, match=r"manual_step stepped optimizer 0 \(Adam\) twice in optimizer step 1 under "
                                           r"precision: fp16, whose one GradScaler update per window allows one step"):
        build(Twice, sanity_check=False, precision="fp16").fit()

    class Words(Alternating):
        def manual_step(self, batch):
            return {**super().manual_step(batch), "note": "hello"}

    with pytest.raises(TypeError, match=r"manual_step returned 'note': str; each value of its dict is logged as "
                                        r"train/note and must be a tensor or a number"):
        build(Words, sanity_check=False).fit()


def test_the_accumulation_a_resume_sets_is_the_one_manual_backward_divides_by():
    """A resume on another number of ranks sets grad_accum_steps after the Trainer is built (see
    checkpoint.keep_global_batch): manual_backward must divide by the value in force."""
    torch.manual_seed(0)
    later = Alternating(Pair(), None, data(), config={**CONFIG, "max_steps": 3})
    later.config.grad_accum_steps = 2
    later.fit()
    built = build(max_steps=3, grad_accum_steps=2)
    built.fit()
    for key, value in built.module.state_dict().items():
        assert torch.equal(later.module.state_dict()[key], value), key
