"""A user's own script, launched by torchrun, that builds a sharded Trainer in code.

Rank 1 alone sees a NaN loss at step 3: with ``on_nonfinite: skip`` every rank must skip that same
step (their shards would drift apart otherwise, and FSDP's next collectives would hang). The blocks
recompute their activations in backward (activation checkpointing, applied before sharding).

``fsdp_script.py init_from RUN_DIR WEIGHTS_DIR`` starts sharded runs from weights files instead
(see ``init_from`` below).
"""

import math
import sys
from pathlib import Path

import torch
from torch import nn

from trainer import Callback, Trainer
from trainer.memory import checkpointed
from trainer.examples.char_lm import CharTransformer, lm_loss, load
from lines import say


class ScriptTrainer(Trainer):
    def __init__(self, *args, optimizer_name="adamw", **kwargs):
        self.optimizer_name = optimizer_name
        super().__init__(*args, **kwargs)

    def configure_optimizers(self):
        if self.optimizer_name == "fused_sgd":  # no kernel for sharded parameters: refused with a reason
            return torch.optim.SGD(self.trainable_parameters(), lr=0.1, fused=True)
        return torch.optim.AdamW(self.trainable_parameters(), lr=3e-3, fused=True)

    def training_step(self, batch):
        loss = super().training_step(batch)
        if self.layout.rank == 1 and self.global_step + 1 == 3:
            loss = loss * float("nan")
        return loss


def main(run_dir: str, precision: str, optimizer_name: str = "adamw") -> None:
    torch.manual_seed(0)
    data = load(block_size=16, max_bytes=2240, val_fraction=0.1)
    model = CharTransformer(block_size=16, d_model=32, n_layers=2, n_heads=2, dropout=0.0)
    trainer = ScriptTrainer(
        model, train_data=data["train"], val_data=data["val"], loss_fn=lm_loss, run_dir=run_dir,
        optimizer_name=optimizer_name,
        config={"strategy": "fsdp", "precision": precision, "batch_size": 4, "max_steps": 6,
                "log_every_n_steps": 2, "on_nonfinite": "skip", "progress": "off",
                "activation_checkpointing": ["Block"]},
    )
    trainer.fit()
    trainer.close()
    blocks = [type(b).__name__ for b in trainer.module.blocks]
    # What the sharded parameters and the optimizer's state (its step counters aside) are held in.
    held = {p.dtype for p in trainer.module.parameters()}
    held |= {v.dtype for s in trainer.optimizer.state.values() for k, v in s.items() if k != "step"}
    say(f"rank {trainer.layout.rank}: sharded={trainer.sharded} skipped={trainer.skipped_steps} "
        f"step={trainer.global_step} val/loss={trainer.history[-1]['val/loss']:.6f} "
        f"checkpointed={','.join(checkpointed(trainer.module))} as {','.join(blocks)} "
        f"held={','.join(sorted(str(d) for d in held))}")


class Rotary(nn.Module):
    """A table kept out of state dicts (``persistent=False``), as a RoPE cache is: no weights file holds
    it, so a model built on the meta device gets it from ``reset_parameters()``."""

    def __init__(self, size: int):
        super().__init__()
        self.register_buffer("angles", torch.empty(size), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.angles.copy_(self.expected(self.angles.numel()))

    @staticmethod
    def expected(size: int) -> torch.Tensor:
        return 1.0 / 10000 ** (torch.arange(size, dtype=torch.float32) / size) * math.pi


class RotaryCharTransformer(CharTransformer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rotary = Rotary(self.block_size)
        self.built_on = torch.empty(()).device.type  # the device it was built on: "meta" under init_from + fsdp


def rotary_lm() -> RotaryCharTransformer:
    return RotaryCharTransformer(block_size=16, d_model=32, n_layers=2, n_heads=2, dropout=0.0)


class Capture(Callback):
    """Before step 1: gather the whole model (every rank takes part) and save it as ``path`` on rank 0."""

    def __init__(self, path: str):
        self.path, self.done = path, False

    def on_train_batch_start(self, trainer, batch):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.done:
            return
        self.done = True
        full = get_model_state_dict(trainer.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if trainer.is_main_process:
            torch.save(full, self.path)


YAML = """\
name: yaml
out_dir: {out}
strategy: fsdp
batch_size: 4
max_steps: 1
progress: "off"
init_from: {{path: {weights}, rename: {{"old.": ""}}}}
model: {{_target_: fsdp_script.rotary_lm}}
data: {{_target_: trainer.examples.char_lm.load, block_size: 16, max_bytes: 2240, val_fraction: 0.1}}
loss: trainer.examples.char_lm.lm_loss
optimizer: {{_target_: torch.optim.AdamW, lr: 3.0e-3}}
callbacks: [{{_target_: fsdp_script.Capture, path: {capture}}}]
"""


def init_from(run_dir: str, weights_dir: str) -> None:
    """Sharded runs started from each kind of weights file (WEIGHTS_DIR/weights.safetensors, state_dict.pt,
    checkpoint.pt, renamed.pt, then the sharded checkpoint the first run writes): the model is built on
    the meta device and each rank fills its own shards. RUN_DIR/<kind>.pt gets the whole model gathered
    before step 1, for the test to compare with one process's load. Last, a resume from the first
    run's checkpoint, which must continue from that checkpoint's weights, not init_from's."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from trainer.cli.build import build
    from trainer.cli.run_config import validate
    from trainer.yaml_source import Source

    dist.init_process_group("gloo")  # the script's own group, kept across the Trainers below
    out, files = Path(run_dir), Path(weights_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load(block_size=16, max_bytes=2240, val_fraction=0.1)

    def report(name, trainer):
        # Once built (after the first forward FSDP may keep the root's parameters gathered until a backward).
        sharded = all(isinstance(p, DTensor) for p in trainer.module.parameters())
        angles = torch.equal(trainer.module.rotary.angles, Rotary.expected(16))
        say(f"rank {dist.get_rank()} {name}: built_on={trainer.module.built_on} sharded={sharded} angles={angles}")

    first = out / "a" / "checkpoints" / "step-00000002"
    for name, path, max_steps, run_dir_, resume in [
        ("safetensors", files / "weights.safetensors", 2, out / "a", None),
        ("state_dict", files / "state_dict.pt", 1, None, None),
        ("checkpoint", files / "checkpoint.pt", 1, None, None),
        ("sharded", first, 1, None, None),
        ("resumed", files / "state_dict.pt", 3, out / "b", first),
    ]:
        trainer = Trainer(rotary_lm, lambda params: torch.optim.AdamW(params, lr=3e-3), data["train"],
                          loss_fn=lm_loss, callbacks=[Capture(str(out / f"{name}.pt"))], run_dir=run_dir_,
                          config={"strategy": "fsdp", "batch_size": 4, "max_steps": max_steps, "progress": "off",
                                  "init_from": str(path)})
        report(name, trainer)
        trainer.fit(resume_from=resume)

    # The YAML builder builds on the meta device too.
    config = out / "yaml.yaml"
    if dist.get_rank() == 0:
        config.write_text(YAML.format(out=out / "runs", weights=files / "renamed.pt", capture=out / "yaml.pt"))
    dist.barrier()
    source = Source.load(config)
    built = build(source, validate(source), None)
    report("yaml", built.trainer)
    built.trainer.fit()
    built.trainer.close()  # every rank meets, then leaves the group: a rank that left first could abort a peer


if __name__ == "__main__":
    if sys.argv[1] == "init_from":
        init_from(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
