"""The project speaks of the toolkit, never of how it was made: no tracked text file (README, docs, code,
comments, tests) refers to the steps, sessions, people or tickets that produced it. Each hit is named
file:line so it can be reworded."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve().relative_to(ROOT).as_posix()  # its patterns are the only allowed hits

# Whole words, any case. Each names the making of the project rather than the project.
PATTERNS = (
    r"this stop", r"previous stop", r"last stop", r"two stops ago", r"this session",
    r"helper-\d", r"helper \d", r"issue \d+", r"the team", r"the issue's",
)
VOICE = re.compile(r"\b(?:" + "|".join(PATTERNS) + r")\b", re.IGNORECASE)


def hits(text: str) -> list[tuple[int, str]]:
    """(line number, the matched words) for every match in `text`."""
    return [(n, m.group(0)) for n, line in enumerate(text.splitlines(), 1) for m in VOICE.finditer(line)]


def tracked_text_files() -> list[Path]:
    """Every regular file git tracks that reads as UTF-8 text (no NUL byte), this test's own file excepted."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    files = []
    for name in out.decode().split("\0"):
        path = ROOT / name
        if not name or name == SELF or path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def test_no_tracked_file_speaks_of_how_the_project_was_made():
    found = [f"{p.relative_to(ROOT)}:{n}: {words!r}"
             for p in tracked_text_files() for n, words in hits(p.read_text(encoding="utf-8"))]
    assert not found, "words about the making of the project, not the toolkit:\n" + "\n".join(found)


def test_the_patterns_catch_each_phrase_and_only_whole_words():
    """The check can fail: every phrase is caught in any case, and words that merely contain one are not."""
    bad = ["Measured This Stop.", "as the previous stop did", "the last stop's run", "two stops ago",
           "in this session", "helper-3 wrote it", "helper 2", "see issue 12", "The team chose", "the issue's axis"]
    assert [len(hits(line)) for line in bad] == [1] * len(bad)
    good = ["a non-stop scan", "tissue 3 is not an issue", "the teams", "stopping rule", "this stopwatch",
            "issue: none", "helpers 2"]
    assert [hits(line) for line in good] == [[]] * len(good)
    assert hits("ok\nsee Issue 4 and the team\n") == [(2, "Issue 4"), (2, "the team")]
