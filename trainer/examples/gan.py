"""A small GAN on a ring of 8 Gaussians (Metz et al., 2017, "Unrolled GANs"): two networks, two
optimizers, one step of its own (``Trainer.manual_step``). A GAN that collapses puts its samples on
one or a few of the 8 modes; one that learns covers all 8. ``samples.png`` in the run directory
shows them at the end of the run, and validation reports ``val/modes`` (modes hit) and
``val/hq`` (the share of samples within 4 standard deviations of a mode)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from trainer.trainer import Trainer

RADIUS, STD, MODES = 2.0, 0.05, 8


def centres() -> torch.Tensor:
    angles = torch.arange(MODES) * (2 * math.pi / MODES)
    return RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)


def ring(n_train: int = 8192, n_val: int = 1024, latent: int = 8, seed: int = 0) -> dict[str, TensorDataset]:
    """Training: points of the ring (one-tensor batches). Validation: fixed latent codes, whose
    samples are scored against the modes."""
    g = torch.Generator().manual_seed(seed)
    modes = torch.randint(0, MODES, (n_train,), generator=g)
    points = centres()[modes] + STD * torch.randn(n_train, 2, generator=g)
    return {"train": TensorDataset(points), "val": TensorDataset(torch.randn(n_val, latent, generator=g))}


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, outputs))


class GAN(nn.Module):
    """``generator``: latent codes to points; ``discriminator``: points to a logit (real or not).
    ``forward`` samples: it is the generator."""

    def __init__(self, latent: int = 8, hidden: int = 128):
        super().__init__()
        self.latent = latent
        self.generator = _mlp(latent, hidden, 2)
        self.discriminator = _mlp(2, hidden, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)


class GANTrainer(Trainer):
    """The non-saturating GAN loss: the discriminator steps on real against generated points, then
    the generator steps to make the discriminator call its points real.

    The optimizers are the generator's and the discriminator's, in that order: from the config's
    ``optimizers:`` (configs/gan.yaml), or, when none are given, ``configure_optimizers`` builds
    Adam with ``lr_g``, ``lr_d`` and ``beta1``."""

    def __init__(self, *args: Any, lr_g: float = 1e-3, lr_d: float = 1e-3, beta1: float = 0.5, **kwargs: Any):
        self.lr_g, self.lr_d, self.betas = lr_g, lr_d, (beta1, 0.999)
        super().__init__(*args, **kwargs)

    def configure_optimizers(self):
        gan = self.module
        return [torch.optim.Adam(gan.generator.parameters(), lr=self.lr_g, betas=self.betas),
                torch.optim.Adam(gan.discriminator.parameters(), lr=self.lr_d, betas=self.betas)]

    def manual_step(self, batch):
        (real,) = batch
        gan = self.model
        g_opt, d_opt = self.optimizers
        fake = gan.generator(torch.randn(len(real), gan.latent, device=real.device))

        real_logits, fake_logits = gan.discriminator(real), gan.discriminator(fake.detach())
        d_loss = (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                  + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
        self.manual_backward(d_loss, d_opt)
        self.optimizer_step(d_opt)

        fooled = gan.discriminator(fake)
        g_loss = F.binary_cross_entropy_with_logits(fooled, torch.ones_like(fooled))
        self.manual_backward(g_loss, g_opt)  # into the generator only: the discriminator's gradients stay as they are
        self.optimizer_step(g_opt)
        return {"d_loss": d_loss, "g_loss": g_loss}

    def validation_step(self, batch):
        (z,) = batch
        points = self.model.generator(z)
        distance, nearest = torch.cdist(points, centres().to(points)).min(dim=1)
        good = distance < 4 * STD
        hit = torch.zeros(MODES, device=points.device).index_fill_(0, nearest[good], 1.0)
        return {"hq": good.float().mean(), "modes": hit.sum()}

    def on_fit_end(self):
        if self.run_dir is None or not self.is_main_process:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            warnings.warn("samples.png needs matplotlib: pip install 'trainer[plot]'", stacklevel=2)
            return
        with torch.no_grad():
            z = torch.randn(2048, self.module.latent, generator=torch.Generator().manual_seed(0)).to(self.device)
            points = self.module.generator(z).float().cpu()
        truth = centres()
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.4, label="generated")
        ax.scatter(truth[:, 0], truth[:, 1], s=60, marker="x", color="red", label="modes")
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
        ax.legend(loc="upper right", fontsize=7)
        ax.set_title(f"step {self.global_step}")
        fig.tight_layout()
        fig.savefig(self.run_dir / "samples.png", dpi=100)
        plt.close(fig)
