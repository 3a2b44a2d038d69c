"""Components: ``{_target_: dotted.path, ...keyword arguments}`` entries of a config, and how they
become objects: import each target, check its arguments against the target's signature and type
hints, and call it.

Every failure is a ``ConfigError`` that points at the line of the value responsible. The command
line builds a run's parts with these (``trainer.cli.build``), and ``build_model`` the module of an
export (``trainer.evaluation.export``). Torch-free.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import typing
from typing import Any, Callable, Collection

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from trainer.yaml_source import Path_, Source

_ARBITRARY = ConfigDict(arbitrary_types_allowed=True)


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


def import_target(dotted_path: str, source: Source, path: Path_) -> Any:
    """Import ``package.module.attr`` (attributes may nest), reporting at ``path`` when it fails."""
    parts = dotted_path.split(".")
    module = None
    for split in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:split])
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            missing_self = exc.name is not None and (exc.name == name or name.startswith(exc.name + "."))
            if not missing_self:
                # the module exists but something it imports does not
                raise source.at(path, f"importing '{name}' failed: {exc}") from exc
            continue
        except Exception as exc:
            raise source.at(path, f"importing '{name}' failed: {type(exc).__name__}: {exc}") from exc
        break
    if module is None:
        raise source.at(
            path,
            f"cannot import '{dotted_path}': no module named '{parts[0]}' (is it installed, or a .py file in the "
            "current directory?)",
        )
    obj: Any = module
    for i, attr in enumerate(parts[split:], start=split):
        if not hasattr(obj, attr):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(attr, names, n=1)
            hint = f"; did you mean '{'.'.join(parts[:i] + [close[0]])}'?" if close else ""
            raise source.at(path, f"cannot import '{dotted_path}': '{'.'.join(parts[:i])}' has no attribute '{attr}'{hint}")
        obj = getattr(obj, attr)
    return obj


def _signature(target: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):  # some builtins have none
        return None


def _hints(target: Any) -> dict[str, Any]:
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to the target's own checks
        return {}


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_arguments(target: Any, kwargs: dict[str, Any], source: Source, path: Path_, skip: int,
                    label: str, filled: Collection[str] = ()) -> dict[str, Any]:
    """Check keyword arguments against ``target``'s signature and type hints, before calling it.

    ``skip`` leading parameters are filled by the framework (the parameters for an optimizer,
    the optimizer for a scheduler), and so are those named in ``filled`` (a Trainer's model, data,
    ...: the config's other sections). Returns the arguments, converted where the hint says so
    (``"3e-4"`` to ``3e-4`` for a float).
    """
    sig = _signature(target)
    if sig is None:
        return kwargs
    params = [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    named = [p for p in params[skip:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in filled]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    accepted = {p.name for p in named}
    for key in kwargs:
        if key in filled:
            raise source.at(path + (key,), f"{label} gets '{key}' from the config's other sections, not as an "
                            f"argument here; remove it (it takes: {', '.join(p.name for p in named) or 'none'})")
        if key not in accepted and not takes_any:
            close = difflib.get_close_matches(key, sorted(accepted), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise source.at(path + (key,), f"{label} takes no argument '{key}'; {hint}it takes: {', '.join(p.name for p in named) or 'none'}")
    for p in named:
        if p.default is p.empty and p.name not in kwargs:
            raise source.at(path, f"{label} needs the argument '{p.name}'")
    hints = _hints(target)
    checked = dict(kwargs)
    for key, value in kwargs.items():
        hint = hints.get(key)
        if hint is None or hint is typing.Any:
            continue
        try:
            adapter = TypeAdapter(hint, config=_ARBITRARY)
        except Exception:  # a hint pydantic cannot express: leave it to the target
            continue
        try:
            converted = adapter.validate_python(value)
        except ValidationError:
            raise source.at(path + (key,), f"{label} expects {_type_name(hint)} for '{key}', found {value!r}") from None
        if isinstance(converted, (bool, int, float, str, tuple)):
            checked[key] = converted
    return checked


def bind(component: Component, source: Source, path: Path_, skip: int = 0) -> Callable[..., Any]:
    """Import and check a component now; return the call, which takes the ``skip`` leading arguments
    the framework fills (the parameters of an optimizer, the optimizer of a scheduler) and keyword
    ``defaults`` the config did not set. Nested ``{_target_: ...}`` arguments are built here."""
    target = import_target(component.target, source, path + ("_target_",))
    label = component.target
    if not callable(target):
        raise source.at(path + ("_target_",), f"'{label}' is not callable")
    kwargs = {}
    for key, value in component.kwargs.items():
        if isinstance(value, dict) and "_target_" in value:
            value = instantiate(Component.model_validate(value), source, path + (key,))
        kwargs[key] = value
    kwargs = check_arguments(target, kwargs, source, path, skip, label)

    def call(*args: Any, **defaults: Any) -> Any:
        try:
            return target(*args, **{**defaults, **kwargs})
        except Exception as exc:
            raise source.at(path, f"{label}(...) raised {type(exc).__name__}: {exc}") from exc

    return call


def instantiate(component: Component, source: Source, path: Path_, *args: Any) -> Any:
    """Import, check and call a component with ``args`` first."""
    return bind(component, source, path, len(args))(*args)
