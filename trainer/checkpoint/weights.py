"""Weights files: a model's tensors read from any file trainer takes, and loaded into a model whole
or, when it is sharded (FSDP), shard by shard.

Four kinds, told apart by their content (a file's first bytes; a folder is a sharded checkpoint):

- a checkpoint of trainer's (``step-*.pt``): its ``model`` entry, after the file's digest is checked
  (``trainer.checkpoint.files``); the file is memory-mapped, so the optimizer's state beside the
  weights is never read;
- a sharded checkpoint directory (written under ``strategy: fsdp``): the model's tensors from its shards;
- a state dict file, ``torch.save(model.state_dict())``, read with ``weights_only=True`` (no code runs);
- a ``.safetensors`` file (the optional ``safetensors`` package: ``pip install 'trainer[safetensors]'``).

``read_weights(path)`` gives every tensor of one, by name. ``load(module, path, ...)`` puts one into
a model (``init_from``): it renames the file's names, names every missing, unexpected and reshaped
tensor before anything is copied, and for a sharded model (DTensor parameters) each rank reads only
its own block of each tensor: a slice of the memory-mapped tensor, safetensors' ``get_slice``, or,
from a sharded checkpoint, the shards that DCP routes to it. ``materialize`` gives a model built on
the meta device its memory.
"""

from __future__ import annotations

import itertools
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer import run_dir as run_files
from trainer.checkpoint import files
from trainer.checkpoint.files import CheckpointError
from trainer.parallel.distributed import is_dtensor

# torch.distributed.checkpoint and .tensor are imported inside the functions of sharded weights: a
# process that reads whole files does not load them (half a second; `trainer export` of a file).

_ZIP = b"PK\x03\x04"  # torch.save's format is a zip archive
_MODEL = "model."  # a sharded checkpoint keeps the model's tensors under this prefix (and the optimizer's beside)
KINDS = ("checkpoint", "sharded checkpoint", "state dict", "safetensors")
_TAKES = ("name a checkpoint (runs/NAME/checkpoints/step-....pt, or a sharded checkpoint's directory), a "
          "torch.save(model.state_dict(), path) file or a .safetensors file")


# safetensors' dtype names, as torch prints them (the floating-point ones are what a check needs)
_SAFETENSORS_DTYPES = {"F64": "torch.float64", "F32": "torch.float32", "F16": "torch.float16", "BF16": "torch.bfloat16",
                       "F8_E4M3": "torch.float8_e4m3fn", "F8_E5M2": "torch.float8_e5m2", "I64": "torch.int64",
                       "I32": "torch.int32", "I16": "torch.int16", "I8": "torch.int8", "U8": "torch.uint8",
                       "BOOL": "torch.bool"}


def _floating(dtype: str) -> bool:
    return dtype.startswith(("torch.float", "torch.bfloat", "torch.complex"))


class WeightsError(CheckpointError):
    """A weights file that cannot be read, or that does not fit the model; the message names the file."""


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a weights file of any of the four kinds, by name, on the CPU (those of a ``.pt``
    file mapped from the file, read when used)."""
    source = WeightsFile(path)
    return {name: source.read(name) for name in source.shapes}


class WeightsFile:
    """An open weights file: its ``kind`` (one of ``KINDS``), ``shapes`` (name -> shape) and
    ``read(name, block)``, which reads one tensor, or a block of it (a tuple of slices), when asked."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.kind, self.shapes = "", {}
        self._tensors: dict[str, torch.Tensor] | None = None
        self._safe: Any = None
        self._sharded: dict[str, Any] = {}
        if not self.path.exists():
            raise WeightsError(f"{self.path} does not exist")
        kind = files.special_kind(self.path)
        if kind is not None:
            raise WeightsError(f"{self.path} is {kind}, not a weights file; {_TAKES}")
        if self.path.is_dir() and (self.path / run_files.CHECKPOINTS).is_dir():
            found = files.list_checkpoints(run_files.checkpoint_dir(self.path))
            newest = f": the newest is {found[-1]}" if found else ", and it holds none yet"
            raise WeightsError(f"{self.path} is a run directory; name one of its checkpoints{newest}")
        if self.path.is_dir():
            self._open_sharded()
        elif _is_safetensors(self.path):
            self._open_safetensors()
        else:
            self._open_torch()

    def dtype(self, name: str) -> str:
        """The dtype of the tensor ``name`` as torch prints it (``torch.float32``), read from the file's index."""
        if self._safe is not None:
            return _SAFETENSORS_DTYPES.get(self._safe.get_slice(name).get_dtype(), self._safe.get_slice(name).get_dtype())
        if self._sharded:
            return str(self._sharded[name].properties.dtype)
        return str(self._tensors[name].dtype)

    def read(self, name: str, block: tuple[slice, ...] | None = None) -> torch.Tensor:
        if self._safe is not None:
            return self._safe.get_slice(name)[block] if block is not None else self._safe.get_tensor(name)
        if self._tensors is None:  # a sharded checkpoint read whole: every tensor at once, on first use
            self._tensors = self._read_sharded()
        tensor = self._tensors[name]
        return tensor[block] if block is not None else tensor

    # ----------------------------------------------------------------- the kinds

    def _open_torch(self) -> None:
        path = self.path
        what = _not_torch(path)
        if what is not None:
            raise WeightsError(f"{path} is not a checkpoint or a weights file (no file trainer, torch.save or "
                               f"safetensors writes): it holds {what}; {_TAKES}")
        with open(path, "rb") as f:
            zipped = f.read(4) == _ZIP  # torch.save's older format cannot be memory-mapped
        try:
            if files.signed(path):
                state, self.kind = files.load_checkpoint(path, mmap=True), "checkpoint"
            else:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
                self.kind = "state dict"
                if isinstance(state, dict) and "trainer_state" in state and "version" in state:
                    # a checkpoint written before checkpoints carried digests: checked as resume checks it
                    state, self.kind = files.load_checkpoint(path, mmap=zipped), "checkpoint"
        except CheckpointError as exc:
            raise WeightsError(str(exc)) from None
        except pickle.UnpicklingError as exc:
            if "Weights only load failed" in str(exc):
                raise WeightsError(
                    f"{path} holds pickled Python objects, which could run code when loaded; refused. Save the "
                    "tensors alone: torch.save(model.state_dict(), path)"
                ) from None
            raise WeightsError(f"{path} is corrupted ({exc})") from None
        except Exception as exc:  # not a torch file at all, or a damaged one: the unpickler raises anything
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise WeightsError(f"{path} is neither a torch.save file nor a safetensors file "
                               f"({type(exc).__name__}: {first})") from None
        tensors = state["model"] if self.kind == "checkpoint" else state
        if not isinstance(tensors, dict) or not any(isinstance(v, torch.Tensor) for v in tensors.values()):
            what = (f"a dict of {', '.join(map(str, list(tensors)[:6]))}" if isinstance(tensors, dict) and tensors
                    else f"a {type(tensors).__name__}" if tensors else "nothing")
            raise WeightsError(f"{path} holds {what}, not a state dict (tensors by name); save one with "
                               "torch.save(model.state_dict(), path)")
        self._tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        self.shapes = {k: v.shape for k, v in self._tensors.items()}

    def _open_safetensors(self) -> None:
        try:
            from safetensors import safe_open
        except ImportError:
            raise WeightsError(f"{self.path}: reading a .safetensors file needs the safetensors package: "
                               "pip install 'trainer[safetensors]'") from None
        try:
            self._safe = safe_open(str(self.path), framework="pt", device="cpu")
            self.shapes = {name: torch.Size(self._safe.get_slice(name).get_shape()) for name in self._safe.keys()}
        except Exception as exc:  # safetensors' own error types vary by version
            raise WeightsError(f"{self.path} is not a readable safetensors file ({exc})") from None
        self.kind = "safetensors"

    def _open_sharded(self) -> None:
        try:
            files.load_checkpoint(self.path)  # trainer.pt, and every shard file with its size and digest
            metadata = files.sharded_metadata(self.path)
        except CheckpointError as exc:
            raise WeightsError(str(exc)) from None
        self._sharded = {key[len(_MODEL):]: meta for key, meta in metadata.state_dict_metadata.items()
                         if key.startswith(_MODEL)}
        self.shapes = {name: meta.size for name, meta in self._sharded.items()}
        self.kind = "sharded checkpoint"

    def _read_sharded(self) -> dict[str, torch.Tensor]:
        tensors = {"model": {name: torch.empty(meta.size, dtype=meta.properties.dtype)
                             for name, meta in self._sharded.items()}}
        self._dcp_load(tensors, no_dist=True)  # this process alone reads every shard
        return tensors["model"]

    def load_shards(self, targets: dict[str, torch.Tensor]) -> None:
        """Fill ``targets`` (this file's names -> this rank's DTensors, or plain tensors) in place from a
        sharded checkpoint: DCP reads on each rank the parts of the shard files its blocks cover.
        Collective: every rank calls it together."""
        self._dcp_load({"model": targets}, no_dist=False)

    def _dcp_load(self, tensors: dict[str, Any], no_dist: bool) -> None:
        import torch.distributed.checkpoint as dcp

        try:
            with warnings.catch_warnings():  # reading in one process is what no_dist asks for, not a guess to warn of
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
                dcp.load(tensors, checkpoint_id=self.path, no_dist=no_dist)
        except Exception as exc:  # DCP wraps the ranks' failures in its own exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(f"{self.path}: reading its shards failed ({first})") from None


def _not_torch(path: Path) -> str | None:
    """What the file holds when its first bytes rule out ``torch.save`` (a zip archive, or a pickle
    in the older format): nothing, zeros, text or other bytes; None when it may be one."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:4] == _ZIP or head[:1] == b"\x80":  # every pickle protocol torch.save uses starts with PROTO
        return None
    if not head:
        return "nothing (0 bytes)"
    if not any(head):
        return f"zeros (its first {len(head)} bytes are all 0)"
    text = head.decode("utf-8", "replace")[:-1]  # the last character may be cut in two
    if text and all((c.isprintable() and c != "\ufffd") or c in "\t\r\n" for c in text):
        return f"text ({text.splitlines()[0][:40]!r}...)"
    return f"other bytes (it starts {head[:8].hex(' ')})"


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with the length of its JSON header (8 bytes, little-endian), then ``{``."""
    with open(path, "rb") as f:
        head = f.read(9)
        size = f.seek(0, 2)
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return True
    return path.suffix == ".safetensors" and head[:4] != _ZIP  # let safetensors say what is wrong with it


# ----------------------------------------------------------------------------- into a model


def load(module: nn.Module, path: str | Path, *, strict: bool = True, rename: dict[str, str] | None = None,
         rename_regex: dict[str, str] | None = None, reset_missing: bool = False) -> str:
    """Load the weights file at ``path`` into ``module`` (plain, or sharded with DTensor parameters);
    returns one line saying what was loaded.

    The file's names are renamed first: ``rename`` maps prefixes (the longest that fits applies),
    then ``rename_regex`` maps regular expressions (``re.sub``; the first pattern that matches a name
    applies). Names the model holds twice (tied weights) need to be in the file once. With ``strict``
    a name missing from the file or absent from the model is an error; without, a warning, and the
    missing keep their values (with ``reset_missing``, for a model built on the meta device, the
    ``reset_parameters()`` of the modules holding them sets them first). A tensor of another shape
    is an error either way. Nothing is copied before every check has passed. Under torchrun every
    rank calls this together when the file is a sharded checkpoint.
    """
    return _load(module, path, strict=strict, rename=rename, rename_regex=rename_regex, reset_missing=reset_missing)[0]


def _load(module: nn.Module, path: str | Path, *, strict: bool, rename: dict[str, str] | None,
          rename_regex: dict[str, str] | None, reset_missing: bool) -> tuple[str, dict[str, str]]:
    """``load``'s line, and the tensors it copied: the model's name -> the file's."""
    source = WeightsFile(path)
    renamed, unused = _renaming(list(source.shapes), rename or {}, rename_regex or {})
    found = {renamed[name]: shape for name, shape in source.shapes.items()}
    state = {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    expected = _without_aliases(module, {k: v.shape for k, v in state.items()}, found)
    missing, unexpected, reshaped = files.mismatch(expected, found, "the file", "in the model")
    fatal = (missing, unexpected, reshaped) if strict else ([], [], reshaped)
    if any(fatal):
        hint = f"; rename entries that matched no name in the file: {', '.join(map(repr, unused))}" if unused else ""
        fix = ("map the file's names to the model's with rename (prefixes) or rename_regex, or load the names both "
               "have with strict: false" if missing or unexpected else
               "the file holds another configuration of this model: build the model it was saved from")
        raise WeightsError(f"{path} does not match the model "
                           f"({files.describe_mismatch(*fatal, found_in='the file')}){hint}; {fix}")
    file_name = {model: name for name, model in renamed.items()}
    names = {k: file_name[k] for k in expected if k in found}
    # A float tensor from integers (or the other way) is no weight of this model: copy_ would cast it
    # silently. Between floating-point dtypes a cast is what loading fp16 or bf16 weights means.
    kinds = [f"{k} ({source.dtype(name)} in the file, {state[k].dtype} in the model)" for k, name in names.items()
             if _floating(source.dtype(name)) != state[k].is_floating_point()]
    if kinds:
        raise WeightsError(f"{path} does not match the model: {len(kinds)} tensor(s) hold another kind of number: "
                           f"{', '.join(kinds[:6])}{' and more' if len(kinds) > 6 else ''}; load the file the model "
                           "was saved as (floating-point weights load into floating-point parameters of any precision)")
    _check_tied(module, source, renamed)
    if missing or unexpected:
        kept = "are set by reset_parameters()" if reset_missing else "keep their initial values"
        warnings.warn(f"{path} (strict: false): {files.describe_mismatch(missing, unexpected, [], 'the file')}; "
                      f"the missing {kept}, the rest is ignored", stacklevel=2)
    if unused:
        warnings.warn(f"{path}: rename entries that matched no name in the file: {', '.join(map(repr, unused))}",
                      stacklevel=2)
    if missing and reset_missing:
        reset(module, missing, "are not in the file and the model was built on the meta device")
    _copy(module, state, source, names)
    return f"loaded {len(names)} tensors from {path} ({source.kind})", names


def _renaming(names: list[str], rename: dict[str, str],
              rename_regex: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The model's name for each of the file's ``names``, and the entries that matched no name."""
    prefixes = sorted(rename, key=len, reverse=True)
    patterns = [(re.compile(pattern), pattern, replacement) for pattern, replacement in rename_regex.items()]
    used: set[str] = set()
    renamed: dict[str, str] = {}
    for name in names:
        new = name
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is not None:
            new, _ = rename[prefix] + name[len(prefix):], used.add(prefix)
        for compiled, pattern, replacement in patterns:
            try:
                result, count = compiled.subn(replacement, new)
            except (re.error, IndexError) as exc:
                raise WeightsError(f"rename_regex {pattern!r}: {replacement!r} is not a valid replacement ({exc})") from None
            if count:
                new, _ = result, used.add(pattern)
                break
        renamed[name] = new
    by_model: dict[str, str] = {}
    for name, new in renamed.items():
        if new in by_model:
            raise WeightsError(f"renaming makes two of the file's names one: {by_model[new]!r} and {name!r} both "
                               f"become {new!r}; make rename and rename_regex tell them apart")
        by_model[new] = name
    return renamed, [entry for entry in [*rename, *rename_regex] if entry not in used]


def _without_aliases(module: nn.Module, expected: dict[str, Any], found: dict[str, Any]) -> dict[str, Any]:
    """``expected`` less the other names of a tensor the model holds under several (tied weights,
    which safetensors stores once): the names the file has, else the first."""
    names_of: dict[int, list[str]] = {}
    for name, tensor in itertools.chain(module.named_parameters(remove_duplicate=False),
                                        module.named_buffers(remove_duplicate=False)):
        names_of.setdefault(id(tensor), []).append(name)
    dropped = set()
    for names in names_of.values():
        kept = [n for n in names if n in found] or names[:1]
        dropped.update(n for n in names if n not in kept)
    return {k: v for k, v in expected.items() if k not in dropped}


def _check_tied(module: nn.Module, source: WeightsFile, renamed: dict[str, str]) -> None:
    """A tensor the model holds under several names (tied weights) that the file holds under more than
    one of them, with different values: one would silently overwrite the other."""
    if source.kind == "sharded checkpoint":
        return  # written from a model, whose tied names hold one tensor; checking would read every shard
    file_name = {model: name for name, model in renamed.items()}
    names_of: dict[int, list[str]] = {}
    for name, tensor in itertools.chain(module.named_parameters(remove_duplicate=False),
                                        module.named_buffers(remove_duplicate=False)):
        names_of.setdefault(id(tensor), []).append(name)
    for names in names_of.values():
        present = [n for n in names if n in file_name]
        if len(present) > 1:
            first = source.read(file_name[present[0]])
            differ = [n for n in present[1:] if not torch.equal(source.read(file_name[n]), first)]
            if differ:
                raise WeightsError(
                    f"{source.path}: {', '.join([present[0], *differ])} are one tensor in the model (tied weights) "
                    "but hold different values in the file; keep one of them in the file, or untie them in the model")


def _copy(module: nn.Module, state: dict[str, torch.Tensor], source: WeightsFile, names: dict[str, str]) -> None:
    """Copy the file's tensors (``names``: the model's name -> the file's) into the model."""
    if not any(is_dtensor(state[k]) for k in names):
        # A whole model: torch's own loading, with the module's load hooks.
        module.load_state_dict({k: source.read(name) for k, name in names.items()}, strict=False)
        return
    if source.kind == "sharded checkpoint":
        source.load_shards({name: state[k] for k, name in names.items()})
        return
    # The state dict's DTensors share their local storage with the parameters: each rank copies
    # its own block of each tensor into it, one tensor at a time, and never holds a whole one.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    with torch.no_grad():
        for k, name in names.items():
            target = state[k]
            if is_dtensor(target):
                shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh,
                                                                      target.placements)
                block = tuple(slice(start, start + n) for start, n in zip(offset, shape))
                target.to_local().copy_(source.read(name, block))
            else:
                target.copy_(source.read(name))


# ----------------------------------------------------------------------------- the meta device


def builds_on_meta(config: Any, layout: Any) -> bool:
    """Whether the model is built on the meta device (no memory): under torchrun with ``strategy:
    fsdp`` and ``init_from``, where the weights come from a file and sharding spreads them, so no
    rank needs room for the whole model."""
    return config.init_from is not None and config.strategy == "fsdp" and layout.enabled


def on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def materialize(module: nn.Module, device: torch.device) -> None:
    """Give a model built on the meta device memory on ``device`` (``to_empty``: values undefined
    until weights are loaded into it; under FSDP each rank's shards only), then values to the
    buffers that no weights file holds, the non-persistent ones (a RoPE table, a causal mask), by
    the ``reset_parameters()`` of the modules that hold them."""
    module.to_empty(device=device)
    transient = [f"{prefix}.{name}" if prefix else name for prefix, sub in module.named_modules()
                 for name in sorted(sub._non_persistent_buffers_set) if sub._buffers.get(name) is not None]
    reset(module, transient, "are buffers kept out of state dicts (persistent=False), so no weights file holds them")


def reset(module: nn.Module, names: list[str], why: str) -> None:
    """Call ``reset_parameters()`` of every module that directly holds one of ``names``; refuse, naming
    them, when one has none (a module of the user's own, usually)."""
    owners: dict[str, list[str]] = {}
    for name in names:
        owners.setdefault(name.rpartition(".")[0], []).append(name)
    lacking = {owner: held for owner, held in owners.items()
               if not callable(getattr(module.get_submodule(owner), "reset_parameters", None))}
    if lacking:
        owner, held = next(iter(lacking.items()))
        kind = type(module.get_submodule(owner)).__name__
        raise WeightsError(
            f"{', '.join(held[:8])} {why}, and {kind} ({owner or 'the model itself'}), which holds them, has no "
            f"reset_parameters() to set them: define {kind}.reset_parameters() to compute them (torch's own "
            "layers have one); it is called once the model has memory"
        )
    for owner in owners:
        module.get_submodule(owner).reset_parameters()

class InitFrom:
    """``config.init_from``: loaded once, when ``fit`` (or evaluation) first needs the weights, and
    not at all once a checkpoint's weights came first (``cancel``): a resumed run continues from its
    checkpoint. ``reset_missing``: the model was built on the meta device, so a tensor the file lacks
    is initialised rather than left without values."""

    def __init__(self, spec: Any, module: nn.Module, reset_missing: bool):
        self.spec, self.module, self.reset_missing = spec, module, reset_missing
        self.pending = spec is not None
        self.loaded: dict[str, str] = {}  # once applied: the model's name -> the file's, of each tensor copied

    def cancel(self) -> None:
        self.pending = False

    def apply(self) -> str | None:
        """One line saying what was loaded, or ``None`` when there is nothing (left) to load."""
        if not self.pending:
            return None
        spec = self.spec
        try:
            loaded, self.loaded = _load(self.module, spec.path, strict=spec.strict, rename=spec.rename,
                                        rename_regex=spec.rename_regex, reset_missing=self.reset_missing)
        except WeightsError as exc:
            raise WeightsError(f"init_from: {exc}") from None
        self.pending = False
        return f"init_from: {loaded}"
