import dataclasses

import pytest
import torch
from torch import nn

from torch.nn import functional as F

from helpers import classification, mlp, quiet
from trainer import Callback, Trainer, detach, ema_update, eval_mode, freeze, freeze_matching, frozen_copy, unfreeze


def model_with_frozen_part():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))
    model[2].eval()  # a frozen BatchNorm inside a training model
    return model


def test_eval_mode_sets_eval_builds_no_graph_and_restores_every_flag():
    model = model_with_frozen_part()
    before = [m.training for m in model.modules()]
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
        out = model(torch.randn(3, 4, requires_grad=True))
        assert not out.requires_grad and out.grad_fn is None
    assert [m.training for m in model.modules()] == before
    assert torch.is_grad_enabled()


def test_eval_mode_restores_after_an_exception():
    model = model_with_frozen_part()
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(model):
            raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == before
    assert torch.is_grad_enabled()


def test_eval_mode_inference_and_nested_grad_mode():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        with eval_mode(model, inference=True):
            assert torch.is_inference_mode_enabled()
            assert model(torch.randn(1, 2)).is_inference()
        assert not torch.is_grad_enabled()  # the outer no_grad is back, not grad on
    assert not torch.is_inference_mode_enabled()


def test_detach_walks_containers_and_passes_other_values():
    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor
        name: str

    w = torch.ones(2, requires_grad=True)
    y = w * 2
    got = detach({"a": [y, (y, 3)], "b": Out(y, "x"), "c": None})
    assert not got["a"][0].requires_grad and not got["a"][1][0].requires_grad
    assert got["a"][1][1] == 3 and isinstance(got["a"][1], tuple)
    assert isinstance(got["b"], Out) and not got["b"].logits.requires_grad and got["b"].name == "x"
    assert got["c"] is None
    assert y.requires_grad  # the original is untouched


def test_freeze_and_unfreeze():
    model = mlp()
    assert freeze(model) is model
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert unfreeze(model) is model
    assert all(p.requires_grad for p in model.parameters()) and model.training


def test_freeze_matching_by_name_pattern():
    model = nn.ModuleDict({"encoder": mlp(), "head": nn.Linear(3, 2)})
    names = freeze_matching(model, "encoder.*")
    assert names == ["encoder.0.weight", "encoder.0.bias", "encoder.2.weight", "encoder.2.bias"]
    assert all(not p.requires_grad for p in model["encoder"].parameters())
    assert all(p.requires_grad for p in model["head"].parameters())
    with pytest.raises(ValueError, match="'encodr.*' matches no parameter"):
        freeze_matching(model, "encodr.*")


def test_frozen_copy_is_independent_and_frozen():
    source = mlp()
    target = frozen_copy(source)
    assert not any(p.requires_grad for p in target.parameters()) and not target.training
    with torch.no_grad():
        source[0].weight.add_(1.0)
    assert not torch.equal(source[0].weight, target[0].weight)
    assert all(p.requires_grad for p in source.parameters())


def test_ema_update_equals_a_hand_computed_ema():
    source = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    target = frozen_copy(source)
    expected = {k: v.clone() for k, v in target.state_dict().items()}
    for step in range(3):
        with torch.no_grad():
            for p in source.parameters():
                p.add_(torch.randn_like(p))
        source.train()
        source(torch.randn(8, 3))  # moves BatchNorm's running stats and counter
        ema_update(target, source, decay=0.9)
        for k, v in source.state_dict().items():
            if v.is_floating_point():
                expected[k] = 0.9 * expected[k] + 0.1 * v
            else:
                expected[k] = v.clone()
    for k, v in target.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-6), k
    assert target[1].num_batches_tracked.item() == 3
    assert all(not p.requires_grad for p in target.parameters())


def test_ema_update_rejects_a_mismatched_target():
    with pytest.raises(ValueError, match="frozen_copy"):
        ema_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0.9)
    with pytest.raises(ValueError, match="decay"):
        ema_update(nn.Linear(2, 2), nn.Linear(2, 2), 1.5)


# ------------------------------------------------------------------ freezing and unfreezing in a run


def encoder_head(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU()), nn.Linear(16, 3))


def test_freeze_matching_puts_the_matched_modules_in_eval_mode_so_batchnorm_stops_drifting():
    model = encoder_head()
    names = freeze_matching(model, "0.*")
    assert names == ["0.0.weight", "0.0.bias", "0.1.weight", "0.1.bias"]
    assert not model[0].training and not model[0][1].training  # as freeze() does
    assert model.training and model[1].training  # the rest keeps training
    before = model[0][1].running_mean.clone()
    model(torch.randn(32, 8) * 5 + 3)
    assert torch.equal(model[0][1].running_mean, before)


def frozen_encoder_trainer(model, run_dir=None, callbacks=(), **config):
    x, y = classification(64)
    freeze(model[0])
    return Trainer(model, lambda params: torch.optim.Adam(params, lr=0.01), (x, y), loss_fn=F.cross_entropy,
                   scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8),
                   callbacks=callbacks, run_dir=run_dir, config=quiet(batch_size=16, **config))


def test_trainer_unfreeze_adds_a_parameter_group_that_trains():
    model = encoder_head()
    t = frozen_encoder_trainer(model, max_steps=3)
    before = model[0][0].weight.detach().clone()
    assert t.unfreeze(model[0], lr=0.05) == ["0.0.weight", "0.0.bias", "0.1.weight", "0.1.bias"]
    assert [g["lr"] for g in t.optimizer.param_groups] == [0.01, 0.05]
    assert model[0].training and model[0][0].weight.requires_grad
    assert t.unfreeze("0.*") == []  # held already: nothing added twice
    t.fit()
    assert not torch.equal(model[0][0].weight, before)
    assert t.scheduler.base_lrs == [0.01, 0.05]  # the schedule scales the new group too
    with pytest.raises(ValueError, match="unfreeze pattern 'encodr.*' matches no parameter"):
        t.unfreeze("encodr.*")


def test_fit_warns_about_parameters_that_require_grad_but_no_optimizer_holds():
    model = encoder_head()
    t = frozen_encoder_trainer(model, max_steps=1)
    unfreeze(model[0])  # the plain function: the optimizer was built without these
    with pytest.warns(UserWarning, match=r"4 parameter\(s\) require gradients but the optimizer does not hold "
                                         r"them, so they will not train: 0\.0\.weight, 0\.0\.bias, 0\.1\.weight"):
        t.fit()


class UnfreezeAtEpoch(Callback):
    """Unfreezes the encoder at the start of epoch 1, as a fine-tuning schedule does."""

    def on_train_epoch_start(self, trainer):
        if trainer.epoch == 1:
            trainer.unfreeze(trainer.module[0], lr=0.003)


def test_a_resume_after_unfreeze_rebuilds_the_group_and_ends_bit_identical(tmp_path):
    # Epochs of 4 steps; unfrozen at step 4, checkpoint at step 6, in the middle of epoch 1.
    config = dict(max_epochs=2, checkpoint={"every_n_steps": 6, "keep_last": 5})
    whole_model = encoder_head()
    whole = frozen_encoder_trainer(whole_model, tmp_path / "whole", [UnfreezeAtEpoch()], **config)
    whole.fit()
    assert len(whole.optimizer.param_groups) == 2

    resumed_model = encoder_head()
    resumed = frozen_encoder_trainer(resumed_model, tmp_path / "resumed", [UnfreezeAtEpoch()], **config)
    assert len(resumed.optimizer.param_groups) == 1  # as built: the checkpoint holds the second
    resumed.fit(resume_from=tmp_path / "whole" / "checkpoints" / "step-00000006.pt")
    assert len(resumed.optimizer.param_groups) == 2
    assert resumed.optimizer.param_groups[1]["lr"] == whole.optimizer.param_groups[1]["lr"]
    for a, b in zip(whole_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
