"""trainer/hooks.py: the hook names, their typo check and the dispatch table."""

import pytest
import torch
from torch.nn import functional as F

from helpers import batches, mlp, quiet
from trainer import Trainer
from trainer.hooks import HOOKS, Callback, check_hook_names, collect_hooks

class Base:
    """Stands in for the Trainer class given to collect_hooks as ``base``."""


class Recorder(Callback):
    """Appends the name of every hook called to ``calls``."""

    def __init__(self):
        self.calls = []


for _name in HOOKS:
    setattr(Recorder, _name, lambda self, trainer, *args, _name=_name: self.calls.append(_name))


def test_a_run_calls_every_hook_first_in_the_order_hooks_lists():
    """HOOKS is the documented order: a run that reaches every hook first calls each in that order,
    on_exception last, from a run that fails. (tests/test_trainer.py pins the whole sequence of a step.)"""
    recorder = Recorder()
    model = mlp()
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(2, 4), val_data=batches(1, 4),
            loss_fn=F.cross_entropy, callbacks=[recorder], config=quiet(max_steps=2)).fit()
    assert list(dict.fromkeys(recorder.calls)) == list(HOOKS[:-1])

    class Fails(Callback):
        def on_train_batch_end(self, trainer, outputs, batch):
            raise RuntimeError("a bug in a callback")

    recorder = Recorder()
    with pytest.raises(RuntimeError, match="a bug in a callback"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(2, 4), loss_fn=F.cross_entropy,
                callbacks=[recorder, Fails()], config=quiet(max_steps=2, sanity_check=False)).fit()
    assert recorder.calls[-1] == "on_exception" and recorder.calls.count("on_exception") == 1


def test_callback_base_defines_every_hook_and_nothing_else_named_on():
    on_methods = {name for name in dir(Callback) if name.startswith("on_")}
    assert on_methods == set(HOOKS)


def test_callback_state_defaults_to_empty():
    cb = Callback()
    assert cb.state_dict() == {}
    cb.load_state_dict({"anything": 1})  # accepted and ignored
    assert cb.state_dict() == {}


def test_a_misspelt_hook_on_a_callback_is_rejected_with_a_did_you_mean():
    class Typo(Callback):
        def on_after_backwards(self, trainer):
            pass

    with pytest.raises(TypeError) as info:
        check_hook_names(Typo(), "callback Typo")
    message = str(info.value)
    assert "callback Typo defines on_after_backwards()" in message
    assert "did you mean 'on_after_backward'?" in message


def test_a_misspelt_hook_on_the_trainer_is_rejected_by_collect_hooks():
    class MyTrainer(Base):
        def on_fit_strat(self):
            pass

    with pytest.raises(TypeError, match=r"MyTrainer defines on_fit_strat\(\).*did you mean 'on_fit_start'\?"):
        collect_hooks(MyTrainer(), [], Base)


def test_a_misspelt_hook_on_a_callback_is_rejected_by_collect_hooks():
    class Typo:
        def on_validaton_end(self, trainer, metrics):
            pass

    with pytest.raises(TypeError, match=r"callback Typo defines on_validaton_end\(\).*'on_validation_end'"):
        collect_hooks(Base(), [Typo()], Base)


def test_an_on_method_like_no_hook_lists_the_hooks():
    class Odd:
        def on_xyzzy(self):
            pass

    with pytest.raises(TypeError) as info:
        check_hook_names(Odd(), "Odd")
    assert "did you mean" not in str(info.value)
    assert ", ".join(HOOKS) in str(info.value)


def test_correct_hooks_and_other_names_pass_the_check():
    class Fine(Callback):
        on_count = 3  # not callable: not a hook candidate

        def on_log(self, trainer, record):
            pass

        def log_something(self):
            pass

    check_hook_names(Fine(), "Fine")  # raises on failure


def test_collect_hooks_has_every_hook_and_only_overridden_ones():
    class Logs(Callback):
        def on_log(self, trainer, record):
            pass

    table = collect_hooks(Base(), [Logs(), Callback()], Base)
    assert list(table) == list(HOOKS)
    assert all(isinstance(fns, tuple) for fns in table.values())
    assert {name for name, fns in table.items() if fns} == {"on_log"}
    assert len(table["on_log"]) == 1  # the plain Callback's own (empty) methods are not collected


def test_collect_hooks_calls_the_trainers_override_first_then_callbacks_in_order():
    calls = []

    class MyTrainer(Base):
        def on_train_batch_end(self, outputs, batch):
            calls.append(("trainer", self, outputs, batch))

    class Recorder(Callback):
        def __init__(self, name):
            self.name = name

        def on_train_batch_end(self, trainer, outputs, batch):
            calls.append((self.name, trainer, outputs, batch))

    trainer = MyTrainer()
    table = collect_hooks(trainer, [Recorder("first"), Recorder("second")], Base)
    for fn in table["on_train_batch_end"]:
        fn(trainer, "out", "batch")  # the documented calling convention: fn(trainer, *args)
    assert calls == [
        ("trainer", trainer, "out", "batch"),
        ("first", trainer, "out", "batch"),
        ("second", trainer, "out", "batch"),
    ]


def test_collect_hooks_skips_methods_the_trainer_inherits_unchanged_from_base():
    class WithDefaults:
        def on_fit_start(self):
            pass

    class MyTrainer(WithDefaults):
        def on_fit_end(self):
            pass

    table = collect_hooks(MyTrainer(), [], WithDefaults)
    assert table["on_fit_start"] == ()
    assert table["on_fit_end"] == (MyTrainer.on_fit_end,)


def test_collect_hooks_keeps_a_grandchild_override_and_duck_typed_callbacks():
    class Parent(Callback):
        def on_fit_start(self, trainer):
            pass

    class Child(Parent):
        def on_fit_end(self, trainer):
            pass

    class Duck:  # not a Callback subclass: hooks are looked up by name
        def on_fit_end(self, trainer):
            pass

    child, duck = Child(), Duck()
    table = collect_hooks(Base(), [child, duck], Base)
    assert table["on_fit_start"] == (child.on_fit_start,)  # inherited from Parent, still an override
    assert table["on_fit_end"] == (child.on_fit_end, duck.on_fit_end)
    assert table["on_exception"] == ()
