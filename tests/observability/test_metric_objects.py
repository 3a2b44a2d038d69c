"""Metric objects (torchmetrics, or anything with update/compute/reset): computed once over the whole
set, reset before each evaluation, untouched by the sanity pass and by batches run only for lockstep."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from helpers import PROJECT, classification, count_conversions, loopback_ok, mlp, process_env, quiet
from trainer import Trainer
from trainer.evaluation import validate as evaluation
from trainer.observability.metric_objects import untouched

torchmetrics = pytest.importorskip("torchmetrics")
sklearn_metrics = pytest.importorskip("sklearn.metrics")
from torchmetrics.classification import (  # noqa: E402
    MulticlassAUROC, MulticlassConfusionMatrix, MulticlassF1Score,
)


class Scored(Trainer):
    """Metric objects kept by the subclass, updated in validation_step and returned beside a mean."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.f1 = MulticlassF1Score(num_classes=3, average="macro")
        self.auroc = MulticlassAUROC(num_classes=3)
        self.confmat = MulticlassConfusionMatrix(num_classes=3)

    def validation_step(self, batch):
        x, y = batch
        logits = self.model(x)
        for metric in (self.f1, self.auroc, self.confmat):
            metric.update(logits, y)
        return {"acc": (logits.argmax(1) == y).float().mean(), "f1": self.f1, "auroc": self.auroc,
                "confmat": self.confmat}


def expected(model, x, y):
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(1).numpy()
    probs = logits.softmax(1).numpy()
    return {"f1": sklearn_metrics.f1_score(y.numpy(), pred, average="macro"),
            "auroc": sklearn_metrics.roc_auc_score(y.numpy(), probs, multi_class="ovr", average="macro"),
            "confmat": sklearn_metrics.confusion_matrix(y.numpy(), pred, labels=[0, 1, 2])}


def trainer_of(cls=Scored, **kwargs):
    model = mlp()
    return cls(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=F.cross_entropy,
               config=quiet(batch_size=16), **kwargs)


def test_values_are_over_the_whole_set_and_independent_between_evaluations():
    t = trainer_of()
    first, second = classification(50, seed=3), classification(37, seed=4)
    a = t.evaluate(first, prefix="test")
    b = t.evaluate(second, prefix="test")
    for (x, y), got in ((first, a), (second, b)):
        want = expected(t.module, x, y)
        # (a mean of per-batch F1s would differ: 50 samples in batches of 16, 16, 16 and 2)
        assert got["test/f1"] == pytest.approx(want["f1"], abs=1e-6)
        assert got["test/auroc"] == pytest.approx(want["auroc"], abs=1e-6)
        # A confusion matrix is logged cell by cell, row (target) then column (prediction).
        assert {k: v for k, v in got.items() if k.startswith("test/confmat/")} == {
            f"test/confmat/{i}_{j}": float(want["confmat"][i, j]) for i in range(3) for j in range(3)}
        assert sum(v for k, v in got.items() if k.startswith("test/confmat/")) == len(y)
        assert got["test/acc"] == pytest.approx((t.module(x).argmax(1) == y).float().mean().item())
    assert t.evaluate(first, prefix="test") == a  # reset before each evaluation: nothing carried over


def test_metrics_argument_is_updated_by_the_default_step_and_the_sanity_pass_leaves_no_state(tmp_path):
    x, y = classification(64)
    val = classification(45, seed=5)
    f1 = MulticlassF1Score(num_classes=3, average="macro")
    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5), (x, y), val_data=val, loss_fn=F.cross_entropy,
                metrics={"f1": f1}, run_dir=tmp_path, config=quiet(max_epochs=2, batch_size=16))
    t.sanity_check()
    assert f1.update_count == 0 and f1.tp.sum() == 0  # the sanity pass's batch was not kept
    t.fit()
    validations = [r for r in t.history if "val/f1" in r]
    assert len(validations) == 2 and sorted(validations[-1]) == ["epoch", "step", "val/acc", "val/f1", "val/loss"]
    assert validations[-1]["val/f1"] == pytest.approx(expected(t.module, *val)["f1"], abs=1e-6)
    assert '"val/f1"' in (tmp_path / "metrics.jsonl").read_text()


def test_a_batch_run_only_for_lockstep_leaves_the_metrics_as_they_were():
    """Under FSDP a rank whose share ran out runs its last batch again, uncounted: its update must
    not count (``strategy.FSDP.eval_batches``). Here the pairs are given directly."""
    t = trainer_of()
    x, y = classification(40, seed=6)
    pieces = list(zip(x.split(16), y.split(16)))
    lockstep = [(b, True) for b in pieces] + [(pieces[-1], False), (pieces[-1], False)]
    with torch.no_grad():
        got = evaluation.evaluate(t.validation_step, lockstep, t.device, metrics={})
    want = expected(t.module, x, y)
    assert got["f1"] == pytest.approx(want["f1"], abs=1e-6) and got["auroc"] == pytest.approx(want["auroc"], abs=1e-6)
    assert got["confmat/0_0"] == want["confmat"][0, 0]

    # A MetricCollection (states shared within a compute group) is put back too.
    collection = torchmetrics.MetricCollection({"f1": MulticlassF1Score(3, average="macro"),
                                                "acc": torchmetrics.classification.MulticlassAccuracy(3)})
    logits = t.module(x).detach()
    collection.update(logits, y)
    before = collection.compute()
    with untouched({"both": collection}):
        collection.update(logits[:5], y[:5])
    assert collection.compute() == before


class Largest:
    """A metric object of one's own: the largest logit seen."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.value = torch.tensor(float("-inf"))

    def update(self, logits):
        self.value = torch.maximum(self.value, logits.max())

    def compute(self):
        return self.value


def test_a_metric_object_of_ones_own_and_what_is_refused():
    class Own(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.largest = Largest()

        def validation_step(self, batch):
            self.largest.update(self.model(batch[0]))
            return {"largest": self.largest}

    t = trainer_of(Own)
    x, y = classification(40, seed=6)
    assert t.evaluate((x, y))["val/largest"] == pytest.approx(t.module(x).max().item())
    small = x[:8] * 0.01
    assert t.evaluate((small, y[:8]))["val/largest"] == pytest.approx(t.module(small).max().item())
    # A NumPy number from compute() is a number like any other.
    t.largest.compute = lambda: np.float32(2.5)
    assert t.evaluate((x, y))["val/largest"] == 2.5
    del t.largest.compute
    # Its state cannot be copied and put back, so a batch run only for lockstep is refused.
    with pytest.raises(TypeError, match="'largest' .*not a torchmetrics Metric.*strategy: fsdp"):
        evaluation.evaluate(t.validation_step, [((x, y), True), ((x, y), False)], t.device, metrics={})

    with pytest.raises(TypeError, match=r"metrics\['f1'\] is a int, not a metric object"):
        trainer_of(Trainer, metrics={"f1": 3})

    class Curve(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.roc = torchmetrics.classification.BinaryROC()

        def validation_step(self, batch):
            self.roc.update(self.model(batch[0])[:, 0].sigmoid(), (batch[1] == 0).long())
            return {"roc": self.roc}

    with pytest.raises(TypeError, match="compute\\(\\) of metric 'roc' returned a tuple"):
        trainer_of(Curve).evaluate((x, y))


def test_a_tensor_too_large_to_log_is_left_out_with_a_warning(monkeypatch):
    from trainer.observability import metric_objects

    monkeypatch.setattr(metric_objects, "MAX_LOGGED", 4)
    t = trainer_of()
    with pytest.warns(UserWarning, match=r"'confmat' .*shape \(3, 3\).*not logged"):
        got = t.evaluate(classification(20))
    assert not any(k.startswith("val/confmat") for k in got) and "val/f1" in got
    assert t.confmat.compute().sum() == 20  # still there to read until the next evaluation


@pytest.mark.distributed
def test_two_ranks_give_the_single_process_values_on_sets_that_do_not_divide_evenly(tmp_path):
    """DDP and FSDP under torchrun (two gloo ranks): the same values as one process, whose F1 and
    confusion matrix are sklearn's; the evaluations are independent; a metric object a rank without
    a validation batch does not hold is refused on every rank, not left to hang in compute()."""
    import importlib.util
    import json
    import subprocess
    import sys


    if not loopback_ok():
        pytest.skip("this machine cannot open loopback sockets between processes")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(PROJECT / "metrics_script.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=process_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"report-{rank}.json").read_text()) for rank in (0, 1)]

    spec = importlib.util.spec_from_file_location("metrics_script", PROJECT / "metrics_script.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    one = script.build(script.Scored, "ddp")  # one process: no wrapper
    first, second = script.data(*script.SETS["first"]), script.data(*script.SETS["second"])
    want_first, want_second = one.evaluate(), one.evaluate(second, prefix="second")
    sk = expected(one.module, *first)
    assert want_first["val/f1"] == pytest.approx(sk["f1"], abs=1e-6)
    assert [want_first[f"val/confmat/{i}_{j}"] for i in range(3) for j in range(3)] == sk["confmat"].flatten().tolist()
    x1, y1 = script.data(1, 3)
    one_f1 = sklearn_metrics.f1_score(y1.numpy(), one.module(x1).argmax(1).numpy(), average="macro", labels=[0, 1, 2],
                                      zero_division=0)
    for r in reports:
        assert r["ddp"][0] == pytest.approx(want_first) and r["ddp"][2] == r["ddp"][0]
        assert r["ddp"][1] == pytest.approx(want_second)
        assert r["fsdp"] == pytest.approx(want_first)  # rank 1's uncounted lockstep batch left no trace
        assert r["one_sample"]["one/f1"] == pytest.approx(one_f1)
        assert r["refused"].startswith("rank 1 holds no metric object 'auroc': it had no validation batch")


def test_the_sanity_pass_leaves_no_state_in_a_returned_metric_object():
    t = trainer_of()
    t.val_data = classification(30, seed=2)
    t.sanity_check()  # its validation batch updated them through validation_step
    assert t.f1.update_count == 0 and t.confmat.confmat.sum() == 0 and t.auroc.preds == []


def test_host_reads_do_not_grow_with_the_number_of_batches():
    """The values are read once per evaluation, with the batch means; a metric's update reads
    nothing (torchmetrics' argument checks off), so a set twice as long reads as often."""
    t = trainer_of(Trainer, metrics={"f1": MulticlassF1Score(num_classes=3, average="macro", validate_args=False)})
    counts = []
    for n in (32, 64):
        with count_conversions() as seen:
            assert "val/f1" in t.evaluate(classification(n))
        counts.append(sum(seen.values()))
    assert counts == [1, 1], counts  # (torchmetrics' F1 reads nothing in one process)
