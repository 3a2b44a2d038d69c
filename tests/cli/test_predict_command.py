"""``trainer predict`` and ``trainer eval --data``: real processes for what a user sees and the exit
codes, typer's CliRunner for the other mistakes (same code path, no interpreter start per case)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import PROJECT_CONFIG, in_process, invoke
from trainer.checkpoint import load_checkpoint
from trainer.examples.models import MLP
from trainer.examples.synthetic import classification

WITH_TEST = PROJECT_CONFIG.replace("n_val: 32\n", "n_val: 32\n  n_test: 13\n")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny project with a test split, trained: (its folder, its config, runs/t)."""
    root = tmp_path_factory.mktemp("predict_project")
    config = root / "cfg.yaml"
    config.write_text(WITH_TEST + f"out_dir: {root / 'runs'}\n")
    code, out = invoke("run", config)
    assert code == 0, out
    return root, config, root / "runs" / "t"


def expected_logits(run, split):
    model = MLP(in_features=16, out_features=4, hidden=8)
    model.load_state_dict(load_checkpoint(run / "checkpoints" / "step-00000004.pt")["model"])
    x = classification(n_train=64, n_val=32, n_test=13)[split].tensors[0]
    with torch.no_grad():
        return model.eval()(x)


def test_predict_writes_the_test_splits_outputs_from_the_runs_newest_checkpoint(finished):
    root, config, run = finished
    proc = in_process("predict", config, "--checkpoint", run, "--out", "preds.pt", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == (
        "wrote preds.pt: 13 predictions of the test data, predictions (13, 4) float32; the trained weights of "
        f"step 4 from {run / 'checkpoints' / 'step-00000004.pt'}")
    assert torch.allclose(torch.load(root / "preds.pt"), expected_logits(run, "test"), atol=1e-6)
    code, out = invoke("predict", config, "--checkpoint", run, "--out", root / "val.safetensors", "--data", "val")
    assert code == 0, out
    assert torch.allclose(load_file(root / "val.safetensors")["predictions"], expected_logits(run, "val"), atol=1e-6)


def test_predict_refuses_a_missing_checkpoint_with_exit_2(finished, run_cli):
    root, config, run = finished
    proc = run_cli("predict", config, "--checkpoint", "runs/nope", "--out", "preds.pt", cwd=root)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("error: --checkpoint runs/nope does not exist; pass a run directory (runs/NAME) or "
                                   "one of its checkpoints (runs/NAME/checkpoints/step-....pt)")
    assert proc.stdout == ""


@pytest.mark.parametrize("args,message", [
    (["--out", "{run}/metrics.jsonl"], "would replace the run's own metrics.jsonl; pick another name"),
    (["--out", "{run}/checkpoints/step-00000004.pt"], "is in the run's checkpoints folder"),
    (["--out", "{root}/preds.npy"], "name the file NAME.pt"),
    (["--out", "{root}/p.pt", "--data", "tset"], "--data tset: no such split; did you mean --data test? the data "
                                                 "callable returns train, val, test"),
])
def test_predict_names_the_mistake_with_exit_2(finished, args, message):
    root, config, run = finished
    before = sorted(p.name for p in run.iterdir())
    code, out = invoke("predict", config, "--checkpoint", run, *[a.format(run=run, root=root) for a in args])
    assert code == 2 and message in out, out
    assert sorted(p.name for p in run.iterdir()) == before


def test_eval_reports_the_test_split_without_touching_the_run(finished):
    root, config, run = finished
    metrics_file = (run / "metrics.jsonl").read_text()
    code, out = invoke("eval", config, "--checkpoint", run, "--data", "test")
    assert code == 0, out
    report = json.loads(out.strip().splitlines()[-1])
    y = classification(n_train=64, n_val=32, n_test=13)["test"].tensors[1]
    logits = expected_logits(run, "test")
    assert report["data"] == "test" and report["step"] == 4
    assert report["test/loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert report["test/acc"] == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    assert (run / "metrics.jsonl").read_text() == metrics_file
    code, out = invoke("eval", config, "--checkpoint", run, "--data", "test", "data.n_test=0")
    assert code == 2 and "returned no 'test' data to evaluate on (it returns train, val)" in out, out


def test_predict_never_writes_over_the_checkpoint_it_reads(finished):
    """A checkpoint copied out of its run (model.pt) and --out model.pt: refused, the file kept."""
    root, config, run = finished
    copied = root / "model.pt"
    copied.write_bytes((run / "checkpoints" / "step-00000004.pt").read_bytes())
    before = copied.read_bytes()
    code, out = invoke("predict", config, "--checkpoint", copied, "--out", copied)
    assert code == 2 and "is the checkpoint --checkpoint reads the weights from; writing there would replace it" in out
    assert copied.read_bytes() == before


def test_predict_writes_beside_the_run_it_reads_from(finished):
    """--checkpoint runs/t --out runs/t/metrics.pt replaces nothing of the run: the weights come from
    its checkpoints folder, and metrics.pt is none of its own files (check_out names those)."""
    root, config, run = finished
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code, out = invoke("predict", config, "--checkpoint", run, "--out", run / "metrics.pt")
    assert code == 0, out
    assert torch.allclose(torch.load(run / "metrics.pt"), expected_logits(run, "test"), atol=1e-6)
    (run / "metrics.pt").unlink()
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
