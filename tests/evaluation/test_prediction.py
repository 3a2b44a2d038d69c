"""Trainer.predict and Trainer.test: outputs in data order, each sample once, in memory or in a file;
test metrics apart from the run. One torchrun launch checks two ranks against one process."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.nn import functional as F

from helpers import PROJECT, Rows, classification, loopback_ok, mlp, process_env, quiet
from trainer import EMAWeights, Trainer
from trainer.evaluation.prediction import Collector, PredictionError


class Named(Trainer):
    def predict_step(self, batch):
        logits = self.model(batch[0])
        return {"logits": logits, "label": logits.argmax(dim=-1)}


def trained(cls=Trainer, **config):
    x, y = classification(n=40)
    model = mlp(dropout=0.5)
    trainer = cls(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), loss_fn=F.cross_entropy,
                  config=quiet(**{"max_steps": 2, "batch_size": 8, **config}))
    trainer.fit()
    return trainer, x, y


def plain(model, x):
    with torch.no_grad():
        model.eval()
        try:
            return model(x)
        finally:
            model.train()


def test_predict_returns_the_models_outputs_in_data_order_in_eval_mode(tmp_path):
    trainer, x, y = trained(batch_size=7)  # 40 samples: a last batch of 5
    expected = plain(trainer.module, x)
    for data in ((x, y), Rows(x, y), (x,), [x[:13], x[13:]]):
        got = trainer.predict(data)
        assert torch.allclose(got, expected, atol=1e-6)  # dropout off: eval mode
        assert not got.requires_grad
    assert trainer.module.training  # the train flags came back
    assert trainer.history and all("test/loss" not in r for r in trainer.history)


def test_predict_writes_the_same_outputs_to_pt_and_to_streamed_safetensors(tmp_path):
    trainer, x, y = trained(Named)
    expected = trainer.predict(Rows(x, y))
    assert set(expected) == {"logits", "label"} and expected["label"].dtype == torch.int64
    pt = trainer.predict(Rows(x, y), out=tmp_path / "preds.pt")
    assert pt.samples == 40 and pt.tensors["logits"] == ((40, 3), torch.float32)
    saved = torch.load(pt.path)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    st = trainer.predict(Rows(x, y), out=tmp_path / "preds.safetensors")
    stored = load_file(st.path)
    assert all(torch.equal(stored[k], expected[k]) for k in expected)
    with safe_open(st.path, "pt") as f:
        assert f.metadata()["structure"] == "dict"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.pt", "preds.safetensors"]  # no temp file left


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_rows_are_put_back_by_sample_index_and_repeats_kept_once(tmp_path, suffix):
    # As rank 0 receives two ranks' shares: samples 0..6, shuffled, sample 2 twice (a padded share).
    values = torch.arange(7, dtype=torch.bfloat16)[:, None] * torch.ones(1, 3, dtype=torch.bfloat16)
    collector = Collector(tmp_path / f"p{suffix}")
    try:
        for indices in ([4, 2, 6], [0, 5], [3, 1, 2]):
            index = torch.tensor(indices)
            collector.add("tuple", {"0": values[index], "1": index * 10}, index)
        _, written = collector.finish()
    finally:
        collector.close()
    got = torch.load(written.path) if suffix == ".pt" else tuple(load_file(written.path).values())
    assert torch.equal(got[0], values) and torch.equal(got[1], torch.arange(7) * 10)
    assert written.samples == 7 and len(list(tmp_path.iterdir())) == 1


def test_predict_uses_the_evaluation_weights_of_ema(tmp_path):
    x, y = classification(n=40)
    model = mlp()
    ema = EMAWeights(decay=0.5)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5), (x, y), loss_fn=F.cross_entropy,
                      callbacks=[ema], config=quiet(max_steps=3, batch_size=8))
    trainer.fit()
    with ema.evaluation_weights(trainer):
        expected = plain(trainer.module, x)
    trained_weights = plain(trainer.module, x)
    got = trainer.predict((x,))
    assert torch.allclose(got, expected, atol=1e-6) and not torch.allclose(got, trained_weights, atol=1e-4)


class OneRowPerBatch(Trainer):
    def predict_step(self, batch):
        return self.model(batch[0]).mean(dim=0, keepdim=True)


def test_predict_names_outputs_and_destinations_it_cannot_use(tmp_path):
    trainer, x, y = trained(OneRowPerBatch)
    with pytest.raises(PredictionError, match="returned 1 rows for a batch of 8 samples; return one row per sample"):
        trainer.predict((x, y))
    plain_trainer, x, y = trained()
    with pytest.raises(PredictionError, match=r"name the file NAME.pt .* or NAME.safetensors"):
        plain_trainer.predict((x,), out=tmp_path / "preds.csv")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(PredictionError, match="in the run's checkpoints folder"):
        plain_trainer.predict((x,), out=run / "checkpoints" / "p.pt")
    with pytest.raises(TypeError, match="override predict_step"):
        plain_trainer.predict([{"x": x}])


def test_test_reports_test_metrics_apart_from_the_run(tmp_path):
    x, y = classification(n=40)
    xt, yt = classification(n=11, seed=7)
    model = mlp()
    fired = []

    class Probe:
        def on_validation_end(self, trainer, metrics):
            fired.append(metrics)

    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), (x, y), loss_fn=F.cross_entropy,
                      callbacks=[Probe()], run_dir=tmp_path / "run", config=quiet(max_steps=2, batch_size=8))
    trainer.fit()
    before = (len(trainer.history), len(fired), trainer.state_dict()["trainer_state"]["validated_step"],
              (tmp_path / "run" / "metrics.jsonl").read_text())
    metrics = trainer.test((xt, yt))
    logits = plain(trainer.module, xt)
    assert metrics == pytest.approx({"test/loss": F.cross_entropy(logits, yt).item(),
                                     "test/acc": (logits.argmax(-1) == yt).float().mean().item()}, rel=1e-6)
    assert (len(trainer.history), len(fired), trainer.state_dict()["trainer_state"]["validated_step"],
            (tmp_path / "run" / "metrics.jsonl").read_text()) == before
    assert json.loads((tmp_path / "run" / "test.json").read_text()) == {"step": 2, **metrics}
    again = Trainer(mlp(), lambda params: torch.optim.SGD(params, lr=0.1), (x, y), loss_fn=F.cross_entropy,
                    run_dir=tmp_path / "run", config=quiet(max_steps=1, batch_size=8))
    again.fit(overwrite=True)
    assert not (tmp_path / "run" / "test.json").exists()  # a replaced run's test report goes with it


@pytest.mark.distributed
@pytest.mark.skipif(not loopback_ok(), reason="this machine cannot open loopback sockets between processes")
def test_two_ranks_predict_each_sample_once_in_order_and_test_as_one_process(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(PROJECT / "predict_script.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=process_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 37 samples over two ranks; the DistributedSampler's padded share repeats one of them.
    for name in ("tensors", "dataset", "sampler"):
        assert f"rank 0: {name} rows=37 same=True" in proc.stdout, proc.stdout
        assert f"rank 1: {name} got=None" in proc.stdout, proc.stdout
    assert "rank 0: file rows=37 same=True" in proc.stdout, proc.stdout
    assert "rank 0: test same=True history kept=True" in proc.stdout, proc.stdout
