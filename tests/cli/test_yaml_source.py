"""The YAML reader: where each value stands, overrides, and its errors."""

from pathlib import Path

import pytest

from trainer.yaml_source import ConfigError, Source, parse_scalar

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


def test_a_later_file_merges_over_and_its_values_keep_their_own_lines(source, tmp_path):
    later = tmp_path / "extra.yaml"
    later.write_text("optimizer: {lr: 1e-3, betas: [0.8, 0.9]}\ncallbacks:\n  - {_target_: trainer.EMAWeights}\n"
                     "max_steps: null\n")
    source.merge(Source.load(later))
    assert source.data == {"max_steps": None, "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3,
                                                            "betas": [0.8, 0.9]},
                           "callbacks": [{"_target_": "trainer.EMAWeights"}]}
    assert str(source.where(("optimizer", "_target_"))).endswith("cfg.yaml:3:13")  # kept from the first file
    assert str(source.where(("optimizer",))).endswith("cfg.yaml:3:3")  # the section the first file began
    assert str(source.where(("optimizer", "lr"))).endswith("extra.yaml:1:17")
    assert str(source.where(("optimizer", "betas", 1))).endswith("extra.yaml:1:36")
    assert str(source.where(("max_steps",))).endswith("extra.yaml:4:12")
    # a list replaced whole: its items are the later file's, none of the earlier's positions remain
    assert str(source.where(("callbacks", 0, "patience"))).endswith("extra.yaml:3:5")
    source.apply_override("optimizer.lr=0.5")
    assert source.data["optimizer"]["lr"] == 0.5 and source.file.endswith("cfg.yaml + " + str(later))


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


# ------------------------------------------------------------------ what the reader refuses

def load(tmp_path, text: str | bytes):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return Source.load(path)


def refused(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert str(info.value).startswith(f"{tmp_path / 'cfg.yaml'}{expected}"), str(info.value)
    return str(info.value)


@pytest.mark.parametrize("text,expected", [
    # the first alias is refused, so a billion laughs never expands (test_commands.py runs one)
    ("a: &a [1, *a]\n", ":1:11: the alias *a is not supported; write the value out in full"),  # recursive
    ("a: &a 1\nb: *a\n", ":2:4: the alias *a"),
    ("base: &base {lr: 1}\nopt:\n  <<: *base\n", ":3:7: the alias *base"),  # merge keys need an alias
])
def test_aliases_are_refused(tmp_path, text, expected):
    refused(tmp_path, text, expected)


def test_an_anchor_alone_is_harmless_and_merge_and_value_keys_are_plain_strings(tmp_path):
    assert load(tmp_path, "a: &a 1\nb: <<\nc: =\n").data == {"a": 1, "b": "<<", "c": "="}


@pytest.mark.parametrize("text,tag", [
    ("a: !foo bar\n", "!foo"),
    ("a: !foo {b: 1}\n", "!foo"),
    ("a: !!python/object:os.system {}\n", "!!python/object:os.system"),
    ("a: !!python/name:os.system\n", "!!python/name:os.system"),
    ("a: !!binary aGVsbG8=\n", "!!binary"),
    ("a: !!set {b: null}\n", "!!set"),
    ("a: !!int 3\n", "!!int"),
    ("a: !!map [1]\n", "!!map"),
    ("a: !!str {b: 1}\n", "!!str"),
    ("%TAG !e! tag:example.com,2000:\n---\na: !e!x 1\n", "tag:example.com,2000:x"),
])
def test_tags_are_refused_and_named(tmp_path, text, tag):
    line = text.count("\n", 0, text.index("a:")) + 1
    refused(tmp_path, text, f":{line}:4: the tag '{tag}' is not supported")


def test_the_plain_tags_are_read(tmp_path):
    assert load(tmp_path, "a: !!str 2024\nb: ! x\nc: !!seq [1]\nd: !!map {e: 1}\n").data == {
        "a": "2024", "b": "x", "c": [1], "d": {"e": 1}}


def test_nesting_is_bounded(tmp_path):
    assert load(tmp_path, "a: " + "[" * 99 + "]" * 99 + "\n").data["a"] is not None  # 100 levels with the top
    refused(tmp_path, "a: " + "[" * 100 + "]" * 100 + "\n", ":1:103: nested more than 100 levels deep")
    refused(tmp_path, "a: " + "[" * 5000 + "]" * 5000 + "\n", ":1:10")  # stopped by the scanner
    refused(tmp_path, "a: " + "{b: " * 5000 + "}" * 5000 + "\n", ":1:")
    refused(tmp_path, "".join(" " * i + "a:\n" for i in range(150)), ":101:101: nested more than 100 levels")


def test_the_number_of_keys_and_values_is_bounded(tmp_path):
    assert len(load(tmp_path, "a: [" + "1, " * 4996 + "1]\n").data["a"]) == 4997  # with the mapping, a, the list
    refused(tmp_path, "a: [" + "1, " * 4997 + "1]\n", ":1:14996: more than 5,000 keys and values")


def test_long_integers_are_refused_before_int_reads_them(tmp_path):
    assert load(tmp_path, f"a: {'9' * 100}\n").data["a"] == int("9" * 100)
    refused(tmp_path, f"seed: {'1' * 5000}\n", ":1:7: seed: an integer of 5,000 characters; a config's integers "
                                              "have at most 100")
    refused(tmp_path, f"a: {':'.join(['1'] * 60_000)}\n", ":1:4: a: an integer of 119,999 characters")  # base 60


def test_a_value_that_matches_a_type_but_not_its_range(tmp_path):
    refused(tmp_path, "name: 2024-13-45\n", ":1:7: name: cannot read '2024-13-45': month must be in 1..12; "
                                            "quote it to keep it a string")


@pytest.mark.parametrize("raw,expected", [
    ("name: t\n".encode("utf-16"), ": the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8"),
    ("name: t\n".encode("utf-16-be"), ":1:1: a NUL byte at byte offset 0: the file is binary or UTF-16"),
    ("name: t\n".encode("utf-32"), ": the file is UTF-32"),
    ("a: 1\nname: caf\xe9\n".encode("latin-1"),
     ":2:10: byte 0xe9 at byte offset 14 is not UTF-8; save the file as UTF-8"),
    (b"a: 1\nb: \x01\n", ":2:4: the character #x0001 is not allowed in YAML"),
])
def test_bad_encodings_name_the_file_and_the_place(tmp_path, raw, expected):
    refused(tmp_path, raw, expected)


def test_utf8_with_a_byte_order_mark_is_read(tmp_path):
    assert load(tmp_path, "\ufeffname: caf\xe9\n").data == {"name": "caf\xe9"}


def test_oversized_files_are_refused_before_parsing(tmp_path):
    assert load(tmp_path, "a: 1\n" + "#" * (256 * 1024 - 6) + "\n").data == {"a": 1}  # 256 KiB exactly
    refused(tmp_path, "a: [\n" * 300_000,
            ": the file is 1,500,000 bytes; a config may be at most 262,144 bytes (256 KiB)")


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux's /proc")
def test_a_file_that_cannot_be_read_or_never_ends():
    with pytest.raises(ConfigError, match="^/proc/self/mem: cannot read the file: Input/output error$"):
        Source.load("/proc/self/mem")
    with pytest.raises(ConfigError, match="^/dev/zero: the file is more than 262,144 bytes"):
        Source.load("/dev/zero")


@pytest.mark.parametrize("value,expected", [
    ("&a [1, *a]", "the alias *a is not supported"),
    ("!!python/object:os.system {}", "the tag '!!python/object:os.system' is not supported"),
    ("[" * 5000, "nested more than 100 levels deep"),
    ("1" * 5000, "an integer of 5,000 characters"),
    ("[" + "1, " * 5000 + "1]", "more than 5,000 keys and values"),
    ("2024-13-45", "cannot read '2024-13-45'"),
])
def test_overrides_go_through_the_same_checks(source, value, expected):
    with pytest.raises(ConfigError) as info:
        source.apply_override(f"max_steps={value}")
    assert str(info.value).startswith(f"command line 'max_steps={value}': {expected}"), str(info.value)[:200]
