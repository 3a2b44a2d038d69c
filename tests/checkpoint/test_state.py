"""What a checkpoint holds and how each part finds its own state again."""

import warnings

import pytest
import torch
from torch.nn import functional as F

from helpers import classification, mlp, quiet
from trainer import Callback, EarlyStopping, ThroughputMonitor, Trainer
from trainer.checkpoint import list_checkpoints, load_checkpoint


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


def run(tmp_path, callbacks, max_steps=4, resume_from=None):
    x, y = classification(64)
    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), val_data=(x, y), loss_fn=F.cross_entropy,
                callbacks=callbacks, run_dir=tmp_path,
                config=quiet(max_steps=max_steps, batch_size=8, eval_every_n_steps=2, eval_every_n_epochs=None))
    t.fit(resume_from=resume_from)
    return t


def test_callback_state_finds_its_callback_when_callbacks_are_added_in_front(tmp_path):
    stopper = EarlyStopping(monitor="val/loss", patience=5)
    run(tmp_path / "a", [stopper])
    saved = (stopper.best, stopper.best_step, stopper.wait)
    assert saved[0] is not None

    again = EarlyStopping(monitor="val/loss", patience=5)
    checkpoint = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=F.cross_entropy,
                callbacks=[ThroughputMonitor(), again], config=quiet())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unclaimed, nothing missing: no warning
        t.load_checkpoint(checkpoint)
    assert (again.best, again.best_step, again.wait) == saved


def test_unclaimed_state_and_callbacks_without_state_are_reported(tmp_path):
    run(tmp_path / "a", [EarlyStopping(monitor="val/loss", patience=5)])
    checkpoint = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    model = mlp()
    counter = Counter()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=F.cross_entropy, callbacks=[counter],
                config=quiet())
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
    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=F.cross_entropy,
                callbacks=[again, counter], config=quiet())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t.load_checkpoint(state)
    assert (again.best, again.wait, counter.count) == (stopper.best, stopper.wait, 4)
