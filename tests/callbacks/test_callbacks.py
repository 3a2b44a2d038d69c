"""The built-in callbacks, schedules, loggers and run reports."""

import math
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from helpers import ROOT, batches, classification, in_process, mlp, process_env, quiet
from trainer import BestCheckpoints, Callback, EarlyStopping, EMAWeights, Trainer, ema_update, frozen_copy
from trainer.checkpoint import list_checkpoints, load_checkpoint
from trainer.schedules import WarmupDecay


class Scripted(Trainer):
    """Validation reports the next value of a script instead of measuring anything."""

    def __init__(self, *args, script=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.script = list(script)

    def validation_step(self, batch):
        return {"score": torch.tensor(self.script.pop(0))}


def scripted(script, callbacks, tmp_path=None, **config):
    model = mlp()
    data = batches(20, 4)
    # Without the sanity pass: its one validation batch would take the script's first value.
    settings = quiet(**{"eval_every_n_steps": 1, "eval_every_n_epochs": None, "max_steps": len(script),
                        "sanity_check": False, **config})
    return Scripted(model, torch.optim.SGD(model.parameters(), lr=0.1), data, val_data=[batches(1, 4)[0]],
                    loss_fn=F.cross_entropy, callbacks=callbacks, script=script, run_dir=tmp_path, config=settings)


def test_early_stopping_stops_at_the_right_step_and_says_why(tmp_path):
    stopper = EarlyStopping(monitor="val/score", mode="max", patience=2, min_delta=0.01)
    t = scripted([0.5, 0.6, 0.605, 0.61, 0.9, 1.0], [stopper], tmp_path)
    t.fit()
    # best 0.6 at step 2; 0.605 and 0.61 are within min_delta: two evaluations without improvement
    assert t.global_step == 4
    assert t.stop_reason == "early stopping: val/score did not improve by more than 0.01 for 2 evaluations (best 0.6 at step 2)"
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == "step-00000004.pt"  # the final checkpoint
    state = load_checkpoint(tmp_path / "checkpoints" / "step-00000004.pt")
    assert state["callbacks"]["EarlyStopping"] == {"best": pytest.approx(0.6), "best_step": 2, "wait": 2}


def test_early_stopping_names_a_missing_metric():
    t = scripted([1.0], [EarlyStopping(monitor="val/acc")])
    with pytest.raises(KeyError, match="monitors 'val/acc', but validation reported \\['val/score'\\]"):
        t.fit()


def test_best_checkpoints_keep_the_top_k(tmp_path):
    best = BestCheckpoints(monitor="val/score", mode="max", top_k=2)
    t = scripted([0.3, 0.9, 0.5, 0.95, 0.1], [best], tmp_path)
    t.fit()
    directory = tmp_path / "checkpoints"
    names = sorted(p.name for p in directory.glob("best-*.pt"))
    assert names == ["best-step-00000002-val_score=0.9000.pt", "best-step-00000004-val_score=0.9500.pt"]
    assert (directory / "best.pt").samefile(directory / "best-step-00000004-val_score=0.9500.pt")
    state = load_checkpoint(directory / "best.pt")
    assert state["trainer_state"]["global_step"] == 4
    assert [p.name for p in list_checkpoints(directory)] == ["step-00000005.pt"]  # periodic ones apart


def test_best_checkpoint_resumes_like_any_other(tmp_path):
    t = scripted([0.3, 0.9, 0.5], [BestCheckpoints(monitor="val/score", mode="max")], tmp_path)
    t.fit()
    again = scripted([0.2, 0.1], [BestCheckpoints(monitor="val/score", mode="max")], max_steps=4)
    again.fit(resume_from=tmp_path / "checkpoints" / "best.pt")
    assert again.global_step == 4


def test_ema_weights_equal_a_hand_computed_ema_and_are_swapped_back():
    seen = {}
    model = mlp(seed=3)
    ema = EMAWeights(decay=0.8)
    reference = frozen_copy(mlp(seed=3))
    shadow = mlp(seed=3)
    data = batches(5, 8)

    class Record(Trainer):
        def validation_step(self, batch):
            seen["during"] = [p.detach().clone() for p in self.module.parameters()]
            return {"loss": F.cross_entropy(self.model(batch[0]), batch[1])}

    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    t = Record(model, opt, data, val_data=[data[0]], loss_fn=F.cross_entropy, callbacks=[ema],
               config=quiet(eval_every_n_epochs=1))
    t.fit()
    # replay the same updates by hand
    shadow_opt = torch.optim.SGD(shadow.parameters(), lr=0.3)
    for x, y in data:
        F.cross_entropy(shadow(x), y).backward()
        shadow_opt.step()
        shadow_opt.zero_grad()
        ema_update(reference, shadow, 0.8)
    for a, b in zip(ema.ema.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)
    for a, b in zip(seen["during"], reference.parameters()):  # validation saw the EMA weights
        torch.testing.assert_close(a, b)
    for a, b in zip(model.parameters(), shadow.parameters()):  # training weights are back
        torch.testing.assert_close(a, b)
    assert opt.param_groups[0]["params"][0] is next(model.parameters())


def test_ema_weights_are_stored_in_checkpoints(tmp_path):
    model = mlp()
    ema = EMAWeights(decay=0.9)
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(3, 4), loss_fn=F.cross_entropy,
            callbacks=[ema], run_dir=tmp_path, config=quiet()).fit()
    state = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    saved = state["callbacks"]["EMAWeights"]["ema"]
    for (k, v), p in zip(saved.items(), ema.ema.state_dict().values()):
        assert torch.equal(v, p), k


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_warmup_schedule_lr_at_chosen_steps(decay):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = WarmupDecay(opt, warmup_steps=4, decay=decay, min_lr_ratio=0.1)
    lrs = []

    class Lr(Callback):
        def on_before_optimizer_step(self, trainer, optimizer):
            lrs.append(optimizer.param_groups[0]["lr"])

    t = Trainer(model, opt, batches(7, 4), loss_fn=F.cross_entropy, scheduler=sched, callbacks=[Lr()],
                config=quiet(max_epochs=2))  # 14 steps, known from the data: no total given
    t.fit()
    assert sched.total_steps == 14
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    middle = 0.1 + 0.9 * (0.5 * (1 + math.cos(math.pi * 5 / 10)) if decay == "cosine" else 0.5)
    assert lrs[9] == pytest.approx(middle)
    assert sched.get_last_lr()[0] == pytest.approx(0.1)  # after the last step: the floor
    assert [r["lr"] for r in t.history][:4] == pytest.approx([0.5, 0.75, 1.0, 1.0])


def test_warmup_schedule_needs_a_length():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    t = Trainer(model, opt, iter(batches(3, 4)), loss_fn=F.cross_entropy,
                scheduler=WarmupDecay(opt, warmup_steps=1), config=quiet())
    with pytest.raises(ValueError, match="needs the run's length"):
        t.fit()


def test_tensorboard_event_files_are_readable(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.observability.tensorboard import TensorBoardLogger

    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(4, 4), loss_fn=F.cross_entropy,
                run_dir=tmp_path, loggers=[TensorBoardLogger(tmp_path / "tensorboard")],
                config=quiet(log_every_n_steps=2, grad_logging={"every_n_steps": 2, "histograms": True}))
    t.fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [2, 4]
    assert loss[0].value == pytest.approx(t.history[0]["train/loss"])
    assert [e.step for e in events.Histograms("grad/0.weight")] == [2, 4]
    assert (tmp_path / "metrics.jsonl").exists()  # beside the files, not instead of them


def test_plot_writes_a_png_that_opens(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    for name in ("a", "b"):
        model = mlp()
        x, y = classification(64)
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), val_data=(x, y), loss_fn=F.cross_entropy,
                run_dir=tmp_path / name, config=quiet(batch_size=16, max_epochs=3,
                                                      grad_logging={"every_n_steps": 1})).fit()
    out = tmp_path / "curves.png"
    proc = in_process("plot", tmp_path / "a", tmp_path / "b", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 500
    assert in_process("plot", tmp_path / "nope").returncode == 2


def test_runs_table_shows_an_interrupted_run(tmp_path):
    config = (ROOT / "configs" / "quickstart.yaml").read_text()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(config)
    marker = tmp_path / "sent"
    env_cfg = tmp_path / "stop.yaml"
    env_cfg.write_text(config + f"callbacks:\n  - {{_target_: killers.KillAt, where: after_step, step: 3, "
                                f"marker: '{marker}', signum: 15}}\n")
    assert in_process("run", cfg, f"out_dir={tmp_path / 'runs'}", "name=done", "max_epochs=1").returncode == 0
    stopped = subprocess.run([sys.executable, "-m", "trainer", "run", env_cfg, f"out_dir={tmp_path / 'runs'}",
                              "name=stopped"], capture_output=True, text=True, env=process_env(), timeout=300)
    assert stopped.returncode == 143, stopped.stderr  # a real process, stopped by a real SIGTERM
    proc = in_process("runs", tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:]}
    assert rows["done"][1] == "finished" and rows["done"][2] == "32"
    assert rows["stopped"][1] == "interrupted" and rows["stopped"][2] == "3"
    assert rows["stopped"][-1] == "step-00000003.pt" and rows["done"][3] == "val/acc"
