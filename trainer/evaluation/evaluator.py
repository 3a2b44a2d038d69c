"""What ``Trainer.evaluate``, ``test`` and ``predict`` run: the passes, their settings and reports.

Each pass runs under the same settings (``evaluating``): the module evaluation calls (the plain
module under DDP, the sharded one under FSDP), torch's settings, the evaluation weights of
callbacks such as ``EMAWeights``, eval mode and autocast; afterwards the training module is back
and, under FSDP, resharded.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from trainer import run_dir as run_files
from trainer.data.run_data import RunData
from trainer.data.sources import length_of
from trainer.device import Precision, torch_settings
from trainer.evaluation import prediction, validate
from trainer.freezing import eval_mode
from trainer.observability import metric_objects
from trainer.parallel import distributed


class Evaluator:
    """``owner``: the Trainer, whose ``validation_step`` and ``predict_step`` run and whom hooks and
    callbacks receive; ``metrics``: the metric objects given to it (every one a pass has met joins them).
    It also decides when the run validates (``due``), from ``config``'s ``eval_every_n_steps`` and
    ``eval_every_n_epochs`` as they are when it is asked."""

    def __init__(self, owner: Any, data: RunData, strategy: Any, precision: Precision, config: Any,
                 callbacks: Sequence[Any], hooks: Mapping[str, Sequence[Callable[..., Any]]], metrics: dict[str, Any]):
        self.owner, self.data, self.strategy, self.precision = owner, data, strategy, precision
        self.device = data.device
        self.config = config
        # The step of the run's last validation, saved in checkpoints (``state_dict``): a resumed run
        # does not repeat it.
        self.validated_step: int | None = None
        self.callbacks, self.hooks = callbacks, hooks
        # Every metric object evaluation has met: those given and those validation_step returned
        # (reset before each evaluation).
        self.metric_objects: dict[str, Any] = dict(metrics)

    def due(self, step: int, epochs_done: int | None = None, end: bool = False) -> bool:
        """Whether the run validates after optimizer step ``step``: every ``eval_every_n_steps`` steps;
        given ``epochs_done``, at the end of every ``eval_every_n_epochs``-th epoch; with ``end``, at
        the end of ``fit``. Never without validation data, never twice at one step."""
        if self.data.val is None or self.validated_step == step:
            return False
        if end:
            return True
        if epochs_done is not None:
            every, count = self.config.eval_every_n_epochs, epochs_done
        else:
            every, count = self.config.eval_every_n_steps, step
        return bool(every) and count % every == 0

    @contextlib.contextmanager
    def validating(self, step: int) -> Iterator[None]:
        """Around the run's validation after ``step`` (``due`` said so). The step counts as validated
        from the start, so that a checkpoint written during it (``BestCheckpoints``) does not run it
        again on resume; if it raises, it counts as not done."""
        before, self.validated_step = self.validated_step, step
        try:
            yield
        except BaseException:
            self.validated_step = before
            raise

    def state_dict(self) -> dict[str, Any]:  # a part of the checkpoint's trainer_state
        return {"validated_step": self.validated_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint without ``validated_step`` (written before it was saved) had no step validated."""
        self.validated_step = state.get("validated_step")

    def evaluate(self, data: Any = None, prefix: str = "val") -> dict[str, float]:
        """See ``Trainer.evaluate``: without ``data`` the run's own validation, with its hooks."""
        owner, own = self.owner, data is None
        if own and self.data.val is None:
            raise ValueError("evaluate() needs data: evaluate(data) or Trainer(..., val_data=...)")
        source = self.data.val_source() if own else self.data.source(data)
        if own:
            for fn in self.hooks["on_validation_start"]:
                fn(owner)
        batches = self.strategy.eval_batches(source)
        if own:  # callbacks that watch validation's batches (the progress bar counts them)
            for cb in self.callbacks:
                if hasattr(cb, "validation_batches"):
                    batches = cb.validation_batches(owner, batches, length_of(source))
        self.prepare_metrics()
        with self.evaluating():
            values = validate.evaluate(owner.validation_step, batches, self.device, self.precision.param_dtype,
                                       self.metric_objects)
        metrics = {f"{prefix}/{name}": value for name, value in values.items()}
        if own:
            for fn in self.hooks["on_validation_end"]:
                fn(owner, metrics)
        return metrics

    def test(self, data: Any, run_dir: Path | None, step: int, main: bool) -> dict[str, float]:
        """See ``Trainer.test``: ``test/<name>``, and rank 0 writes ``<run_dir>/test.json``."""
        metrics = self.evaluate(data, prefix="test")
        if run_dir is not None and main:
            run_dir.mkdir(parents=True, exist_ok=True)
            report = json.dumps({"step": step, **metrics}, indent=2) + "\n"
            run_files.write_text_atomic(run_dir / run_files.TEST, report)
        return metrics

    def predict(self, data: Any, out: str | Path | None, main: bool, sharded: bool) -> Any:
        """See ``Trainer.predict``."""
        target = prediction.check_out(out) if out is not None and main else None  # rank 0 writes
        source = self.data.source(data)
        order = prediction.sample_order(source)
        gather = order is not None and distributed.active()
        if not (main or gather or sharded):
            return None  # every rank sees the same batches (see trainer.evaluation.prediction): rank 0's are the result
        batches = prediction.rounds(source, sharded, self.device) if gather else self.strategy.eval_batches(source)
        collector = prediction.Collector(target) if main else None
        result, written = None, None
        try:
            with self.evaluating():
                prediction.predict(self.owner.predict_step, batches, self.device, self.precision.param_dtype, order,
                                   gather, collector)
            if collector is not None:
                result, written = collector.finish()
        finally:
            if collector is not None:
                collector.close()
        return written if out is not None else result

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """The settings every pass runs under (see the module)."""
        owner = self.owner
        stepped, owner.model = owner.model, self.strategy.eval_module(owner.model, owner.module)
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch_settings(self.device, self.config.deterministic))
                for cb in self.callbacks:
                    if hasattr(cb, "evaluation_weights"):
                        stack.enter_context(cb.evaluation_weights(owner))
                stack.enter_context(eval_mode(owner.module))
                stack.enter_context(self.precision.autocast)
                yield
        finally:
            owner.model = stepped
            self.strategy.end_evaluation(owner.module)

    def prepare_metrics(self) -> None:
        """Before an evaluation: the metric objects on the device (also those a subclass keeps as
        attributes, which validation_step may not have returned yet), and reset."""
        held = [value for value in vars(self.owner).values() if metric_objects.is_metric(value)]
        metric_objects.to_device([*self.metric_objects.values(), *held], self.device)
        for metric in self.metric_objects.values():
            metric.reset()


__all__ = ["Evaluator"]
