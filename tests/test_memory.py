"""Activation checkpointing: the same gradients from less saved memory, the same names, and the
modules it applies to chosen by name or class (trainer.memory)."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from trainer import Trainer
from trainer.examples.char_lm import CharTransformer, lm_loss, load
from trainer.freezing import frozen_copy
from trainer.memory import SavedForBackward, checkpoint_activations, checkpointed, matching_modules

BATCH, TIME, WIDTH = 4, 16, 32


def char_lm(dropout: float = 0.1, layers: int = 3) -> CharTransformer:
    torch.manual_seed(0)
    return CharTransformer(block_size=TIME, d_model=WIDTH, n_layers=layers, n_heads=2, dropout=dropout)


def tokens(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (BATCH, TIME), generator=g), torch.randint(0, 256, (BATCH, TIME), generator=g)


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    x, y = tokens()
    torch.manual_seed(2)  # the dropout masks
    lm_loss(model(x), y).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_gradients_are_those_of_the_model_without_it():
    plain = gradients(char_lm())
    model = char_lm()
    assert checkpoint_activations(model, "blocks.*") == ["blocks.0", "blocks.1", "blocks.2"]
    # The recompute draws the same dropout masks (the random state of the first forward is restored)
    # and runs the same kernels on the same inputs: bit for bit the same gradients.
    ours = gradients(model)
    assert list(ours) == list(plain)
    for name, grad in plain.items():
        assert torch.equal(ours[name], grad), name


def test_names_and_state_dict_do_not_change():
    plain, model = char_lm(), char_lm()
    checkpoint_activations(model, ["Block"])
    assert list(model.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert [n for n, _ in model.named_modules()] == [n for n, _ in plain.named_modules()]
    model.load_state_dict(plain.state_dict())  # a checkpoint of either loads into the other
    plain.load_state_dict(model.state_dict())
    assert checkpointed(model) == ["blocks.0", "blocks.1", "blocks.2"] and checkpointed(plain) == []


def test_saved_bytes_fall_by_what_the_blocks_kept():
    """What autograd keeps for backward, each storage once and the weights not counted: without
    checkpointing, everything each block saved; with it, each block's input alone."""
    x, y = tokens()

    def saved_bytes(model: nn.Module) -> int:
        with SavedForBackward(model) as saved:
            loss = lm_loss(model(x), y)
        loss.backward()  # what was saved is what backward needs
        return saved.bytes

    plain = saved_bytes(char_lm())
    model = char_lm()
    checkpoint_activations(model, "Block")
    with_checkpoints = saved_bytes(model)

    # One block run alone saves its input (its first LayerNorm does) and its own activations.
    block = char_lm().blocks[0]
    with SavedForBackward(block) as alone:
        block(torch.randn(BATCH, TIME, WIDTH))
    input_bytes = BATCH * TIME * WIDTH * 4
    inside = alone.bytes - input_bytes
    assert inside > 4 * input_bytes  # attention, MLP and norms keep several activations each
    assert with_checkpoints == plain - len(model.blocks) * inside
    assert with_checkpoints < plain / 2


def test_patterns_are_names_or_classes_and_the_outermost_match_is_taken():
    model = char_lm(layers=2)
    assert [n for n, _ in matching_modules(model, ["Block"])] == ["blocks.0", "blocks.1"]
    # "blocks.*" also matches what is inside each block: the block covers it
    assert [n for n, _ in matching_modules(model, ["blocks.*"])] == ["blocks.0", "blocks.1"]
    assert [n for n, _ in matching_modules(model, ["blocks.1.mlp", "LayerNorm"])] == [
        "blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "blocks.1.ln2", "blocks.1.mlp", "ln"]
    assert [n for n, _ in matching_modules(model, ["CharTransformer", "Block"])] == [""]
    assert checkpoint_activations(model, "blocks.0") == ["blocks.0"]
    assert checkpoint_activations(model, ["Block"]) == ["blocks.0", "blocks.1"]  # again: no second wrap
    assert checkpointed(model) == ["blocks.0", "blocks.1"]


def test_a_pattern_that_matches_nothing_names_it_and_what_there_is():
    with pytest.raises(ValueError) as info:
        checkpoint_activations(char_lm(), ["Block", "Blok"])
    message = str(info.value)
    assert "pattern 'Blok' matches no module" in message and "did you mean 'Block'?" in message
    assert "modules are: tok, pos, drop, blocks, blocks.0, blocks.1, blocks.2, ln and 1 more" in message
    assert "classes are: CharTransformer, Embedding, Dropout, ModuleList, Block," in message
    with pytest.raises(ValueError, match="pattern 'blocks.9' matches no module"):
        Trainer(char_lm(), lambda p: torch.optim.SGD(p, lr=0.1), config={"activation_checkpointing": ["blocks.9"]})


def test_a_deep_copy_recomputes_with_its_own_weights():
    """frozen_copy, EMA teachers: the copy's checkpointed forward runs the copy, not the original."""
    model = char_lm()
    checkpoint_activations(model, "Block")
    twin = frozen_copy(model).requires_grad_(True).train()
    assert checkpointed(twin) == checkpointed(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    plain = char_lm()
    plain.load_state_dict(twin.state_dict())
    theirs, ours = gradients(plain), gradients(twin)
    for name, grad in theirs.items():
        assert torch.equal(ours[name], grad), name
    assert all(p.grad is None for p in model.parameters())


def test_evaluation_runs_the_plain_forward():
    model = char_lm()
    checkpoint_activations(model, "Block")
    x, _ = tokens()
    with torch.no_grad(), SavedForBackward(model) as saved:
        model(x)
    assert saved.bytes == 0


def test_the_trainer_takes_it_from_the_config_and_trains_the_same(tmp_path):
    data = load(block_size=TIME, max_bytes=2000, val_fraction=0.1)

    def run(patterns, run_dir):
        t = Trainer(lambda: char_lm(), lambda p: torch.optim.AdamW(p, lr=3e-3), data["train"], data["val"],
                    loss_fn=lm_loss, run_dir=run_dir,
                    config={"activation_checkpointing": patterns, "batch_size": BATCH, "max_steps": 3,
                            "log_every_n_steps": 1, "progress": "off", "seed": 3})
        t.fit()
        return t

    plain, ours = run([], tmp_path / "plain"), run(["blocks.*"], tmp_path / "ours")
    assert checkpointed(ours.module) == ["blocks.0", "blocks.1", "blocks.2"]
    assert [r.get("train/loss") for r in ours.history] == [r.get("train/loss") for r in plain.history]
    for (name, a), b in zip(ours.module.state_dict().items(), plain.module.state_dict().values()):
        assert torch.equal(a, b), name
    # Its checkpoint loads into a run without it (and the other way), names unchanged.
    again = Trainer(lambda: char_lm(), lambda p: torch.optim.AdamW(p, lr=3e-3), data["train"], loss_fn=lm_loss,
                    config={"batch_size": BATCH, "max_steps": 3, "progress": "off", "seed": 3})
    again.load_weights(tmp_path / "ours" / "checkpoints" / "step-00000003.pt")
    for (name, a), b in zip(again.module.state_dict().items(), ours.module.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_compiled_with_checkpointed_blocks_gives_the_eager_gradients():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)) for _ in range(2))
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            for block in self.blocks:
                x = x + block(x)
            return self.head(x)

    torch.manual_seed(0)
    eager = Net()
    model = copy.deepcopy(eager)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    F.cross_entropy(eager(x), y).backward()
    grads = {}

    class Keep:
        def on_before_zero_grad(self, trainer, optimizer):
            grads.update({n: p.grad.clone() for n, p in trainer.module.named_parameters()})

    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), [(x, y)], loss_fn=F.cross_entropy,
                callbacks=[Keep()],
                config={"compile": True, "activation_checkpointing": ["blocks.*"], "max_steps": 1,
                        "progress": "off", "sanity_check": False, "log_every_n_steps": 1})
    t.fit()
    assert t.model is not t.module and checkpointed(t.module) == ["blocks.0", "blocks.1"]
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6)
    # The compiled graph keeps the checkpoints: what it saves for backward is the blocks' inputs
    # and the head's input, nothing from inside the blocks.
    with SavedForBackward(model) as saved:
        out = t.model(x)
    F.cross_entropy(out, y).backward()
    assert saved.bytes <= 3 * x.numel() * 4  # without the checkpoints: also 2 x (16, 32) per block


def test_a_module_holding_batch_norm_is_refused_naming_it():
    """Its recompute in backward would update the running statistics a second time (the gradients
    would still agree, the buffers and every later evaluation would not)."""
    net = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0' holds batch norm \(0.1\), whose running statistics the recompute"):
        checkpoint_activations(net, ["0"])
    assert checkpointed(net) == []
    free = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False)), nn.Linear(4, 2))
    assert checkpoint_activations(free, ["0"]) == ["0"]  # nothing to update twice
