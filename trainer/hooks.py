"""The fixed set of hooks and the callback base class.

The order in which the hooks run around one optimizer step is drawn once, in README.md,
section "The loop and its hooks"; ``tests/test_trainer.py`` pins it.
"""

from __future__ import annotations

import difflib
from typing import Any

HOOKS = (
    "on_fit_start",
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
    "on_log",
    "on_train_epoch_end",
    "on_validation_start",
    "on_validation_end",
    "on_fit_end",
    "on_exception",
)


class Callback:
    """Subclass and override any hook; each receives the trainer first.

    A callback that keeps state across a run (a best score, a counter) returns it from
    ``state_dict()`` and takes it back in ``load_state_dict()``, so it is saved in checkpoints under
    its ``state_key`` (the class name unless the attribute is set; two callbacks of one class that
    keep state need distinct keys). A callback that changes the weights evaluation should use (an
    average, say) defines ``evaluation_weights(trainer)``, a context manager that ``evaluate``
    enters around every evaluation, the run's validation and any other data alike. A callback that
    follows the run's validation batch by batch (the progress bar) defines
    ``validation_batches(trainer, batches, total)``, returning an iterable that yields ``batches``'
    items unchanged (``total``: their number, or None). Neither is a hook: they wrap rather than
    notify, and only callbacks define them.
    """

    def on_fit_start(self, trainer) -> None: ...
    def on_train_epoch_start(self, trainer) -> None: ...
    def on_train_batch_start(self, trainer, batch) -> None: ...
    def on_before_backward(self, trainer, loss) -> None: ...
    def on_after_backward(self, trainer) -> None: ...
    def on_before_optimizer_step(self, trainer, optimizer) -> None: ...
    def on_before_zero_grad(self, trainer, optimizer) -> None: ...
    def on_train_batch_end(self, trainer, outputs, batch) -> None: ...
    def on_log(self, trainer, record: dict[str, float]) -> None: ...
    def on_train_epoch_end(self, trainer) -> None: ...
    def on_validation_start(self, trainer) -> None: ...
    def on_validation_end(self, trainer, metrics: dict[str, float]) -> None: ...
    def on_fit_end(self, trainer) -> None: ...
    def on_exception(self, trainer, exc: BaseException) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def check_hook_names(obj: Any, where: str) -> None:
    """Reject a method that looks like a hook but is not one (``on_after_backwards``)."""
    for name in dir(type(obj)):
        if name.startswith("on_") and name not in HOOKS and callable(getattr(type(obj), name)):
            close = difflib.get_close_matches(name, HOOKS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"hooks are: {', '.join(HOOKS)}"
            raise TypeError(f"{where} defines {name}(), which is not a hook: {hint}")


def collect_hooks(trainer: Any, callbacks: list[Any], base: type) -> dict[str, tuple]:
    """For each hook, the functions to call as ``fn(trainer, *args)``, in order: the Trainer
    subclass's own override first, then the callbacks in the order given.

    Only overridden hooks are kept, so a hook nobody implements costs an empty loop.
    """
    check_hook_names(trainer, type(trainer).__name__)
    for cb in callbacks:
        check_hook_names(cb, f"callback {type(cb).__name__}")
    table: dict[str, list] = {name: [] for name in HOOKS}
    for name in HOOKS:
        own = getattr(type(trainer), name, None)
        if own is not None and own is not getattr(base, name, None):
            table[name].append(own)  # unbound: called as own(trainer, *args)
        for cb in callbacks:
            fn = getattr(type(cb), name, None)
            if fn is not None and fn is not getattr(Callback, name):
                table[name].append(getattr(cb, name))
    return {name: tuple(fns) for name, fns in table.items()}
