"""The whole pipeline as users run it: `make all` on a reduced fact world (the same world on every machine,
its model trained well enough), and the report renders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_world, write_jsonl

import trackstar as ts


def make_on(run, target: str, *extra: str) -> None:
    """`make TARGET` on the tiny run's world and run directory; it must succeed."""
    cmd = ["make", "-C", str(ROOT), target, "SIZE=tiny", f"DATA={run.parent}/data", f"RUN={run}",
           f"PY={sys.executable}", "DIM=1024", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.slow
def test_make_all_prints_the_ablation_table(tiny_run):
    run, stdout = tiny_run
    for name in ("BM25", "Dense (text embeddings)", "Gradient cosine", "TRAK-like", "TrackStar (mixed R)",
                 "Ground truth"):
        assert name in stdout
    results = json.loads((run / "results.json").read_text())
    methods = results["settings"]["methods"]
    assert {"bm25", "dense", "dot", "cosine", "trak", "optcorr", "train", "eval", "trackstar", "truth"} <= set(methods)
    for m in methods:
        s = results["summary"][m]
        assert 0 <= s["mrr"] <= 1 and 0 <= s["recall"] <= 1
    # Ground-truth documents state the fact by construction, so their recall is perfect,
    # and the gradient methods retrieve far better than chance on a world this regular.
    assert results["summary"]["truth"]["recall"] == 1.0
    n_docs = results["settings"]["n_docs"]
    assert results["summary"]["trackstar"]["recall"] > 10 * 10 / n_docs


@pytest.mark.slow
def test_make_all_exports_every_method_for_the_authors_viewer_with_evaluates_metrics(tiny_run):
    """RUN/viewer/<method>.jsonl for every retrieval row of the CI world; the viewer's mrr_first and recall@10
    (demo/metrics.ts) recomputed from each record's `proponent_correct` are results.json's MRR and recall@10."""
    run, _ = tiny_run
    results = json.loads((run / "results.json").read_text())
    methods = [m for m in results["settings"]["methods"] if m != "truth"]
    assert sorted(p.name for p in (run / "viewer").iterdir()) == sorted(f"{m}.jsonl" for m in methods)
    for m in methods:
        records = [json.loads(line) for line in (run / "viewer" / f"{m}.jsonl").read_text().splitlines()]
        assert [r["example_id"] for r in records] == results["queries"]
        for rec, mrr, recall in zip(records, results["per_query"][m]["mrr"], results["per_query"][m]["recall"],
                                    strict=True):
            correct = rec["proponent_correct"]
            first = correct.index(True) if True in correct else -1
            assert (1 / (1 + first) if first > -1 else 0.0) == pytest.approx(mrr, abs=1e-12), (m, rec["example_id"])
            assert float(True in correct[:10]) == recall, (m, rec["example_id"])


@pytest.mark.slow
def test_tail_patch_is_a_valid_probe_on_the_ci_world(tiny_run):
    """Stepping on the documents that state a fact raises p(target), on average over all queries: the probe
    that ranks the methods must score the ground truth above zero."""
    run, _ = tiny_run
    results = json.loads((run / "results.json").read_text())
    assert results["summary"]["truth"]["dp"] > 0 and results["summary"]["truth"]["dlogp"] > 0
    assert "lr·(1−β1)" in results["settings"]["step"]


@pytest.mark.slow
def test_make_sweep_writes_its_figures_and_table_into_the_report(tiny_run):
    run, _ = tiny_run
    make_on(run, "sweep", "SWEEP_TAIL_QUERIES=4")
    sweep = json.loads((run / "sweep" / "sweep.json").read_text())
    assert set(sweep["axes"]) == {"d", "n_train", "damping", "lambda", "reval"}
    held_out = [p for p in sweep["axes"]["reval"] if p["x"] == "other half"]
    assert held_out and all(p["vs_in_sample"]["mrr"]["state"] in ("holds", "contradicted", "not established")
                            for p in held_out)
    assert sorted({p["x"] for p in sweep["axes"]["d"]}, key=int) == ["128", "256", "512", "1024"]
    assert {p["x"] for p in sweep["axes"]["damping"]} >= {"auto", "1e-3"}
    assert {"0.9", "0.99", "auto"} <= {p["x"] for p in sweep["axes"]["lambda"]}
    for axis in set(sweep["axes"]) - {"reval"}:
        assert (run / "sweep" / f"sweep-{axis}.png").read_bytes()[:4] == b"\x89PNG"
    html = (run / "report.html").read_text()
    assert "<h2 id='sweep'>" in html and html.count("data:image/png;base64,") >= 4 + 1  # + the results chart


@pytest.mark.slow
def test_rerunning_make_all_rebuilds_nothing(tiny_run):
    run, _ = tiny_run
    cmd = ["make", "-C", str(ROOT), "-q", "all", "SIZE=tiny", f"DATA={run.parent}/data", f"RUN={run}",
           f"PY={sys.executable}", "DIM=1024"]
    # `make -q` exits 0 only if every target is up to date (`all` itself is phony: check its input).
    cmd[cmd.index("all")] = f"{run}/results.md"
    assert subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(tiny_run):
    run, _ = tiny_run
    html = (run / "report.html").read_text()
    assert "<table" in html and "TrackStar" in html and 'src="data:image/png;base64,' in html
    assert "<pre>" not in html
    cmd = ["make", "-C", str(ROOT), "screenshot", "SIZE=tiny", f"DATA={run.parent}/data", f"RUN={run}",
           f"PY={sys.executable}", "DIM=1024"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    png = (run / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a real page, not a blank one


@pytest.mark.slow
def test_make_trend_evaluates_every_checkpoint_and_refuses_to_mix_them(tiny_run):
    """`make trend`: each checkpoint (and the final model) through the whole pipeline, one point per
    checkpoint in training order with more tokens each, the figure drawn; and a checkpoint's corpus
    encodings refuse to be indexed with another checkpoint's queries, naming both fingerprints."""
    run, _ = tiny_run
    # on a share of the world's corpus (every document stating a query's fact, and 300 others): the checkpoints are
    # what is under test, and each is encoded whole
    world = tiny_world(run)
    facts = {q["fact"] for q in ts.read_jsonl(world / "queries.jsonl", "queries")}
    docs = ts.read_jsonl(world / "corpus.jsonl", "corpus")
    stating = [d for d in docs if facts & set(d.get("facts", []))]
    corpus = write_jsonl(run.parent / "trend-corpus.jsonl", stating + [d for d in docs if d not in stating][:300])
    make_on(run, "trend", "TREND_TAIL_QUERIES=4", f"MODEL={world}/model", f"CORPUS={corpus}",
            f"QUERIES={world}/queries.jsonl")
    trend_json = json.loads((run / "trend" / "trend.json").read_text())
    points = trend_json["rows"]
    assert {c["state"] for c in trend_json["across"]} <= {"holds", "contradicted", "not established"}
    steps = sorted(p.name for p in (tiny_world(run) / "model" / "checkpoints").iterdir())
    assert [p["run"].rsplit("/", 1)[1] for p in points] == [*steps, "final"]
    assert all(a["tokens"] < b["tokens"] for a, b in zip(points, points[1:], strict=False))
    assert all(0 <= p["trackstar_mrr"] <= 1 and p["bm25_mrr"] > 0.5 for p in points)
    assert (run / "trend" / "trend.png").read_bytes()[:4] == b"\x89PNG"
    trend = run / "trend"
    mixed = subprocess.run([sys.executable, str(ROOT / "index.py"), "--corpus", str(trend / steps[0] / "corpus"),
                            "--queries", str(trend / "final" / "queries"), "--out", str(run / "mixed"),
                            "--hessian", "none"], capture_output=True, text=True, cwd=ROOT)
    assert mixed.returncode != 0 and "differ in 'model'" in mixed.stderr, mixed.stderr[-2000:]  # the fingerprints
    assert not (run / "mixed").exists()


# -----------------------------------------------------------------------------
# the world `make all` trained: one world on every machine, and a model that learned its facts

SAME_FILES = ("corpus.jsonl", "queries.jsonl", "model/model.safetensors", "model/optimizer.pt",
              "model/tokenizer.json", "model/config.json", "model/checkpoint.json")


@pytest.mark.slow
def test_the_tiny_world_is_byte_identical_whatever_the_thread_count_with_or_without_checkpoints(tiny_run, tmp_path):
    """Weights, optimizer state, tokenizer and data: the same bytes trained under another OMP_NUM_THREADS (1 or
    2) and without intermediate checkpoints as `make all` trained them (with three checkpoints saved on the way),
    since training pins its own thread count and records it and saving touches no random state. So every
    machine's `make all` starts from the same model, and a trend's final point is `make all`'s."""
    made = tiny_world(tiny_run[0])
    threads = "2" if os.environ.get("OMP_NUM_THREADS") == "1" else "1"  # not the count `make all` ran with
    env = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2",  # the CPU kernels `make all` pins, unless set
           **os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    one = tmp_path / "one"
    r = subprocess.run([sys.executable, str(ROOT / "prepare.py"), "factworld", "--out", str(one), "--size", "tiny",
                        "--checkpoints", "0"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (made / "model" / "checkpoints").is_dir() and not (one / "model" / "checkpoints").exists()
    for name in SAME_FILES:
        assert (one / name).read_bytes() == (made / name).read_bytes(), name
    for info in (json.loads((w / "world.json").read_text()) for w in (one, made)):
        assert info["training"]["threads"] == 1


@pytest.mark.slow
def test_tiny_world_model_learns_its_frequent_facts(tiny_run):
    """The world `make all` trained: facts stated often are answered, rare ones less; the table is printed."""
    run, stdout = tiny_run
    assert "docs stating the fact" in stdout
    info = json.loads((tiny_world(run) / "world.json").read_text())
    acc = {row["bucket"]: row["accuracy"] for row in info["accuracy_by_bucket"]}
    assert acc["8+"] >= 0.8 and acc["8+"] > acc["1"]
    assert info["final_loss"] < 3.5  # ln(vocab) = 7.3 at the start; generic text keeps it well above 0
    assert info["tokenizer"]["split_mismatches"] == 0
