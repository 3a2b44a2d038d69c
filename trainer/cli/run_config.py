"""The YAML config of ``trainer run``: the loop settings plus the run's name and its components.

Torch-free: ``trainer check`` reports a bad field and ``trainer schema`` prints the schema
without importing torch.
"""

from __future__ import annotations

import difflib
import itertools
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from trainer.components import Component
from trainer.config import MLflowSettings, TrainerConfig, WandbSettings
from trainer.run_dir import METRICS_CSV, METRICS_JSONL, NAME_MAX_BYTES, TENSORBOARD, name_problem
from trainer.yaml_source import ConfigError, Source, dotted


class TrackerLogger(BaseModel):
    """``{mlflow: {...options}}`` or ``{wandb: {...options}}``: a tracker logger with options."""

    model_config = ConfigDict(extra="forbid")
    mlflow: MLflowSettings | None = Field(None, description="MLflow, with these options.")
    wandb: WandbSettings | None = Field(None, description="Weights & Biases, with these options.")

    @model_validator(mode="after")
    def _one(self) -> TrackerLogger:
        if (self.mlflow is None) == (self.wandb is None):
            raise ValueError("a logger mapping names one tracker: {mlflow: {...}} or {wandb: {...}}; list each "
                             "tracker as its own entry of loggers")
        return self

    @property
    def settings(self) -> tuple[str, MLflowSettings | WandbSettings]:
        return ("mlflow", self.mlflow) if self.mlflow is not None else ("wandb", self.wandb)


TRACKERS = ("mlflow", "wandb")


class OptimizerEntry(BaseModel):
    """One of several optimizers (``optimizers:``): the parameters it holds, it, and its scheduler."""

    model_config = ConfigDict(extra="forbid")
    params: list[str] | str = Field(description="Glob patterns of the parameter names it holds, e.g. 'generator.*'.")
    optimizer: Component = Field(description="Called with those parameters first, e.g. {_target_: torch.optim.Adam, lr: 1.0e-3}.")
    scheduler: Component | None = Field(None, description="Called with the optimizer first (null: none).")


class RunConfig(TrainerConfig):
    """Everything ``trainer run`` needs: the TrainerConfig fields, where the run goes, and what to build."""

    name: str = Field("run", min_length=1, description="Run name; the run directory is <out_dir>/<name>. One folder "
                      f"name: no '/', not '.' or '..', at most {NAME_MAX_BYTES} bytes.")
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
    metrics: dict[str, Component] = Field(
        default_factory=dict,
        description="Metric objects by name, each {_target_: ...} building one with update/compute/reset (a "
        "torchmetrics Metric, needs pip install 'trainer[metrics]'): the default validation_step updates each with "
        "(outputs, targets) and validation logs its value over the whole set as val/<name>.",
    )
    optimizer: Component | None = Field(
        None,
        description="Called with the trainable parameters first, e.g. {_target_: torch.optim.AdamW, lr: 3.0e-4}; "
        "null when the Trainer subclass defines configure_optimizers().",
    )
    scheduler: Component | None = Field(None, description="Called with the optimizer first (null: none).")
    optimizers: dict[str, OptimizerEntry] | None = Field(
        None,
        description="Several optimizers instead of optimizer:, by name, in order: {name: {params: 'pattern.*', "
        "optimizer: {_target_: ...}, scheduler: ...}}; each parameter in one. Needs a Trainer subclass with manual_step.",
    )
    callbacks: list[Component] = Field(default_factory=list, description="Callbacks, each {_target_: ...}.")
    loggers: list[Literal["tensorboard", "mlflow", "wandb"] | TrackerLogger | Component] = Field(
        default_factory=list,
        description=f"Metric sinks beside {METRICS_JSONL} and {METRICS_CSV}: 'tensorboard' (writes <run_dir>/{TENSORBOARD}; "
        "needs the tensorboard package), 'mlflow' or 'wandb' (experiment trackers; options as {mlflow: {tracking_uri: "
        "..., experiment: ..., run_name: ...}} or {wandb: {project: ..., mode: offline}}), or {_target_: ...}, called "
        "with the run directory first.",
    )

    @field_validator("name")
    @classmethod
    def _one_folder(cls, value: str) -> str:
        # The name is joined to out_dir and the result may be deleted (--overwrite): '..', '.', 'a/b'
        # or '/abs' would reach folders that are not this run's.
        problem = name_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("trainer", "loss")
    @classmethod
    def _dotted_path(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and "." not in value:
            raise ValueError(f"expected a dotted path such as {_EXAMPLES[info.field_name]}, got {value!r}")
        return value

    @field_validator("trainer")
    @classmethod
    def _bare_trainer(cls, value: Component | str) -> Component | str:
        # {_target_: pkg.MyTrainer} with no arguments is the same run as pkg.MyTrainer: one config.yaml
        # for both, and a resume sees no change between them.
        return value.target if isinstance(value, Component) and not value.kwargs else value


_EXAMPLES = {"trainer": "my_pkg.MyTrainer", "loss": "torch.nn.functional.cross_entropy"}
_COMPONENT = "{_target_: dotted.path, ...arguments}"

# What each union field accepts, in the words of a config file: a value that fits no branch gets
# one line saying so, instead of pydantic's error per branch named after our types.
_UNIONS = {
    "trainer": ("Trainer", "a dotted path such as my_pkg.MyTrainer or {_target_: my_pkg.MyTrainer, ...arguments}"),
    "loss": ("loss", "a dotted path such as torch.nn.functional.cross_entropy or "
                     "{_target_: torch.nn.CrossEntropyLoss, ...arguments}"),
    "loggers": ("logger", "'tensorboard', 'mlflow', 'wandb', {mlflow: {...options}}, {wandb: {...options}} or "
                          f"{_COMPONENT}"),
    "compile": ("compile setting", "true, false or a mapping of settings such as {mode: max-autotune, optimizer: true}"),
}


def trainer_config(run: RunConfig) -> TrainerConfig:
    """The loop settings alone, as the Trainer takes them."""
    # Excluded fields (the deprecated progress_bar) have already been folded into their successors.
    return TrainerConfig(**{name: getattr(run, name) for name, field in TrainerConfig.model_fields.items()
                            if not field.exclude})


def _keys(model: type[BaseModel]) -> dict[str, Any]:
    """A model's fields by the key a config file uses: the alias where one is set (``async``)."""
    return {field.alias or name: field for name, field in model.model_fields.items()}


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The models an annotation names: itself, or the branches of a union (compile: true or its settings)."""
    return [a for a in typing.get_args(annotation) or (annotation,) if isinstance(a, type) and issubclass(a, BaseModel)]


def _fields_at(model: type[BaseModel], path: tuple) -> list[str]:
    """The valid keys at ``path`` (for suggestions)."""
    annotation: Any = model
    for part in path:
        if isinstance(part, int):  # an item of a list (loggers[0])
            annotation = next(iter(typing.get_args(annotation)), None)
            continue
        field = next((_keys(m)[part] for m in _models(annotation) if part in _keys(m)), None)
        if field is None:
            return []
        annotation = field.annotation
    models = _models(annotation)
    return list(_keys(models[0])) if models else []


def _is_branch(part: Any) -> bool:
    """Whether a part of an error's location names a union branch (Component, str, literal['x'],
    function-after[...]) rather than a key or an index."""
    return isinstance(part, str) and (part[:1].isupper() or part in ("str", "bool") or "[" in part)


def _names(annotation: Any) -> list[str]:
    """The plain names a field takes (its Literal values), wherever they sit in its annotation."""
    if typing.get_origin(annotation) is Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return [name for arg in typing.get_args(annotation) for name in _names(arg)]


def _value_at(data: Any, path: tuple) -> Any:
    for part in path:
        data = data[part]
    return data


def _shown(value: Any) -> str:
    return f"a {type(value).__name__}" if isinstance(value, (dict, list)) else repr(value)


def _union_message(path: tuple, value: Any) -> str:
    field = path[0]
    noun, accepts = _UNIONS.get(field, ("value", "one of the forms the schema lists"))
    names = _names(RunConfig.model_fields[field].annotation) if field in RunConfig.model_fields else []
    if isinstance(value, str) and names:
        close = difflib.get_close_matches(value, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "."
        return f"unknown {noun} {value!r}{hint} A {noun} is {accepts}"
    return f"expected {accepts}, found {_shown(value)}"


def validate(source: Source) -> RunConfig:
    """Check the whole file against RunConfig; the first problem becomes a ConfigError at its line."""
    try:
        return RunConfig.model_validate(source.data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    error = errors[0]
    loc = tuple(error["loc"])
    branch = next((i for i, part in enumerate(loc) if _is_branch(part)), None)
    if branch is not None:  # a union: pydantic reports each branch that did not fit
        union = loc[:branch]
        value = _value_at(source.data, union)
        if not isinstance(value, dict):
            raise source.at(union, _union_message(union, value) + _more(errors))
        # a mapping is meant as the mapping branch (a component, compile's settings): its problem is the one to report
        # (a logger {mlflow: ...} or {wandb: ...} is meant as a tracker's options, not a component)
        tracker = union[0] == "loggers" and bool(value.keys() & set(TRACKERS))
        error = next(e for e in errors if tuple(e["loc"])[:branch] == union and len(e["loc"]) > branch
                     and (TrackerLogger.__name__ in str(e["loc"][branch]) if tracker
                          else str(e["loc"][branch])[:1].isupper()))
    path = tuple(p for p in error["loc"] if not _is_branch(p))
    if error["type"] == "extra_forbidden":
        key = path[-1]
        close = difflib.get_close_matches(str(key), _fields_at(RunConfig, path[:-1]), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise source.at(path, f"unknown key '{key}'{hint}")
    if error["type"] == "missing":
        if path and path[-1] == "_target_":
            raise source.at(path[:-1], "a component needs '_target_: dotted.path.to.callable'")
        raise ConfigError(f"{source.file}: missing required section '{dotted(path)}'")
    found = error.get("input")
    if error["type"] == "model_type" and error.get("ctx", {}).get("class_name") == Component.__name__:
        fix = f"; write {{_target_: {found}}}" if isinstance(found, str) and "." in found else ""
        raise source.at(path, f"expected a component {_COMPONENT}, found {_shown(found)}{fix}{_more(errors)}")
    message = error["msg"].removeprefix("Value error, ")
    says_found = "found" in error.get("ctx", {}) or isinstance(found, (dict, list)) or repr(found) in message
    shown = "" if says_found else f" (found {found!r})"
    raise source.at(path, f"{message}{shown}{_more(errors)}")


def _more(errors: list[dict[str, Any]]) -> str:
    """How many problems the file has beyond the first (a union's branches count once)."""
    problems = {tuple(itertools.takewhile(lambda part: not _is_branch(part), e["loc"])) for e in errors}
    n = len(problems) - 1
    return f" (and {n} more problem{'s' * (n > 1)})" if n else ""
