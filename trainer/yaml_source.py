"""YAML config files that remember where each value stands, merged one over another, and
``key=value`` overrides.

Every error about a config value can then say ``config.yaml:12:7``. Torch-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

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


# Limits on what a config may be. Configs are written by hand and hold tens of values (the shipped
# ones are under 1 KiB and 40 values); PyYAML parses in pure Python at about 1 MiB and 10,000
# values a second, so these bound the worst file to half a second and a few MB.
MAX_BYTES = 256 * 1024
MAX_VALUES = 5_000  # nodes: keys count too
MAX_DEPTH = 100  # deeper nesting would also exhaust the recursion of composing and validating
MAX_INT_CHARS = 100  # 2**64 has 20 digits; longer literals are slow (or refused) for int() to read

_TAG = "tag:yaml.org,2002:"
# The tags a config may write explicitly: '!!str' to keep a value a string (name: !!str 2024), and
# the default tag of each kind of node. Any other tag asks for a constructor a config has no use for.
_EXPLICIT_TAGS = {
    yaml.ScalarEvent: ("!", _TAG + "str"),
    yaml.SequenceStartEvent: ("!", _TAG + "seq"),
    yaml.MappingStartEvent: ("!", _TAG + "map"),
}
_BYTE_ORDER_MARKS = [  # UTF-32 first: its little-endian mark begins with UTF-16's
    (b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"),
]


class _Refused(Exception):
    """Something the reader will not read, at ``mark`` (a yaml Mark, or None)."""

    def __init__(self, message: str, mark: Any = None):
        super().__init__(message)
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``3e-4`` as a float (YAML 1.2), not as the string '3e-4', and that
    refuses, while composing and so before anything is built, what a config has no use for.

    Aliases are refused outright rather than counted: an alias repeats a node without repeating its
    text, so 800 bytes of nested aliases stand for a billion values (and a recursive one for an
    infinite value); no shipped config uses one; and a value reached through an alias would carry
    its anchor's line, so its errors would point at the wrong place."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._values = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(f"the alias *{event.anchor} is not supported; write the value out in full",
                           event.start_mark)
        if event.tag is not None and event.tag not in _EXPLICIT_TAGS[type(event)]:
            tag = "!!" + event.tag.removeprefix(_TAG) if event.tag.startswith(_TAG) else event.tag
            raise _Refused(f"the tag '{tag}' is not supported; a config holds plain strings, numbers, booleans, "
                           "null, lists and mappings: remove the tag", event.start_mark)
        self._values += 1
        if self._values > MAX_VALUES:
            raise _Refused(f"more than {MAX_VALUES:,} keys and values; a config may hold at most {MAX_VALUES:,}",
                           event.start_mark)
        nests = not isinstance(event, yaml.ScalarEvent)
        self._depth += nests
        if self._depth > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep; a config may nest at most {MAX_DEPTH}",
                           event.start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= nests

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        # The scanner reads up to 1,024 characters past an opening bracket, at a cost that grows with
        # the number open: refuse deep [[[[ here, before the composer would see the 101st level.
        if self.flow_level >= MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep; a config may nest at most {MAX_DEPTH}",
                           self.get_mark())
        super().fetch_flow_collection_start(TokenClass)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
# YAML 1.1's merge key '<<' and value key '=' have no use without aliases: both are plain strings.
_Loader.add_constructor(_TAG + "merge", yaml.SafeLoader.construct_yaml_str)
_Loader.add_constructor(_TAG + "value", yaml.SafeLoader.construct_yaml_str)


def _position(text: str | bytes, offset: int) -> tuple[int, int]:
    """1-based line and column of ``offset`` in ``text``."""
    newline = "\n" if isinstance(text, str) else b"\n"
    return text.count(newline, 0, offset) + 1, offset - (text.rfind(newline, 0, offset) + 1) + 1


def _decode(raw: bytes, name: str) -> str:
    for mark, encoding in _BYTE_ORDER_MARKS:
        if raw.startswith(mark):
            raise ConfigError(f"{name}: the file is {encoding} (it starts with a {encoding} byte-order mark); "
                              "save it as UTF-8")
    # ASCII text in UTF-16 without a byte-order mark is valid UTF-8 with a NUL after every letter
    nul = raw.find(b"\0")
    if nul >= 0:
        line, column = _position(raw, nul)
        raise ConfigError(f"{name}:{line}:{column}: a NUL byte at byte offset {nul}: the file is binary or UTF-16, "
                          "not UTF-8 text; save it as UTF-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, column = _position(raw, exc.start)
        raise ConfigError(f"{name}:{line}:{column}: byte 0x{raw[exc.start]:02x} at byte offset {exc.start} is not "
                          "UTF-8; save the file as UTF-8") from None


def _compose(text: str) -> yaml.Node | None:
    """The node tree of ``text``; raises yaml.YAMLError (a syntax error) or _Refused."""
    try:
        return yaml.compose(text, Loader=_Loader)
    except yaml.reader.ReaderError as exc:  # a control character: PyYAML gives its offset, not its line
        line, column = _position(text, exc.position)
        raise _Refused(f"the character #x{exc.character:04x} is not allowed in YAML; remove it",
                       yaml.Mark("", exc.position, line - 1, column - 1, None, None)) from None


def _at(name: str, mark: Any) -> str:
    return f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name


def parse_scalar(text: str) -> Any:
    """An override's value, read as a YAML scalar (``3e-4``, ``null``, ``true``, ``[1, 2]``); text that
    is not valid YAML is the string itself. What a config file may not hold raises ConfigError."""
    if text == "":
        return ""
    try:
        node = _compose(text)
        return _construct(node, (), "command line", {}) if node is not None else None
    except yaml.YAMLError:
        return text
    except _Refused as exc:
        raise ConfigError(str(exc)) from None


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
        try:
            with path.open("rb") as file:
                raw = file.read(MAX_BYTES + 1)  # no further: the path may be a device or a pipe
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read the file: {exc.strerror or exc}") from None
        if len(raw) > MAX_BYTES:
            size = path.stat().st_size if path.is_file() else 0
            size_text = f"{size:,} bytes" if size > MAX_BYTES else f"more than {MAX_BYTES:,} bytes"
            raise ConfigError(f"{name}: the file is {size_text}; a config may be at most {MAX_BYTES:,} bytes "
                              f"({MAX_BYTES // 1024} KiB)")
        text = _decode(raw, name)
        try:
            node = _compose(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"{_at(name, mark)}: YAML syntax error: {problem}") from None
        except _Refused as exc:
            raise ConfigError(f"{_at(name, exc.mark)}: {exc}") from None
        if node is None:
            raise ConfigError(f"{name}: the file is empty; a config is a mapping such as 'max_steps: 100'")
        if not isinstance(node, yaml.MappingNode):
            kind = {yaml.SequenceNode: "a list", yaml.ScalarNode: "a single value"}.get(type(node), "not a mapping")
            raise ConfigError(
                f"{name}:{node.start_mark.line + 1}:{node.start_mark.column + 1}: the top level is {kind}; "
                "a config is a mapping of keys to values such as 'max_steps: 100'"
            )
        positions: dict[Path_, Where] = {}
        try:
            data = _construct(node, (), name, positions)
        except _Refused as exc:
            raise ConfigError(f"{_at(name, exc.mark)}: {exc}") from None
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

    def merge(self, later: "Source") -> None:
        """Merge ``later``, a config file given after this one, over it: mappings key by key at any
        depth; any other value (a list, null) replaces the earlier one whole, and its errors then
        point at ``later``'s lines."""
        replaced: set[Path_] = set()
        _merge(self.data, later.data, (), replaced)

        def is_replaced(path: Path_) -> bool:
            return any(path[:i] in replaced for i in range(1, len(path) + 1))

        self.positions = {path: where for path, where in self.positions.items() if not is_replaced(path)}
        self.positions.update((path, where) for path, where in later.positions.items() if is_replaced(path))
        self.file = f"{self.file} + {later.file}"

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
        try:
            node[parts[-1]] = parse_scalar(raw)
        except ConfigError as exc:
            raise ConfigError(f"command line '{text}': {exc}") from None
        self.positions[tuple(parts)] = Where(self.file, override=text)
        for i in range(1, len(parts)):
            self.positions.setdefault(tuple(parts[:i]), Where(self.file, override=text))


def load(files: Sequence[str | Path], overrides: Sequence[str] = ()) -> Source:
    """The config of ``files``, each merged over those before it, then ``overrides`` applied in turn."""
    source = Source.load(files[0])
    for path in files[1:]:
        source.merge(Source.load(path))
    for text in overrides:
        source.apply_override(text)
    return source


def _merge(data: dict[str, Any], later: dict[str, Any], path: Path_, replaced: set[Path_]) -> None:
    for key, value in later.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            _merge(data[key], value, path + (key,), replaced)
        else:
            data[key] = value
            replaced.add(path + (key,))


def dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _construct(node: yaml.Node, path: Path_, file: str, positions: dict[Path_, Where]) -> Any:
    """The value of ``node``, recording each key's and item's position; raises _Refused."""
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = _Loader.construct_scalar(_Loader(""), key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                raise _Refused("keys must be plain names", key_node.start_mark)
            if key in out:
                raise _Refused(f"{dotted(path + (key,))}: duplicate key", key_node.start_mark)
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
    where = f"{dotted(path)}: " if path else ""
    if node.tag == _TAG + "int" and len(node.value) > MAX_INT_CHARS:
        # int() of a long decimal is refused past 4,300 digits, and of a long 1:2:3 (base 60) is slow
        raise _Refused(f"{where}an integer of {len(node.value):,} characters; a config's integers have at most "
                       f"{MAX_INT_CHARS}", node.start_mark)
    try:
        return _Loader("").construct_object(node, deep=True)
    except ValueError as exc:  # a plain value that matches a type's pattern but not its range: 2024-13-45
        raise _Refused(f"{where}cannot read {node.value!r}: {exc}; quote it to keep it a string",
                       node.start_mark) from None
