"""`make all MODEL=... CORPUS=...` on a user's own model and data, as written in README: without queries it
ends in an index ready for ad-hoc questions; with queries that carry no ground truth it ends in a report."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT, write_jsonl


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(ROOT), *args, f"PY={sys.executable}"], capture_output=True, text=True)


@pytest.fixture(scope="module")
def corpus_only(model_dir, tmp_path_factory):
    """make all MODEL= CORPUS= (no QUERIES): the corpus encoded and an R_train index built."""
    tmp = tmp_path_factory.mktemp("custom")
    corpus = write_jsonl(tmp / "corpus.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate([
        "The capital of France is Paris.", "Rome is the capital of Italy.", "Madrid is in Spain.",
        "Tokyo is the capital of Japan.", "Paris is known for the Eiffel Tower.", "Berlin is in Germany.",
        "The quick brown fox jumps over the lazy dog.", "Lisbon is the capital of Portugal."] * 3)])
    run = tmp / "run"
    r = make("all", f"MODEL={model_dir}", f"CORPUS={corpus}", f"RUN={run}", "DIM=64")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run, corpus, r.stdout


def ask(index, prompt: str, target: str) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "query.py"), "--index", str(index), "--prompt", prompt,
                        "--target", target, "--k", "5"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.slow
def test_corpus_without_queries_ends_in_an_index_that_answers_the_printed_question(corpus_only):
    run, _, stdout = corpus_only
    assert (run / "index-corpus" / "index.h5").exists() and not (run / "results.md").exists()
    printed = re.search(r"query\.py --index (\S+) --prompt (\".*?\") --target (\".*?\")", stdout)
    assert printed, stdout
    out = ask(printed.group(1), json.loads(printed.group(2)), json.loads(printed.group(3)))
    assert "proponents" in out and "opponents" in out


@pytest.mark.slow
def test_ad_hoc_answer_equals_the_queries_file_answer(corpus_only, model_dir, tmp_path):
    """The same query asked ad hoc and through an encoded queries file gets the same proponents and scores."""
    run, _, _ = corpus_only
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": "q0", "prompt": "The capital of Italy is", "target": " Rome"}])
    meta = json.loads((run / "corpus" / "meta.json").read_text())
    subprocess.run([sys.executable, str(ROOT / "encode.py"), "queries", "--model", str(model_dir), "--data",
                    str(queries), "--out", str(tmp_path / "qrun"), "--dim", str(meta["dim"]), "--also-uncorrected",
                    "--token-budget", str(meta["token_budget"])], check=True, capture_output=True)
    subprocess.run([sys.executable, str(ROOT / "query.py"), "--index", str(run / "index-corpus"), "--queries",
                    str(tmp_path / "qrun"), "--out", str(tmp_path / "p.jsonl"), "--k", "5"], check=True,
                   capture_output=True)
    from_file = json.loads((tmp_path / "p.jsonl").read_text())["proponents"]
    table = ask(run / "index-corpus", "The capital of Italy is", " Rome")
    rows = re.findall(r"^\s+(\d+)\s+(\S+)\s+(d\d+)\s", table.split("opponents")[0], re.M)
    assert [r[2] for r in rows] == [p["id"] for p in from_file]
    assert [float(r[1]) for r in rows] == pytest.approx([p["score"] for p in from_file], rel=1e-3)


@pytest.mark.slow
def test_queries_without_facts_end_in_a_report(corpus_only, model_dir, tmp_path):
    run, corpus, _ = corpus_only
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": f"q{i}", "prompt": p, "target": t} for i, (p, t) in enumerate(
        [("The capital of Italy is", " Rome"), ("Madrid is in", " Spain"), ("Tokyo is the capital of", " Japan")])])
    r = make("all", f"MODEL={model_dir}", f"CORPUS={corpus}", f"QUERIES={queries}", f"RUN={run}", "DIM=64",
             "LR=1e-3")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "encode corpus" not in r.stderr, "the corpus was encoded again"
    results = json.loads((run / "results.json").read_text())
    assert all(results["summary"][m]["mrr"] is None for m in results["summary"])
    assert (run / "report.html").exists()


@pytest.mark.parametrize("args, missing", [(["MODEL=m"], "CORPUS="), (["CORPUS=c.jsonl"], "MODEL="),
                                           (["QUERIES=q.jsonl"], "MODEL=")])
def test_a_missing_make_variable_is_one_line_naming_it(args, missing):
    r = make("all", *args)
    assert r.returncode != 0 and missing in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1, r.stderr
