"""Mean teacher (Tarvainen & Valpola, 2017): a frozen EMA copy of the student guides it on
unlabelled data. Target freezing in practice: ``frozen_copy`` builds the teacher, ``ema_update``
moves it after every optimizer step, and it never receives a gradient."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from trainer.freezing import ema_update, frozen_copy
from trainer.trainer import Trainer


class MeanTeacherTrainer(Trainer):
    """Batches are ``(x, y)`` with ``y = -1`` for unlabelled samples.

    Loss: cross-entropy on the labelled samples plus ``consistency`` times the squared distance
    between the student's and the teacher's class probabilities on all samples, each model seeing
    its own randomly shifted, noisy copy of the input. ``consistency: 0`` trains the student alone (the baseline).
    """

    def __init__(self, *args: Any, ema_decay: float = 0.99, consistency: float = 5.0, noise: float = 0.15,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be between 0 and 1, got {ema_decay}")
        self.ema_decay, self.consistency, self.noise = ema_decay, consistency, noise
        self.teacher = frozen_copy(self.module)
        self.register_state("teacher", self.teacher)  # in checkpoints, back on resume and in trainer eval

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """A random shift of up to a pixel and pixel noise, drawn per image (digits are 8x8)."""
        images = x.view(-1, 1, 8, 8)
        theta = torch.zeros(len(x), 2, 3, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, :, 2] = (torch.rand(len(x), 2, device=x.device) * 2 - 1) * 0.25  # 1 pixel = 0.25
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        shifted = F.grid_sample(images, grid, align_corners=False, padding_mode="zeros").view_as(x)
        return shifted + self.noise * torch.randn_like(x)

    def training_step(self, batch):
        x, y = batch
        student = self.model(self._augment(x))
        with torch.no_grad():
            teacher = self.teacher(self._augment(x))
        labelled = (y >= 0).float()
        # Mean over the labelled samples only, without asking the host how many there are.
        per_sample = F.cross_entropy(student, y.clamp(min=0), reduction="none") * labelled
        supervised = per_sample.sum() / labelled.sum().clamp(min=1.0)
        consistency = F.mse_loss(student.softmax(-1), teacher.softmax(-1))
        return {"loss": supervised + self.consistency * consistency, "supervised": supervised,
                "consistency": consistency}

    def on_before_zero_grad(self, optimizer):
        ema_update(self.teacher, self.module, self.ema_decay)

    def validation_step(self, batch):
        x, y = batch
        student, teacher = self.model(x), self.teacher(x)
        return {
            "loss": F.cross_entropy(student, y),
            "acc": (student.argmax(-1) == y).float().mean(),
            "teacher_acc": (teacher.argmax(-1) == y).float().mean(),
        }
