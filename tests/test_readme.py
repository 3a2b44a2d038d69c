"""The README's first two commands are what a newcomer runs on a fresh machine: they must stay the
ones CI runs and say where the tests' pytest comes from."""

import re

from helpers import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def commands() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", README, re.S)


def test_the_first_command_installs_and_trains_the_quickstart_model():
    first = commands()[0]
    assert first.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install ")
    assert first.endswith("&& trainer run configs/quickstart.yaml")
    assert "configs/quickstart.yaml" in {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").iterdir()}


def test_the_second_command_is_the_one_ci_runs_word_for_word():
    second = commands()[1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert second.endswith(ci) and ci.endswith("&& pytest") and "'.[test]'" in ci


def test_after_the_commands_the_readme_says_which_pytest_runs_the_tests():
    # The first command installs no pytest: a bare `pytest` after it is the system's, without torch.
    after = README.split(commands()[1], 1)[1].split("\n## ", 1)[0]
    assert "The first command installs no\npytest" in after and "pip install -e '.[test]'" in after
