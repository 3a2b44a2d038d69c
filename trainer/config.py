"""Typed loop settings.

This module imports pydantic only (no torch), so the command line can validate a
config file and print its schema without paying for ``import torch``.
"""

from __future__ import annotations

import re
import typing
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

# Every integer setting fits an int64, what torch's counters and generators hold. The seed needs the
# bound too: torch.manual_seed takes up to 2**64-1, but the data order is seeded with seed + epoch.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1


def _number_kind(annotation: Any) -> str | None:
    """'an integer' or 'a number' for an int or float field (optional or not), else None."""
    kinds = typing.get_args(annotation) or (annotation,)
    return "an integer" if int in kinds else "a number" if float in kinds else None


def _progress_mode(value: Any) -> Any:
    # YAML 1.1, as PyYAML reads it, makes an unquoted `progress: off` the boolean false.
    return {False: "off", True: "auto"}[value] if isinstance(value, bool) else value


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, assignments are validated, and a number
    is a number: pydantic's lax mode would read true as 1 (YAML's yes and on are true too). A key
    that is a Python keyword (``checkpoint.async``) is the alias of a field named with a trailing
    underscore: config files and dumps use the key, code may use either name."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_by_name=True,
                              validate_by_alias=True, serialize_by_alias=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        kind = _number_kind(cls.model_fields[info.field_name].annotation)
        if kind is not None and isinstance(value, bool):
            raise PydanticCustomError("bool_for_number", "expected {kind}, found {found}",
                                      {"kind": kind, "found": str(value).lower()})
        return value

    @field_validator("*")
    @classmethod
    def _int64(cls, value: Any) -> Any:
        if type(value) is int and not INT_MIN <= value <= INT_MAX:
            raise PydanticCustomError("int_out_of_range", "{found} is out of range: an integer setting is at most "
                                      "2**63-1 = {max} (and at least -2**63)", {"found": value, "max": INT_MAX})
        return value


class GradLoggingConfig(StrictModel):
    every_n_steps: int | None = Field(
        None,
        ge=1,
        description="Log gradient norms every N optimizer steps (null turns gradient logging off).",
    )
    per_layer: bool = Field(
        False,
        description="Also log one norm per named parameter as grad_norm/<name>, beside grad_norm/total.",
    )
    histograms: bool = Field(
        False,
        description="Also send each parameter's gradient as a histogram to loggers that take them (tensorboard).",
    )


class CheckpointConfig(StrictModel):
    every_n_steps: int | None = Field(
        None,
        ge=1,
        description="Write a checkpoint every N optimizer steps (null: only the final one).",
    )
    keep_last: int | None = Field(
        3,
        ge=1,
        description="Keep the newest K periodic checkpoints (null keeps all); the final one is never rotated away.",
    )
    save_final: bool = Field(True, description="Write a checkpoint when training ends.")
    async_: bool = Field(
        False,
        alias="async",
        description="Write the checkpoints of fit in the background: the loop waits only while the state is "
        "copied into CPU memory (pinned on CUDA), then trains on while a thread writes the file, with the same "
        "atomic write and digest. At most one write is in flight: the next save waits for it. Costs CPU memory "
        "for one copy of the state. The final checkpoint is written before fit returns. In code: async_=True.",
    )


class TrainerConfig(StrictModel):
    """Every setting of the training loop. The same names are the top-level keys of a YAML config."""

    seed: int = Field(
        0, description="Seed for python, numpy, torch (CPU and CUDA) and the data order; -2**63 to 2**63-1."
    )
    device: str = Field(
        "auto",
        description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="fp32; bf16 autocast; or fp16 autocast with a gradient scaler.",
    )
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (null: no step limit)."
    )
    max_epochs: int | None = Field(
        None,
        ge=1,
        description="Stop after this many passes over the training data (null: 1 unless max_steps is set).",
    )
    batch_size: int = Field(
        32, ge=1, description="Samples per micro-batch when the Trainer builds the DataLoader."
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    data_timeout: float | None = Field(
        None,
        gt=0,
        description="Seconds a DataLoader worker may take to deliver a batch before the run stops with an "
        "error (null: wait as long as it takes). Applies with num_workers > 0.",
    )
    grad_accum_steps: int = Field(
        1, ge=1, description="Micro-batches whose gradients are summed into one optimizer step."
    )
    clip_grad_norm: float | None = Field(
        None, gt=0, description="Clip the total gradient norm to this value before each step (null: off)."
    )
    log_every_n_steps: int = Field(
        50, ge=1, description="Turn logged values into numbers and write them every N optimizer steps."
    )
    eval_every_n_steps: int | None = Field(
        None, ge=1, description="Run validation every N optimizer steps (null: off)."
    )
    eval_every_n_epochs: int | None = Field(
        1, ge=1, description="Run validation at the end of every N epochs (null: off)."
    )
    grad_logging: GradLoggingConfig = Field(
        default_factory=GradLoggingConfig, description="Gradient-norm logging."
    )
    progress: Literal["auto", "bar", "lines", "off"] = Field(
        "auto",
        description="How training shows its progress (rank 0 only): 'bar', a bar on stderr with the latest loss "
        "and validation metrics; 'lines', one plain line on stdout per log point and per validation (for "
        "nohup, batch schedulers, | tee); 'auto', the bar when stderr is a terminal, else lines; 'off' (YAML "
        "reads an unquoted off as false, which means 'off' here too).",
    )
    progress_bar: bool | None = Field(
        None,
        exclude=True,  # its meaning lives on in progress, which resolved configs and checkpoints record
        deprecated="use progress: off or progress: auto",
        description="Deprecated: use progress. false is progress: off, true is progress: auto.",
    )
    deterministic: bool = Field(
        False, description="Use torch's deterministic algorithms (slower; errors on ops without one)."
    )
    compile: bool = Field(False, description="Wrap the model with torch.compile.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun: 'ddp' keeps a full copy of the model on every rank; 'fsdp' shards "
        "parameters, gradients and optimizer state over the ranks (FSDP2) and writes checkpoints as "
        "directories of shards (torch.distributed.checkpoint). A single process trains the model as it is.",
    )
    on_nonfinite: Literal["error", "skip"] = Field(
        "error",
        description="On a NaN/Inf loss or gradient: 'error' stops the run (checked on the host: before the "
        "optimizer step; on the device: at the next log point, the bad step skipped); 'skip' skips that step.",
    )
    max_consecutive_skips: int = Field(
        10, ge=1, description="With on_nonfinite: skip, this many skipped steps in a row become an error."
    )
    nonfinite_check: Literal["auto", "host", "device"] = Field(
        "auto",
        description="Where a step's loss is checked: 'host' reads it before the optimizer step (one sync per "
        "step on CUDA); 'device' flags it on the device for a fused optimizer to skip the step, read at the "
        "next log point (no sync); 'auto' is 'device' on CUDA with a fused optimizer and no fp16, else 'host'. "
        "A skipped step means the same either way.",
    )
    sanity_check: bool = Field(
        True,
        description="Before training (and in trainer check): one training micro-batch forward and backward, no "
        "optimizer step, and one validation batch, checked for errors and for the metrics callbacks monitor; "
        "everything is left as it was, so the run is the same with it or without.",
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="When checkpoints are written and how many are kept."
    )

    @field_validator("progress", mode="before")
    @classmethod
    def _progress_from_boolean(cls, value: Any) -> Any:
        return _progress_mode(value)

    @model_validator(mode="before")
    @classmethod
    def _progress_from_progress_bar(cls, data: Any) -> Any:
        # Configs written before `progress` existed keep their meaning, with a warning that says what to write.
        if not isinstance(data, dict) or data.get("progress_bar") is None:
            return data
        old = data["progress_bar"]
        if not isinstance(old, bool):
            return data  # the field's own validation reports it
        meant = "auto" if old else "off"
        new = _progress_mode(data.get("progress", "auto"))
        if new not in ("auto", meant):
            raise PydanticCustomError(
                "progress_conflict", "progress_bar: {old} (deprecated) disagrees with progress: {new}; "
                "remove progress_bar", {"old": str(old).lower(), "new": str(new)})
        warnings.warn(f"progress_bar is deprecated: write progress: {meant} instead", DeprecationWarning,
                      stacklevel=3)  # the caller of TrainerConfig(...), past pydantic's __init__
        return {**data, "progress": meant}

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
        return value
