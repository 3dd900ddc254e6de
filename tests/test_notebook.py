"""query.open_index from a notebook: two questions in one open give what the command line gives (ids and
scores) for a gradient index, a dense index and BM25, with the model loaded once; another model is refused
naming both fingerprints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import CORPUS, ROOT, write_jsonl
from test_dense import save_bert
from typer.testing import CliRunner

import index as index_cli
import query
import trackstar as ts

FACTS = {0: ["f0"], 1: ["f1"], 6: ["f0"]}  # "The capital of France is Paris.", "Rome is the capital of Italy..."
QUESTIONS = [("The capital of France is", " Paris", "f0"), ("Rome is the capital of", " Italy", "f1")]


def invoke(app, *args) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, f"{r.output}\n{r.exception!r}"
    return r.output


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def printed_proponents(output: str) -> list[tuple[str, str]]:
    """(id, score as printed) of the CLI's ad-hoc proponents table."""
    lines = output.split("opponents")[0].splitlines()
    return [(line.split()[2], line.split()[1]) for line in lines if line.strip()[:1].isdigit()]


@pytest.fixture()
def data(tmp_path):
    """A corpus with ground truth for two facts, and the two questions as a queries file."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": f"d{i}", "text": CORPUS[i % len(CORPUS)] + f" Number {i}.",
                                                      **({"facts": FACTS[i]} if i in FACTS else {})}
                                                     for i in range(16)])
    queries = write_jsonl(tmp_path / "queries.jsonl", [{"id": f"q{j}", "prompt": p, "target": t, "fact": f}
                                                       for j, (p, t, f) in enumerate(QUESTIONS)])
    return corpus, queries


@pytest.fixture()
def gradient_index(model_dir, data, tmp_path):
    """Corpus and queries encoded, an index of both, and the queries file's proponents (exact scores)."""
    corpus, queries = data
    for kind, path in (("corpus", corpus), ("queries", queries)):
        r = subprocess.run([sys.executable, str(ROOT / "encode.py"), kind, "--model", str(model_dir), "--data",
                            str(path), "--out", str(tmp_path / kind), "--dim", "64"], cwd=ROOT, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    invoke(index_cli.app, "--corpus", tmp_path / "corpus", "--queries", tmp_path / "queries", "--out",
           tmp_path / "index", "--dtype", "float32")
    invoke(query.app, "--index", tmp_path / "index", "--queries", tmp_path / "queries", "--out",
           tmp_path / "p.jsonl", "--k", "5", "--device", "cpu")
    return tmp_path / "index", read_jsonl(tmp_path / "p.jsonl")


def same_as_file(answers: list[list[dict]], file_rows: list[dict], exact: bool = True) -> None:
    """Each answer is the queries file's proponents for that question: ids, texts, and scores (bit for bit, or to
    float32 round-off: a query encoded alone is not bit-identical to one encoded in a batch, and the round-off of
    a dot product scales with the vectors' norms, so with the largest score rather than with each score)."""
    for got, row in zip(answers, file_rows, strict=True):
        assert [(d["id"], d["text"]) for d in got] == [(p["id"], p["text"]) for p in row["proponents"]]
        want = [p["score"] for p in row["proponents"]]
        round_off = 1e-4 * max(abs(w) for w in want)
        assert [d["score"] for d in got] == (want if exact else pytest.approx(want, rel=0, abs=round_off))


def cli_adhoc(monkeypatch, *args) -> tuple[list[tuple[str, str]], tuple]:
    """`query.py --prompt P --target T ...`: its printed proponents (id, score as printed) and the exact result
    it printed them from (scores and corpus rows)."""
    seen = []
    printer = query.print_adhoc
    monkeypatch.setattr(query, "print_adhoc", lambda *a: seen.append(a[3]) or printer(*a))
    return printed_proponents(invoke(query.app, *args)), seen[-1]


def same_as_adhoc(got: list[dict], shown: list[tuple[str, str]], result: tuple) -> None:
    """An answer is the CLI's ad-hoc answer: the printed table, and the scores it printed, bit for bit."""
    assert shown == [(d["id"], f"{d['score']:.4g}") for d in got]
    assert [d["score"] for d in got] == [float(x) for x in result[0][0]]


def test_two_questions_in_one_open_equal_the_cli_and_load_the_model_once(gradient_index, monkeypatch):
    """A gradient index: two questions, one model load; each answer is the CLI's ad-hoc answer (which loads the
    model afresh) bit for bit, and the queries file's lists; `states_fact` is the corpus's ground truth for the
    question's fact, and absent without one."""
    index, file_rows = gradient_index
    loads = []
    real_load = ts.load_model
    monkeypatch.setattr(ts, "load_model", lambda *a, **kw: loads.append(a) or real_load(*a, **kw))
    ix = query.open_index(index, device="cpu")
    answers = [ix.ask(p, t, k=5, fact=f) for p, t, f in QUESTIONS]
    assert len(loads) == 1 and ix.method == "trackstar"
    same_as_file(answers, file_rows, exact=False)
    for (p, t, f), got in zip(QUESTIONS, answers, strict=True):
        same_as_adhoc(got, *cli_adhoc(monkeypatch, "--index", index, "--prompt", p, "--target", t, "--k", "5",
                                      "--device", "cpu"))
        assert [d["states_fact"] for d in got] == [f in FACTS.get(int(d["id"][1:]), []) for d in got]
    assert any(d["states_fact"] for got in answers for d in got)
    assert "states_fact" not in ix.ask(*QUESTIONS[0][:2], k=3)[0]


def test_bm25_questions_equal_the_cli(data, tmp_path):
    """BM25 over the corpus itself: the same lists and float64 scores as `query.py --method bm25`."""
    corpus, queries = data
    invoke(query.app, "--method", "bm25", "--corpus", corpus, "--queries", queries, "--out", tmp_path / "b.jsonl",
           "--k", "5")
    ix = query.open_index(corpus)
    assert ix.method == "bm25"
    same_as_file([ix.ask(p, t, k=5) for p, t, _ in QUESTIONS], read_jsonl(tmp_path / "b.jsonl"))


def test_dense_questions_equal_the_cli_and_another_embedding_model_is_refused(data, tmp_path, monkeypatch):
    """A dense index: the CLI's ad-hoc answers bit for bit and the queries file's lists; another embedding
    model is refused, both fingerprints named."""
    corpus, queries = data
    bert = save_bert(tmp_path / "bert", seed=0)
    invoke(query.app, "--method", "dense", "--corpus", corpus, "--index", tmp_path / "dense", "--dense-model", bert,
           "--device", "cpu")
    invoke(query.app, "--method", "dense", "--index", tmp_path / "dense", "--queries", queries, "--out",
           tmp_path / "d.jsonl", "--k", "5", "--device", "cpu")
    ix = query.open_index(tmp_path / "dense", device="cpu")
    assert ix.method == "dense"
    answers = [ix.ask(p, t, k=5) for p, t, _ in QUESTIONS]
    same_as_file(answers, read_jsonl(tmp_path / "d.jsonl"), exact=False)
    for (p, t, _), got in zip(QUESTIONS, answers, strict=True):
        same_as_adhoc(got, *cli_adhoc(monkeypatch, "--method", "dense", "--index", tmp_path / "dense", "--prompt", p,
                                      "--target", t, "--k", "5", "--device", "cpu"))
    other = save_bert(tmp_path / "bert-other", seed=1)
    with pytest.raises(ts.TrackStarError, match="refusing to mix") as e:
        query.open_index(tmp_path / "dense", device="cpu", model=str(other))
    recorded = query.read_dense_meta(tmp_path / "dense")["model"]
    assert recorded in str(e.value) and query.load_dense_model(str(other), "cpu").fingerprint in str(e.value)


def test_a_model_other_than_the_indexs_is_refused_naming_both_fingerprints(gradient_index, model_dir, tmp_path):
    """The same weights in another folder are accepted; changed weights are refused, both fingerprints named."""
    index, file_rows = gradient_index
    moved = tmp_path / "moved-model"
    shutil.copytree(model_dir, moved)
    same_as_file([query.open_index(index, device="cpu", model=str(moved)).ask(*QUESTIONS[0][:2], k=5)],
                 file_rows[:1], exact=False)
    model, tokenizer = ts.load_model(str(moved))
    with torch.no_grad():
        next(model.parameters()).mul_(1.01)
    model.save_pretrained(moved)
    recorded = ts.read_meta(index.parent / "corpus").model
    with pytest.raises(ts.TrackStarError) as e:
        query.open_index(index, device="cpu", model=str(moved))
    assert recorded in str(e.value) and ts.fingerprint(model, tokenizer) in str(e.value)


def test_a_question_without_a_target_is_refused(data):
    ix = query.open_index(data[0])
    with pytest.raises(ts.TrackStarError, match="prompt and a target"):
        ix.ask("The capital of France is", " ")
