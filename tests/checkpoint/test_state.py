"""What a checkpoint holds and how each part finds its own state again."""

import warnings

import pytest
import torch
from torch.nn import functional as F

from helpers import classification, mlp, quiet
from trainer import Callback, EarlyStopping, Trainer
from trainer.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint


class Counter(Callback):
    def __init__(self, state_key=None):
        self.state_key = state_key
        self.count = 0

    def on_train_batch_end(self, trainer, outputs, batch):
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def build(callbacks, tmp_path=None, max_steps=4):
    x, y = classification(64)
    model = mlp()
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), val_data=(x, y),
                   loss_fn=F.cross_entropy, callbacks=callbacks, run_dir=tmp_path,
                   config=quiet(max_steps=max_steps, batch_size=8, eval_every_n_steps=2, eval_every_n_epochs=None))


def run(tmp_path, callbacks, max_steps=4, resume_from=None):
    t = build(callbacks, tmp_path, max_steps)
    t.fit(resume_from=resume_from)
    return t


def test_callback_state_finds_its_callback_when_callbacks_are_added_in_front(tmp_path):
    stopper = EarlyStopping(monitor="val/loss", patience=5)
    run(tmp_path / "a", [stopper])
    saved = (stopper.best, stopper.best_step, stopper.wait)
    assert saved[0] is not None

    again = EarlyStopping(monitor="val/loss", patience=5)
    checkpoint = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    t = build([Callback(), again])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unclaimed, nothing missing: no warning
        t.load_checkpoint(checkpoint)
    assert (again.best, again.best_step, again.wait) == saved


def test_unclaimed_state_and_callbacks_without_state_are_reported(tmp_path):
    run(tmp_path / "a", [EarlyStopping(monitor="val/loss", patience=5)])
    checkpoint = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    counter = Counter()
    t = build([counter])
    with pytest.warns(UserWarning) as caught:
        t.load_checkpoint(checkpoint)
    messages = [str(w.message) for w in caught]
    assert any("holds state for callback(s) 'EarlyStopping' that no callback of this run claims" in m for m in messages)
    assert any("holds no state for callback 'Counter'; it starts afresh" in m for m in messages)
    assert counter.count == 0


def test_two_callbacks_of_one_class_need_their_own_state_keys(tmp_path):
    model = mlp()
    with pytest.raises(ValueError, match="two callbacks keep their state under the key 'Counter'.*state_key='Counter-2'"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=F.cross_entropy,
                callbacks=[Counter(), Counter()], config=quiet())

    first, second = Counter("train"), Counter("other")
    second.count = 100
    run(tmp_path / "b", [first, second])
    assert (first.count, second.count) == (4, 104)
    # Restored by key, in the opposite order.
    a, b = Counter("other"), Counter("train")
    run(tmp_path / "c", [a, b], max_steps=6, resume_from=list_checkpoints(tmp_path / "b" / "checkpoints")[-1])
    assert (a.count, b.count) == (106, 6)


def test_checkpoints_with_positional_callback_keys_still_load(tmp_path):
    stopper = EarlyStopping(monitor="val/loss", patience=5)
    run(tmp_path / "a", [Counter(), stopper])
    path = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    state = load_checkpoint(path)
    # The layout checkpoints had before state keys: "<position>:<class name>".
    state["callbacks"] = {"0:Counter": state["callbacks"]["Counter"], "1:EarlyStopping": state["callbacks"]["EarlyStopping"]}
    again, counter = EarlyStopping(monitor="val/loss", patience=5), Counter()
    t = build([again, counter])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t.load_checkpoint(state)
    assert (again.best, again.wait, counter.count) == (stopper.best, stopper.wait, 4)


def resumable(tmp_path, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), batch_size=8, scheduler=None,
              max_steps=6):
    x, y = classification(64)
    model = mlp()
    return Trainer(model, optimizer, (x, y), loss_fn=F.cross_entropy, scheduler=scheduler, run_dir=tmp_path,
                   config=quiet(max_steps=max_steps, batch_size=batch_size, eval_every_n_epochs=None))


def test_a_resume_with_another_optimizer_setting_is_refused_before_anything_changes(tmp_path):
    resumable(tmp_path / "a", max_steps=3).fit()
    checkpoint = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    t = resumable(tmp_path / "b", optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), batch_size=16)
    before = [p.detach().clone() for p in t.module.parameters()]
    with pytest.raises(CheckpointError) as caught:
        t.load_checkpoint(checkpoint)
    message = str(caught.value)
    assert "batch_size: 8 -> 16 (breaks exact resume)" in message
    assert "optimizer.0.lr: 0.1 -> 0.05 (breaks exact resume)" in message
    assert "max_steps: 3 -> 6;" in message and "max_steps: 3 -> 6 (breaks" not in message
    assert "--accept-changes" in message
    assert t.global_step == 0 and all(torch.equal(a, b) for a, b in zip(t.module.parameters(), before))


def test_another_optimizer_class_is_refused_not_a_key_error_and_starts_fresh_when_accepted(tmp_path):
    resumable(tmp_path / "a", max_steps=3).fit()
    checkpoint = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    adam = lambda ps: torch.optim.AdamW(ps, lr=1e-3)  # noqa: E731
    with pytest.raises(CheckpointError, match="optimizer.class: 'SGD' -> 'AdamW' \\(breaks exact resume\\)"):
        resumable(tmp_path / "b", optimizer=adam).load_checkpoint(checkpoint)
    t = resumable(tmp_path / "c", optimizer=adam)
    changes = t.load_checkpoint(checkpoint, accept_changes=True)
    assert "optimizer.class: 'SGD' -> 'AdamW'" in changes
    assert t.global_step == 3 and not t.optimizer.state  # fresh AdamW state
    t.fit()
    assert t.global_step == 6 and all(torch.isfinite(p).all() for p in t.module.parameters())


def reversed_sgd(ps):
    return torch.optim.SGD(list(ps)[::-1], lr=0.1, momentum=0.9)


def test_a_checkpoint_names_its_optimizers_parameters_and_a_resume_with_others_is_refused(tmp_path):
    resumable(tmp_path / "a", max_steps=3).fit()
    checkpoint = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    saved = load_checkpoint(checkpoint)["trainer_state"]["optimizer_params"]
    assert saved == [[[["0.weight", [16, 8]], ["0.bias", [16]], ["2.weight", [3, 16]], ["2.bias", [3]]]]]
    t = resumable(tmp_path / "b", optimizer=reversed_sgd)
    with pytest.raises(CheckpointError) as caught:
        t.load_checkpoint(checkpoint)
    assert str(caught.value) == (
        f"checkpoint {checkpoint}: the optimizer of the checkpoint trains 0.*, 2.* (4 tensors), this run's trains "
        "2.*, 0.* (4 tensors) (the same tensors in another order or grouping (1 group(s) saved, 1 now)); the "
        "optimizers' parameters must match to resume their state: resume with the model and optimizers the run "
        f"was started with, or start a new run from its weights (init_from: {checkpoint})")
    assert t.global_step == 0 and not t.optimizer.state


def test_a_checkpoint_from_before_parameter_names_still_loads_and_its_state_shapes_are_checked(tmp_path):
    resumable(tmp_path / "a", max_steps=3).fit()
    state = load_checkpoint(list_checkpoints(tmp_path / "a" / "checkpoints")[-1])
    state["trainer_state"].pop("optimizer_params", None)  # as written before names were saved
    old = save_checkpoint(state, tmp_path / "old.pt")
    t = resumable(tmp_path / "b")
    t.load_checkpoint(old)
    assert t.global_step == 3 and torch.equal(t.optimizer.state[t.optimizer.param_groups[0]["params"][0]]
                                              ["momentum_buffer"], state["optimizer"]["state"][0]["momentum_buffer"])
    t = resumable(tmp_path / "c", optimizer=reversed_sgd)
    with pytest.raises(CheckpointError, match=r"the state of the optimizer does not fit this run's parameters: its "
                                              r"momentum_buffer of tensor 0 has shape \(16, 8\), this run's "
                                              r"parameter 2.bias \(3,\)"):
        t.load_checkpoint(old)
    assert not t.optimizer.state


def test_accepted_changes_apply_for_real(tmp_path):
    schedule = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)  # noqa: E731
    resumable(tmp_path / "a", max_steps=3, scheduler=schedule).fit()
    checkpoint = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    t = resumable(tmp_path / "b", optimizer=lambda ps: torch.optim.SGD(ps, lr=0.4, momentum=0.5), scheduler=schedule)
    changes = t.load_checkpoint(checkpoint, accept_changes=True)
    assert "optimizer.0.lr: 0.1 -> 0.4" in changes and "optimizer.0.momentum: 0.9 -> 0.5" in changes
    group = t.optimizer.param_groups[0]
    # Three steps of StepLR(2, 0.5): the schedule's factor 0.5 carries over to the new base rate.
    assert (group["lr"], group["momentum"], t.scheduler.base_lrs) == (pytest.approx(0.2), 0.5, [0.4])
    assert "momentum_buffer" in t.optimizer.state[group["params"][0]]  # the state itself is kept


def test_a_resume_into_bf16_true_is_a_change_and_once_accepted_rounds_weights_and_state_to_bf16(tmp_path):
    x, y = classification(64)

    def trainer(run_dir, precision, max_steps=6):
        return Trainer(mlp(), lambda ps: torch.optim.AdamW(ps, lr=1e-2), (x, y), loss_fn=F.cross_entropy,
                       run_dir=run_dir, config=quiet(max_steps=max_steps, batch_size=8, eval_every_n_epochs=None,
                                                     precision=precision))

    trainer(tmp_path / "a", "fp32", max_steps=3).fit()
    checkpoint = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    with pytest.raises(CheckpointError, match=r"precision: 'fp32' -> 'bf16-true' \(breaks exact resume\)"):
        trainer(tmp_path / "b", "bf16-true").load_checkpoint(checkpoint)
    t = trainer(tmp_path / "c", "bf16-true")
    assert "precision: 'fp32' -> 'bf16-true'" in t.load_checkpoint(checkpoint, accept_changes=True)
    saved = load_checkpoint(checkpoint)
    for name, value in t.module.state_dict().items():
        assert torch.equal(value, saved["model"][name].to(torch.bfloat16)), name
    assert {v["exp_avg"].dtype for v in t.optimizer.state.values()} == {torch.bfloat16}
    t.fit()
    assert t.global_step == 6 and {p.dtype for p in t.module.parameters()} == {torch.bfloat16}


def test_an_accepted_batch_size_keeps_the_place_in_the_epoch_by_samples(tmp_path):
    resumable(tmp_path / "a", max_steps=3).fit()  # 3 batches of 8 into an epoch of 64 samples
    checkpoint = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    t = resumable(tmp_path / "b", batch_size=4)
    t.load_checkpoint(checkpoint, accept_changes=True)
    assert (t.epoch, t.batch_in_epoch) == (0, 6)  # 24 samples seen either way


class Tally:
    """A small class of the user's: not a module, not a callback."""

    def __init__(self):
        self.seen = 0

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def test_registered_state_is_saved_under_its_name_and_restored_on_resume(tmp_path):
    t = build([], tmp_path / "a")
    shadow, tally = mlp(seed=3), Tally()
    tally.seen = 11
    t.register_state("shadow", shadow)
    t.register_state("tally", tally)
    t.fit()
    checkpoint = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    assert load_checkpoint(checkpoint)["states"]["tally"] == {"seen": 11}

    again, other_shadow = build([]), mlp(seed=4)
    again.register_state("shadow", other_shadow)
    again.register_state("tally", Tally())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every name claimed, every registered name found
        again.load_checkpoint(checkpoint)
    assert again._checkpointer.states["tally"].seen == 11
    for a, b in zip(shadow.state_dict().values(), other_shadow.state_dict().values()):
        assert torch.equal(a, b)


def test_registered_state_nobody_claims_or_that_is_missing_is_reported(tmp_path):
    t = build([], tmp_path / "a")
    t.register_state("tally", Tally())
    t.fit()
    checkpoint = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    again = build([])
    again.register_state("teacher", Tally())
    with pytest.warns(UserWarning) as caught:
        again.load_checkpoint(checkpoint)
    messages = " | ".join(str(w.message) for w in caught)
    assert "holds no state registered as 'teacher'; it starts afresh" in messages
    assert "holds state registered as 'tally' that nothing in this run registered" in messages
    with pytest.raises(TypeError, match=r"register_state\('x', \.\.\.\): a int has no state_dict\(\) and no "
                                        r"load_state_dict\(\)"):
        again.register_state("x", 3)
    with pytest.raises(ValueError, match="the name 'teacher' is taken"):
        again.register_state("teacher", Tally())


class RunIdLogger:
    """A logger that keeps state (as the trackers keep their run's id) and is started by fit."""

    def __init__(self, run_id=None):
        self.run_id, self.started, self.records = run_id, [], []

    def start(self, config):
        self.started.append(config["max_steps"])

    def log(self, record):
        self.records.append(record)

    def close(self):
        pass

    def state_dict(self):
        return {"run_id": self.run_id}

    def load_state_dict(self, state):
        self.run_id = state["run_id"]


def test_logger_state_is_kept_in_checkpoints_and_given_back_on_resume_but_not_with_weights(tmp_path):
    x, y = classification(64)

    def build_with(logger, max_steps):
        model = mlp()
        return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), loss_fn=F.cross_entropy,
                       loggers=[logger], run_dir=tmp_path, config=quiet(max_steps=max_steps, batch_size=8))

    first = RunIdLogger("run-1")
    build_with(first, 2).fit()
    assert first.started == [2] and len(first.records) == 2
    path = tmp_path / "checkpoints" / "step-00000002.pt"
    assert load_checkpoint(path)["loggers"] == {"RunIdLogger": {"run_id": "run-1"}}
    evaluating = RunIdLogger()
    build_with(evaluating, 2).load_weights(path, states=True)
    assert evaluating.run_id is None
    resumed = RunIdLogger()
    build_with(resumed, 4).fit(resume_from=path)
    assert resumed.run_id == "run-1" and resumed.started == [4]

    class Other(RunIdLogger):
        pass

    with pytest.warns(UserWarning) as caught:
        build_with(Other(), 4).load_checkpoint(path)
    assert [str(w.message) for w in caught] == [
        f"checkpoint {path} holds no state for logger 'Other'; it starts a new run",
        f"checkpoint {path} holds state for logger(s) 'RunIdLogger' that no logger of this run claims; it is ignored "
        "(a logger removed?)"]


def test_the_global_batch_is_kept_on_another_number_of_ranks_or_the_error_says_how():
    from trainer.checkpoint import BatchLayout, keep_global_batch

    two = BatchLayout(8, 1, 2)
    layout, notice = keep_global_batch(two, BatchLayout(8, 1, 1), "scale_accumulation", False, "c.pt")
    assert layout == BatchLayout(8, 2, 1)
    assert notice == ("resumed on 1 rank a run trained on 2 ranks: grad_accum_steps 1 -> 2 keeps its global batch "
                      "of 16 = batch_size 8 x grad_accum_steps 2 x 1 rank (on_world_size_change: scale_accumulation)")
    assert keep_global_batch(BatchLayout(8, 2, 1), BatchLayout(8, 2, 2), "scale_accumulation", False, "c.pt")[0] == two
    assert keep_global_batch(two, BatchLayout(8, 1, 1), "scale_batch_size", False, "c.pt")[0] == BatchLayout(16, 1, 1)
    assert keep_global_batch(two, BatchLayout(8, 1, 2), "error", False, "c.pt") == (BatchLayout(8, 1, 2), None)

    with pytest.raises(CheckpointError) as caught:
        keep_global_batch(BatchLayout(32, 1, 2), BatchLayout(32, 1, 3), "scale_accumulation", False, "c.pt")
    assert str(caught.value) == (
        "checkpoint c.pt was trained with a global batch of 64 = batch_size 32 x grad_accum_steps 1 x 2 ranks; on "
        "3 ranks this config makes it 96 (on_world_size_change: scale_accumulation): 64 is not a multiple of "
        "batch_size 32 x 3 ranks. Resume on 1, 2 rank(s), or set batch_size and grad_accum_steps so that batch_size "
        "x grad_accum_steps x 3 = 64, or accept a new global batch (trainer run --accept-changes; in code "
        "load_checkpoint(..., accept_changes=True))")
    with pytest.raises(CheckpointError, match="error\\): set grad_accum_steps: 2 or batch_size: 16 to keep it"):
        keep_global_batch(two, BatchLayout(8, 1, 1), "error", False, "c.pt")
    # accepted: the config's layout, a new global batch
    assert keep_global_batch(BatchLayout(32, 1, 2), BatchLayout(32, 1, 3), "error", True, "c.pt")[0].global_batch == 96


def test_batch_size_and_accumulation_changed_together_resume_at_the_same_sample(tmp_path):
    """8 x 2 -> 16 x 1 keeps the global batch: no --accept-changes needed, and a checkpoint written at
    an epoch's end (40 samples: two steps of 16, a short one of 8) resumes at the next epoch, not at
    sample 32 of the same one."""
    x, y = classification(40)

    def trainer(run_dir, batch_size, accum):
        model = mlp()
        return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), loss_fn=F.cross_entropy,
                       run_dir=run_dir, config=quiet(max_epochs=2, batch_size=batch_size, grad_accum_steps=accum,
                                                     eval_every_n_epochs=None, checkpoint={"every_n_steps": 3}))

    trainer(tmp_path / "a", 8, 2).fit()
    t = trainer(tmp_path / "b", 16, 1)
    with pytest.warns(UserWarning, match="its 40 samples per epoch do not divide by it"):  # a short step of 8
        changes = t.load_checkpoint(tmp_path / "a" / "checkpoints" / "step-00000003.pt")
    assert changes == ["batch_size: 8 -> 16", "grad_accum_steps: 2 -> 1"]
    assert (t.epoch, t.batch_in_epoch) == (0, 3)  # the epoch's data is used up: 40 samples in 3 batches of 16
    t.fit()
    assert t.global_step == 6 and t.epoch == 2
    assert [r["epoch"] for r in t.history if r["step"] > 3] == [1, 1, 1]


def test_a_resumed_run_does_not_repeat_the_validation_of_its_checkpoints_step(tmp_path):
    """The checkpoint at step 4 follows step 4's validation: resumed there, with nothing left to
    train, the end of fit finds the step validated and adds no record. A second fit with a higher
    limit goes on validating at its own steps."""
    first = run(tmp_path / "a", [], max_steps=4)
    assert [r["step"] for r in first.history if "val/loss" in r] == [2, 4]
    checkpoint = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    resumed = build([], max_steps=4)
    resumed.fit(resume_from=checkpoint)
    assert resumed.global_step == 4 and [r for r in resumed.history if "val/loss" in r] == []
    resumed.config.max_steps = 6
    resumed.fit()
    assert [r["step"] for r in resumed.history if "val/loss" in r] == [6]


def test_a_checkpoint_without_validated_step_counts_no_step_validated():
    """A checkpoint written before validated_step was saved, loaded into a Trainer that has
    validated since: the Trainer's own last validation does not stand for the checkpoint's, and the
    steps it goes on to validate as due."""
    state = run(None, [], max_steps=2).state_dict()
    del state["trainer_state"]["validated_step"]
    t = run(None, [], max_steps=4)
    assert [r["step"] for r in t.history if "val/loss" in r] == [2, 4]
    t.load_checkpoint(state)
    done = len(t.history)
    t.fit()
    assert t.global_step == 4 and [r["step"] for r in t.history[done:] if "val/loss" in r] == [4]
