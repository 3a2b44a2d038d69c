"""The command line as a user runs it: real subprocesses for exit codes, typer's CliRunner for the
many error messages (same code path, no interpreter start per case)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, in_process, invoke


def line_of(path, needle):
    """1-based line number of the first line containing ``needle``."""
    for i, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if needle in line:
            return i
    raise AssertionError(f"{needle!r} not in {path}")


def with_line(text, old, new):
    assert old in text
    return text.replace(old, new, 1)


# ------------------------------------------------------------------ training as a user does


def test_run_writes_the_run_directory_and_exits_zero(tmp_path, project, run_cli):
    cfg = project.write(project.text + "out_dir: " + str(tmp_path / "runs") + "\n")
    proc = run_cli("run", cfg, "max_steps=6", "optimizer.lr=3e-2")
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "t"
    assert "finished: step 6" in proc.stdout and str(run_dir) in proc.stdout
    resolved = (run_dir / "config.yaml").read_text()
    assert "max_steps: 6" in resolved and "lr: 0.03" in resolved
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4, 6]
    assert all("epoch" in r for r in records)
    assert any("val/acc" in r for r in records)
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"step", "epoch", "train/loss", "lr", "val/loss"} <= set(header)
    assert (run_dir / "checkpoints" / "step-00000006.pt").is_file()


def test_an_existing_run_is_never_overwritten_silently(tmp_path, project):
    cfg = project.write(project.text + "out_dir: " + str(tmp_path / "runs") + "\n")
    assert invoke("run", cfg)[0] == 0
    before = (tmp_path / "runs" / "t" / "metrics.jsonl").read_text()
    code, out = invoke("run", cfg)
    assert code == 2
    assert "already holds a run" in out and "--resume auto" in out and "--overwrite" in out and "name=t-2" in out
    assert (tmp_path / "runs" / "t" / "metrics.jsonl").read_text() == before
    code, _ = invoke("run", cfg, "--overwrite", "max_steps=2")
    assert code == 0
    assert '"step": 2' in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text()


def test_user_project_with_its_own_model_and_trainer_subclass(tmp_path, project):
    project.write("""\
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self, width: int):
                super().__init__()
                self.body = nn.Linear(16, width)
                self.head = nn.Linear(width, 4)

            def forward(self, x):
                return self.head(torch.relu(self.body(x)))
        """, "my_models.py")
    project.write("""\
        from torch.nn import functional as F
        from trainer import Trainer

        class MyTrainer(Trainer):
            def training_step(self, batch):
                x, y = batch
                logits = self.model(x)
                self.log("train/custom", logits.abs().mean())
                return {"loss": F.cross_entropy(logits, y) + 0.0 * logits.pow(2).mean(),
                        "margin": logits.max(1).values.mean()}
        """, "my_trainer.py")
    text = project.text.replace("trainer.examples.models.MLP", "my_models.Net").replace(
        "  in_features: 16\n  out_features: 4\n  hidden: 8\n", "  width: 12\n")
    project.write("trainer: my_trainer.MyTrainer\n" + text)
    proc = in_process("run", "cfg.yaml", cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [2, 4]  # the log points of four steps
    assert all("train/custom" in r and "train/margin" in r for r in train)


def test_quickstart_config_runs(tmp_path):
    proc = in_process("run", ROOT / "configs" / "quickstart.yaml", f"out_dir={tmp_path}", "progress=off")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.splitlines()[0]
    assert line.startswith("finished: step 160, epoch 5")
    acc = float(line.split("val/acc ")[1].split(",")[0])
    assert acc > 0.8


def test_digits_config_runs_for_a_few_epochs(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("torchmetrics")
    code, out = invoke("run", ROOT / "configs" / "digits.yaml", f"out_dir={tmp_path}", "max_epochs=3",
                       "progress=off")
    assert code == 0, out
    acc = float(out.split("val/acc ")[1].split()[0].rstrip(","))
    assert acc > 0.8
    assert float(out.split("val/f1 ")[1].split()[0].rstrip(",")) > 0.8  # macro-F1, from the metrics: section


def test_digits_config_without_torchmetrics_names_the_extra(monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.setitem(sys.modules, "torchmetrics.classification", None)  # what a missing package raises
    code, out = invoke("check", ROOT / "configs" / "digits.yaml")
    assert code == 2, out
    line = line_of(ROOT / "configs" / "digits.yaml", "macro_f1")
    assert f"digits.yaml:{line}:" in out and "metrics.f1:" in out, out
    assert "needs torchmetrics: pip install 'trainer[metrics]'" in out, out


def test_a_metrics_entry_that_builds_no_metric_object_is_refused_at_its_line(project):
    cfg = project.write(project.text + "metrics:\n  f1: {_target_: torch.nn.Linear, in_features: 2, out_features: 2}\n")
    code, out = invoke("check", cfg)
    assert code == 2, out
    assert f"cfg.yaml:{line_of(cfg, 'f1:')}:" in out and "'torch.nn.Linear' returned a Linear, not a metric object" in out


@pytest.mark.slow
def test_digits_full_run_reaches_95_percent(tmp_path):
    pytest.importorskip("sklearn")
    code, out = invoke("run", ROOT / "configs" / "digits.yaml", f"out_dir={tmp_path}", "progress=off")
    assert code == 0, out
    assert float(out.split("val/acc ")[1].split()[0].rstrip(",")) >= 0.95


def test_char_lm_config_takes_a_few_steps(tmp_path):
    code, out = invoke("run", ROOT / "configs" / "char_lm.yaml", f"out_dir={tmp_path}", "max_steps=3",
                       "batch_size=4", "data.max_bytes=20000", "model.n_layers=1", "eval_every_n_steps=3",
                       "log_every_n_steps=1", "progress=off", "scheduler.T_max=3")
    assert code == 0, out
    assert "finished: step 3" in out and "val/loss" in out


def test_check_builds_and_trains_nothing(tmp_path, project):
    cfg = project.write(project.text + "out_dir: " + str(tmp_path / "runs") + "\n")
    code, out = invoke("check", cfg, "model.hidden=10")
    assert code == 0, out
    assert "# device: cpu" in out
    assert "# model: MLP, 324 parameters (324 trainable)" in out  # 16*10+10 + 10*10+10 + 10*4+4
    assert "# train data: 64 samples" in out and "# val data: 32 samples" in out
    assert "hidden: 10" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_check_accepts_every_shipped_config(name):
    if name == "digits.yaml":
        pytest.importorskip("sklearn")
        pytest.importorskip("torchmetrics")
    code, out = invoke("check", ROOT / "configs" / name)
    assert code == 0, out
    assert "# config OK" in out


@pytest.mark.parametrize("precision", ["fp32", "bf16-true"])
def test_eval_prints_metrics_of_a_checkpoint(tmp_path, project, precision):
    cfg = project.write(project.text + "out_dir: " + str(tmp_path / "runs") + f"\nprecision: {precision}\n")
    assert invoke("run", cfg)[0] == 0
    ckpt = tmp_path / "runs" / "t" / "checkpoints" / "step-00000004.pt"
    code, out = invoke("eval", cfg, "--checkpoint", ckpt)
    assert code == 0, out
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["step"] == 4 and 0.0 <= metrics["val/acc"] <= 1.0
    assert metrics["weights"] == "trained"  # no callback swaps other weights in
    last_val = [json.loads(x) for x in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()][-1]
    assert metrics["val/loss"] == pytest.approx(last_val["val/loss"], rel=1e-6)
    code, out = invoke("eval", cfg, "--checkpoint", tmp_path / "nope.pt")
    assert code == 2 and "nope.pt does not exist" in out


PROBE = """\
import pathlib

from trainer import Callback


class Probe(Callback):
    \"\"\"Writes a line for every validation hook that fires.\"\"\"

    def on_validation_end(self, trainer, metrics):
        with open(pathlib.Path(__file__).parent / "fired.txt", "a") as f:
            f.write(f"{trainer.global_step}\\n")
"""


def test_eval_evaluates_the_ema_weights_the_run_reported_and_fires_no_validation_hook(project):
    project.write(PROBE, "probe.py")
    project.write(project.text + "callbacks:\n  - {_target_: trainer.EMAWeights, decay: 0.5}\n"
                  "  - {_target_: probe.Probe}\n  - {_target_: trainer.EarlyStopping, patience: 1}\n")
    assert in_process("run", project.config, "max_steps=8", cwd=project.root).returncode == 0
    fired = (project.root / "fired.txt").read_text()
    checkpoint = project.runs / "t" / "checkpoints" / "step-00000008.pt"
    proc = in_process("eval", project.config, "--checkpoint", checkpoint, cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["weights"] == "ema"
    last_val = [json.loads(x) for x in (project.runs / "t" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last_val["step"] == 8
    assert metrics["val/loss"] == pytest.approx(last_val["val/loss"], rel=1e-9)  # what the run reported
    assert (project.root / "fired.txt").read_text() == fired  # neither Probe nor EarlyStopping ran


def test_mean_teacher_keeps_its_teacher_through_checkpoints_and_eval(tmp_path):
    pytest.importorskip("sklearn")
    args = ["max_epochs=4", "eval_every_n_epochs=2", f"out_dir={tmp_path}", "progress_bar=false"]
    assert in_process("run", ROOT / "configs" / "ema_teacher.yaml", *args).returncode == 0
    run = tmp_path / "ema_teacher"
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    proc = in_process("eval", ROOT / "configs" / "ema_teacher.yaml", *args, "--checkpoint", checkpoint)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    last_val = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    # The teacher came back from the checkpoint (register_state), not a fresh copy of the student.
    assert metrics["val/teacher_acc"] == pytest.approx(last_val["val/teacher_acc"], rel=1e-9)
    assert metrics["val/acc"] == pytest.approx(last_val["val/acc"], rel=1e-9)


def test_schema_is_json_with_every_field_described():
    code, out = invoke("schema")
    assert code == 0
    schema = json.loads(out)
    props = schema["properties"]
    for key in ("max_steps", "device", "precision", "model", "optimizer", "grad_logging", "name", "out_dir"):
        assert key in props and (props[key].get("description") or props[key].get("allOf")), key
    assert schema.get("additionalProperties") is False


def test_help_is_fast_because_torch_is_not_imported():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; sys.argv = ['trainer', '--help']\n"
         "from trainer.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
         "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"],
        capture_output=True, text=True, cwd=ROOT)
    assert "run" in proc.stdout and "check" in proc.stdout and "schema" in proc.stdout
    assert proc.stdout.strip().endswith("NO-TORCH")


def test_dtensor_and_dcp_are_left_to_what_shards():
    # Half a second of imports (torch.distributed.tensor) that a process handling no sharded model or
    # checkpoint is spared: `trainer export` of a file imports nothing else that loads them (a run
    # does, through torch.optim, which imports torch._dynamo).
    heavy = ("torch.distributed.tensor", "torch.distributed.checkpoint", "torch.distributed.fsdp")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys\nimport trainer.cli.build, trainer.evaluation.export, trainer.trainer\n"
         f"print([m for m in {heavy!r} if m in sys.modules])"],
        capture_output=True, text=True, cwd=ROOT)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_python_dash_m_is_the_same_program(run_cli):
    proc = run_cli("--help")
    assert proc.returncode == 0 and "Exit codes" in proc.stdout


# ------------------------------------------------------------------ errors a person can act on


def assert_user_error(code, out, *needles):
    assert code == 2, out
    assert "Traceback" not in out
    for needle in needles:
        assert needle in out, f"{needle!r} not in {out!r}"


def test_yaml_syntax_error_has_file_and_line(tmp_path, project):
    cfg = project.write(project.text + "callbacks: [1, 2\n")
    proc = in_process("check", cfg)
    assert_user_error(proc.returncode, proc.stderr, f"{cfg}:", "YAML syntax error")
    line = int(proc.stderr.split(f"{cfg}:")[1].split(":")[0])
    assert line >= line_of(cfg, "callbacks")


@pytest.mark.parametrize("old,new,field,expected", [
    ("max_steps: 4", "max_steps: ten", "max_steps", "valid integer"),
    ("seed: 0", "seed: 0\ndevice: gpu", "device", "expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ("seed: 0", "seed: 0\nprecision: fp8", "precision", "'fp32', 'bf16', 'fp16' or 'bf16-true'"),
    ("batch_size: 16", "batch_size: -4", "batch_size", "greater than or equal to 1"),
])
def test_wrong_framework_field_points_at_its_line(tmp_path, old, new, field, expected, project):
    cfg = project.write(with_line(project.text, old, new))
    code, out = invoke("check", cfg)
    bad_value = new.split(": ")[-1]
    assert_user_error(code, out, f"{cfg}:{line_of(cfg, new.splitlines()[-1])}:", f"{field}: ", expected,
                      bad_value if field == "batch_size" else f"'{bad_value}'")


def test_framework_errors_are_reported_without_importing_torch(tmp_path, project):
    cfg = project.write(with_line(project.text, "max_steps: 4", "max_steps: ten"))
    proc = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom trainer.cli import main\nsys.argv=['trainer','check',sys.argv[1]]\n"
         "try:\n    main()\nexcept SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)", str(cfg)],
        capture_output=True, text=True, cwd=ROOT)
    assert "exit 2 False" in proc.stdout


def test_unknown_key_suggests_the_closest(tmp_path, project):
    cfg = project.write(with_line(project.text, "max_steps: 4", "max_step: 4"))
    code, out = invoke("check", cfg)
    assert_user_error(code, out, f"{cfg}:{line_of(cfg, 'max_step:')}:", "unknown key 'max_step'; did you mean 'max_steps'?")


def test_unknown_nested_key_suggests_the_closest(tmp_path, project):
    cfg = project.write(project.text + "grad_logging:\n  every_n_step: 5\n")
    code, out = invoke("check", cfg)
    assert_user_error(code, out, f"{cfg}:{line_of(cfg, 'every_n_step:')}:", "grad_logging.every_n_step",
                      "did you mean 'every_n_steps'?")


def test_component_argument_of_the_wrong_type_points_at_its_own_line(tmp_path, project):
    cfg = project.write(with_line(project.text, "lr: 0.1", "lr: abc"))
    code, out = invoke("check", cfg)
    assert_user_error(code, out, f"{cfg}:{line_of(cfg, 'lr: abc')}:", "optimizer.lr:", "found 'abc'")


def test_error_raised_by_the_target_names_the_component(tmp_path, project):
    cfg = project.write(with_line(project.text, "lr: 0.1", "lr: -1"))
    code, out = invoke("check", cfg)
    assert_user_error(code, out, f"{cfg}:{line_of(cfg, 'optimizer:') + 1}:", "optimizer:", "Invalid learning rate: -1")


def test_target_module_that_does_not_exist(tmp_path, project):
    cfg = project.write(with_line(project.text, "_target_: torch.optim.SGD", "_target_: torch.optimm.SGD"))
    code, out = invoke("check", cfg)
    assert_user_error(code, out, f"{cfg}:{line_of(cfg, 'torch.optimm')}:", "optimizer._target_",
                      "cannot import 'torch.optimm.SGD'", "did you mean 'torch.optim'?")


def test_target_attribute_that_does_not_exist(tmp_path, project):
    cfg = project.write(with_line(project.text, "_target_: torch.optim.SGD", "_target_: torch.optim.SDG"))
    code, out = invoke("check", cfg)
    assert_user_error(code, out, f"{cfg}:{line_of(cfg, 'torch.optim.SDG')}:", "has no attribute 'SDG'",
                      "did you mean 'torch.optim.SGD'?")


def test_argument_the_target_does_not_take(tmp_path, project):
    cfg = project.write(with_line(project.text, "  hidden: 8", "  hiden: 8"))
    code, out = invoke("check", cfg)
    assert_user_error(code, out, f"{cfg}:{line_of(cfg, 'hiden')}:", "model.hiden",
                      "takes no argument 'hiden'; did you mean 'hidden'?")


def test_missing_empty_and_non_mapping_files(tmp_path, project):
    code, out = invoke("check", tmp_path / "missing.yaml")
    assert_user_error(code, out, "missing.yaml: config file not found")
    code, out = invoke("check", project.write("", "empty.yaml"))
    assert_user_error(code, out, "empty.yaml: the file is empty")
    code, out = invoke("check", project.write("- a\n- b\n", "list.yaml"))
    assert_user_error(code, out, "list.yaml:1:1: the top level is a list")


def test_missing_sections(tmp_path, project):
    cfg = project.write("max_steps: 3\n")
    code, out = invoke("check", cfg)
    assert_user_error(code, out, "missing required section 'model'")


def test_cuda_requested_on_a_machine_without_it(tmp_path, project):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = project.write(with_line(project.text, "seed: 0", "seed: 0\ndevice: cuda"))
    proc = in_process("run", cfg, cwd=project.root)
    assert_user_error(proc.returncode, proc.stderr, f"{cfg}:{line_of(cfg, 'device: cuda')}:",
                      "CUDA is not available")


def test_override_of_a_key_that_does_not_exist(tmp_path, project):
    cfg = project.write(project.text)
    code, out = invoke("check", cfg, "max_step=3")
    assert_user_error(code, out, "command line 'max_step=3'", "did you mean 'max_steps'?")
    code, out = invoke("check", cfg, "optimizer.lrr=3")
    assert_user_error(code, out, "command line 'optimizer.lrr=3'", "did you mean 'lr'?")
    code, out = invoke("check", cfg, "nothing.here=3")
    assert_user_error(code, out, "command line 'nothing.here=3'", "unknown key 'nothing'")
    code, out = invoke("check", cfg, "max_steps")
    assert_user_error(code, out, "an override is KEY=VALUE")


def test_override_values_are_yaml_scalars(tmp_path, project):
    cfg = project.write(project.text + "scheduler:\n  _target_: torch.optim.lr_scheduler.StepLR\n  step_size: 2\n")
    code, out = invoke("check", cfg, "scheduler=null", "clip_grad_norm=1e0", "progress=lines")
    assert code == 0, out
    assert "scheduler: null" in out and "clip_grad_norm: 1.0" in out and "progress: lines" in out


# What the reader refuses: each case a real `trainer check` with a hostile file or override; the
# timeout keeps one that regresses (an alias bomb ran for minutes) from hanging the suite.

BOMB = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi")
)


@pytest.mark.parametrize("old,new,needle,expected", [
    ("seed: 0", "seed: 0\n" + BOMB, "b: &b", "the alias *a is not supported"),
    ("seed: 0", "seed: 0\nextra: !foo bar", "!foo", "the tag '!foo' is not supported"),
    ("seed: 0", "seed: 0\nextra: !!python/object/apply:os.system [echo]", "python",
     "the tag '!!python/object/apply:os.system'"),
    ("seed: 0", "seed: 0\nextra: " + "[" * 5000 + "]" * 5000, "extra", "nested more than 100 levels deep"),
    ("seed: 0", "seed: 18446744073709551616", "seed:", "seed: 18446744073709551616 is out of range: an integer setting "
                                                        "is at most 2**63-1 = 9223372036854775807"),
    ("seed: 0", "seed: " + "1" * 5000, "seed:", "seed: an integer of 5,000 characters"),
    ("seed: 0", "seed: 0\nnum_workers: 9223372036854775807", "num_workers",
     "num_workers: Input should be less than or equal to 256 (found 9223372036854775807)"),
    ("max_steps: 4", "max_steps: true", "max_steps", "max_steps: expected an integer, found true\n"),
    ("batch_size: 16", "batch_size: yes", "batch_size", "batch_size: expected an integer, found true\n"),
    ("seed: 0", "seed: 0\nclip_grad_norm: off", "clip_grad_norm", "clip_grad_norm: expected a number, found false\n"),
    ("seed: 0", "seed: 0\ncheckpoint: {keep_last: on}", "keep_last",
     "checkpoint.keep_last: expected an integer, found true"),
    ("name: t", "name: caf\xe9", "name:", "byte 0xe9 at byte offset 9 is not UTF-8; save the file as UTF-8"),
])
def test_check_refuses_what_the_reader_cannot_read_safely(project, run_cli, old, new, needle, expected):
    cfg = project.config
    text = with_line(project.text, old, new)
    cfg.write_bytes(text.encode("latin-1" if "\xe9" in text else "utf-8"))
    line = next(i for i, x in enumerate(text.splitlines(), start=1) if needle in x)
    proc = run_cli("check", cfg, timeout=20)
    assert_user_error(proc.returncode, proc.stderr, f"error: {cfg}:{line}:", expected)


@pytest.mark.parametrize("kind,expected", [
    ("utf-16", ": the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8"),
    ("oversized", ": the file is 300,000 bytes; a config may be at most 262,144 bytes (256 KiB)"),
])
def test_check_refuses_files_it_cannot_read_as_a_whole(project, run_cli, kind, expected):
    cfg = project.config
    cfg.write_bytes(project.text.encode("utf-16") if kind == "utf-16" else b"#" * 300_000)
    proc = run_cli("check", cfg, timeout=20)
    assert_user_error(proc.returncode, proc.stderr, f"error: {cfg}{expected}\n")


@pytest.mark.parametrize("override,expected", [
    ("max_steps=true", "max_steps: expected an integer, found true"),
    ("seed=18446744073709551616", "seed: 18446744073709551616 is out of range"),
    ("seed=" + "1" * 5000, "an integer of 5,000 characters"),
    ("callbacks=&a [*a, *a]", "the alias *a is not supported"),
    ("loss=!!python/name:os.system", "the tag '!!python/name:os.system' is not supported"),
    ("callbacks=" + "[" * 5000, "nested more than 100 levels deep"),
])
def test_check_refuses_the_same_on_the_command_line(project, run_cli, override, expected):
    cfg = project.write(project.text)
    proc = run_cli("check", cfg, override, timeout=20)
    assert_user_error(proc.returncode, proc.stderr, f"error: command line '{override}': ", expected)


def test_numbers_may_be_written_as_numeric_strings_but_not_as_booleans(project):
    cfg = project.write(project.text)
    code, out = invoke("check", cfg, "clip_grad_norm='3e-4'", "max_steps=4.0", "seed=-1")
    assert code == 0, out
    assert "clip_grad_norm: 0.0003" in out and "max_steps: 4\n" in out and "seed: -1" in out
    code, out = invoke("check", cfg, "grad_logging.every_n_steps=no")
    assert_user_error(code, out, "command line 'grad_logging.every_n_steps=no': grad_logging.every_n_steps: "
                                 "expected an integer, found false\n")


def test_debug_shows_the_traceback(tmp_path, project):
    cfg = project.write(with_line(project.text, "lr: 0.1", "lr: -1"))
    proc = in_process("check", cfg, "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "Invalid learning rate" in proc.stderr


def test_a_failure_in_the_users_hook_exits_one_and_names_it(tmp_path, project):
    project.write("""\
        from trainer import Trainer

        class Broken(Trainer):
            def on_fit_start(self):
                raise KeyError("a bug in the user's code")
        """, "broken.py")
    project.write("trainer: broken.Broken\n" + project.text)
    proc = in_process("run", "cfg.yaml", cwd=project.root)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert proc.stderr.strip() == ('error: the run failed after 0 optimizer steps: KeyError: "a bug in the user\'s code", '
                                   'raised in broken.py:5 in on_fit_start; --debug shows the traceback')


def test_loggers_tensorboard_from_yaml(tmp_path, project):
    pytest.importorskip("tensorboard")
    cfg = project.write(project.text + f"out_dir: {tmp_path / 'runs'}\nloggers: [tensorboard]\n")
    code, out = invoke("run", cfg)
    assert code == 0, out
    run_dir = tmp_path / "runs" / "t"
    assert any((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "metrics.jsonl").exists()
    code, out = invoke("check", project.write(project.text + "loggers: [tensorbord]\n", "bad.yaml"))
    assert_user_error(code, out, "loggers[0]", "'tensorboard'")


def test_built_in_callbacks_and_schedule_from_yaml(tmp_path, project):
    text = project.text.replace("max_steps: 4", "max_steps: 40\neval_every_n_steps: 4\neval_every_n_epochs: null") + (
        f"out_dir: {tmp_path / 'runs'}\n"
        "scheduler: {_target_: trainer.WarmupDecay, warmup_steps: 5, decay: cosine}\n"
        "callbacks:\n"
        "  - {_target_: trainer.EarlyStopping, monitor: val/loss, patience: 2, min_delta: 10.0}\n"
        "  - {_target_: trainer.BestCheckpoints, monitor: val/acc, mode: max, top_k: 2}\n"
        "  - {_target_: trainer.EMAWeights, decay: 0.9}\n"
    )
    code, out = invoke("run", project.write(text))
    assert code == 0, out
    # min_delta 10 means no evaluation counts as an improvement after the first: stop after 3 evaluations
    assert out.startswith("early stopping: val/loss did not improve by more than 10.0 for 2 evaluations")
    assert "step 12" in out
    checkpoints = tmp_path / "runs" / "t" / "checkpoints"
    assert (checkpoints / "best.pt").exists() and len(list(checkpoints.glob("best-step-*.pt"))) <= 2
    state = torch_load(checkpoints / "step-00000012.pt")
    assert set(state["callbacks"]) == {"EarlyStopping", "BestCheckpoints", "EMAWeights"}
    assert state["scheduler"]["total_steps"] == 40


def torch_load(path):
    from trainer.checkpoint import load_checkpoint

    return load_checkpoint(path)


# ------------------------------------------------------------------ union fields, factories, runs


@pytest.mark.parametrize("old,new,expected", [
    ("seed: 0", "seed: 0\nloggers: [tensorbord]",
     "loggers[0]: unknown logger 'tensorbord'; did you mean 'tensorboard'? A logger is 'tensorboard', 'mlflow', "
     "'wandb', {mlflow: {...options}}, {wandb: {...options}} or {_target_: dotted.path, ...arguments}"),
    ("seed: 0", "seed: 0\nloggers: [mlfow]", "loggers[0]: unknown logger 'mlfow'; did you mean 'mlflow'? A logger is "
     "'tensorboard', 'mlflow', 'wandb', {mlflow: {...options}}, {wandb: {...options}} or {_target_: dotted.path, "
     "...arguments}"),
    ("seed: 0", "seed: 0\ntrainer: 5",
     "trainer: expected a dotted path such as my_pkg.MyTrainer or {_target_: my_pkg.MyTrainer, ...arguments}, found 5"),
    ("loss: torch.nn.functional.cross_entropy", "loss: [cross_entropy]",
     "loss: expected a dotted path such as torch.nn.functional.cross_entropy or "
     "{_target_: torch.nn.CrossEntropyLoss, ...arguments}, found a list"),
    ("loss: torch.nn.functional.cross_entropy", "loss: cross_entropy",
     "loss: expected a dotted path such as torch.nn.functional.cross_entropy, got 'cross_entropy'"),
    ("seed: 0", "seed: 0\ncompile: max-autotune",
     "compile: expected true, false or a mapping of settings such as {mode: max-autotune, optimizer: true}, "
     "found 'max-autotune'"),
])
def test_a_value_no_branch_of_a_union_takes_gets_one_line(project, old, new, expected):
    cfg = project.write(with_line(project.text, old, new))
    code, out = invoke("check", cfg)
    line = new.splitlines()[-1]
    column = line.index(": ") + 3 + line.startswith("loggers")  # the value; a list's first item
    assert_user_error(code, out, f"{cfg}:{line_of(cfg, line)}:{column}: {expected}\n")
    assert "Component" not in out and "literal" not in out and "more problem" not in out


def test_tracker_options_are_checked_like_a_section(project):
    cfg = project.write(project.text + "loggers:\n  - mlflow: {trackin_uri: sqlite:///m.db}\n")
    code, out = invoke("check", cfg)
    assert_user_error(code, out, f"{cfg}:{line_of(cfg, 'trackin_uri')}:",
                      "loggers[0].mlflow.trackin_uri: unknown key 'trackin_uri'; did you mean 'tracking_uri'?")
    cfg = project.write(project.text + "loggers: [{mlflow: {}, wandb: {}}]\n")
    code, out = invoke("check", cfg)
    assert_user_error(code, out, "loggers[0]: a logger mapping names one tracker: {mlflow: {...}} or {wandb: {...}}")


def test_compile_settings_are_checked_like_a_section(project):
    cfg = project.write(project.text + "compile:\n  mod: max-autotune\n")
    code, out = invoke("check", cfg)
    assert_user_error(code, out, f"{cfg}:{line_of(cfg, 'mod:')}:", "compile.mod: unknown key 'mod'; did you mean 'mode'?")
    cfg = project.write(project.text + "compile: {mode: max-autotune, backend: eager}\n")
    code, out = invoke("check", cfg)
    assert_user_error(code, out, f"{cfg}:{line_of(cfg, 'compile:')}:", "compile.backend: mode 'max-autotune' is a "
                      "setting of the inductor backend, not of 'eager'")
    assert "CompileConfig" not in out and "more problem" not in out
    cfg = project.write(project.text + "compile:\n  backend: inductr\n")  # torch.compile itself says so only at step 1
    code, out = invoke("check", cfg)
    assert_user_error(code, out, f"{cfg}:{line_of(cfg, 'backend:')}:", "compile.backend: compile backend 'inductr' "
                      "is not one torch.compile knows; did you mean 'inductor'?")


def test_an_activation_checkpointing_pattern_that_matches_nothing_points_at_itself(project):
    cfg = project.write(project.text + "activation_checkpointing:\n  - Linear\n  - blocks.*\n")
    code, out = invoke("check", cfg)
    assert_user_error(code, out, f"{cfg}:{line_of(cfg, '- blocks.*')}:",
                      "activation_checkpointing[1]: pattern 'blocks.*' matches no module name or class; "
                      "modules are: 0, 1, 2, 3, 4; classes are: MLP, Linear, ReLU")


def test_a_compiled_optimizer_step_gets_an_unfused_optimizer(project):
    cfg = project.write(with_line(project.text, "lr: 0.1", "lr: 0.1\n  fused: true") + "compile: {optimizer: true}\n")
    code, out = invoke("check", cfg)
    assert_user_error(code, out, f"{cfg}:{line_of(cfg, 'fused:')}:", "optimizer.fused: compile: {optimizer: true} "
                      "compiles the optimizer's own code, which a fused kernel replaces")


def test_a_component_written_as_a_bare_path_is_shown_the_mapping_to_write(project):
    cfg = project.write(with_line(project.text, "optimizer:\n  _target_: torch.optim.SGD\n  lr: 0.1",
                                  "optimizer: torch.optim.SGD"))
    code, out = invoke("check", cfg)
    assert_user_error(code, out, f"{cfg}:{line_of(cfg, 'optimizer:')}:12: optimizer: expected a component",
                      "found 'torch.optim.SGD'; write {_target_: torch.optim.SGD}")


def test_a_scheduler_that_raises_is_blamed_at_its_own_line(project):
    # StepLR resuming from last_epoch 5 needs initial_lr in the optimizer's groups: it raises when called
    cfg = project.write(project.text + "scheduler:\n  _target_: torch.optim.lr_scheduler.StepLR\n  step_size: 2\n"
                        "  last_epoch: 5\n")
    code, out = invoke("check", cfg)
    assert_user_error(code, out, f"{cfg}:{line_of(cfg, 'scheduler:') + 1}:3: scheduler: ",
                      "torch.optim.lr_scheduler.StepLR(...) raised KeyError")
    assert "building trainer.Trainer failed" not in out


def test_the_checkpoint_holds_the_whole_run_config(tmp_path, project):
    cfg = project.write(project.text + f"out_dir: {tmp_path / 'runs'}\n")
    code, out = invoke("run", cfg)
    assert code == 0, out
    state = torch_load(tmp_path / "runs" / "t" / "checkpoints" / "step-00000004.pt")
    assert state["config"]["name"] == "t" and state["config"]["model"]["_target_"] == "trainer.examples.models.MLP"
    assert state["config"]["optimizer"] == {"_target_": "torch.optim.SGD", "lr": 0.1}


def test_runs_lists_a_damaged_run_beside_the_good_ones(tmp_path, project):
    cfg = project.write(project.text + "out_dir: runs\n"
                        "callbacks:\n"
                        "  - {_target_: trainer.EarlyStopping, monitor: val/loss, patience: 5}\n"
                        "  - {_target_: trainer.BestCheckpoints, monitor: val/acc, mode: max}\n")
    assert in_process("run", cfg, "max_steps=12", cwd=project.root).returncode == 0  # three evaluations
    shutil.copytree(project.runs / "t", project.runs / "damaged")  # a second run, then damaged
    (project.runs / "damaged" / "status.json").write_text('{"status": ')
    proc = in_process("runs", cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:3]}
    assert rows["damaged"][1] == "unreadable"
    losses = [json.loads(x)["val/loss"] for x in (project.runs / "t" / "metrics.jsonl").read_text().splitlines()
              if "val/loss" in x]
    assert rows["t"][1:4] == ["finished", "12", "val/loss"] and min(losses) != max(losses)
    assert float(rows["t"][4]) == pytest.approx(min(losses), rel=1e-3)  # min: EarlyStopping's mode, not max
    assert "damaged: JSONDecodeError" in proc.stdout


def test_stop_from_a_callback_ends_the_run_and_the_reason_is_reported(project):
    project.write("""\
        from trainer import Callback


        class StopAt(Callback):
            def on_train_batch_end(self, trainer, outputs, batch):
                if trainer.global_step == 3:
                    trainer.stop("enough: step 3 looked fine")
        """, name="stopper.py")
    cfg = project.write(project.text.replace("max_steps: 4", "max_steps: 20")
                        + "callbacks: [{_target_: stopper.StopAt}]\n")
    proc = in_process("run", cfg, cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    # Step 3 is the third of the first epoch's four: epoch 1, counted from 1 as people count.
    assert proc.stdout.startswith("enough: step 3 looked fine: step 3, epoch 1; train/loss "), proc.stdout
    status = json.loads((project.runs / "t" / "status.json").read_text())
    assert (status["status"], status["step"], status["reason"]) == ("finished", 3, "enough: step 3 looked fine")
    assert (project.runs / "t" / "checkpoints" / "step-00000003.pt").exists()  # the final checkpoint follows


def test_a_warning_of_the_framework_is_one_line(project, run_cli):
    """A warning raised inside ``trainer`` reads as ``warning: ...``, not as a Python warning that
    points at a line of the framework; the run goes on."""
    project.write(project.text + "profile: {start_step: 100}\n")
    proc = run_cli("run", project.config, cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "profile.start_step" in line]
    assert lines == ["warning: profile.start_step 100 is past the run's last step 4: no trace will be written; "
                     "set profile.start_step to 4 or less"], proc.stderr
    assert "UserWarning" not in proc.stderr
