"""``trainer export``: real processes for what a user sees and the exit codes, typer's CliRunner
for the many mistakes (same code path, no interpreter start per case)."""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import PROJECT_CONFIG, ROOT, in_process, invoke
from trainer.checkpoint import load_checkpoint
from trainer.evaluation.export import build_model



@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A finished run of the tiny project with an EMAWeights callback: runs/t, checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("ema_project")
    config = root / "cfg.yaml"
    config.write_text(PROJECT_CONFIG + "checkpoint: {every_n_steps: 2}\n"
                      "callbacks:\n  - {_target_: trainer.EMAWeights, decay: 0.5}\n")
    code, out = invoke("run", config, f"out_dir={root / 'runs'}")
    assert code == 0, out
    return root / "runs" / "t"


def test_export_writes_the_ema_weights_and_the_model_config(ema_run, tmp_path):
    proc = in_process("export", ema_run, "--out", tmp_path / "model.safetensors")
    assert proc.returncode == 0, proc.stderr
    newest = ema_run / "checkpoints" / "step-00000004.pt"
    assert proc.stdout.splitlines()[0].startswith(
        f"wrote {tmp_path / 'model.safetensors'}: the EMA weights (EMAWeights) of step 4, 6 tensors, fp32, ")
    assert proc.stdout.splitlines()[0].endswith(f"from {newest}")
    assert proc.stdout.splitlines()[1] == f"wrote {tmp_path / 'model.yaml'}: the model section of the run's config"
    ema = load_checkpoint(newest)["callbacks"]["EMAWeights"]["ema"]
    model = build_model(tmp_path / "model.yaml")
    model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    assert all(torch.equal(value, ema[key]) for key, value in model.state_dict().items())


def test_export_of_a_checkpoint_in_bf16_and_the_trained_weights(ema_run, tmp_path):
    checkpoint = ema_run / "checkpoints" / "step-00000002.pt"
    code, out = invoke("export", checkpoint, "--out", tmp_path / "w.safetensors", "--dtype", "bf16",
                       "--weights", "trained")
    assert code == 0, out
    assert "the trained weights of step 2, 6 tensors, bf16," in out
    saved = load_checkpoint(checkpoint)["model"]
    exported = load_file(tmp_path / "w.safetensors")
    assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], v.to(torch.bfloat16))
               for k, v in saved.items())
    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        meta = f.metadata()
    assert (meta["step"], meta["weights"], meta["dtype"], meta["checkpoint"]) == ("2", "trained", "bf16", str(checkpoint))


@pytest.mark.parametrize("case,message", [
    ("missing", "error: {tmp}/missing does not exist; pass a run directory (runs/NAME) or a checkpoint"),
    ("folder", "error: {tmp}/folder is neither a run directory"),
    ("no_checkpoints", "error: the run {tmp}/no_checkpoints has no checkpoint in {tmp}/no_checkpoints/checkpoints"),
    ("no_out_folder", "error: --out {tmp}/nowhere/m.safetensors: the folder {tmp}/nowhere does not exist"),
    ("dtype", "error: dtype 'int8' is not one export writes: choose bf16, fp16 or fp32"),
    ("weights", "error: --weights fast: checkpoint {run}/checkpoints/step-00000004.pt holds no EMA under that "
                "state key (EMAs held: EMAWeights)"),
    ("not_a_checkpoint", "error: checkpoint {tmp}/junk.pt is truncated or corrupted"),
])
def test_mistakes_exit_2_with_one_line(ema_run, tmp_path, case, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "no_checkpoints").mkdir()
    (tmp_path / "no_checkpoints" / "status.json").write_text('{"status": "failed"}')
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    out = tmp_path / "m.safetensors"
    args = {"missing": [tmp_path / "missing", "--out", out], "folder": [tmp_path / "folder", "--out", out],
            "no_checkpoints": [tmp_path / "no_checkpoints", "--out", out],
            "no_out_folder": [ema_run, "--out", tmp_path / "nowhere" / "m.safetensors"],
            "dtype": [ema_run, "--out", out, "--dtype", "int8"], "weights": [ema_run, "--out", out, "--weights", "fast"],
            "not_a_checkpoint": [tmp_path / "junk.pt", "--out", out]}[case]
    code, output = invoke("export", *args)
    assert code == 2, output
    assert output.strip().splitlines() == [output.strip()]  # one line
    assert output.startswith(message.format(tmp=tmp_path, run=ema_run)), output
    assert not out.exists()


def test_an_existing_config_is_kept_unless_overwrite_is_passed(ema_run, tmp_path):
    (tmp_path / "m.yaml").write_text("model: {_target_: mine.Net}\n")
    code, output = invoke("export", ema_run, "--out", tmp_path / "m.safetensors")
    assert code == 2, output
    assert output.strip() == f"error: {tmp_path / 'm.yaml'} exists; pass --overwrite to replace it, or pick another --out"
    assert (tmp_path / "m.yaml").read_text() == "model: {_target_: mine.Net}\n"
    assert not (tmp_path / "m.safetensors").exists()
    code, output = invoke("export", ema_run, "--out", tmp_path / "m.safetensors", "--overwrite")
    assert code == 0, output
    build_model(tmp_path / "m.yaml").load_state_dict(load_file(tmp_path / "m.safetensors"), strict=True)


def test_a_real_process_exits_2_on_a_mistake(tmp_path, run_cli):
    proc = run_cli("export", tmp_path / "missing", "--out", tmp_path / "m.safetensors")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {tmp_path / 'missing'} does not exist") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""


def test_without_safetensors_installed_export_says_how_to_install_it(ema_run, tmp_path, run_cli):
    blocker = tmp_path / "blocker"
    (blocker / "safetensors").mkdir(parents=True)
    # What Python raises for a package that is not installed.
    (blocker / "safetensors" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'safetensors'\")\n")
    proc = run_cli("export", ema_run, "--out", tmp_path / "m.safetensors",
                   env={"PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: exporting writes .safetensors files, which needs the safetensors package: "
        "pip install 'trainer[safetensors]'"]
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "m.yaml").exists()
