"""docs/tutorial.md runs: every ``>>>`` example in it, with its printed output checked."""

import doctest
from pathlib import Path

TUTORIAL = Path(__file__).resolve().parent.parent / "docs" / "tutorial.md"


def test_tutorial_examples_run_and_print_what_the_text_says():
    result = doctest.testfile(
        str(TUTORIAL),
        module_relative=False,
        optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS,
        verbose=False,
    )
    assert result.attempted > 0, f"no examples found in {TUTORIAL}"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {TUTORIAL} failed (see above)"
