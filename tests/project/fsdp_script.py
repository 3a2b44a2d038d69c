"""A user's own script, launched by torchrun, that builds a sharded Trainer in code.

Rank 1 alone sees a NaN loss at step 3: with ``on_nonfinite: skip`` every rank must skip that same
step (their shards would drift apart otherwise, and FSDP's next collectives would hang).
"""

import sys

import torch

from trainer import Trainer
from trainer.examples.char_lm import CharTransformer, lm_loss, load


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
                "log_every_n_steps": 2, "on_nonfinite": "skip", "progress": "off"},
    )
    trainer.fit()
    trainer.close()
    # What the sharded parameters and the optimizer's state (its step counters aside) are held in.
    held = {p.dtype for p in trainer.module.parameters()}
    held |= {v.dtype for s in trainer.optimizer.state.values() for k, v in s.items() if k != "step"}
    print(f"rank {trainer.layout.rank}: sharded={trainer.sharded} skipped={trainer.skipped_steps} "
          f"step={trainer.global_step} val/loss={trainer.history[-1]['val/loss']:.6f} "
          f"held={','.join(sorted(str(d) for d in held))}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
