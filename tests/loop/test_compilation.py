"""compile: its settings, recompilations in the log records, and the compiled optimizer step
(trainer.compilation). Compiled with the eager backend where code generation is not the point."""

import copy

import pytest
import torch
from torch.nn import functional as F

from helpers import batches, count_conversions, mlp, quiet
from trainer import Trainer
from trainer.checkpoint.state import config_changes
from trainer.loop.compilation import Recompiles, check_optimizer, compile_step
from trainer.config import CompileConfig, TrainerConfig, compile_settings


def sized_batches(sizes):
    """One batch per size: a model compiled for one batch size meets another each step."""
    return [batch for n in sizes for batch in batches(1, n, seed=n)]


@pytest.mark.parametrize("dynamic, expected", [
    (False, [0, 1, 2, 3, 4]),  # every new batch size is a new graph
    (None, [0, 1, 1, 1, 1]),  # the second size recompiles once, with the size dynamic from then on
])
def test_changing_shapes_show_as_recompiles(dynamic, expected):
    torch._dynamo.reset()
    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), sized_batches([2, 3, 4, 5, 6]),
                loss_fn=F.cross_entropy,
                config=quiet(compile={"backend": "eager", "dynamic": dynamic}, max_steps=5, sanity_check=False))
    t.fit()
    assert [r["compile/recompiles"] for r in t.history] == expected


def test_no_record_of_recompiles_without_compile():
    model = mlp()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(2, 4), loss_fn=F.cross_entropy,
                config=quiet(max_steps=2))
    t.fit()
    assert [r["step"] for r in t.history] == [1, 2]  # a record every step, none with the count
    assert all("train/loss" in r and "compile/recompiles" not in r for r in t.history)


def test_the_count_goes_on_after_dynamo_is_reset(monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setitem(counters, "frames", {"total": 10})
    recompiles = Recompiles()
    recompiles.start()
    counters["frames"]["total"] = 13
    assert recompiles.count() == 3
    counters["frames"]["total"] = 2  # torch._dynamo.reset() cleared it, then two more
    assert recompiles.count() == 5


def test_settings_and_what_true_means():
    assert compile_settings(False) is None
    assert compile_settings(True) == CompileConfig()
    assert CompileConfig() == CompileConfig(mode="default", fullgraph=False, dynamic=None, backend="inductor",
                                            optimizer=False)
    settings = TrainerConfig(compile={"mode": "max-autotune", "optimizer": True}).compile
    assert settings.mode == "max-autotune" and settings.optimizer
    # A resolved config of an older run (compile a boolean) compares equal to the same setting now,
    # and true stays true in the configs this version writes.
    assert TrainerConfig(compile=True).model_dump(mode="json")["compile"] is True
    saved = {"compile": True, "seed": 0}
    assert config_changes(saved, {**saved, "compile": TrainerConfig(compile=True).model_dump(mode="json")["compile"]}) == []


@pytest.mark.parametrize("config, message", [
    ({"compile": {"mode": "max-autotune", "backend": "eager"}}, "mode 'max-autotune' is a setting of the inductor"),
    ({"compile": {"optimizer": True}, "precision": "fp16"}, "optimizer: true cannot be used with precision: fp16"),
    ({"compile": {"optimizer": True}, "nonfinite_check": "device"}, "device needs a fused optimizer"),
    ({"compile": {"mode": "fast"}}, "Input should be 'default', 'reduce-overhead'"),
])
def test_settings_that_do_not_go_together(config, message):
    with pytest.raises(ValueError, match=message):
        TrainerConfig(**config)


def test_the_compiled_optimizer_step_matches_the_eager_one_and_a_schedule_does_not_recompile():
    """A learning rate read as a float would be a constant of the graph: a schedule that changes it
    each step would recompile each step. It goes in as a tensor, so the count stays where it is."""
    torch._dynamo.reset()

    def run(compiled):
        model = mlp()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
        settings = {"backend": "eager", "optimizer": True} if compiled else False
        t = Trainer(model, optimizer, batches(5, 8), loss_fn=F.cross_entropy, scheduler=scheduler,
                    config=quiet(compile=settings, max_steps=5, sanity_check=False))
        t.fit()
        return t

    eager, compiled = run(False), run(True)
    assert [r["compile/recompiles"] for r in compiled.history] == [0] * 5
    assert [r["lr"] for r in compiled.history] == [r["lr"] for r in eager.history]
    assert all(type(g["lr"]) is float for g in compiled.optimizer.param_groups)  # as schedulers and checkpoints expect
    for (name, a), b in zip(compiled.module.state_dict().items(), eager.module.state_dict().values()):
        # the same updates, the learning rate a tensor in them: a float32 rounding or two apart
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_optimizers_whose_step_cannot_be_compiled_are_refused():
    model = mlp()
    with pytest.raises(ValueError, match="fused AdamW: torch.compile does not trace into fused kernels"):
        Trainer(model, torch.optim.AdamW(model.parameters(), fused=True),
                config={"compile": {"optimizer": True, "backend": "eager"}})
    with pytest.raises(ValueError, match="not supported with strategy: fsdp"):
        check_optimizer(torch.optim.AdamW(mlp().parameters()), sharded=True)


def test_the_compiled_step_reads_nothing_from_the_device():
    torch._dynamo.reset()
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, foreach=False)
    step = compile_step(optimizer, CompileConfig(backend="eager", optimizer=True))
    x, y = batches(1, 8)[0]
    F.cross_entropy(model(x), y).backward()
    step()  # compiles
    before = copy.deepcopy(model.state_dict())
    with count_conversions() as counts:
        for _ in range(3):
            step()
    assert sum(counts.values()) == 0, counts
    assert not torch.equal(before["0.weight"], model.state_dict()["0.weight"])
