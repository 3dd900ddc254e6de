"""query.py with several --queries, each paired with its --out: the same files as one call per pair, the index
read (and on a GPU loaded) once for all of them, every pair checked before any work, every run checked against
the index before any is scanned."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import run, write_jsonl
from test_dense import DOCS, bert_dir  # noqa: F401 (fixture)
from test_distributed import torchrun
from test_index_query import META, fabricate_run, invoke, ok, runs

import index as index_cli
import query as query_cli
import trackstar as ts


@pytest.fixture()
def two_runs(tmp_path) -> tuple[Path, Path, Path]:
    """(index, queries run A, queries run B): A fit the index's R_eval, B is another query set encoded alike, its
    queries named apart from A's (b0, b1, ...: an answer under the other run's names shows)."""
    _, a = runs(tmp_path)
    b = fabricate_run(tmp_path / "other", "queries", {"vectors": np.random.default_rng(1).standard_normal((5, 32))})
    write_jsonl(tmp_path / "other.jsonl", [{"id": f"b{i}", "prompt": f"prompt {i}", "target": f" target {i}"}
                                           for i in range(5)])  # no digest recorded: the rename is read as is
    ok(invoke(index_cli.app, ["--corpus", tmp_path / "corpus", "--queries", a, "--out", tmp_path / "index"]))
    return tmp_path / "index", a, b


def wrote(output: str) -> list[str]:
    """The `wrote` lines of a call's standard output, their timings dropped (a scan's seconds differ from call to
    call)."""
    return [re.sub(r" in \d+\.\d+ s$", "", line) for line in output.splitlines() if line.startswith("wrote ")]


def test_two_pairs_in_one_call_write_the_bytes_of_two_one_pair_calls(two_runs, tmp_path):
    """Catches pairs crossed or misread (A's answers in B's file, one run's ids on the other's rows, the R_eval
    note or a run's order lost): each file of one two-pair call equals, byte for byte, the file a one-pair call
    writes, and each says the same `wrote` line."""
    index, a, b = two_runs
    alone = [invoke(query_cli.app, ["--index", index, "--queries", q, "--out", tmp_path / "alone" / out,
                                    "--k", "4", "--block", "33"]) for q, out in ((a, "a.jsonl"), (b, "b.jsonl"))]
    for r in alone:
        ok(r)
    both = invoke(query_cli.app, ["--index", index, "--queries", a, "--out", tmp_path / "a.jsonl",
                                  "--queries", b, "--out", tmp_path / "b.jsonl", "--k", "4", "--block", "33"])
    ok(both)
    for out in ("a.jsonl", "b.jsonl"):
        assert (tmp_path / out).read_bytes() == (tmp_path / "alone" / out).read_bytes()
    want = [line.replace(str(tmp_path / "alone"), str(tmp_path)) for r in alone for line in wrote(r.stdout)]
    assert len(want) == 2 and wrote(both.stdout) == want
    note = "note: the index's R_eval was fit on"
    assert [note in r.stderr for r in alone] == [False, True] and both.stderr.count(note) == 1  # B's, as alone


def test_the_index_is_read_and_loaded_once_and_the_loaded_rows_are_what_every_pair_scans(two_runs, tmp_path,
                                                                                        monkeypatch):
    """Catches a call that reads the index's settings or loads its rows per pair, or loads them and then reads
    the files anyway: with a resident index standing in for a GPU's (load_resident on the CPU), the settings
    are read once, the rows loaded once, every scan gets that one resident index and no file is read after the
    load; the answers are those of the streamed scan. One pair loads nothing, as before."""
    index, a, b = two_runs
    for q in (a, b):
        ok(invoke(query_cli.app, ["--index", index, "--queries", q, "--out", tmp_path / f"{q.name}-streamed.jsonl"]))
    calls = {"read_index_meta": 0, "resident_if_it_fits": 0}
    loaded, scanned = [], []
    read_meta, search = query_cli.read_index_meta, query_cli.search

    def counted_meta(*args, **kwargs):
        calls["read_index_meta"] += 1
        return read_meta(*args, **kwargs)

    def resident_on_the_cpu(segments, device, build):
        calls["resident_if_it_fits"] += 1
        loaded.append(query_cli.load_resident(segments, "cpu", build))

        def no_file(*args, **kwargs):
            raise AssertionError("an index file was read after the rows were loaded")

        monkeypatch.setattr(query_cli, "iter_index_blocks", no_file)
        return loaded[-1]

    def recorded_search(*args, **kwargs):
        scanned.append(args[6] if len(args) > 6 else kwargs.get("resident"))
        return search(*args, **kwargs)

    monkeypatch.setattr(query_cli, "read_index_meta", counted_meta)
    monkeypatch.setattr(query_cli, "resident_if_it_fits", resident_on_the_cpu)
    monkeypatch.setattr(query_cli, "search", recorded_search)
    ok(invoke(query_cli.app, ["--index", index, "--queries", a, "--out", tmp_path / "a.jsonl",
                              "--queries", b, "--out", tmp_path / "b.jsonl"]))
    assert calls == {"read_index_meta": 1, "resident_if_it_fits": 1}
    assert len(loaded) == 1 and len(scanned) == 2 and all(r is loaded[0] for r in scanned)
    for q, out in ((a, "a.jsonl"), (b, "b.jsonl")):
        assert (tmp_path / out).read_bytes() == (tmp_path / f"{q.name}-streamed.jsonl").read_bytes()
    monkeypatch.undo()
    monkeypatch.setattr(query_cli, "resident_if_it_fits", resident_on_the_cpu)
    ok(invoke(query_cli.app, ["--index", index, "--queries", a, "--out", tmp_path / "one.jsonl"]))
    assert calls["resident_if_it_fits"] == 1  # not called again


def fail_if_called(monkeypatch) -> None:
    """Every method's work, from the index's settings on, refused: a test that sets it expects a refusal first."""
    for name in ("read_index_meta", "read_dense_meta", "query_runs", "query_bm25", "dense_main", "load_dense_model"):
        def work(*args, name=name, **kwargs):
            raise AssertionError(f"{name} was called before the pairs were refused")
        monkeypatch.setattr(query_cli, name, work)


@pytest.mark.parametrize("method", ["trackstar", "bm25", "dense"])
@pytest.mark.parametrize("counts", [(2, 1), (1, 2), (3, 2)])
def test_unequal_counts_are_refused_naming_both_before_any_work(tmp_path, monkeypatch, method, counts):
    """Catches pairs zipped short (a --queries answered nowhere, an --out left unwritten) or counted only after
    the index loads: the refusal is one line naming both counts, nothing read and nothing written."""
    index, a = tmp_path / "index", tmp_path / "queries"
    fail_if_called(monkeypatch)
    queries = [arg for _ in range(counts[0]) for arg in ("--queries", a)]
    outs = [arg for i in range(counts[1]) for arg in ("--out", tmp_path / f"p{i}.jsonl")]
    where = ["--corpus", tmp_path / "corpus.jsonl"] if method == "bm25" else ["--index", index]
    r = invoke(query_cli.app, ["--method", method, *where, *queries, *outs])
    assert isinstance(r.exception, ts.TrackStarError), r.output
    message = str(r.exception)
    assert f"{counts[0]} --queries but {counts[1]} --out" in message and "\n" not in message
    assert not list(tmp_path.glob("p*.jsonl"))


@pytest.mark.parametrize("method", ["trackstar", "bm25", "dense"])
@pytest.mark.parametrize("spelling", ["same", "another"])
def test_two_equal_outs_are_refused_before_any_work(tmp_path, monkeypatch, method, spelling):
    """Catches a second run silently overwriting the first one's answers: two --out naming one file (as typed, or
    spelt another way) are refused in one line naming it, before anything is read."""
    index, a, b = tmp_path / "index", tmp_path / "queries", tmp_path / "other"
    fail_if_called(monkeypatch)
    first = tmp_path / "p.jsonl"
    second = first if spelling == "same" else tmp_path / "x" / ".." / "p.jsonl"
    (tmp_path / "x").mkdir()
    where = ["--corpus", tmp_path / "corpus.jsonl"] if method == "bm25" else ["--index", index]
    r = invoke(query_cli.app, ["--method", method, *where, "--queries", a, "--out", first, "--queries", b,
                               "--out", second])
    assert isinstance(r.exception, ts.TrackStarError), r.output
    message = str(r.exception)
    assert f"--out {second} is given twice" in message and "\n" not in message
    assert spelling == "same" or f"(as --out {first} too)" in message
    assert not first.exists()


@pytest.mark.parametrize("key,value", [("model", "fingerprint-B"), ("seed", 7), ("kind", "corpus")])
def test_a_run_from_other_settings_among_several_is_refused_naming_it_before_any_scan(two_runs, tmp_path, key,
                                                                                      value):
    """Catches checking only the first run, or scanning and writing the good runs before a later one is checked:
    a run encoded with another model or seed (or a corpus run) second of three is refused naming it and both
    values, and no --out is written."""
    index, a, b = two_runs
    rng = np.random.default_rng(2)
    kind, settings = ("corpus", {}) if key == "kind" else ("queries", {key: value})
    bad = fabricate_run(tmp_path / "bad", kind, {"vectors": rng.standard_normal((3, 32))}, **settings)
    outs = [tmp_path / f"p{i}.jsonl" for i in range(3)]
    r = invoke(query_cli.app, ["--index", index, "--queries", a, "--out", outs[0], "--queries", bad,
                               "--out", outs[1], "--queries", b, "--out", outs[2]])
    assert isinstance(r.exception, ts.TrackStarError), r.output
    message = str(r.exception)
    assert str(bad) in message and "\n" not in message
    if key == "kind":
        assert "'corpus' run" in message
    else:
        assert repr(META[key]) in message and repr(value) in message
    assert not any(out.exists() for out in outs)


def test_bm25_and_dense_answer_several_pairs_as_one_call_each(bert_dir, tmp_path):  # noqa: F811
    """Catches a text baseline that answers only its first pair, or crosses them: BM25's and the dense index's
    files of one two-pair call equal, byte for byte, those of one call per pair."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(DOCS)])
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"id": "a0", "prompt": "The capital of France is", "target": " Paris"},
                                             {"id": "a1", "prompt": "Number 3 is", "target": " prime"}])
    qb = write_jsonl(tmp_path / "qb.jsonl", [{"id": "b0", "prompt": "The quick brown fox jumps over the",
                                              "target": " dog"}])
    ok(invoke(query_cli.app, ["--method", "dense", "--corpus", corpus, "--index", tmp_path / "dense",
                              "--dense-model", bert_dir]))
    where = {"bm25": ["--corpus", corpus], "dense": ["--index", tmp_path / "dense"]}
    for method, args in where.items():
        for q in (qa, qb):
            ok(invoke(query_cli.app, ["--method", method, *args, "--queries", q, "--out",
                                      tmp_path / f"{method}-{q.stem}-alone.jsonl", "--k", "3"]))
        ok(invoke(query_cli.app, ["--method", method, *args, "--queries", qa, "--out", tmp_path / f"{method}-qa.jsonl",
                                  "--queries", qb, "--out", tmp_path / f"{method}-qb.jsonl", "--k", "3"]))
        for q in (qa, qb):
            assert ((tmp_path / f"{method}-{q.stem}.jsonl").read_bytes()
                    == (tmp_path / f"{method}-{q.stem}-alone.jsonl").read_bytes())


def test_torchrun_answers_two_pairs_as_one_process_bit_for_bit(two_runs, tmp_path):
    """Catches ranks falling out of step across pairs (a rank that leaves the loop early, or skips a pair's
    collectives, hangs or mixes the pairs' keys): two torchrun ranks answering two pairs in one call write the
    files of one process, one call per pair."""
    index, a, b = two_runs
    for q in (a, b):  # one thread, as each rank has: a float sum's rounding depends on its threads
        run("query.py", "--index", index, "--queries", q, "--out", tmp_path / f"{q.name}-one.jsonl", "--block", "7")
    torchrun("query.py", "--index", index, "--queries", a, "--out", tmp_path / "a.jsonl", "--queries", b,
             "--out", tmp_path / "b.jsonl", "--block", "7")
    for q, out in ((a, "a.jsonl"), (b, "b.jsonl")):
        assert (tmp_path / out).read_bytes() == (tmp_path / f"{q.name}-one.jsonl").read_bytes()
