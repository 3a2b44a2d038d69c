"""The sanity pass leaves no trace, blames the right part, and tells the user's code from ours."""

import random
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from helpers import Rows, classification, quiet
from trainer import EarlyStopping, SanityCheckError, Trainer
from trainer.loop.sanity import culprit


class Noisy(Trainer):
    """Draws from python's and numpy's generators every step; dropout draws from torch's."""

    def training_step(self, batch):
        x, y = batch
        x = x * (1.0 + 0.1 * random.random()) + 0.1 * float(np.random.randn())
        return F.cross_entropy(self.model(x), y)


def net(seed: int = 0) -> nn.Module:
    """BatchNorm (running statistics, a counter), dropout, and a submodule left in eval mode."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3),
                          nn.BatchNorm1d(3))
    model[5].eval()  # frozen statistics inside a model in training mode: the flag must survive
    return model


def run(sanity: bool, data: str):
    x, y = classification(96)
    train = Rows(x, y) if data == "dataset" else (x, y)  # a map-style dataset: the Trainer's DataLoader, shuffled
    model = net()
    t = Noisy(model, lambda p: torch.optim.AdamW(p, lr=1e-2), train, val_data=classification(40, seed=5),
              loss_fn=F.cross_entropy,
              callbacks=[EarlyStopping(monitor="val/loss", patience=5)],
              config=quiet(max_steps=7, batch_size=16, eval_every_n_steps=3, sanity_check=sanity))
    t.fit()
    return t


@pytest.mark.parametrize("data", ["dataset", "tensors"])
def test_a_run_with_the_sanity_pass_equals_one_without(data):
    with_pass, without = run(True, data), run(False, data)
    assert with_pass._sanity_checked and not without._sanity_checked
    a, b = with_pass.module.state_dict(), without.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # BatchNorm statistics included
    losses = [[(r["step"], r.get("train/loss"), r.get("val/loss")) for r in t.history] for t in (with_pass, without)]
    assert losses[0] == losses[1] and len(losses[0]) >= 7


def test_the_sanity_pass_leaves_everything_as_it_was():
    x, y = classification(64)
    order = torch.Generator().manual_seed(3)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=order)  # the user's own
    t = Noisy(net(), lambda p: torch.optim.AdamW(p, lr=1e-2), loader, val_data=(x, y), loss_fn=F.cross_entropy,
              config=quiet(max_steps=2, sanity_check=False))
    t.fit()  # optimizer state and BatchNorm statistics that are not the initial ones
    for i, p in enumerate(t.module.parameters()):
        p.grad = torch.full_like(p, float(i)) if i % 2 else None  # some gradients held, some not
    grads = [(p.grad, None if p.grad is None else p.grad.clone()) for p in t.module.parameters()]
    weights = {k: v.clone() for k, v in t.module.state_dict().items()}
    flags = [m.training for m in t.module.modules()]
    optimizer = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                 for k, s in t.optimizer.state_dict()["state"].items()}
    rngs = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state(), order.get_state())

    t.sanity_check()

    assert all(p.grad is g and (g is None or torch.equal(g, values))
               for p, (g, values) in zip(t.module.parameters(), grads))
    now = t.module.state_dict()
    assert all(torch.equal(now[k], v) for k, v in weights.items())
    assert [m.training for m in t.module.modules()] == flags == [True, True, True, True, True, True, False]
    saved = t.optimizer.state_dict()["state"]
    assert all(torch.equal(saved[k][n], v) if torch.is_tensor(v) else saved[k][n] == v
               for k, s in optimizer.items() for n, v in s.items())
    assert random.getstate() == rngs[0] and np.array_equal(np.random.get_state()[1], rngs[1])
    assert torch.equal(torch.get_rng_state(), rngs[2]) and torch.equal(order.get_state(), rngs[3])
    assert t.model is t.module and torch.is_grad_enabled()


def trainer(model_in: int = 8, **kwargs) -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(model_in, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = classification(64)
    kwargs.setdefault("loss_fn", F.cross_entropy)
    return Trainer(model, lambda p: torch.optim.SGD(p, lr=0.1), (x, y), val_data=(x, y),
                   config=quiet(max_steps=2, batch_size=16), **kwargs)


@pytest.mark.parametrize("kwargs, part, expected", [
    ({"model_in": 5}, "model", "the model (Sequential) failed on the first training batch: RuntimeError: mat1 and "
     "mat2 shapes cannot be multiplied (16x8 and 5x16); the batch holds inputs of shape (16, 8) and targets of shape (16,)"),
    ({"loss_fn": None}, "loss", "loss_fn is missing, and the default training_step and validation_step need it"),
    ({"loss_fn": nn.CrossEntropyLoss}, "loss", "loss_fn is the class torch.nn.modules.loss.CrossEntropyLoss, not a "
     "loss: pass an instance, torch.nn.modules.loss.CrossEntropyLoss(), or a function such as "
     "torch.nn.functional.cross_entropy"),
    ({"loss_fn": lambda out, y: 1.0}, "loss", "returned a float, not a loss Tensor"),
    ({"callbacks": [EarlyStopping(monitor="val/accuracy")]}, "callback",
     "EarlyStopping monitors 'val/accuracy', but validation reports val/acc, val/loss; did you mean 'val/acc'?"),
])
def test_fit_names_the_part_that_fails_before_training(kwargs, part, expected):
    t = trainer(**kwargs)
    with pytest.raises(SanityCheckError, match=None) as caught:
        t.fit()
    assert caught.value.part == part and expected in str(caught.value)
    assert t.global_step == 0 and t.history == []


def test_data_that_is_not_data_is_blamed_on_the_data():
    t = trainer()
    t.train_data = torch.randn(64, 8)  # features without targets: a tensor, not a dataset
    with pytest.raises(SanityCheckError, match="the training data cannot be used: training/validation data must be"):
        t.sanity_check()
    assert caught_part(t) == "data"


def caught_part(t):
    try:
        t.sanity_check()
    except SanityCheckError as exc:
        return exc.part


def test_a_data_source_that_can_be_read_once_is_not_read():
    x, y = classification(64)
    once = iter([(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)])
    t = trainer()
    t.train_data = once
    t.sanity_check()
    assert len(list(once)) == 4


# ------------------------------------------------------------------ whose code raised


def raised(fn):
    try:
        fn()
    except Exception as exc:
        return exc
    raise AssertionError("did not raise")


def compiled(path: Path, source: str):
    """The function ``f`` of ``source``, its code object claiming to live at ``path``."""
    scope = {}
    exec(compile(textwrap.dedent(source), str(path), "exec"), scope)
    return scope["f"]


def test_our_own_bug_is_ours_and_the_users_is_theirs(tmp_path):
    import trainer as package

    t = trainer()
    ours = compiled(Path(package.__file__).parent / "loop_helpers.py", "def f():\n    raise KeyError('our bug')\n")
    assert culprit(t, raised(ours)) is None
    # torch raising on a call of ours is ours too
    torch_on_ours = compiled(Path(package.__file__).parent / "x.py", "import torch\ndef f():\n    torch.zeros(2) @ torch.zeros(3)\n")
    assert culprit(t, raised(torch_on_ours)) is None

    users = compiled(tmp_path / "my_project.py", "import torch\ndef f():\n    x = 1\n    torch.zeros(2) @ torch.zeros(3)\n")
    found = culprit(t, raised(users))
    assert found is not None and found.part is None
    assert found.frame == (str(tmp_path / "my_project.py"), 4, "f")


def test_the_users_model_is_blamed_even_when_made_of_torchs_layers():
    t = trainer(model_in=5)
    x, _ = classification(4)
    found = culprit(t, raised(lambda: t.module(x)))
    assert found.part == "model" and found.frame[2] == "<lambda>"  # the innermost frame of a user's file: this test
