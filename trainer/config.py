"""Typed loop settings.

This module imports pydantic only (no torch), so the command line can validate a
config file and print its schema without paying for ``import torch``.
"""

from __future__ import annotations

import os
import re
import typing
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

# More DataLoader workers than any machine has cores for: a typo, never a plan (each forks the process).
MAX_WORKERS = 256

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


class MLflowSettings(StrictModel):
    """The ``mlflow`` logger's options (``trainer.observability.trackers.MLflowLogger``)."""

    tracking_uri: str | None = Field(
        None,
        description="Where runs are stored: a server (http://host:5000) or a database (sqlite:///path/mlflow.db). "
        "Default: MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db.",
    )
    experiment: str | None = Field(None, description="Experiment name. Default: MLFLOW_EXPERIMENT_NAME, else Default.")
    run_name: str | None = Field(None, description="The MLflow run's name. Default: the run's name.")


class WandbSettings(StrictModel):
    """The ``wandb`` logger's options (``trainer.observability.trackers.WandbLogger``)."""

    project: str | None = Field(None, description="W&B project. Default: WANDB_PROJECT, else trainer.")
    entity: str | None = Field(None, description="W&B user or team. Default: W&B's own (WANDB_ENTITY or your default).")
    run_name: str | None = Field(None, description="The W&B run's display name. Default: the run's name.")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="online, offline (files only; upload later with wandb sync) or disabled. Default: WANDB_MODE, "
        "else online."
    )
    dir: str | None = Field(None, description="Where W&B writes its files (<dir>/wandb/). Default: WANDB_DIR, else the "
                            "run directory.")


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


class InitFromConfig(StrictModel):
    """Weights to start from: loaded into the model before the first step of a fresh run (a resumed
    run takes its weights from its checkpoint instead)."""

    path: str = Field(
        min_length=1,
        description="A checkpoint of trainer's (a .pt file, or a sharded checkpoint directory written under "
        "strategy: fsdp), a state dict file (torch.save(model.state_dict())) or a .safetensors file.",
    )
    strict: bool = Field(
        True,
        description="Every tensor of the model must be in the file and every tensor of the file in the model "
        "(after renaming). false loads the names both have and warns about the rest; shapes must agree either way.",
    )
    rename: dict[str, str] = Field(
        default_factory=dict,
        description="Prefixes of the file's names and what they become in the model's, e.g. {'module.': ''} or "
        "{'backbone.': 'encoder.'}; the longest prefix that fits applies. Applied before rename_regex.",
    )
    rename_regex: dict[str, str] = Field(
        default_factory=dict,
        description="Regular expressions over the file's names and their replacements (re.sub; \\1 refers to a "
        "group), e.g. {'^layers\\.(\\d+)\\.attn\\.': 'blocks.\\1.attention.'}; the first pattern that "
        "matches a name applies, as in Hugging Face's key_mapping.",
    )

    @field_validator("rename_regex")
    @classmethod
    def _compiles(cls, value: dict[str, str]) -> dict[str, str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from None
        return value


class CompileConfig(StrictModel):
    """``compile:`` as a mapping: torch.compile's settings, and whether the optimizer step is compiled too."""

    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="torch.compile's mode: 'default'; 'reduce-overhead' (CUDA graphs: less launch overhead, more "
        "memory); 'max-autotune' (autotuned kernels and CUDA graphs, a long first step); "
        "'max-autotune-no-cudagraphs'.",
    )
    fullgraph: bool = Field(
        False, description="Fail on a graph break instead of running that part eagerly (finds graph breaks)."
    )
    dynamic: bool | None = Field(
        None,
        description="Shapes: null compiles for the first shapes and recompiles with dynamic ones when they "
        "change; true is dynamic from the start; false recompiles for every new shape.",
    )
    backend: str = Field(
        "inductor", min_length=1,
        description="torch.compile's backend: 'inductor' (generates kernels), 'aot_eager' or 'eager' (no code "
        "generation: for finding graph breaks and recompilations quickly).",
    )
    optimizer: bool = Field(
        False,
        description="Also compile the optimizer step (PyTorch's 'compiling the optimizer' recipe: one generated "
        "kernel from the optimizer's foreach code). Needs an optimizer that is not fused (configs then build "
        "Adam, AdamW and SGD unfused), and no fp16; the learning rate goes in as a tensor, so a schedule "
        "causes no recompilation.",
    )

    @field_validator("backend")
    @classmethod
    def _mode_is_inductors(cls, value: str, info: ValidationInfo) -> str:
        mode = info.data.get("mode", "default")
        if value != "inductor" and mode != "default":
            raise ValueError(f"mode {mode!r} is a setting of the inductor backend, not of {value!r}; "
                             "use backend: inductor, or leave mode at default")
        return value


class ProfileConfig(StrictModel):
    """``profile:``: a torch.profiler trace of a few optimizer steps, and a CUDA memory snapshot on
    out-of-memory. Only the traced steps (and their warmup) pay for the profiler."""

    start_step: int | None = Field(
        None,
        ge=1,
        description="The first optimizer step traced (counted from 1, as the logged step; null: no trace). The "
        "trace covers each step from its data fetch through its log point, validation and checkpoint.",
    )
    steps: int = Field(3, ge=1, description="How many optimizer steps are traced, from start_step on.")
    warmup: int = Field(
        1,
        ge=0,
        description="Steps just before start_step during which the profiler runs but keeps nothing, so that its "
        "own start-up cost stays out of the trace (fewer when start_step leaves less room).",
    )
    record_shapes: bool = Field(False, description="Record the input shapes of every op (torch.profiler's record_shapes).")
    profile_memory: bool = Field(
        False, description="Record tensor allocations and frees (torch.profiler's profile_memory)."
    )
    with_stack: bool = Field(
        False, description="Record the Python source line of every op (torch.profiler's with_stack; larger traces)."
    )
    memory_snapshot_on_oom: bool = Field(
        False,
        description="On CUDA: record the allocator's history during fit and, on an out-of-memory error, write it "
        "to profile/memory-oom-rank<R>.pickle in the run directory (open it at https://pytorch.org/memory_viz). "
        "Recording costs some time per allocation; ignored on CPU.",
    )
    memory_snapshot_entries: int = Field(
        100_000, ge=1, description="The most recent allocator events kept for the memory snapshot."
    )


class SlurmConfig(StrictModel):
    """Inside a SLURM job (``SLURM_JOB_ID`` set); outside one nothing here applies."""

    # TERM, INT and HUP already stop the run (without a requeue), KILL and STOP cannot be handled, and
    # the others mean something else to a process (ALRM, CHLD, ...).
    requeue_signal: Literal["USR1", "USR2"] | None = Field(
        "USR1",
        description="The signal that sbatch --signal=USR1@90 sends before the time limit: the run stops at the next "
        "optimizer step with a checkpoint, as on SIGTERM, then rank 0 requeues the job (scontrol requeue "
        "$SLURM_JOB_ID) and status.json says requeued. USR1 or USR2 (SIGUSR1 is read as USR1); null: no requeue, "
        "the signal keeps its default meaning.",
    )

    @field_validator("requeue_signal", mode="before")
    @classmethod
    def _signal_name(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        name = value.upper().removeprefix("SIG")
        if name in ("TERM", "INT", "HUP"):
            raise ValueError(f"{value} already stops the run with a checkpoint, without a requeue; the requeue "
                             "signal is USR1 or USR2 (sbatch --signal=USR1@90)")
        return name


class ThroughputConfig(StrictModel):
    """``throughput:``: what MFU (model FLOPs utilisation) needs beyond the run's own measurements."""

    flops_per_sample: float | None = Field(
        None,
        gt=0,
        description="FLOPs of one training sample, forward and backward (about 6 x parameters x tokens per sample "
        "for a transformer). null: the model's flops_per_sample attribute, else its flops_per_token() method "
        "times the tokens of a sample; without any, no MFU is logged.",
    )
    peak_flops: float | None = Field(
        None,
        gt=0,
        description="The device's peak FLOP/s at the run's precision, e.g. 989e12 (H100 SXM, bf16 dense). null: "
        "from a table of common GPUs for bf16/fp16 (trainer.observability.timing.PEAK_FLOPS); on CPU and under fp32, MFU is "
        "then not logged.",
    )


def compile_settings(value: bool | CompileConfig) -> CompileConfig | None:
    """``compile:`` as settings: ``true`` is torch's defaults, ``false`` is ``None`` (not compiled)."""
    if isinstance(value, CompileConfig):
        return value
    return CompileConfig() if value else None


class TrainerConfig(StrictModel):
    """Every setting of the training loop. The same names are the top-level keys of a YAML config."""

    seed: int = Field(
        0, description="Seed for python, numpy, torch (CPU and CUDA) and the data order; -2**63 to 2**63-1."
    )
    device: str = Field(
        "auto",
        description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'.",
    )
    precision: Literal["fp32", "bf16", "fp16", "bf16-true"] = Field(
        "fp32",
        description="fp32; bf16 autocast (fp32 weights); fp16 autocast with a gradient scaler; or bf16-true: "
        "weights, gradients and optimizer state all in bf16, no fp32 copy (half the memory; updates smaller "
        "than about 1/256 of a weight are rounded away).",
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
    num_workers: int = Field(0, ge=0, le=MAX_WORKERS, description=f"DataLoader worker processes per rank (at most "
                             f"{MAX_WORKERS}; each is a process with a copy of the dataset).")
    data_timeout: float | None = Field(
        None,
        gt=0,
        description="Seconds a DataLoader worker may take to deliver a batch before the run stops with an "
        "error (null: wait as long as it takes). Applies with num_workers > 0, and to the workers of your own "
        "DataLoader unless it sets a timeout of its own.",
    )
    stream_split: Literal["trainer", "dataset"] = Field(
        "trainer",
        description="How an IterableDataset given as data is split across ranks and DataLoader workers: 'trainer' "
        "deals item i to global worker i mod (world_size * num_workers), rank-major (every worker reads the whole "
        "stream and keeps its share); 'dataset': it splits itself (reads get_worker_info() and the rank), which "
        "the first batches of the first epoch are checked for. A dataset's own shards_itself attribute wins.",
    )
    grad_accum_steps: int = Field(
        1, ge=1, description="Micro-batches whose gradients are summed into one optimizer step."
    )
    on_world_size_change: Literal["scale_accumulation", "scale_batch_size", "error"] = Field(
        "scale_accumulation",
        description="A resume on another number of ranks keeps the checkpoint's global batch (batch_size x "
        "grad_accum_steps x ranks) when the config's batch_size and grad_accum_steps are the ones it was "
        "written with: 'scale_accumulation' sets grad_accum_steps (2 ranks x 1 -> 1 rank x 2), 'scale_batch_size' "
        "sets batch_size, each with a one-line notice; 'error' refuses, naming the values that keep it. A "
        "global batch that cannot be kept on the new ranks is an error that says which rank counts can.",
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
    compile: bool | CompileConfig = Field(
        False,
        description="Wrap the model with torch.compile: true (torch's defaults), false, or a mapping of settings "
        "{mode, fullgraph, dynamic, backend, optimizer}. Recompilations are logged as compile/recompiles.",
    )
    activation_checkpointing: list[str] = Field(
        default_factory=list,
        description="Submodules whose activations are recomputed in backward instead of kept from forward "
        "(less memory, about one more forward of them): module-name glob patterns ('blocks.*') or class names "
        "('Block'). The outermost matching modules are checkpointed; names and state dicts do not change. "
        "Empty: off.",
    )
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
    profile: ProfileConfig | None = Field(
        None,
        description="A torch.profiler trace of a few steps into <run_dir>/profile/ (TensorBoard and Perfetto), and "
        "a CUDA memory snapshot on out-of-memory: {start_step, steps, warmup, record_shapes, profile_memory, "
        "with_stack, memory_snapshot_on_oom}. null: off.",
    )
    throughput: ThroughputConfig = Field(
        default_factory=ThroughputConfig,
        description="flops_per_sample and peak_flops, for the logged mfu (model FLOPs utilisation).",
    )
    slurm: SlurmConfig = Field(
        default_factory=SlurmConfig,
        description="Inside a SLURM job: requeue_signal, on which the run checkpoints and requeues the job.",
    )
    init_from: InitFromConfig | None = Field(
        None,
        description="Start from these weights (a path, or {path, strict, rename, rename_regex}): loaded into the "
        "model before the first step, not on resume. Under torchrun with strategy: fsdp a model given as a "
        "function (or built from a config) is built on the meta device and each rank reads only its shards.",
    )

    @field_validator("init_from", mode="before")
    @classmethod
    def _init_from_path(cls, value: Any) -> Any:
        return {"path": os.fspath(value)} if isinstance(value, (str, os.PathLike)) else value

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

    @classmethod
    def of(cls, config: TrainerConfig | dict[str, Any] | None) -> TrainerConfig:
        """``Trainer(config=...)``: a ``TrainerConfig``, a dict of its fields, or ``None`` for the defaults."""
        if config is None or isinstance(config, dict):
            return cls(**(config or {}))
        if not isinstance(config, cls):
            raise TypeError(f"config must be a TrainerConfig or a dict of its fields, got {type(config).__name__}")
        return config

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _one_pattern(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # `activation_checkpointing: Block` reads as one

    @field_validator("activation_checkpointing")
    @classmethod
    def _no_empty_pattern(cls, value: list[str]) -> list[str]:
        if any(not p.strip() for p in value):
            raise ValueError("an empty pattern matches no module; write a module name pattern ('blocks.*') or a "
                             "class name ('Block')")
        return value

    @field_validator("compile")
    @classmethod
    def _optimizer_compile_without_fp16(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, CompileConfig) and value.optimizer and info.data.get("precision") == "fp16":
            raise ValueError("optimizer: true cannot be used with precision: fp16 (the gradient scaler unscales, "
                             "checks and steps the optimizer itself, eagerly); use precision: bf16, or optimizer: false")
        return value

    @field_validator("nonfinite_check")
    @classmethod
    def _device_check_needs_fused(cls, value: str, info: ValidationInfo) -> str:
        settings = info.data.get("compile")
        if value == "device" and isinstance(settings, CompileConfig) and settings.optimizer:
            raise ValueError("device needs a fused optimizer and compile: {optimizer: true} an unfused one, whose "
                             "step torch.compile generates; use nonfinite_check: auto (checked on the host), or "
                             "compile the model only")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
        return value
