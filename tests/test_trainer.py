import copy
import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import batches, classification, mlp, quiet
from trainer import Callback, SanityCheckError, Trainer, TrainerConfig


class Vector(nn.Module):
    """The seed notebook's parameter x = [1., 2., 3.]."""

    def __init__(self, values):
        super().__init__()
        self.x = nn.Parameter(torch.tensor(values))


class GradRecorder(Callback):
    def __init__(self, param):
        self.param = param
        self.seen = []

    def on_after_backward(self, trainer):
        self.seen.append(self.param.grad.clone())


# ------------------------------------------------------------------ the seed notebook's numbers


def test_mean_loss_gradient_matches_the_notebook():
    class Seed(Trainer):
        def training_step(self, batch):
            x = self.model.x
            return (2 * (x + 2) ** 2).mean()

    model = Vector([1.0, 2.0, 3.0])
    rec = GradRecorder(model.x)
    Seed(model, torch.optim.SGD(model.parameters(), lr=0.0), [None], callbacks=[rec], config=quiet()).fit()
    torch.testing.assert_close(rec.seen[0], torch.tensor([4.0, 16 / 3, 20 / 3]))


def test_backward_override_with_a_vector_matches_the_notebook():
    class VectorBackward(Trainer):
        def training_step(self, batch):
            x = self.model.x
            return 2 * (x + 2) ** 2

        def backward(self, loss):
            loss.backward(torch.tensor([1.0, 1.5, 1.5]))

    model = Vector([1.0, 2.0, 3.0])
    rec = GradRecorder(model.x)
    t = VectorBackward(model, torch.optim.SGD(model.parameters(), lr=0.0), [None], callbacks=[rec], config=quiet())
    t.fit()
    torch.testing.assert_close(rec.seen[0], torch.tensor([12.0, 24.0, 30.0]))
    # a non-scalar loss is logged as its mean: 2*(3^2 + 4^2 + 5^2)/3
    assert t.history[0]["train/loss"] == pytest.approx(2 * (9 + 16 + 25) / 3)


def test_zero_grad_between_steps_so_gradients_do_not_accumulate():
    class Sum(Trainer):
        def training_step(self, batch):
            return (self.model.x * 3).sum()

    model = Vector([1.0, 1.0, 1.0, 1.0])
    rec = GradRecorder(model.x)
    Sum(model, torch.optim.SGD(model.parameters(), lr=0.1), [None] * 3, callbacks=[rec], config=quiet()).fit()
    assert len(rec.seen) == 3
    for grad in rec.seen:
        assert torch.equal(grad, torch.full((4,), 3.0))
    assert model.x.grad is None  # zero_grad(set_to_none=True) after the last step


def test_frozen_parameters_get_no_gradient_and_stay_identical():
    model = mlp()
    model[0].requires_grad_(False)
    before = copy.deepcopy(model[0].state_dict())
    seen = []

    class Check(Callback):
        def on_after_backward(self, trainer):
            seen.append((model[0].weight.grad, model[2].weight.grad is not None))

    t = Trainer(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5),
                batches(5, 16), loss_fn=F.cross_entropy, callbacks=[Check()], config=quiet())
    t.fit()
    assert seen and all(g is None and trained for g, trained in seen)
    for k, v in model[0].state_dict().items():
        assert torch.equal(v, before[k])


# ------------------------------------------------------------------ parity with a hand-written loop


def hand_loop(model, optimizer, data, steps):
    for x, y in data[:steps]:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
], ids=["sgd", "adamw"])
def test_weights_bit_identical_to_a_hand_written_loop(make_opt):
    data = batches(12, 16)
    raw = mlp(seed=3)
    hand_loop(raw, make_opt(raw.parameters()), data, 12)

    model = mlp(seed=3)
    Trainer(model, make_opt(model.parameters()), data, loss_fn=F.cross_entropy,
            config=quiet(grad_logging={"every_n_steps": 1, "per_layer": True})).fit()
    for (name, a), b in zip(model.state_dict().items(), raw.state_dict().values()):
        assert torch.equal(a, b), name


def test_grad_accumulation_matches_the_full_batch():
    full = batches(6, 32)
    micro = [(x[i : i + 8], y[i : i + 8]) for x, y in full for i in range(0, 32, 8)]

    a = mlp(seed=4)
    Trainer(a, torch.optim.SGD(a.parameters(), lr=0.2), full, loss_fn=F.cross_entropy, config=quiet()).fit()
    b = mlp(seed=4)
    t = Trainer(b, torch.optim.SGD(b.parameters(), lr=0.2), micro, loss_fn=F.cross_entropy,
                config=quiet(grad_accum_steps=4))
    t.fit()
    assert t.global_step == 6
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_partial_accumulation_window_steps_at_epoch_end():
    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(5, 4), loss_fn=F.cross_entropy,
                config=quiet(grad_accum_steps=2, max_epochs=2))
    t.fit()
    assert t.global_step == 6  # 3 per epoch: 2 full windows and a partial one


def test_dataset_and_tensor_paths_see_the_same_batches():
    x, y = classification(50)
    seen = {}

    class Record(Callback):
        def __init__(self, key):
            self.key = key

        def on_train_batch_start(self, trainer, batch):
            seen.setdefault(self.key, []).append(batch[0].clone())

    class Indexed(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return x[i], y[i]

    for key, data in [("dataset", Indexed()), ("tensors", torch.utils.data.TensorDataset(x, y)), ("tuple", (x, y))]:
        model = mlp()
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, loss_fn=F.cross_entropy,
                callbacks=[Record(key)], config=quiet(batch_size=16, max_epochs=2, seed=7)).fit()
    assert len(seen["dataset"]) == 8  # 4 batches an epoch, the last one of 2 samples
    for a, b, c in zip(seen["dataset"], seen["tensors"], seen["tuple"]):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(seen["dataset"][0], seen["dataset"][4])  # each epoch has its own order
    assert not torch.equal(torch.cat(seen["dataset"][:4]), x)  # shuffled


def test_batches_inside_dicts_and_dataclasses_reach_training_step():
    import dataclasses

    @dataclasses.dataclass
    class Pair:
        inputs: torch.Tensor
        labels: torch.Tensor

    class DictTrainer(Trainer):
        def training_step(self, batch):
            assert isinstance(batch["pair"], Pair)
            return F.cross_entropy(self.model(batch["pair"].inputs), batch["pair"].labels)

    data = [{"pair": Pair(x, y)} for x, y in batches(3, 8)]
    model = mlp()
    t = DictTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, config=quiet())
    t.fit()
    assert t.global_step == 3


# ------------------------------------------------------------------ hooks

DOCUMENTED_STEP = [
    "on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
    "on_before_zero_grad", "on_train_batch_end",
]


def recorder():
    """A callback that implements every hook by appending the hook's name to ``calls``."""
    from trainer import HOOKS

    calls = []
    methods = {name: (lambda name: lambda self, trainer, *args: calls.append(name))(name) for name in HOOKS}
    return type("Recorder", (Callback,), methods)(), calls


def test_hook_order_is_the_documented_order():
    rec, calls = recorder()
    model = mlp()
    x, y = classification(32)
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(4, 8), val_data=[(x, y)],
            loss_fn=F.cross_entropy, callbacks=[rec],
            config=quiet(grad_accum_steps=2, log_every_n_steps=2)).fit()
    micro = ["on_train_batch_start", "on_before_backward", "on_train_batch_end"]
    step = DOCUMENTED_STEP
    expected = (
        ["on_fit_start", "on_train_epoch_start"]
        + micro + step
        + micro + step + ["on_log"]
        + ["on_train_epoch_end", "on_validation_start", "on_validation_end", "on_log", "on_fit_end"]
    )
    assert calls == expected


def test_trainer_subclass_hooks_run_before_callbacks():
    order = []

    class Mine(Trainer):
        def on_after_backward(self):
            order.append("trainer")

    class Cb(Callback):
        def on_after_backward(self, trainer):
            order.append("callback")

    model = mlp()
    Mine(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(1, 4), loss_fn=F.cross_entropy,
         callbacks=[Cb()], config=quiet()).fit()
    assert order == ["trainer", "callback"]


def test_misspelt_hook_on_a_callback_is_rejected():
    class Typo(Callback):
        def on_after_backwards(self, trainer):
            pass

    model = mlp()
    with pytest.raises(TypeError, match="on_after_backwards.*did you mean 'on_after_backward'"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), callbacks=[Typo()])


def test_misspelt_hook_on_a_trainer_subclass_is_rejected():
    class Typo(Trainer):
        def on_train_epoch_ends(self):
            pass

    model = mlp()
    with pytest.raises(TypeError, match="on_train_epoch_ends.*did you mean 'on_train_epoch_end'"):
        Typo(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_on_exception_sees_the_error_and_it_propagates():
    seen = []

    class Boom(Trainer):
        def training_step(self, batch):
            if self.global_step == 1:  # in the loop: a failure of the sanity pass comes before on_fit_start
                raise RuntimeError("boom")
            return F.cross_entropy(self.model(batch[0]), batch[1])

        def on_exception(self, exc):
            seen.append(exc)

    model = mlp()
    with pytest.raises(RuntimeError, match="boom"):
        Boom(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(2, 4), config=quiet()).fit()
    assert len(seen) == 1 and str(seen[0]) == "boom"


# ------------------------------------------------------------------ metrics, stopping, evaluation


def test_history_has_loss_lr_throughput_and_dict_metrics():
    class WithExtra(Trainer):
        def training_step(self, batch):
            x, y = batch
            out = self.model(x)
            return {"loss": F.cross_entropy(out, y), "acc": (out.argmax(1) == y).float().mean()}

    model = mlp()
    t = WithExtra(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(6, 8),
                  config=quiet(log_every_n_steps=3))
    history = t.fit()
    assert [r["step"] for r in history] == [3, 6]
    for record in history:
        assert {"train/loss", "train/acc", "lr", "samples_per_sec", "epoch"} <= set(record)
        assert record["lr"] == 0.1


def test_logged_loss_is_the_mean_over_the_interval():
    losses = []

    class Keep(Callback):
        def on_before_backward(self, trainer, loss):
            losses.append(loss.item())

    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(4, 8), loss_fn=F.cross_entropy,
                callbacks=[Keep()], config=quiet(log_every_n_steps=4))
    t.fit()
    assert t.history[0]["train/loss"] == pytest.approx(sum(losses) / 4, rel=1e-6)


def test_max_steps_counts_optimizer_steps_across_epochs():
    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(3, 4), loss_fn=F.cross_entropy,
                config=quiet(max_steps=7, grad_accum_steps=1))
    t.fit()
    assert t.global_step == 7 and t.epoch == 2


def test_scheduler_steps_once_per_optimizer_step():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    t = Trainer(model, opt, batches(8, 4), loss_fn=F.cross_entropy, scheduler=sched,
                config=quiet(grad_accum_steps=2))
    t.fit()
    assert t.global_step == 4
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 5)
    assert [r["lr"] for r in t.history] == pytest.approx([1 / 2, 1 / 3, 1 / 4, 1 / 5])


def test_clip_grad_norm_limits_the_update():
    model = nn.Linear(4, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    data = [(torch.full((2, 4), 100.0), torch.zeros(2, 1))]
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=1.0), data, loss_fn=lambda o, y: -(o.sum()),
                config=quiet(clip_grad_norm=1.0))
    t.fit()
    assert model.weight.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_evaluate_averages_over_samples_not_batches():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    # batch 1: 3 samples all right; batch 2: 1 sample wrong -> acc 3/4, not (1 + 0) / 2
    data = [
        (torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0, 1])),
        (torch.tensor([[1.0, 0.0]]), torch.tensor([1])),
    ]
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=F.cross_entropy, config=quiet())
    metrics = t.evaluate(data)
    assert metrics["val/acc"] == pytest.approx(0.75)
    assert model.training


def test_run_dir_gets_metric_files(tmp_path):
    import csv
    import json

    model = mlp()
    x, y = classification(32)
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(4, 8), val_data=(x, y),
            loss_fn=F.cross_entropy, run_dir=tmp_path, config=quiet(log_every_n_steps=2)).fit()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 4]
    assert "val/acc" in lines[-1]
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert len(rows) == 3 and float(rows[0]["train/loss"]) == pytest.approx(lines[0]["train/loss"])
    assert rows[2]["val/acc"] != "" and rows[0]["val/acc"] == ""


# ------------------------------------------------------------------ precision on CPU


def test_bf16_autocast_runs_the_forward_in_bfloat16():
    dtypes = []

    class Peek(Trainer):
        def training_step(self, batch):
            x, y = batch
            out = self.model(x)
            dtypes.append(out.dtype)
            return F.cross_entropy(out.float(), y)

    model = mlp()
    Peek(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(2, 8), config=quiet(precision="bf16")).fit()
    assert dtypes == [torch.bfloat16] * 3  # the sanity pass's forward runs under autocast too
    assert model[0].weight.dtype == torch.float32  # master weights stay fp32


def test_fp16_goes_through_the_grad_scaler_and_gradients_are_unscaled_at_the_logging_point():
    grads = {}

    class Peek(Callback):
        def on_after_backward(self, trainer):
            grads["fp16"] = model[0].weight.grad.clone()

    model = mlp(seed=5)
    data = batches(1, 8)
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), data, loss_fn=F.cross_entropy,
                callbacks=[Peek()], config=quiet(precision="fp16"))
    assert t.precision.scaler.is_enabled()
    t.fit()
    assert t.precision.scaler.get_scale() > 1.0

    ref = mlp(seed=5)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(ref(data[0][0]), data[0][1])
    loss.backward()
    torch.testing.assert_close(grads["fp16"], ref[0].weight.grad, rtol=1e-2, atol=1e-3)


class DtypesAtStep(Callback):
    """The gradients' dtypes just before each optimizer step."""

    def __init__(self):
        self.grads = set()

    def on_before_optimizer_step(self, trainer, optimizer):
        self.grads |= {p.grad.dtype for p in trainer.module.parameters()}


@pytest.mark.parametrize("optimizer", ["fused", "foreach", "built before the Trainer"])
def test_bf16_true_holds_weights_gradients_and_optimizer_state_in_bfloat16(tmp_path, optimizer):
    from trainer.checkpoint import list_checkpoints, load_checkpoint

    model = mlp()
    if optimizer == "built before the Trainer":  # on the fp32 parameters, which are converted in place
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    else:
        opt = lambda params: torch.optim.AdamW(params, lr=1e-2, **{optimizer: True})  # noqa: E731
    seen = DtypesAtStep()
    t = Trainer(model, opt, batches(4, 8), val_data=batches(1, 8), loss_fn=F.cross_entropy, run_dir=tmp_path,
                callbacks=[seen], config=quiet(precision="bf16-true", clip_grad_norm=1.0,
                                               grad_logging={"every_n_steps": 1}))
    t.fit()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert seen.grads == {torch.bfloat16}
    state = t.optimizer.state
    assert len(state) == 4 and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16
                                   for s in state.values())  # ("step" is torch's fp32 counter)
    assert not t.precision.scaler.is_enabled()
    assert torch.get_default_dtype() == torch.float32  # the steps' bf16 default is not left behind
    # Logged as numbers summed in fp32, as in any precision.
    assert all(type(r[k]) is float for r in t.history for k in ("train/loss", "grad_norm/total") if k in r)
    saved = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert {v.dtype for v in saved["model"].values()} == {torch.bfloat16}
    assert {v["exp_avg"].dtype for v in saved["optimizer"]["state"].values()} == {torch.bfloat16}


def test_bf16_true_builds_a_model_factory_in_bfloat16():
    made = []

    def build():
        made.append(torch.get_default_dtype())
        return nn.Linear(8, 3)

    t = Trainer(build, lambda params: torch.optim.SGD(params, lr=0.1), batches(1, 4), loss_fn=F.cross_entropy,
                config=quiet(precision="bf16-true"))
    assert made == [torch.bfloat16] and t.module.weight.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32


def test_bf16_true_steps_see_float_inputs_in_bfloat16_and_integer_inputs_untouched():
    seen = {"train": [], "val": []}

    class Peek(Trainer):
        def record(self, where, batch):
            seen[where].append((batch["x"].dtype, batch["ids"].dtype, torch.zeros(1).dtype))

        def training_step(self, batch):
            self.record("train", batch)
            out = self.model(batch["x"] + batch["ids"].unsqueeze(1))
            return F.cross_entropy(out, batch["y"])

        def validation_step(self, batch):
            self.record("val", batch)
            return {"loss": F.cross_entropy(self.model(batch["x"]), batch["y"])}

    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(4, 8, generator=g), "ids": torch.arange(4), "y": torch.arange(4) % 3} for _ in range(2)]
    model = mlp()
    t = Peek(model, torch.optim.SGD(model.parameters(), lr=0.1), data, val_data=data,
             config=quiet(precision="bf16-true"))
    history = t.fit()
    expected = (torch.bfloat16, torch.int64, torch.bfloat16)  # a tensor made in the step is bf16 too
    assert seen["train"] == [expected] * 3  # the sanity pass's batch, then two steps
    assert seen["val"] == [expected] * 3  # the sanity pass's batch, then the two of the validation
    assert data[0]["x"].dtype == torch.float32  # the user's data is left as it was
    assert type(history[-1]["val/loss"]) is float


# ------------------------------------------------------------------ bad input


def test_no_optimizer_is_a_clear_error():
    with pytest.raises(TypeError, match="no optimizer.*configure_optimizers"):
        Trainer(mlp())


def test_configure_optimizers_supplies_the_optimizer_with_trainable_parameters_only():
    class Mine(Trainer):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.trainable_parameters(), lr=1e-3)

    model = mlp()
    model[0].requires_grad_(False)
    t = Mine(model)
    params = t.optimizer.param_groups[0]["params"]
    assert len(params) == 2 and all(p.requires_grad for p in params)


def test_an_optimizer_given_wins_over_configure_optimizers_and_a_warning_says_so():
    class Mine(Trainer):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.trainable_parameters(), lr=3e-3)
            return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    x, y = classification(32)
    model = mlp()
    with pytest.warns(UserWarning, match=r"^Mine.configure_optimizers\(\) is not called: the optimizer given as "
                                         r"Trainer\(optimizer=...\) is used; leave optimizer out to train with "
                                         r"Mine.configure_optimizers\(\)$") as caught:
        t = Mine(model, torch.optim.SGD(model.parameters(), lr=1e-5), (x, y), loss_fn=F.cross_entropy,
                 config=quiet(max_steps=2, batch_size=16))
    assert caught[0].filename == __file__  # the line that built the Trainer
    assert [r["lr"] for r in t.fit()] == [1e-5, 1e-5]

    # A scheduler given beside the optimizer configure_optimizers() builds: the one given is used.
    with pytest.warns(UserWarning, match=r"^the scheduler Mine.configure_optimizers\(\) returned is not used: the one "
                                         r"given as Trainer\(scheduler=...\) is"):
        t = Mine(mlp(), None, (x, y), loss_fn=F.cross_entropy, config=quiet(max_steps=2, batch_size=16),
                 scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1))
    assert [r["lr"] for r in t.fit()] == pytest.approx([3e-4, 3e-5])


def test_non_scalar_loss_without_backward_override_is_a_clear_error():
    class Vec(Trainer):
        def training_step(self, batch):
            return self.model.x * 2

    model = Vector([1.0, 2.0])
    with pytest.raises(ValueError, match=r"non-scalar loss of shape \(2,\).*override backward"):
        Vec(model, torch.optim.SGD(model.parameters(), lr=0.1), [None], config=quiet()).fit()


# The sanity pass finds these before training; the loop's own checks remain for data it cannot read
# ahead (an iterator) and for sanity_check: false.
@pytest.mark.parametrize("sanity", [True, False])
def test_batch_the_default_step_cannot_unpack_is_a_clear_error(sanity):
    model = mlp()
    data = [torch.randn(2, 8)]  # a bare tensor would silently unpack into two rows
    with pytest.raises(SanityCheckError if sanity else TypeError,
                       match=r"\(inputs, targets\), got a Tensor of shape \(2, 8\).*override training_step"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, loss_fn=F.cross_entropy,
                config=quiet(sanity_check=sanity)).fit()


@pytest.mark.parametrize("sanity, expected", [(True, "loss_fn is missing"), (False, "no loss_fn")])
def test_missing_loss_fn_is_a_clear_error(sanity, expected):
    model = mlp()
    with pytest.raises(SanityCheckError if sanity else TypeError, match=expected):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(1, 4),
                config=quiet(sanity_check=sanity)).fit()


@pytest.mark.parametrize("sanity, expected", [(True, "Bad.training_step returned a float, not a loss Tensor"),
                                              (False, "must return a loss Tensor")])
def test_training_step_returning_a_float_is_a_clear_error(sanity, expected):
    class Bad(Trainer):
        def training_step(self, batch):
            return 1.0

    model = mlp()
    with pytest.raises(SanityCheckError if sanity else TypeError, match=expected):
        Bad(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(1, 4), config=quiet(sanity_check=sanity)).fit()


def test_wrong_config_value_names_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_steps"):
        TrainerConfig(max_steps="ten")
    with pytest.raises(ValidationError, match="expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        TrainerConfig(device="gpu")
    with pytest.raises(ValidationError, match="max_step"):
        TrainerConfig(max_step=3)


def test_every_config_field_has_a_description():
    from trainer.config import CheckpointConfig, GradLoggingConfig

    for model in (TrainerConfig, GradLoggingConfig, CheckpointConfig):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name}"


def test_out_of_memory_is_reraised_with_what_to_try():
    class Oom(Trainer):
        def training_step(self, batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model = mlp()
    t = Oom(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(2, 4),
            config=quiet(batch_size=256, grad_accum_steps=2, precision="bf16"))
    with pytest.raises(torch.OutOfMemoryError) as info:
        t.fit()
    message = str(info.value)
    assert "batch_size 256" in message and "grad_accum_steps 2" in message and "bf16" in message
    assert "Try a smaller batch_size" in message and "Tried to allocate 2.00 GiB" in message
    assert "precision: bf16-true (weights, gradients and optimizer state in bf16" in message  # bf16's next lever
    assert "activation_checkpointing: [<block class>]" in message  # an MLP has no list of blocks to name

    from trainer.examples.char_lm import CharTransformer

    for patterns, suggested in ([], "activation_checkpointing: [blocks.*]"), (["Block"], None):
        model = CharTransformer(block_size=8, d_model=8, n_layers=1, n_heads=1)
        t = Oom(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(2, 4),
                config=quiet(activation_checkpointing=patterns, sanity_check=False))
        with pytest.raises(torch.OutOfMemoryError) as info:
            t.fit()
        assert (suggested in str(info.value)) if suggested else "activation_checkpointing" not in str(info.value)


@pytest.mark.slow
def test_compile_trains_and_times_the_first_step_separately():
    x, y = classification(64)
    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), loss_fn=F.cross_entropy,
                config=quiet(compile=True, batch_size=16, max_steps=4, log_every_n_steps=2))
    t.fit()
    assert t.history[0]["time/first_step_s"] > 0
    assert "time/first_step_s" not in t.history[1]
    assert t.model is not t.module and not any(k.startswith("_orig_mod") for k in t.state_dict()["model"])


def test_resuming_at_the_end_of_an_epoch_yields_no_empty_batch():
    from trainer.data.sources import TensorSource

    x, y = classification(32)
    source = TensorSource((x, y), batch_size=8, seed=0, shuffle=True, device=torch.device("cpu"))
    assert len(list(source.epoch(0, 4))) == 0
    assert [len(b[0]) for b in source.epoch(0, 2)] == [8, 8]


def test_extra_metrics_are_means_over_the_interval_like_the_loss():
    class WithExtra(Trainer):
        def training_step(self, batch):
            x, y = batch
            loss = F.cross_entropy(self.model(x), y)
            return {"loss": loss, "same": loss * 1.0}

    model = mlp()
    t = WithExtra(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(6, 8), config=quiet(log_every_n_steps=3))
    t.fit()
    for record in t.history:
        assert record["train/same"] == pytest.approx(record["train/loss"], rel=1e-6)


def test_deterministic_is_on_during_fit_and_restored_after():
    seen = []

    class Peek(Callback):
        def on_after_backward(self, trainer):
            seen.append(torch.are_deterministic_algorithms_enabled())

    model = mlp()
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(2, 4), loss_fn=F.cross_entropy,
            callbacks=[Peek()], config=quiet(deterministic=True)).fit()
    assert seen == [True, True]
    assert not torch.are_deterministic_algorithms_enabled()


def settings():
    from trainer.device import _tf32_get

    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark, _tf32_get(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


@pytest.mark.parametrize("fails", [False, True])
def test_global_torch_settings_are_as_they_were_after_fit_and_evaluate(fails):
    """The user's own choices (here all of them unlike the defaults a run sets) come back after fit
    and evaluate, also when fit raises."""
    from trainer.device import _TF32_ON, _tf32_set, torch_settings

    class Boom(Trainer):
        def training_step(self, batch):
            if fails and self.global_step == 1:  # in the loop, after the sanity pass and a step
                raise RuntimeError("boom")
            return super().training_step(batch)

    before = settings()
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = True
        off = ("ieee", "ieee") if isinstance(_TF32_ON[0], str) else (False, False)
        _tf32_set(off)
        mine = settings()
        model = mlp()
        t = Boom(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(2, 4), loss_fn=F.cross_entropy,
                 config=quiet(deterministic=True))
        if fails:
            with pytest.raises(RuntimeError, match="boom"):
                t.fit()
        else:
            t.fit()
        assert settings() == mine
        t.evaluate(batches(1, 4))
        assert settings() == mine
        # What a CUDA run switches on, checked without a GPU: TF32 and deterministic mode inside, undone after.
        with torch_settings(torch.device("cuda"), deterministic=True):
            assert settings() == (True, False, False, _TF32_ON, mine[4] or ":4096:8")
        assert settings() == mine
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]
        _tf32_set(before[3])


def test_a_cpu_run_leaves_per_backend_precision_settings_untouched():
    """torch's per-backend precision settings: a CPU run neither reads the legacy global one (an error
    once a user chose per-backend ones) nor pins 'none' (inherit) to a fixed value."""
    if not hasattr(torch.backends, "mkldnn") or not hasattr(torch.backends.mkldnn, "matmul"):
        pytest.skip("this torch has no per-backend precision settings")
    before = (torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    try:
        torch.backends.mkldnn.matmul.fp32_precision = "ieee"
        model = mlp()
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(2, 4), loss_fn=F.cross_entropy,
                config=quiet()).fit()
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == before[1]
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before[0]


class ListLogger:
    def __init__(self):
        self.records, self.closed = [], False

    def log(self, record):
        assert not self.closed, "logged into a closed logger"
        self.records.append(record)

    def close(self):
        self.closed = True


def test_fit_closes_only_the_files_it_opened_and_a_second_fit_continues(tmp_path):
    import json

    x, y = classification(96)
    logger = ListLogger()
    model = mlp(dropout=0.2)  # dropout draws from torch's generator: reseeding would show
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), loss_fn=F.cross_entropy,
                loggers=[logger], run_dir=tmp_path,
                config=quiet(max_steps=5, batch_size=8, log_every_n_steps=1, eval_every_n_epochs=None))
    t.fit()
    assert not logger.closed and t.loggers == [logger]
    t.config.max_steps = 9
    t.fit()
    assert t.global_step == 9 and not logger.closed
    assert [r["step"] for r in logger.records] == list(range(1, 10))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 10))

    whole = mlp(dropout=0.2)
    Trainer(whole, torch.optim.SGD(whole.parameters(), lr=0.1), (x, y), loss_fn=F.cross_entropy,
            config=quiet(max_steps=9, batch_size=8, eval_every_n_epochs=None)).fit()
    for a, b in zip(model.parameters(), whole.parameters()):
        assert torch.equal(a, b)


def test_evaluation_right_after_an_epoch_end_is_not_repeated():
    x, y = classification(32)
    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), val_data=(x, y), loss_fn=F.cross_entropy,
                config=quiet(max_epochs=2, batch_size=8, eval_every_n_steps=4, eval_every_n_epochs=1))
    t.fit()
    assert [r["step"] for r in t.history if "val/loss" in r] == [4, 8]


@pytest.mark.parametrize("data", ["empty tensors", "empty list"])
def test_empty_training_data_is_an_error_before_the_first_step(data):
    from trainer import DataError

    train = (torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)) if data == "empty tensors" else []
    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), train, loss_fn=F.cross_entropy,
                config=quiet(max_steps=10))
    with pytest.raises(DataError, match="holds no batch: it is empty"):
        t.fit()
    assert t.global_step == 0


def test_an_epoch_that_yields_no_batch_is_an_error_not_an_endless_loop():
    from trainer import DataError

    model = mlp()
    once = iter(batches(3, 4))  # an iterator: it runs dry after the first epoch
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), once, loss_fn=F.cross_entropy,
                config=quiet(max_steps=10))
    with pytest.raises(DataError, match="epoch 1 of the training data yielded no batch"):
        t.fit()
    assert t.global_step == 3


def test_resuming_a_finished_run_from_its_final_checkpoint_adds_no_validation(tmp_path):
    x, y = classification(32)

    def build():
        model = mlp()
        return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), val_data=(x, y),
                       loss_fn=F.cross_entropy, run_dir=tmp_path, config=quiet(max_steps=4, batch_size=8))

    build().fit()
    again = build()
    again.fit(resume_from=tmp_path / "checkpoints" / "step-00000004.pt")
    assert again.history == [] and again.global_step == 4


# ------------------------------------------------------------------ seeding the model, one run per run_dir


def test_a_model_given_as_a_function_is_built_after_seeding():
    x, y = classification(64)

    def trained(seed_before):
        torch.manual_seed(seed_before)  # whatever happened to the global generator before
        t = Trainer(lambda: nn.Linear(8, 3), lambda params: torch.optim.SGD(params, lr=0.1), (x, y),
                    loss_fn=F.cross_entropy, config=quiet(batch_size=16, seed=7))
        initial = t.module.weight.detach().clone()
        t.fit()
        return initial, t.module.weight.detach()

    (init_a, final_a), (init_b, final_b) = trained(1), trained(2)
    assert torch.equal(init_a, init_b) and torch.equal(final_a, final_b)
    torch.manual_seed(7)
    assert torch.equal(init_a, nn.Linear(8, 3).weight)  # drawn right after seed_everything(seed)


def fit_in(run_dir, **fit_args):
    x, y = classification(64)
    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), loss_fn=F.cross_entropy,
                run_dir=run_dir, config=quiet(batch_size=16, max_steps=2, checkpoint={"every_n_steps": 1}))
    t.fit(**fit_args)
    return t


def test_a_second_run_in_a_run_dir_is_refused_unless_it_resumes_or_overwrites(tmp_path):
    fit_in(tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match=r"already holds a run \(metrics\.jsonl, metrics\.csv, checkpoints/\); "
                                              r"continue it with fit\(resume_from=<checkpoint>\), replace it with "
                                              r"fit\(overwrite=True\)"):
        fit_in(tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing appended, nothing replaced

    fit_in(tmp_path, resume_from=tmp_path / "checkpoints" / "step-00000001.pt")  # a resume continues it
    (tmp_path / "checkpoints" / "step-00000001.pt").rename(tmp_path / "checkpoints" / "mine.pt")
    fit_in(tmp_path, overwrite=True)
    records = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2  # this run's two log points alone
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001.pt", "step-00000002.pt"]


def test_stop_ends_the_run_at_the_next_optimizer_step_boundary_with_the_first_reason():
    class StopMidWindow(Callback):
        def on_train_batch_start(self, trainer, batch):
            if trainer.global_step == 2 and trainer.batch_in_epoch == 5:  # step 3's first micro-batch of two
                trainer.stop("asked mid-window")
                trainer.stop("asked again")

    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(20, 4), loss_fn=F.cross_entropy,
                callbacks=[StopMidWindow()], config=quiet(max_steps=10, grad_accum_steps=2))
    t.fit()
    assert (t.global_step, t.batch_in_epoch) == (3, 6)  # the window finished with its step, then no more
    assert t.should_stop and t.stop_reason == "asked mid-window"
    assert [r["step"] for r in t.history] == [1, 2, 3]


def test_setting_should_stop_directly_still_stops():
    class Halt(Callback):
        def on_train_batch_end(self, trainer, outputs, batch):
            if trainer.global_step == 2:
                trainer.should_stop = True

    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(20, 4), loss_fn=F.cross_entropy,
                callbacks=[Halt()], config=quiet(max_steps=10))
    t.fit()
    assert t.global_step == 2 and t.stop_reason is None


def test_each_kind_of_boundary_work_comes_at_exactly_its_steps_and_a_stop_at_a_quiet_step_stops_there(tmp_path):
    """Most boundaries have nothing due and only look for a stop (trainer.loop.run_length.next_busy):
    log points, evaluations and checkpoints still come at exactly their steps, a stop asked at a
    boundary with nothing due stops there, and a second fit with a raised max_steps ends at it."""

    class StopAt(Callback):
        def on_train_batch_end(self, trainer, outputs, batch):
            if trainer.global_step == 23:
                trainer.stop("at a quiet step")

    model = mlp()
    x, y = classification(30 * 4)
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), val_data=(x[:8], y[:8]),
                loss_fn=F.cross_entropy, run_dir=tmp_path, callbacks=[StopAt()],
                config=quiet(max_steps=28, batch_size=4, log_every_n_steps=5, eval_every_n_steps=7,
                             eval_every_n_epochs=None, checkpoint={"every_n_steps": 9, "save_final": False}))
    t.fit()
    assert t.global_step == 23 and t.stop_reason == "at a quiet step"
    assert [r["step"] for r in t.history if "train/loss" in r] == [5, 10, 15, 20, 23]  # 23: the stop's flush
    assert [r["step"] for r in t.history if "val/loss" in r] == [7, 14, 21, 23]  # 23: the final validation
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000009.pt", "step-00000018.pt"]

    t.callbacks.clear()
    t.config.max_steps, t.config.log_every_n_steps = 26, 100  # no log point or evaluation due before the end
    t.fit()
    assert t.global_step == 26


def test_the_next_busy_step_is_the_first_log_point_evaluation_checkpoint_or_last_step():
    from trainer.loop.run_length import RunLength

    class Data:
        val = None

    config = TrainerConfig(max_steps=100, log_every_n_steps=10, eval_every_n_steps=4,
                           checkpoint={"every_n_steps": 15})
    length = RunLength(config, Data())
    assert [length.next_busy(s) for s in (0, 9, 10, 14, 29)] == [10, 10, 15, 15, 30]  # no val data: no evaluation
    Data.val = object()
    assert [length.next_busy(s) for s in (0, 4, 9, 98, 99)] == [4, 8, 10, 100, 100]
    config.max_steps, config.log_every_n_steps, config.eval_every_n_steps = None, 10**9, None
    config.checkpoint.every_n_steps = None
    assert length.next_busy(7) == 10**9


def test_a_closed_trainer_refuses_to_go_on_and_a_second_close_does_nothing():
    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(32, 8), loss_fn=F.cross_entropy,
                config=quiet(max_steps=2))
    t.fit()
    t.close()
    t.close()
    for go_on in (t.fit, t.apply_init_from):
        with pytest.raises(RuntimeError, match="this Trainer was closed"):
            go_on()
    assert t.global_step == 2
