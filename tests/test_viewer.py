"""The export for the paper authors' viewer (evaluate.py --export-viewer): exactly the viewer's schema, the
viewer's own MRR and recall@10 recomputed from it equal evaluate.py's for every method, and the built viewer
(../shared/data/pair_viewer) parses every record in headless Chromium."""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import subprocess
import threading

import pytest
from conftest import SHARED, write_jsonl
from typer.testing import CliRunner

import evaluate
import query
import trackstar as ts

# Twelve documents; f0..f2 are stated by some of them, d11 states two facts.
DOCS = [{"id": f"d{i}", "text": f"Document {i} says something about place number {i}.",
         "facts": facts} for i, facts in enumerate([["f0"], [], ["f1"], [], [], ["f0"], [], [], [], ["f2"], [],
                                                    ["f1", "f2"]])]
QUERIES = [
    {"id": "q0", "prompt": "The capital of France is", "target": " Paris", "fact": "f0", "relation": "P36"},
    {"id": "q1", "prompt": "Rome is the capital of", "target": " Italy", "fact": "f1", "relation": "P1376"},
    {"id": "q2", "prompt": "Madrid is in", "target": " Spain", "fact": "f2"},
    {"id": "q3", "prompt": "The quick brown fox", "target": " jumps"},  # no fact: no ground truth to mark
]
# Each method ranks all twelve documents its own way (query.py's --k above evaluate.py's: the export is cut to k).
ORDERS = {"alpha": [1, 3, 0, 4, 6, 7, 8, 10, 2, 9, 5, 11], "beta": [3, 4, 6, 7, 8, 10, 1, 2, 5, 9, 11, 0],
          "gamma": [9, 11, 4, 6, 7, 8, 10, 3, 1, 2, 5, 0]}
SCHEMA = {"example_id": str, "inputs_plaintext": str, "targets_plaintext": str, "proponents": list,
          "proponent_ids": list, "proponent_scores": list}
OPTIONAL = {"proponent_correct": list, "fact": str, "relation": str}


def proponents(order: list[int], shift: int) -> list[dict]:
    """A ranking for one query: the method's order rotated per query, so queries differ."""
    ids = order[shift:] + order[:shift]
    return [{"id": f"d{i}", "score": 2.0 - 0.125 * r, "text": DOCS[i]["text"]} for r, i in enumerate(ids)]


@pytest.fixture()
def exported(tmp_path, model_dir):
    """A run's proponents files, evaluated (attribution only) with --export-viewer; (results, export dir)."""
    corpus, queries = write_jsonl(tmp_path / "corpus.jsonl", DOCS), write_jsonl(tmp_path / "queries.jsonl", QUERIES)
    run = tmp_path / "run"
    run.mkdir()
    for m, order in ORDERS.items():
        made = query.made_by(m, len(order), None, queries, ts.data_digest(queries))
        write_jsonl(run / f"proponents-{m}.jsonl", [{"query_id": q["id"], "proponents": proponents(order, j),
                                                     "opponents": [], "made_by": made} for j, q in enumerate(QUERIES)])
    r = CliRunner().invoke(evaluate.app, ["--run", str(run), "--model", str(model_dir), "--corpus", str(corpus),
                                          "--queries", str(queries), "--methods", ",".join(ORDERS), "--k", "10",
                                          "--no-tail-patch", "--device", "cpu", "--export-viewer", str(run / "viewer")])
    assert r.exit_code == 0, r.output
    return json.loads((run / "results.json").read_text()), run / "viewer"


def read_export(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def viewer_metrics(correct: list[bool]) -> dict[str, float]:
    """demo/metrics.ts getGroundTruthMetrics: first-correct reciprocal rank (0 if none), any correct in the top 10."""
    first = correct.index(True) if True in correct else -1
    return {"mrr_first": 1.0 / (1 + first) if first > -1 else 0.0, "recall@10": float(True in correct[:10])}


def test_export_has_exactly_the_viewers_fields_and_types(exported):
    """One file per method (the ground-truth row is no retrieval), a record per query in the queries' order,
    the viewer's field names and types, parallel lists of k; `proponent_correct` only where the query has a fact,
    `fact` and `relation` only where the query has them."""
    results, viewer = exported
    assert sorted(p.name for p in viewer.iterdir()) == sorted(f"{m}.jsonl" for m in ORDERS)
    for m in ORDERS:
        records = read_export(viewer / f"{m}.jsonl")
        assert [r["example_id"] for r in records] == [q["id"] for q in QUERIES]
        for rec, q in zip(records, QUERIES, strict=True):
            want = set(SCHEMA) | ({"proponent_correct", "fact"} if "fact" in q else set()) | \
                ({"relation"} if "relation" in q else set())
            assert set(rec) == want, (m, q["id"], set(rec) ^ want)
            for key, typ in {**SCHEMA, **OPTIONAL}.items():
                assert key not in rec or type(rec[key]) is typ, (m, key)
            assert (rec["inputs_plaintext"], rec["targets_plaintext"]) == (q["prompt"], q["target"])
            assert len(rec["proponents"]) == len(rec["proponent_ids"]) == len(rec["proponent_scores"]) == 10
            assert all(type(t) is str for t in rec["proponents"]) and all(type(i) is str for i in rec["proponent_ids"])
            assert all(type(s) is float for s in rec["proponent_scores"])
            texts = {d["id"]: d["text"] for d in DOCS}
            assert rec["proponents"] == [texts[i] for i in rec["proponent_ids"]]
            if "proponent_correct" in rec:
                assert all(type(c) is bool for c in rec["proponent_correct"]) and len(rec["proponent_correct"]) == 10
                facts = {d["id"]: d["facts"] for d in DOCS}
                assert rec["proponent_correct"] == [q["fact"] in facts[i] for i in rec["proponent_ids"]]


def test_viewers_mrr_and_recall_from_the_export_equal_evaluates(exported):
    """For every method and query, the viewer's mrr_first and recall@10 computed from the exported
    `proponent_correct` are results.json's MRR and recall@10; the means too (the viewer averages over the
    records that carry the field, as evaluate.py skips queries without ground truth). The rankings put the first
    correct document at different ranks (and beyond the top 10), so a shifted rank or a cut list would differ."""
    results, viewer = exported
    per_rank = set()
    for m in ORDERS:
        mrr, recall = results["per_query"][m]["mrr"], results["per_query"][m]["recall"]
        ours = []
        for rec, want_mrr, want_recall in zip(read_export(viewer / f"{m}.jsonl"), mrr, recall, strict=True):
            if "proponent_correct" not in rec:
                assert want_mrr is None and want_recall is None
                continue
            got = viewer_metrics(rec["proponent_correct"])
            assert (got["mrr_first"], got["recall@10"]) == pytest.approx((want_mrr, want_recall), abs=1e-12), m
            ours.append(got["mrr_first"])
            per_rank.add(got["mrr_first"])
        assert sum(ours) / len(ours) == pytest.approx(results["summary"][m]["mrr"], abs=1e-12)
    assert len(per_rank) >= 4 and 0.0 in per_rank, "the fixture exercises several ranks and a miss"


def chromium_console(url: str, profile) -> str:
    """The console lines headless Chromium logs while it loads `url` (virtual time lets the fetches finish)."""
    r = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                        "--no-first-run", "--disable-background-networking", f"--user-data-dir={profile}",
                        "--virtual-time-budget=15000", "--dump-dom", url], capture_output=True, text=True, timeout=120)
    return r.stderr


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
@pytest.mark.skipif(not (SHARED / "pair_viewer" / "index.html").exists(),
                    reason="the built viewer (../shared/data/pair_viewer) is not beside the checkout")
def test_the_authors_viewer_parses_every_exported_record(exported, tmp_path):
    """The unmodified built viewer and an export served from one origin on 127.0.0.1: the viewer logs that it
    parsed as many examples as the export holds records, for each method's file."""
    _, viewer = exported
    site = tmp_path / "site"
    site.mkdir()
    (site / "viewer").symlink_to(SHARED / "pair_viewer")
    (site / "export").symlink_to(viewer)
    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for m in ORDERS:
            data = f"{base}/export/{m}.jsonl"
            log = chromium_console(f"{base}/viewer/index.html?jsonl_path={data}", tmp_path / "profile")
            parsed = re.findall(r"DataLoaderService: parsed (\d+) examples from (\S+?)\"", log)
            assert parsed and parsed[-1] == (str(len(QUERIES)), data), log[-3000:]
    finally:
        server.shutdown()
        server.server_close()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request lines on the test's output
        pass
