"""Export for serving: a checkpoint's weights as one ``.safetensors`` file, with the model's config
beside it.

``export_model(source, out)`` reads a checkpoint (a file, a sharded directory, or the newest good
checkpoint of a run directory, chosen as ``--resume auto`` chooses it), takes the model's weights,
or the average an ``EMAWeights`` callback kept, casts them to the dtype asked for, and writes:

- ``NAME.safetensors``: every key of the model's ``state_dict``, each tensor contiguous and with
  storage of its own (tied weights are stored once per name, so ``load_state_dict(strict=True)``
  takes the file as it is), and in the header's ``__metadata__`` the step, the checkpoint, which
  weights and the dtype;
- ``NAME.yaml``: the ``model:`` section of the run's resolved config, the component that builds
  the module the weights load into (``build_model``).

Both are written atomically (a temp file beside, fsync'ed, renamed), with the modes the user's
other new files get (``0o666 & ~umask``), and neither replaces a file that exists unless asked to
(``overwrite``). A sharded checkpoint's model tensors are read whole into this process by
``torch.distributed.checkpoint``, no process group needed.

A checkpoint may come from elsewhere, and its config names code. As with pickles, which checkpoint
files never hold, such a file runs nothing without the user's say: ``build_model`` imports only
``torch.nn`` and ``trainer`` modules (``nn.Module`` classes) from it, and anything else only from
the modules the user names in ``trust``.
"""

from __future__ import annotations

import inspect
import json
import os
import stat
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from trainer import run_dir as run_files
from trainer.checkpoint import files
from trainer.components import Component, import_target, instantiate
from trainer.yaml_source import ConfigError, Path_, Source

SUFFIX = ".safetensors"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INSTALL = "pip install 'trainer[safetensors]'"
# What a model file that the user did not write may name: nn.Module classes of these packages.
SAFE_PACKAGES = ("torch.nn", "trainer")


class ExportError(Exception):
    """A source, destination or option that export cannot use; the message says what to pass instead."""


class SafetensorsMissing(ImportError):
    """The safetensors package is not installed; the message says how to install it."""


@dataclass
class Exported:
    """What ``export_model`` wrote and from what."""

    weights: Path  # NAME.safetensors
    config: Path | None  # NAME.yaml; None when the checkpoint's config names no model (a Trainer built in code)
    checkpoint: Path  # the checkpoint read
    step: int
    ema: str | None  # the state key of the EMA exported; None: the trained weights
    dtype: str  # bf16, fp16 or fp32 (several, comma-separated, when kept as saved and mixed)
    tensors: int
    bytes: int


def export_model(source: str | Path, out: str | Path, dtype: str | None = None, weights: str = "auto",
                 overwrite: bool = False) -> Exported:
    """Write the weights of ``source`` (a run directory or a checkpoint) to ``out`` (``NAME.safetensors``)
    and the model's config to ``NAME.yaml`` beside it. Either file existing already is an error
    unless ``overwrite`` (then a ``NAME.yaml`` that this checkpoint has no model for is removed, so
    that it cannot pass for the new weights' config).

    ``dtype``: ``"bf16"``, ``"fp16"`` or ``"fp32"`` for the floating-point tensors (integer buffers
    keep theirs); ``None`` keeps the dtypes as saved. ``weights``: ``"auto"`` takes the EMA when the
    checkpoint holds one (an ``EMAWeights`` callback's) and the trained weights otherwise; ``"ema"``
    requires one; ``"trained"`` takes the model's own; any other value names the ``state_key`` of
    the EMA callback to take (for a run with several). Raises ``ExportError`` or
    ``CheckpointError`` with a message that says what to change, and ``SafetensorsMissing`` (an
    ``ImportError``) without the safetensors package."""
    safetensors, safetensors_torch = _safetensors()
    out = Path(out)
    cast = _dtype(dtype)
    _check_out(out, overwrite)
    state = _read(Path(source))
    checkpoint = Path(state["path"])
    ema_key = _choose_ema(state, weights, checkpoint)
    tensors = state["callbacks"][ema_key]["ema"] if ema_key is not None else _model_state(state, checkpoint)
    tensors = _servable(tensors, cast, checkpoint)
    step = int(state["trainer_state"]["global_step"])
    model = (state.get("config") or {}).get("model")
    shown = dtype or ",".join(sorted({_short(t.dtype) for t in tensors.values() if t.is_floating_point()})) or "none"
    metadata = {"format": "pt", "step": str(step), "checkpoint": str(checkpoint.resolve()),
                "weights": "ema" if ema_key is not None else "trained", "dtype": shown}
    if ema_key is not None:
        metadata["ema_state_key"] = ema_key
    config = None
    if model is not None:
        metadata["model"] = json.dumps(model)
        config = out.with_suffix(".yaml")
        run_files.write_text_atomic(config, _config_text(model, checkpoint, step))
    else:
        out.with_suffix(".yaml").unlink(missing_ok=True)  # an earlier export's, which overwrite allows

    def write(tmp: Path) -> None:
        # safetensors writes a file of its own and renames it over tmp, mode 0600 whatever the
        # umask: the file first made at tmp has the mode the user's new files get, and keeps it.
        tmp.touch()
        mode = stat.S_IMODE(tmp.stat().st_mode)
        safetensors_torch.save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)

    try:
        run_files.write_atomic(out, write)
    except (OSError, safetensors.SafetensorError) as exc:  # the Rust writer reports I/O as its own error
        raise ExportError(f"could not write {out} ({exc}); any earlier {out.name} is intact: free some space "
                          "or pick another --out") from None
    return Exported(out, config, checkpoint, step, ema_key, shown, len(tensors),
                    sum(t.numel() * t.element_size() for t in tensors.values()))


def build_model(config: str | Path, trust: str | Iterable[str] = ()) -> torch.nn.Module:
    """The module an export's ``NAME.yaml`` describes, freshly initialised: load the exported
    weights into it with ``load_state_dict(safetensors.torch.load_file(...), strict=True)``. A
    problem with the file is a ``ConfigError`` that points at its line.

    The file's ``_target_``s (the model's and those of its arguments) may name ``nn.Module``
    classes of ``torch.nn`` and of ``trainer`` (the examples); anything else only from a module in
    ``trust`` (``"my_project.models"`` trusts it and its submodules). The file holds what a
    checkpoint's config said, and a checkpoint from elsewhere must not run code of its choosing."""
    source = Source.load(Path(config))
    section = source.data.get("model") if isinstance(source.data, dict) else None
    if not isinstance(section, dict) or "_target_" not in section:
        raise ConfigError(f"{config}: no 'model:' section with a _target_; pass the .yaml that trainer export "
                          "wrote beside the .safetensors file")
    trusted = (trust,) if isinstance(trust, str) else tuple(trust)
    for path, target in _targets(section, ("model",)):
        _check_target(target, trusted, source, path)
    model = instantiate(Component.model_validate(section), source, ("model",))
    if not isinstance(model, torch.nn.Module):
        raise source.at(("model",), f"'{section['_target_']}' returned a {type(model).__name__}, not a torch.nn.Module")
    return model


# ----------------------------------------------------------------------------- the pieces


def _targets(value: Any, path: Path_) -> Iterator[tuple[Path_, str]]:
    """Every ``_target_`` string under ``value``, at any depth, with where it stands."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "_target_" and isinstance(item, str):
                yield path + (key,), item
            else:
                yield from _targets(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _targets(item, path + (i,))


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _check_target(target: str, trusted: tuple[str, ...], source: Source, path: Path_) -> None:
    """Refuse ``target`` unless it is an nn.Module class of a safe package or anything of a trusted
    module. The name is checked before anything is imported (importing a module runs its code),
    and what it resolves to after (an attribute path can lead from a safe module to anything)."""
    found: Any = None
    if _within(target, trusted + SAFE_PACKAGES):
        found = import_target(target, source, path)
    module = getattr(found, "__module__", None) or ""
    if _within(module, trusted) or (inspect.isclass(found) and issubclass(found, torch.nn.Module)
                                    and _within(module, SAFE_PACKAGES)):
        return
    suggested = target.rsplit(".", 1)[0]
    raise source.at(path, f"'{target}' is not a torch.nn or trainer module class, and build_model imports nothing "
                          f"else from a file unless told to trust it (a checkpoint's config may name any code): if "
                          f"you trust {source.file}, call build_model('{source.file}', trust='{suggested}')")


def _safetensors() -> tuple[Any, Any]:
    try:
        import safetensors
        import safetensors.torch
    except ImportError:
        raise SafetensorsMissing(f"exporting writes .safetensors files, which needs the safetensors package: {INSTALL}") from None
    return safetensors, safetensors.torch


def _dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one export writes: choose bf16, fp16 or fp32, or leave it out "
                          "to keep the dtypes as saved")
    return DTYPES[dtype]


def _short(dtype: torch.dtype) -> str:
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))


def _check_out(out: Path, overwrite: bool) -> None:
    if out.suffix != SUFFIX:
        raise ExportError(f"--out {out}: name the weights file NAME{SUFFIX} (the model's config goes beside it as "
                          "NAME.yaml)")
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: the folder {out.parent} does not exist; create it first or pick another")
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; pass a file name such as {out / 'model.safetensors'}")
    config = out.with_suffix(".yaml")
    if run_files.is_run_dir(out.parent) and config.name in run_files.OWN:
        raise ExportError(f"--out {out}: its config would replace the run's own {config}; pick another name, "
                          f"such as {out.parent / ('model' + SUFFIX)}")
    for path in (out, config):
        if path.exists() and not overwrite:
            raise ExportError(f"{path} exists; pass --overwrite to replace it, or pick another --out")


def _read(source: Path) -> dict[str, Any]:
    """The checkpoint behind ``source``, loaded and checked; ``state["path"]`` says which."""
    if not source.exists():
        raise ExportError(f"{source} does not exist; pass a run directory (runs/NAME) or a checkpoint "
                          "(runs/NAME/checkpoints/step-....pt, or such a directory under strategy: fsdp)")
    if run_files.is_run_dir(source):
        state = files.newest_good_checkpoint(source, "export")
        if state is None:
            raise ExportError(f"the run {source} has no checkpoint in {run_files.checkpoint_dir(source)} to export; "
                              "checkpoints are written every checkpoint.every_n_steps steps and at the end of a run")
        return state
    if source.is_dir() and not (source / files.SHARDED_STATE).exists():
        raise ExportError(f"{source} is neither a run directory (it holds none of {', '.join(run_files.OWN)}) nor a "
                          f"sharded checkpoint (no {files.SHARDED_STATE}); pass runs/NAME or one of its checkpoints")
    state = files.load_checkpoint(source)
    state["path"] = str(source)
    return state


def _ema_states(state: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """The averages of the weights in the callbacks' state, by state key: ``EMAWeights`` keeps
    ``{"ema": <the averaged module's state_dict>}`` (``None`` before its first step)."""
    return {key: value["ema"] for key, value in (state.get("callbacks") or {}).items()
            if isinstance(value, dict) and set(value) == {"ema"} and isinstance(value["ema"], dict) and value["ema"]
            and all(isinstance(t, torch.Tensor) for t in value["ema"].values())}


def _choose_ema(state: dict[str, Any], weights: str, checkpoint: Path) -> str | None:
    """The state key of the EMA to export, or None for the trained weights."""
    found = _ema_states(state)
    if weights == "trained":
        return None
    if weights == "auto" and not found:
        return None
    if weights in ("auto", "ema"):
        if len(found) == 1:
            return next(iter(found))
        if not found:
            raise ExportError(f"checkpoint {checkpoint} holds no EMA of the weights (the run had no EMAWeights "
                              "callback); export the trained weights with --weights trained")
        raise ExportError(f"checkpoint {checkpoint} holds several EMAs of the weights ({', '.join(sorted(found))}); "
                          "pick one with --weights <state key>, or --weights trained")
    if weights not in found:
        held = ", ".join(sorted(found)) or "none"
        raise ExportError(f"--weights {weights}: checkpoint {checkpoint} holds no EMA under that state key (EMAs held: "
                          f"{held}); pass auto, ema, trained or one of those keys")
    return weights


def _model_state(state: dict[str, Any], checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model's state_dict: from the file, or from a sharded checkpoint's DCP files, read whole."""
    if not state.get("sharded"):
        return state["model"]
    import torch.distributed.checkpoint as dcp  # with DTensor, half a second: only a sharded checkpoint's export
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    # The metadata's index was checked by load_checkpoint before DCP unpickles it here.
    metadata = dcp.FileSystemReader(state["sharded"]).read_metadata()
    model: dict[str, torch.Tensor] = {}
    for key, meta in metadata.state_dict_metadata.items():
        path = (metadata.planner_data or {}).get(key, ())
        if len(path) == 2 and path[0] == "model" and isinstance(meta, TensorStorageMetadata):
            model[path[1]] = torch.empty(meta.size, dtype=meta.properties.dtype)
    # The shards of every rank, resharded into whole tensors in this process; no_dist, so that a
    # process group of the caller's (under torchrun) is neither needed nor used.
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # as intended
            dcp.load({"model": model}, checkpoint_id=state["sharded"], no_dist=True)
    except Exception as exc:  # DCP wraps read failures in its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"checkpoint {checkpoint}: its model shards could not be read ({first})") from None
    return model


def _servable(state: dict[str, Any], cast: torch.dtype | None, checkpoint: Path) -> dict[str, torch.Tensor]:
    """The tensors as safetensors stores them: cast, contiguous, each with storage of its own. A
    tied weight (an embedding shared with the output layer) appears under both of its names and
    is copied for the second, so the file loads into the module with ``strict=True``."""
    others = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if others:
        raise ExportError(f"checkpoint {checkpoint}: the model's state holds entries that are not tensors "
                          f"({', '.join(others[:4])}), which a .safetensors file cannot store")
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, tensor in state.items():
        tensor = tensor.detach().cpu()
        if cast is not None and tensor.is_floating_point():
            cast_to = tensor.to(cast)
            # fp16 tops out at 65504: a larger weight would be written as inf, and served as one.
            if not bool(torch.isfinite(cast_to).all()) and bool(torch.isfinite(tensor).all()):
                raise ExportError(
                    f"{key} does not fit {cast} (largest magnitude {tensor.abs().max().item():.4g}, which becomes "
                    f"inf); export in bf16 (the range of fp32) or fp32")
            tensor = cast_to
        tensor = tensor.contiguous()
        where = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if tensor.numel() and where in seen:
            tensor = tensor.clone()
        seen.add(where)
        out[key] = tensor
    return out


def _config_text(model: dict[str, Any], checkpoint: Path, step: int) -> str:
    return (f"# The model of {checkpoint} (step {step}), written by trainer export beside its weights.\n"
            "# Build it with trainer.evaluation.export.build_model(this file), then load_state_dict(load_file(weights), strict=True).\n"
            + yaml.safe_dump({"model": model}, sort_keys=False))
