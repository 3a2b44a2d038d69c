"""The optimizer step alone (trainer.loop.step): built from real parts, without a Trainer."""

import copy
import warnings

import pytest
import torch
from torch import nn

from trainer.loop.nonfinite import NonFiniteGuard
from trainer.loop.step import OptimizerStep, split_loss
from trainer.parallel.distributed import Layout
from trainer.parallel.strategy import SingleProcess

CPU = torch.device("cpu")


class Parts:
    """A model, its SGD optimizer and scheduler, and an ``OptimizerStep`` over them whose hooks
    note their order."""

    def __init__(self, policy="skip", fp16=False, clip=None):
        torch.manual_seed(0)
        self.model = nn.Linear(4, 2)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.5)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=0.5)
        self.scaler = torch.amp.GradScaler("cpu", enabled=fp16, init_scale=2.0**8)
        self.guard = NonFiniteGuard(policy, 3, [self.optimizer], CPU, fp16)
        self.guard.start(0, 10)
        self.calls = []
        hooks = {
            "on_after_backward": [lambda owner: self.calls.append(("after_backward", self.grads()))],
            "on_before_optimizer_step": [lambda owner, opt: self.calls.append(("before_optimizer_step", opt))],
            "on_before_zero_grad": [lambda owner, opt: self.calls.append(("before_zero_grad", self.grads()))],
        }
        self.step = OptimizerStep(self, hooks, SingleProcess(Layout(), CPU), self.guard, self.scaler,
                                  [self.optimizer], [self.scheduler], CPU, clip_grad_norm=clip)

    def grads(self):
        return [None if p.grad is None else p.grad.clone() for p in self.model.parameters()]

    def backward(self, bad_grad=False):
        x = torch.ones(3, 4)
        loss = self.model(x).pow(2).mean()
        self.scaler.scale(loss).backward()  # the loss itself when fp16 is off
        if bad_grad:
            self.model.weight.grad[0, 0] = float("inf")
        return loss.detach()


def test_a_step_runs_its_stages_in_order_and_steps_as_the_optimizer_would():
    parts = Parts()
    reference_model = copy.deepcopy(parts.model)
    reference = torch.optim.SGD(reference_model.parameters(), lr=0.5)
    reference_model(torch.ones(3, 4)).pow(2).mean().backward()
    reference.step()

    loss = parts.backward()
    assert parts.step.run(parts.optimizer, 1, loss) is False
    assert [name for name, _ in parts.calls] == ["after_backward", "before_optimizer_step", "before_zero_grad"]
    assert parts.calls[1][1] is parts.optimizer
    assert all(g is not None for g in parts.calls[0][1])  # the hooks see the step's gradients
    for ours, theirs in zip(parts.model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        assert ours.grad is None  # zero_grad, after on_before_zero_grad
    assert parts.scheduler.get_last_lr() == [0.25]


@pytest.mark.parametrize("bad", ["gradient", "loss"])
def test_a_non_finite_step_is_skipped_whole_but_still_counts(bad):
    parts = Parts()
    before = [p.detach().clone() for p in parts.model.parameters()]
    loss = parts.backward(bad_grad=bad == "gradient")
    if bad == "loss":
        loss = loss * float("nan")
    with pytest.warns(UserWarning, match="step 1: .*skipped this optimizer step"):
        assert parts.step.run(parts.optimizer, 1, loss) is True
    for p, b in zip(parts.model.parameters(), before):
        assert torch.equal(p, b) and p.grad is None
    assert parts.scheduler.get_last_lr() == [0.25]  # the schedule stays aligned with the steps
    assert [name for name, _ in parts.calls] == ["after_backward", "before_optimizer_step", "before_zero_grad"]
    assert parts.guard.skipped == 1

    # The next, finite step is taken: the flag of the bad one was cleared.
    loss = parts.backward()
    assert parts.step.run(parts.optimizer, 2, loss) is False
    assert not all(torch.equal(p, b) for p, b in zip(parts.model.parameters(), before))


def test_under_on_nonfinite_error_a_bad_gradient_raises_before_the_weights_change():
    parts = Parts(policy="error")
    before = [p.detach().clone() for p in parts.model.parameters()]
    loss = parts.backward(bad_grad=True)
    with pytest.raises(FloatingPointError, match="step 1: a gradient is not finite"):
        parts.step.run(parts.optimizer, 1, loss)
    assert all(torch.equal(p, b) for p, b in zip(parts.model.parameters(), before))


def test_clipping_sees_the_gradients_after_the_hooks_and_the_optimizer_sees_them_clipped():
    parts = Parts(clip=1e-3)
    before = [p.detach().clone() for p in parts.model.parameters()]
    loss = parts.backward()
    grads = parts.grads()
    assert parts.step.run(parts.optimizer, 1, loss) is False
    moved = torch.cat([(b - p.detach()).flatten() for p, b in zip(parts.model.parameters(), before)])
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    assert norm > 1e-3
    torch.testing.assert_close(torch.linalg.vector_norm(moved), torch.tensor(0.5 * 1e-3), rtol=1e-4, atol=0)


def test_fp16_unscales_before_the_hooks_and_updates_the_scale_once_per_window():
    parts = Parts(fp16=True)
    loss = parts.backward()
    unscaled = [g.clone() for g in (p.grad / parts.scaler.get_scale() for p in parts.model.parameters())]
    assert not parts.step.run(parts.optimizer, 1, loss)
    torch.testing.assert_close(parts.calls[0][1], unscaled)  # on_after_backward saw true gradients

    # manual_step's steps: the scale changes at end_window, after the window's last step, not before.
    scale = parts.scaler.get_scale()
    parts.backward(bad_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # under fp16 the scaler owns a bad step: no warning of ours
        parts.step.run(parts.optimizer, 2, None, None, "optimizer 0 (SGD)", False)
    assert parts.scaler.get_scale() == scale
    parts.step.end_window()
    assert parts.scaler.get_scale() == scale / 2  # backed off once, for the bad step

    # The automatic loop's one step per window updates it itself.
    parts.backward(bad_grad=True)
    parts.step.run(parts.optimizer, 3, None)
    assert parts.scaler.get_scale() == scale / 4


def test_split_loss_divides_a_mean_over_the_window_and_scales_what_backward_gets():
    loss = torch.tensor(3.0)
    assert split_loss(loss, 1) == (loss, loss, None)
    got, divided, count = split_loss({"loss": loss, "acc": 1.0}, 4)
    assert got is loss and divided.item() == 0.75 and count is None
    _, scaled, _ = split_loss(loss, 4, lambda t: t * 8)
    assert scaled.item() == 6.0
    total, scaled, count = split_loss({"loss_sum": torch.tensor(6.0), "count": torch.tensor(3)}, 4, lambda t: t * 8)
    assert total.item() == 6.0 and scaled.item() == 48.0 and count.item() == 3  # a sum is not divided
    with pytest.raises(TypeError, match="training_step must return a loss Tensor"):
        split_loss(3.0, 1)
