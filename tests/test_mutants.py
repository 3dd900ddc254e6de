"""The mutation check counts a mutant as caught only when an assertion fails: a mutant that merely makes the
tests crash shows they run the line, not that they check it."""

from __future__ import annotations

import pytest

from tools import mutants


@pytest.mark.parametrize("body, state", [
    ("assert 1 + 1 == 2", "passed"),
    ("assert 1 + 1 == 3", "killed"),
    ("import pytest\n    pytest.fail('a refusal was expected')", "killed"),
    ("import pytest\n    with pytest.raises(ValueError):\n        pass", "killed"),
    ("undefined_name()", "crashed"),
])
def test_outcome_tells_an_assertion_from_a_crash(tmp_path, body, state):
    (tmp_path / "test_x.py").write_text(f"def test_x():\n    {body}\n")
    assert mutants.outcome(tmp_path, ["test_x.py"]) == state
