"""The docs cannot drift: every results block of README.md and docs/ is what `make docs` renders from the
recorded result files, and each names the command, commit and machine that made it."""

from __future__ import annotations

from tools import docs


def test_readme_and_docs_tables_are_what_make_docs_renders():
    assert docs.stale() == []


def test_a_retyped_figure_is_caught(tmp_path, monkeypatch):
    """Changing one digit inside a block makes the page stale: the check compares, it does not just parse."""
    pages = [p for p in docs.pages() if docs.BLOCK.search(p.read_text(encoding="utf-8"))]
    assert pages, "no results block in README.md or docs/"
    text = pages[0].read_text(encoding="utf-8")
    block = docs.BLOCK.search(text)
    body = block.group(4)
    i = next(i for i, c in enumerate(body) if c.isdigit())
    edited = text[: block.start(4) + i] + str((int(body[i]) + 1) % 10) + text[block.start(4) + i + 1:]
    assert docs.rendered(edited) != edited and docs.rendered(text) == text


def test_every_block_names_its_command_commit_and_machine():
    for page in docs.pages():
        for m in docs.BLOCK.finditer(page.read_text(encoding="utf-8")):
            last = m.group(4).rstrip().splitlines()[-1]
            # a block over several records ("a+b") says which one is missing
            missing = [n for n in m.group(2).split("+") if last == docs.NOT_RECORDED.format(name=n).rstrip()]
            if missing:
                assert not (docs.RESULTS / f"{missing[0]}.json").exists(), (page, m.group(2))
                continue
            assert last.startswith("*`") and "at commit `" in last and "-core " in last, (page, m.group(2), last)
