"""The YAML config of ``trainer run``: the loop settings plus the run's name and its components.

Torch-free: ``trainer check`` reports a bad field and ``trainer schema`` prints the schema
without importing torch.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trainer.cli.yaml_source import ConfigError, Source, dotted
from trainer.config import TrainerConfig


class Component(BaseModel):
    """``{_target_: dotted.path, ...keyword arguments}``: the target is imported and called."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    target: str = Field(alias="_target_", description="Dotted path of the class or function to call.")

    @field_validator("target")
    @classmethod
    def _dotted(cls, value: str) -> str:
        if "." not in value:
            raise ValueError(f"expected a dotted path such as torch.optim.AdamW, got {value!r}")
        return value

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RunConfig(TrainerConfig):
    """Everything ``trainer run`` needs: the TrainerConfig fields, where the run goes, and what to build."""

    name: str = Field("run", description="Run name; the run directory is <out_dir>/<name>.", min_length=1)
    out_dir: str = Field("runs", description="Folder that holds run directories.")
    trainer: Component | str = Field(
        "trainer.Trainer",
        description="The Trainer class: a dotted path such as my_pkg.MyTrainer, or {_target_: my_pkg.MyTrainer, "
        "...extra constructor arguments of the subclass}.",
    )
    model: Component = Field(description="The nn.Module to train: {_target_: ..., kwargs}.")
    data: Component = Field(
        description="A callable returning the datasets: a dict with 'train' (and 'val'), a (train, val) tuple, "
        "or the training data alone."
    )
    loss: Component | str | None = Field(
        None,
        description="The loss: a component that is called to build it ({_target_: torch.nn.CrossEntropyLoss}) "
        "or a dotted path used as is (torch.nn.functional.cross_entropy).",
    )
    optimizer: Component | None = Field(
        None,
        description="Called with the trainable parameters first, e.g. {_target_: torch.optim.AdamW, lr: 3.0e-4}; "
        "null when the Trainer subclass defines configure_optimizers().",
    )
    scheduler: Component | None = Field(None, description="Called with the optimizer first (null: none).")
    callbacks: list[Component] = Field(default_factory=list, description="Callbacks, each {_target_: ...}.")
    loggers: list[Literal["tensorboard"] | Component] = Field(
        default_factory=list,
        description="Metric sinks beside metrics.jsonl and metrics.csv: 'tensorboard' (writes <run_dir>/tensorboard; "
        "needs the tensorboard package) or {_target_: ...}, called with the run directory first.",
    )

    @field_validator("trainer", "loss")
    @classmethod
    def _dotted_path(cls, value: Any) -> Any:
        if isinstance(value, str) and "." not in value:
            raise ValueError(f"expected a dotted path such as my_pkg.MyTrainer, got {value!r}")
        return value


def trainer_config(run: RunConfig) -> TrainerConfig:
    """The loop settings alone, as the Trainer takes them."""
    return TrainerConfig(**{name: getattr(run, name) for name in TrainerConfig.model_fields})


def _fields_at(model: type[BaseModel], path: tuple) -> list[str]:
    """The valid keys at ``path`` (for suggestions)."""
    for part in path:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields)


def validate(source: Source) -> RunConfig:
    """Check the whole file against RunConfig; the first problem becomes a ConfigError at its line."""
    try:
        return RunConfig.model_validate(source.data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    error = errors[0]
    loc = tuple(error["loc"])
    # For a union (loss: Component | str) pydantic adds the branch name to loc; drop such parts.
    path = tuple(p for p in loc if isinstance(p, int) or not (p[:1].isupper() or p in ("str", "function-after")))
    if error["type"] == "extra_forbidden":
        key = path[-1]
        close = difflib.get_close_matches(str(key), _fields_at(RunConfig, path[:-1]), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise source.at(path, f"unknown key '{key}'{hint}")
    if error["type"] == "missing":
        if path and path[-1] == "_target_":
            raise source.at(path[:-1], "a component needs '_target_: dotted.path.to.callable'")
        raise ConfigError(f"{source.file}: missing required section '{dotted(path)}'")
    message = error["msg"].removeprefix("Value error, ")
    found = error.get("input")
    shown = f" (found {found!r})" if not isinstance(found, (dict, list)) else ""
    more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    raise source.at(path, f"{message}{shown}{more}")
