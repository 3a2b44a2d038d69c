"""The sanity pass, and whose code an exception came from.

Before a run writes anything, one training micro-batch goes forward and backward (no optimizer
step) and one validation batch goes through ``validation_step``. A model that does not fit the
data, a loss that is not a loss, data that is not data or a monitored metric that validation never
reports then fails in a second, with ``SanityCheckError`` naming the part, instead of at the first
step (or at the first validation, an epoch later) as a traceback from inside the loop.

The pass leaves no trace, so a run with it trains exactly as one without: gradients, every buffer
(BatchNorm's running statistics), each submodule's train/eval flag, the python, numpy, torch and
CUDA generators and the generators of a user's DataLoader are put back as they were; the optimizer
is never called. Hooks do not fire. It runs the plain module, never the DDP wrapper (whose backward
all-reduces) or the compiled one: without collectives, or, under FSDP, with the same ones on every
rank. Training data that can be read only once (a generator) is not read, nor is a loader that
keeps its own position (a ``StatefulDataLoader``), which the read would move.

The Trainer hands over what the pass needs besides its public attributes (``Parts``: its data
sources, evaluator and manual step, the steps its class overrides, its own code that acts for a
part of the user's run): this module never imports the Trainer nor reads inside it.

``culprit`` tells the user's code from ours in any exception: the command line shows the user's
failures as theirs (the part, the file and line) and keeps "internal error" for our own.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import os
import re
import sysconfig
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any, NoReturn

import torch

from trainer import losses
from trainer.observability import metric_objects
from trainer.checkpoint.files import rng_state, set_rng_state
from trainer.data.batches import describe, to_device
from trainer.data.sources import EndTogether, IterableSource, StatefulSource, loader_generators
from trainer.device import out_of_memory_message, torch_settings
from trainer.freezing import eval_mode
from trainer.memory import suggestion

# What a failure is blamed on; "trainer" is another method of the user's Trainer subclass (a hook).
PARTS = ("model", "loss", "data", "training_step", "manual_step", "validation_step", "backward", "callback", "trainer")


class SanityCheckError(Exception):
    """The sanity pass failed: ``part`` (one of ``PARTS``; ``callback`` is the index of the callback
    when the part is one) did what ``problem`` says. The user's own exception is the ``__cause__``."""

    def __init__(self, part: str, subject: str, problem: str, callback: int | None = None):
        super().__init__(f"{subject} {problem}")
        self.part, self.subject, self.problem, self.callback = part, subject, problem, callback


# The steps a Trainer subclass may override, as ``Parts.overridden`` lists them.
STEPS = ("training_step", "validation_step", "backward", "manual_step")


@dataclass(frozen=True)
class Parts:
    """What the sanity pass and ``culprit`` need of a Trainer besides its public attributes (model,
    data, loss, callbacks, config, steps); the Trainer builds it once, as ``trainer.sanity_parts``.

    ``data``: the run's data sources (``train_source()``, ``val_source()``: ``RunData``);
    ``evaluator``: ``prepare_metrics()`` and the ``metric_objects`` evaluation has met
    (``Evaluator``); ``manual``: the subclass's own step (``ManualSteps``), or None; ``overridden``:
    the ``STEPS`` the Trainer's class overrides; ``defaults``: the Trainer's own code that acts for
    a part of the user's run, and which: ``"loss"`` (the default steps' call of ``loss_fn``),
    ``"data"`` (their reading of a batch), ``"backward"`` (the default backward, the training
    step's part); ``monitoring``: the callback classes whose ``monitor`` validation must report."""

    data: Any
    evaluator: Any
    manual: Any
    overridden: frozenset[str]
    defaults: Mapping[CodeType, str]
    monitoring: tuple[type, ...]


    @classmethod
    def of(cls, trainer_class: type, base: type, data: Any, evaluator: Any, manual: Any,
           monitoring: tuple[type, ...], loss: Callable[..., Any], unpack: Callable[..., Any]) -> Parts:
        """The parts of a Trainer of class ``trainer_class``; ``base``: the ``Trainer`` class itself, whose
        default steps call ``loss`` (``loss_fn``) and ``unpack`` (a batch's inputs and targets)."""
        defaults = {loss.__code__: "loss", unpack.__code__: "data", base.backward.__code__: "backward"}
        return cls(data, evaluator, manual, overridden(trainer_class, base), defaults, monitoring)


def overridden(cls: type, base: type) -> frozenset[str]:
    """The ``STEPS`` that the Trainer class ``cls`` overrides of ``base``'s."""
    return frozenset(step for step in STEPS if getattr(cls, step) is not getattr(base, step))


def run(trainer: Any) -> None:
    """The sanity pass over ``trainer`` (see the module's docstring); raises ``SanityCheckError``."""
    parts = trainer.sanity_parts
    _check_loss(trainer, parts)
    with _untouched(trainer), torch_settings(trainer.device, trainer.config.deterministic):
        _training_batch(trainer, parts)
        _validation_batch(trainer, parts)


def _check_loss(trainer: Any, parts: Parts) -> None:
    """What needs no batch to be found wrong."""
    loss_fn = trainer.loss_fn
    if inspect.isclass(loss_fn):
        name = f"{loss_fn.__module__}.{loss_fn.__qualname__}"
        raise SanityCheckError("loss", "loss_fn", f"is the class {name}, not a loss: pass an instance, "
                               f"{name}(), or a function such as {functional_of(loss_fn) or 'torch.nn.functional.cross_entropy'}")
    needs = [step for step in ("training_step", "validation_step") if step not in parts.overridden
             and (step == "training_step" and parts.manual is None or step == "validation_step" and trainer.val_data is not None)]
    if loss_fn is None and needs:
        raise SanityCheckError("loss", "loss_fn", f"is missing, and the default {' and '.join(needs)} {'needs' if len(needs) == 1 else 'need'} it: pass "
                               "Trainer(..., loss_fn=torch.nn.functional.cross_entropy), or override "
                               f"{needs[0]}(batch) in a Trainer subclass")


def functional_of(cls: type) -> str | None:
    """``torch.nn.functional.cross_entropy`` for ``torch.nn.CrossEntropyLoss``, when there is such a function."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", cls.__name__).lower()
    for name in (snake.removesuffix("_loss"), snake):
        if hasattr(torch.nn.functional, name):
            return f"torch.nn.functional.{name}"
    return None


def _training_batch(trainer: Any, parts: Parts) -> None:
    if trainer.train_data is None:
        return  # fit() says what is missing; evaluate() needs no training data
    source = _readable(parts.data.train_source, "the training data")
    if source is None:
        return
    batch = None
    try:
        batch = next(iter(_inner(source).epoch(0, 0)), None)
        if batch is None:
            return  # empty: fit() raises its DataError
        batch = to_device(batch, trainer.device, dtype=trainer.precision.param_dtype)
        if parts.manual is not None:
            _manual_batch(trainer, parts.manual, batch)
            return
        with trainer.precision.autocast:
            outputs = trainer.training_step(batch)
        _check_summed(trainer, parts, outputs, "training_step", "the first training batch")
        if isinstance(outputs, dict) and losses.SUM in outputs:
            loss = outputs[losses.SUM]
        else:
            loss = outputs["loss"] if isinstance(outputs, dict) and "loss" in outputs else outputs
        if not isinstance(loss, torch.Tensor):
            part, subject = _step(trainer, parts, "training_step")
            raise SanityCheckError(part, subject, f"returned {describe(outputs)}, not a loss Tensor (or a dict with "
                                   "a 'loss' Tensor, or 'loss_sum' and 'count' Tensors) on the first training batch")
        trainer.backward(loss)
    except torch.OutOfMemoryError as exc:
        cfg = trainer.config
        raise torch.OutOfMemoryError(out_of_memory_message(
            exc, trainer.device, trainer.global_step + 1, cfg.batch_size, cfg.grad_accum_steps, cfg.precision,
            suggestion(trainer.module, cfg.activation_checkpointing))) from exc
    except SanityCheckError:
        raise
    except Exception as exc:
        _blame(trainer, parts, exc, "training_step" if parts.manual is None else "manual_step", "the first training batch",
               batch)


def _manual_batch(trainer: Any, steps: Any, batch: Any) -> None:
    """A subclass's own step (``manual_step``) on the batch: its backwards run, no optimizer steps."""
    steps.dry = True
    try:
        with trainer.precision.autocast:
            trainer.manual_step(batch)
    finally:
        steps.dry = False


def _validation_batch(trainer: Any, parts: Parts) -> None:
    if trainer.val_data is None:
        return
    source = _readable(parts.data.val_source, "the validation data")
    if source is None:
        return
    batch = None
    try:
        # Under FSDP this agrees on the number of batches with the other ranks (every rank runs it).
        first = next(iter(trainer.strategy.eval_batches(source)), None)
        if first is None:
            return
        batch = to_device(first[0], trainer.device, dtype=trainer.precision.param_dtype)
        parts.evaluator.prepare_metrics()
        outputs = None
        try:
            with eval_mode(trainer.module), trainer.precision.autocast:
                outputs = trainer.validation_step(batch)
        finally:
            trainer.strategy.end_evaluation(trainer.module)
            # The batch's update leaves no trace in a metric object (it is not computed here: that
            # is a collective, and a rank may have no validation batch).
            returned = outputs if isinstance(outputs, dict) else {}
            for metric in {id(m): m for m in [*parts.evaluator.metric_objects.values(), *returned.values()]
                           if metric_objects.is_metric(m)}.values():
                metric.reset()
    except SanityCheckError:
        raise
    except Exception as exc:
        _blame(trainer, parts, exc, "validation_step", "the first validation batch", batch)
    if not isinstance(outputs, dict):
        part, subject = _step(trainer, parts, "validation_step")
        raise SanityCheckError(part, subject, f"returned {describe(outputs)}, not a dict of metric tensors, on the "
                               "first validation batch")
    _check_summed(trainer, parts, outputs, "validation_step", "the first validation batch")
    names = set(outputs) - {losses.SUM, losses.COUNT} | ({"loss"} if losses.SUM in outputs else set())
    objects = [f"val/{name}" for name, value in outputs.items() if metric_objects.is_metric(value)]
    _check_monitors(trainer, parts, sorted(f"val/{name}" for name in names), objects)


def _check_summed(trainer: Any, parts: Parts, outputs: Any, step: str, what: str) -> None:
    """A step's ``loss_sum`` without its ``count``, or of the wrong kind (``trainer.losses``)."""
    problem = losses.problem(outputs) if isinstance(outputs, dict) and losses.SUM in outputs else None
    if problem is not None:
        part, subject = _step(trainer, parts, step)
        raise SanityCheckError(part, subject, f"returned {problem} on {what}: return {losses.EXAMPLE}")


def _check_monitors(trainer: Any, parts: Parts, reported: list[str], objects: list[str] = ()) -> None:
    """``objects``: the names of metric objects, whose values may be dicts or tensors (``val/f1/3``)."""
    for i, cb in enumerate(trainer.callbacks):
        if isinstance(cb, parts.monitoring) and cb.monitor not in reported and not any(
                cb.monitor.startswith(f"{name}/") for name in objects):
            close = difflib.get_close_matches(cb.monitor, reported, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "monitor one of them, or report it from validation_step"
            raise SanityCheckError(
                "callback", f"{type(cb).__name__}", f"monitors {cb.monitor!r}, but validation reports "
                f"{', '.join(reported) or 'nothing'}; {hint}", callback=i)


def _step(trainer: Any, parts: Parts, step: str) -> tuple[str, str]:
    """The part to blame for what a step returned: the loss under the default step, else the step."""
    if step not in parts.overridden:
        return "loss", f"the loss ({_name(trainer.loss_fn)})"
    return step, f"{type(trainer).__name__}.{step}"


def _blame(trainer: Any, parts: Parts, exc: Exception, step: str, what: str, batch: Any) -> NoReturn:
    """Raise ``SanityCheckError`` from ``exc`` when it came from the user's side, else ``exc`` itself."""
    found = _culprit(trainer, parts, exc)
    if found is None:
        raise exc  # our own bug: the traceback, as it is
    part = found.part if found.part not in (None, "trainer") else step
    subjects = {
        "model": f"the model ({type(trainer.module).__name__})",
        "loss": f"the loss ({_name(trainer.loss_fn)})",
        "data": "the validation data" if step == "validation_step" else "the training data",
        "callback": f"callback {type(trainer.callbacks[found.callback]).__name__}" if found.callback is not None else "",
    }
    subject = subjects.get(part) or f"{type(trainer).__name__}.{part}"
    at = f" (at {found.location()})" if found.frame is not None else ""
    problem = f"failed on {what}: {one_line(exc)}{at}"
    if batch is not None and part in ("model", "loss", "data"):
        problem += f"; the batch holds {shapes(batch)}"
    raise SanityCheckError(part, subject, problem, found.callback) from exc


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def shapes(batch: Any) -> str:
    """A batch's tensors by shape, in the words of the default steps."""
    def shape(t: Any) -> str:
        return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"

    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return f"inputs of {shape(batch[0])} and targets of {shape(batch[1])}"
    if isinstance(batch, dict):
        return ", ".join(f"{k!r} of {shape(v)}" for k, v in list(batch.items())[:6])
    return describe(batch)


def _name(obj: Any) -> str:
    if obj is None:
        return "none"
    named = obj if inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj) else type(obj)
    return f"{getattr(named, '__module__', '')}.{getattr(named, '__qualname__', repr(named))}".lstrip(".")


def _readable(make: Callable[[], Any], what: str) -> Any:
    """The source ``make`` builds, or None when a batch read here would be missing from the run."""
    try:
        source = make()
    except TypeError as exc:
        raise SanityCheckError("data", what, f"cannot be used: {exc}") from exc
    return None if _read_once(source) else source


def _read_once(source: Any) -> bool:
    """An iterator or generator: reading a batch here would take it from the run. A loader that keeps
    its own position is not read either: the read would move the position the run starts from."""
    source = _inner(source)
    if isinstance(source, StatefulSource):
        return True
    return isinstance(source, IterableSource) and iter(source.data) is source.data


def _inner(source: Any) -> Any:
    """The source itself, without the ranks' agreement on the end of a stream (a collective per batch)."""
    return source.inner if isinstance(source, EndTogether) else source


def _generators(*datas: Any) -> list[torch.Generator]:
    """The generators a user's DataLoader draws its order and worker seeds from."""
    found: list[torch.Generator] = []
    for g in (g for data in datas for g in loader_generators(data)):
        if all(g is not f for f in found):
            found.append(g)
    return found


@contextlib.contextmanager
def _untouched(trainer: Any) -> Iterator[None]:
    """Run the steps on the plain module and put back everything a forward and backward change."""
    module = trainer.module
    rng = rng_state()
    generators = [(g, g.get_state()) for g in _generators(trainer.train_data, trainer.val_data)]
    flags = [(m, m.training) for m in module.modules()]
    buffers = [(m, name, b, b.detach().clone()) for m in module.modules() for name, b in m.named_buffers(recurse=False)]
    # Backward adds into an existing .grad in place: keep the tensor and a copy of its values.
    grads = [(p, p.grad, p.grad.detach().clone() if p.grad is not None else None) for p in module.parameters()]
    stepped, trainer.model = trainer.model, module
    try:
        yield
    finally:
        trainer.model = stepped
        with torch.no_grad():
            for p, grad, values in grads:
                if grad is not None:
                    grad.copy_(values)
                p.grad = grad
            for m, name, b, values in buffers:
                b.copy_(values)
                setattr(m, name, b)  # a forward that replaced the buffer gets the original back
        for m, training in flags:
            m.training = training
        for g, state in generators:
            g.set_state(state)
        set_rng_state(rng)


# ----------------------------------------------------------------------------- whose code raised

_TRAINER = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # the package
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_STDLIB = os.path.dirname(os.path.abspath(os.__file__)) + os.sep
_SITE = tuple({os.path.abspath(sysconfig.get_paths()[k]) + os.sep for k in ("purelib", "platlib")})


def _library(filename: str) -> bool:
    """torch or the standard library: code that raises on behalf of its caller."""
    if filename.startswith("<"):
        return True
    path = os.path.abspath(filename)
    if path.startswith(_TRAINER):
        return False
    return path.startswith(_TORCH) or (path.startswith(_STDLIB) and not path.startswith(_SITE))


def _ours(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_TRAINER)


@dataclass
class Culprit:
    """The user's side of an exception: the ``part`` of the run that raised it (``None``: some other
    code of the user's), the callback's index when it is one, and the innermost frame of the user's
    own files (``None`` when the part is made of torch's code, e.g. an ``nn.Sequential``)."""

    part: str | None
    callback: int | None
    frame: tuple[str, int, str] | None  # filename, line, function

    def location(self) -> str:
        filename, line, function = self.frame
        try:
            shown = os.path.relpath(filename)
        except ValueError:  # another drive (Windows)
            shown = filename
        shown = filename if shown.startswith("..") else shown
        return f"{shown}:{line} in {function}"


def culprit(trainer: Any, exc: BaseException) -> Culprit | None:
    """Whose code raised ``exc``: ``None`` when it is ours (the innermost frame outside torch and the
    standard library is in the ``trainer`` package, and no part of the user's run is deeper), else
    the part of the run (or ``None``: some other code of the user's) and the user's innermost frame."""
    return _culprit(trainer, trainer.sanity_parts, exc)


def _culprit(trainer: Any, parts: Parts, exc: BaseException) -> Culprit | None:
    frames: list[tuple[FrameType, int]] = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    # From the innermost frame out, the first that decides: a part of the user's run (the model, made
    # of torch's layers or not, the loss, a step or hook of theirs), or our own code, unless a file of
    # the user's came first (a helper of theirs that one of our functions called).
    part, callback, users_first = None, None, False
    for frame, _ in reversed(frames):
        part, callback = _part(trainer, parts, frame)
        if part is not None:
            break
        filename = frame.f_code.co_filename
        if _library(filename):
            continue
        if _ours(filename):
            if not users_first:
                return None
            break
        users_first = True
    mine = [(f.f_code.co_filename, line, f.f_code.co_name) for f, line in frames if not _library(f.f_code.co_filename)]
    users = [f for f in mine if not _ours(f[0])]
    own_files = [f for f in users if not os.path.abspath(f[0]).startswith(_SITE)]
    frame = (own_files or users or [None])[-1]
    return Culprit(part, callback, frame)


def _part(trainer: Any, parts: Parts, frame: FrameType) -> tuple[str | None, int | None]:
    """The part of the run ``frame`` belongs to, if any."""
    code = frame.f_code
    default = parts.defaults.get(code)
    owner = frame.f_locals.get("self")
    if owner is not None and isinstance(owner, torch.nn.Module) and any(owner is m for m in trainer.module.modules()):
        return "model", None
    loss_fn = trainer.loss_fn
    if loss_fn is not None and (owner is loss_fn or code is getattr(loss_fn, "__code__", None) or default == "loss"):
        return "loss", None
    if default == "data" or (owner is not None and any(
            owner is d for d in (trainer.train_data, trainer.val_data) if d is not None)):
        return "data", None
    if default == "backward":
        return _step(trainer, parts, "training_step")[0], None
    for step in ("training_step", "validation_step", "backward"):
        if step in parts.overridden and code is getattr(getattr(type(trainer), step), "__code__", None):
            return step, None
    for i, cb in enumerate(trainer.callbacks):
        # The built-in callbacks are ours: their failures stay internal errors.
        if owner is cb and not type(cb).__module__.startswith("trainer."):
            return "callback", i
    if owner is trainer and not _ours(code.co_filename):
        return "trainer", None  # a hook or helper of the user's Trainer subclass
    return None, None
