"""YAML config files that remember where each value stands, and ``key=value`` overrides.

Every error about a config value can then say ``config.yaml:12:7``. Torch-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(Exception):
    """A mistake in a config file or on the command line: reported in one line, exit code 2."""


@dataclass(frozen=True)
class Where:
    """Where a value came from: a file position, or a command-line override."""

    file: str
    line: int = 0  # 1-based; 0 when unknown
    column: int = 0
    override: str | None = None

    def __str__(self) -> str:
        if self.override is not None:
            return f"command line '{self.override}'"
        return f"{self.file}:{self.line}:{self.column}" if self.line else self.file


Path_ = tuple[str | int, ...]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``3e-4`` as a float (YAML 1.2), not as the string '3e-4'."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_scalar(text: str) -> Any:
    """An override's value, read as a YAML scalar (``3e-4``, ``null``, ``true``, ``[1, 2]``)."""
    try:
        return yaml.load(text, Loader=_Loader) if text != "" else ""
    except yaml.YAMLError:
        return text


class Source:
    """A config mapping plus the position of every key's value in its file."""

    def __init__(self, data: dict[str, Any], file: str, positions: dict[Path_, Where]):
        self.data = data
        self.file = file
        self.positions = positions

    @classmethod
    def load(cls, path: str | Path) -> "Source":
        path = Path(path)
        name = str(path)
        if not path.exists():
            raise ConfigError(f"{name}: config file not found")
        if path.is_dir():
            raise ConfigError(f"{name}: is a directory, expected a YAML config file")
        text = path.read_text(encoding="utf-8")
        try:
            node = yaml.compose(text, Loader=_Loader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
        if node is None:
            raise ConfigError(f"{name}: the file is empty; a config is a mapping such as 'max_steps: 100'")
        if not isinstance(node, yaml.MappingNode):
            kind = {yaml.SequenceNode: "a list", yaml.ScalarNode: "a single value"}.get(type(node), "not a mapping")
            raise ConfigError(
                f"{name}:{node.start_mark.line + 1}:{node.start_mark.column + 1}: the top level is {kind}; "
                "a config is a mapping of keys to values such as 'max_steps: 100'"
            )
        positions: dict[Path_, Where] = {}
        data = _construct(node, (), name, positions)
        return cls(data, name, positions)

    def where(self, path: Path_) -> Where:
        """The position of ``path``, or of its nearest ancestor that has one."""
        path = tuple(path)
        while path:
            if path in self.positions:
                return self.positions[path]
            path = path[:-1]
        return Where(self.file)

    def at(self, path: Path_, message: str) -> ConfigError:
        return ConfigError(f"{self.where(path)}: {dotted(path)}: {message}" if path else f"{self.file}: {message}")

    def apply_override(self, text: str) -> None:
        """Apply ``a.b.c=value``. The parent of the last key must exist (or be creatable as a section);
        whether the key itself is valid is checked with the rest of the config."""
        if "=" not in text:
            raise ConfigError(f"command line '{text}': an override is KEY=VALUE, e.g. max_steps=200 or optimizer.lr=3e-4")
        key, raw = text.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"command line '{text}': '{key}' is not a dotted key such as optimizer.lr")
        node: Any = self.data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part) if isinstance(node, dict) else None
            if child is None:
                if isinstance(node, dict) and part not in node and i == 0:
                    child = node[part] = {}  # a section the file leaves out, e.g. grad_logging
                else:
                    raise ConfigError(
                        f"command line '{text}': '{'.'.join(parts[: i + 1])}' is not a section of the config"
                    )
            node = child
        if not isinstance(node, dict):
            raise ConfigError(f"command line '{text}': '{'.'.join(parts[:-1])}' is not a section of the config")
        node[parts[-1]] = parse_scalar(raw)
        self.positions[tuple(parts)] = Where(self.file, override=text)
        for i in range(1, len(parts)):
            self.positions.setdefault(tuple(parts[:i]), Where(self.file, override=text))


def dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _construct(node: yaml.Node, path: Path_, file: str, positions: dict[Path_, Where]) -> Any:
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = _Loader.construct_scalar(_Loader(""), key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                mark = key_node.start_mark
                raise ConfigError(f"{file}:{mark.line + 1}:{mark.column + 1}: keys must be plain names")
            if key in out:
                mark = key_node.start_mark
                raise ConfigError(f"{file}:{mark.line + 1}:{mark.column + 1}: {dotted(path + (key,))}: duplicate key")
            mark = value_node.start_mark
            positions[path + (key,)] = Where(file, mark.line + 1, mark.column + 1)
            out[key] = _construct(value_node, path + (key,), file, positions)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            mark = item.start_mark
            positions[path + (i,)] = Where(file, mark.line + 1, mark.column + 1)
            items.append(_construct(item, path + (i,), file, positions))
        return items
    loader = _Loader("")
    return loader.construct_object(node, deep=True)
