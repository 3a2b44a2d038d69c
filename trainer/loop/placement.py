"""Where the model runs: its device, precision, process group and strategy, decided once.

``place`` builds the model (when given a function), puts it on its device in its precision, joins
torchrun's process group, and wraps (DDP) or shards (FSDP) it through the strategy. The optimizer
is built after this, on the parameters it will step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer import memory
from trainer.checkpoint import weights
from trainer.config import TrainerConfig
from trainer.device import Precision, model_init, resolve_device, seed_everything
from trainer.loop import manual
from trainer.parallel import distributed
from trainer.parallel import strategy as strategies


@dataclass
class Placement:
    device: torch.device
    precision: Precision
    strategy: Any  # one process, DDP or FSDP (trainer.parallel.strategy)
    module: nn.Module  # the plain (under fsdp, sharded) module
    stepped: nn.Module  # what training steps call, before compiling: the module, or DDP's wrapper
    built_on_meta: bool  # the weights come from init_from, shard by shard


def place(model: nn.Module | Callable[[], nn.Module], optimizer: Any, cfg: TrainerConfig, layout: distributed.Layout,
          configure_sharding: Callable[[nn.Module], None], steps_itself: bool) -> Placement:
    """``steps_itself``: a ``manual_step`` averages gradients itself, so the module is never wrapped
    by DDP for it (trainer.loop.manual), and FSDP, which reduces inside backward, is refused."""
    if callable(model) and not isinstance(model, nn.Module):
        seed_everything(cfg.seed)  # the initial weights are drawn from the seeded generator
        # With init_from under fsdp the weights come from the file, shard by shard: the model
        # is built without memory and each rank materialises its shards only. bf16-true: made
        # in bf16, never in fp32 first.
        on_meta = torch.device("meta") if weights.builds_on_meta(cfg, layout) else contextlib.nullcontext()
        with on_meta, model_init(cfg.precision):
            model = model()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a function that builds one, got {type(model).__name__}")
    meta = weights.on_meta(model)
    if meta and cfg.init_from is None:
        raise ValueError("the model is on the meta device, without values: set init_from to load its weights, "
                         "or build it on a real device")
    if meta and isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError("an optimizer built on a model on the meta device holds parameters that are replaced "
                         "when the model gets its memory; pass a function of the parameters instead "
                         "(optimizer=lambda params: torch.optim.AdamW(params, lr=...))")

    device = resolve_device(cfg.device, layout.local_rank if layout.enabled else None)
    precision = Precision(cfg.precision, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    strategy = strategies.choose(cfg.strategy, layout, device, configure_sharding)
    strategy.join()
    # bf16-true converts the module here, before the optimizer is built, so that the optimizer's
    # state is bf16 too (an optimizer built before the Trainer holds the same parameters, converted
    # in place; its state, made at its first step, follows).
    module = model if meta else model.to(device=device, dtype=precision.param_dtype)
    if cfg.activation_checkpointing:  # before sharding and compiling, which then see it (trainer.memory)
        memory.checkpoint_activations(module, cfg.activation_checkpointing)
    if meta and not strategy.sharded:
        weights.materialize(module, device)
    if steps_itself:
        manual.refuse_sharded(strategy)  # before sharding: FSDP reduces inside backward
    stepped = strategy.wrap(module, optimizer)
    if steps_itself:
        stepped = module
    if meta and strategy.sharded:
        weights.materialize(module, device)  # each rank's shards only
    return Placement(device, precision, strategy, module, stepped, meta)


__all__ = ["Placement", "place"]
