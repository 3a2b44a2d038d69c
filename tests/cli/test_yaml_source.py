"""The YAML reader: where each value stands, overrides, and its errors."""

import pytest

from trainer.cli.yaml_source import ConfigError, Source, parse_scalar

TEXT = """\
max_steps: 10
optimizer:
  _target_: torch.optim.AdamW
  lr: 3e-4
callbacks:
  - {_target_: trainer.EarlyStopping, patience: 2}
"""
PATIENCE = TEXT.splitlines()[5].index("2}") + 1  # column of the patience value


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(TEXT)
    return Source.load(path)


def test_every_value_knows_its_line_and_column(source):
    assert str(source.where(("max_steps",))).endswith("cfg.yaml:1:12")
    assert str(source.where(("optimizer", "lr"))).endswith("cfg.yaml:4:7")
    assert str(source.where(("callbacks", 0))).endswith("cfg.yaml:6:5")
    assert str(source.where(("callbacks", 0, "patience"))).endswith(f"cfg.yaml:6:{PATIENCE}")
    assert str(source.where(("optimizer", "nothing"))).endswith("cfg.yaml:3:3")  # the nearest ancestor


def test_exponents_without_a_dot_are_floats(source):
    assert source.data["optimizer"]["lr"] == 3e-4


def test_an_error_names_the_place_and_the_dotted_key(source):
    message = str(source.at(("callbacks", 0, "patience"), "too small"))
    assert message.endswith(f"cfg.yaml:6:{PATIENCE}: callbacks[0].patience: too small")


def test_overrides_are_yaml_scalars_and_remember_the_command_line(source):
    source.apply_override("optimizer.lr=1e-3")
    source.apply_override("grad_logging.every_n_steps=5")  # a section the file leaves out
    source.apply_override("max_steps=null")
    assert source.data["optimizer"]["lr"] == 1e-3 and source.data["max_steps"] is None
    assert source.data["grad_logging"] == {"every_n_steps": 5}
    assert str(source.where(("optimizer", "lr"))) == "command line 'optimizer.lr=1e-3'"
    assert parse_scalar("[1, 2]") == [1, 2] and parse_scalar("") == "" and parse_scalar("a: b: c") == "a: b: c"


@pytest.mark.parametrize("text,expected", [
    ("max_steps", "an override is KEY=VALUE"),
    ("optimizer..lr=1", "is not a dotted key"),
    ("max_steps.x=1", "'max_steps' is not a section"),
    ("nothing.deep.x=1", "'nothing.deep' is not a section"),
])
def test_bad_overrides(source, text, expected):
    with pytest.raises(ConfigError, match=expected):
        source.apply_override(text)


@pytest.mark.parametrize("text,expected", [
    ("a: [1, 2\n", "cfg.yaml:2:1: YAML syntax error"),
    ("", "the file is empty"),
    ("- a\n", "cfg.yaml:1:1: the top level is a list"),
    ("a: 1\na: 2\n", "cfg.yaml:2:1: a: duplicate key"),
    ("[1]: 2\n", "cfg.yaml:1:1: keys must be plain names"),
])
def test_file_errors(tmp_path, text, expected):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
        Source.load(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        Source.load(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        Source.load(tmp_path)
