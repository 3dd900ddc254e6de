"""The report (report.py, after evaluate.py), on hand-made inputs (no pipeline run): a self-contained HTML page,
runs without ground truth, re-rendering without the model, ground-truth fields of the wrong type refused, and the
proponent categories' shares (or the note that there are none)."""

from __future__ import annotations

import base64
import json
import re

import pytest
from conftest import write_jsonl
from typer.testing import CliRunner

import evaluate
import query
import report
import trackstar as ts

DOCS = [
    ("d0", "The capital of France is Paris.", ["f0"]),
    ("d1", "Rome is the capital of Italy, a country in southern Europe.", ["f1"]),
    ("d2", "Paris is known for the Eiffel Tower.", []),
    ("d3", "Madrid is in Spain and it is large.", ["f2"]),
    ("d4", "The quick brown fox jumps over the lazy dog.", []),
    ("d5", "Tokyo is the capital of Japan.", ["f3"]),
]
QUERIES = [
    {"id": "q0", "prompt": "The capital of France is", "target": " Paris", "fact": "f0"},
    {"id": "q1", "prompt": "Rome is the capital of", "target": " Italy", "fact": "f1"},
]
METHODS = {"alpha": ["d0", "d2", "d4"], "beta": ["d2", "d1", "d0"]}  # each method's ranking, for every query


def ranked(ids: list[str]) -> list[dict]:
    text = {d: t for d, t, _ in DOCS}
    return [{"id": i, "score": 1.0 - 0.1 * r, "text": text[i]} for r, i in enumerate(ids)]


def make_inputs(tmp_path, truth: bool = True):
    """corpus.jsonl, queries.jsonl and RUN/proponents-<method>.jsonl as query.py would write them."""
    docs = [{"id": i, "text": t, **({"facts": f} if truth else {})} for i, t, f in DOCS]
    queries = [q if truth else {k: v for k, v in q.items() if k != "fact"} for q in QUERIES]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    qfile = write_jsonl(tmp_path / "queries.jsonl", queries)
    run = tmp_path / "run"
    run.mkdir()
    for m, ids in METHODS.items():
        made = query.made_by(m, 3, None, qfile, ts.data_digest(qfile))
        write_jsonl(run / f"proponents-{m}.jsonl", [
            {"query_id": q["id"], "proponents": ranked(ids), "opponents": ranked(["d4", "d3"])[::-1],
             "made_by": made} for q in QUERIES])
    return run, corpus, qfile


def evaluate_cli(run, corpus, queries, model, *extra: str):
    """evaluate.py, then (when it succeeds) report.py, as `make all` runs them."""
    args = ["--run", str(run), "--model", str(model), "--corpus", str(corpus), "--queries", str(queries),
            "--methods", ",".join(METHODS), "--lr", "1e-3", "--k", "3", "--device", "cpu", *extra]
    r = CliRunner().invoke(evaluate.app, args)
    return report_cli(run, corpus, queries) if r.exit_code == 0 else r


def report_cli(run, corpus, queries):
    return CliRunner().invoke(report.app, ["--run", str(run), "--corpus", str(corpus), "--queries", str(queries)])


def test_report_is_one_page_of_tables_inline_charts_and_marked_proponents(tmp_path, model_dir):
    """With ground truth: real <table>s (no <pre> dump of results.md), every figure an inline PNG that decodes,
    the query's target (and subject) marked in a proponent's text, and proponents stating the fact marked as hits."""
    run, corpus, queries = make_inputs(tmp_path)
    r = evaluate_cli(run, corpus, queries, model_dir)
    assert r.exit_code == 0, r.output + repr(r.exception)
    page = (run / "report.html").read_text()
    assert "<table" in page and "<pre" not in page and "| ---" not in page
    pngs = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert pngs and all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "<td>The capital of <mark class='subj'>France</mark> is <mark>Paris</mark>.</td>" in page
    assert "<tr class='hit'>" in page
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page), "the page must not load anything from outside"
    results = json.loads((run / "results.json").read_text())
    assert results["settings"]["methods"] == ["alpha", "beta", "truth"]
    assert results["summary"]["alpha"]["mrr"] == 0.5  # q0 finds d0 at rank 1, q1 never finds d1


def test_without_ground_truth_the_run_succeeds_and_says_so(tmp_path, model_dir):
    """No `fact` / `facts` anywhere: exit 0, MRR and recall null (not 0, not NaN) for every method, no
    ground-truth row, both reports say so, and tail-patch and the proponents are still there."""
    run, corpus, queries = make_inputs(tmp_path, truth=False)
    r = evaluate_cli(run, corpus, queries, model_dir)
    assert r.exit_code == 0, r.output + repr(r.exception)
    text = (run / "results.json").read_text()
    assert "NaN" not in text
    results = json.loads(text)
    assert results["settings"]["methods"] == ["alpha", "beta"] and results["settings"]["attribution_queries"] == 0
    for m in ("alpha", "beta"):
        assert results["summary"][m]["mrr"] is None and results["summary"][m]["recall"] is None
        assert all(v is None for v in results["per_query"][m]["mrr"])
        assert results["summary"][m]["dp"] is not None
    md, page = (run / "results.md").read_text(), (run / "report.html").read_text()
    for doc in (md, page):
        assert "no ground truth" in doc.lower() and "n/a" in doc
    assert "Ground truth" not in md
    assert "d4" in page and "Opponents of beta" in page and "The quick brown fox" in page


def test_some_queries_without_a_fact_are_scored_over_the_rest(tmp_path, model_dir):
    """Only q0 has a `fact`: MRR is over that one query (q1's is null), and the report says 1 of 2."""
    run, corpus, queries = make_inputs(tmp_path)
    write_jsonl(queries, [QUERIES[0], {k: v for k, v in QUERIES[1].items() if k != "fact"}])
    assert evaluate_cli(run, corpus, queries, model_dir).exit_code == 0
    results = json.loads((run / "results.json").read_text())
    assert results["per_query"]["alpha"]["mrr"] == [1.0, None] and results["summary"]["alpha"]["mrr"] == 1.0
    assert "1 of 2 queries" in (run / "results.md").read_text()


def test_report_rerenders_without_the_model(tmp_path, model_dir, monkeypatch):
    """report.py rebuilds results.md (identical) and report.html from results.json, never loading a model,
    and picks up a sweep's figures and notes written since."""
    run, corpus, queries = make_inputs(tmp_path)
    assert evaluate_cli(run, corpus, queries, model_dir).exit_code == 0
    md = (run / "results.md").read_text()
    (run / "results.md").unlink()
    (run / "report.html").unlink()
    (run / "sweep").mkdir()
    (run / "sweep" / "lam.png").write_bytes(tiny_png())
    (run / "sweep" / "sweep.md").write_text("# Sweep of λ\n\nOne run per λ.\n\n| λ | MRR |\n| --- | ---: |\n"
                                            "| 0.9 | 0.5 |\n")

    def no_model(*a, **kw):
        raise AssertionError("report.py loaded the model")

    monkeypatch.setattr(ts, "load_model", no_model)
    r = report_cli(run, corpus, queries)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert (run / "results.md").read_text() == md
    page = (run / "report.html").read_text()
    assert "<h3>Sweep of λ</h3>" in page and "<td class='num'>0.5</td>" in page and 'alt="lam"' in page


def tiny_png() -> bytes:
    """A figure as the sweep stage would save one."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.subplots().plot([0, 1])
    return report.figure_png(fig)


@pytest.mark.parametrize(("where", "bad"), [("corpus", "f1"), ("queries", ["f1"])])
def test_ground_truth_of_the_wrong_type_is_refused_at_its_line(tmp_path, model_dir, where, bad):
    """`facts` as a string (not a list), or `fact` as a list (not a string), is an error naming file and line."""
    run, corpus, queries = make_inputs(tmp_path)
    path = corpus if where == "corpus" else queries
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["facts" if where == "corpus" else "fact"] = bad
    write_jsonl(path, rows)
    r = evaluate_cli(run, corpus, queries, model_dir)
    assert isinstance(r.exception, ts.TrackStarError)
    assert f"{path}:2:" in str(r.exception) and ("'facts'" if where == "corpus" else "'fact'") in str(r.exception)


CATEGORY_QUERIES = [
    {"id": "q0", "prompt": "The capital of France is", "target": " Paris", "fact": "f0", "subject": "France",
     "relation": "capital", "relation_templates": ["The capital of [X] is [Y]."]},
    {"id": "q1", "prompt": "Rome is the capital of", "target": " Italy", "fact": "f1", "subject": "Rome",
     "relation": "capital-of", "relation_templates": ["[X] is the capital of [Y].", "The capital of [Y] is [X]."]},
]


def test_shares_sum_to_one_per_method_and_show_in_both_reports(tmp_path, model_dir):
    """evaluate.py on the report tests' inputs with categorised queries: per-query categories as counted by hand,
    shares summing to 1 for every method in every split with queries, the table in results.md and report.html,
    a stacked-bar chart, and each proponent's category beside it in the per-query view; report.py renders
    the same results.md from results.json (whose keys are sorted: the rows keep the order of --methods)."""
    run_dir, corpus, queries = make_inputs(tmp_path)
    write_jsonl(queries, CATEGORY_QUERIES)
    r = evaluate_cli(run_dir, corpus, queries, model_dir, "--methods", "beta,alpha")
    assert r.exit_code == 0, r.output + repr(r.exception)
    results = json.loads((run_dir / "results.json").read_text())
    # alpha ranks d0, d2, d4 for both queries (METHODS)
    assert results["per_query"]["alpha"]["categories"] == [["fact", "object", "none"], ["relation", "none", "none"]]
    cat = results["categories"]
    assert cat["queries"] == 2 and cat["without_fact"] == 0 and "truth" not in cat["shares"]["All queries"]
    assert cat["shares"]["All queries"]["alpha"]["none"] == pytest.approx(3 / 6)
    for title, by_method in cat["shares"].items():
        for m, shares in by_method.items():
            if cat["split_queries"][title]:
                assert sum(shares.values()) == pytest.approx(1.0), (title, m)
            else:
                assert shares is None
    md, page = (run_dir / "results.md").read_text(), (run_dir / "report.html").read_text()
    assert "## Proponent categories" in md and "| method | fact | subject+object | relation |" in md
    assert "<th>subject+object</th>" in page and 'alt="proponent category shares' in page
    assert "<td class='cat'>relation</td>" in page
    categories = md[md.index("## Proponent categories"):]
    assert categories.index("| beta |") < categories.index("| alpha |")
    assert report_cli(run_dir, corpus, queries).exit_code == 0
    assert (run_dir / "results.md").read_text() == md


def test_without_the_fields_the_reports_say_categories_were_not_computed(tmp_path, model_dir):
    run_dir, corpus, queries = make_inputs(tmp_path)
    assert evaluate_cli(run_dir, corpus, queries, model_dir).exit_code == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["categories"] is None
    assert all(c is None for c in results["per_query"]["alpha"]["categories"])
    for name in ("results.md", "report.html"):
        assert "Not computed: no query carries" in (run_dir / name).read_text()
    assert "<td class='cat'>" not in (run_dir / "report.html").read_text()
