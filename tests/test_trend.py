"""experiments/trend.py's checks: a point's results must come from its checkpoint, and all points from one setting."""

from __future__ import annotations

import json

import pytest

import trackstar as ts
from experiments import trend


def fake_point(tmp_path, name: str, step: int, tokens: int, lr: float = 2e-4, model=None, truth: bool = True):
    """A checkpoint directory and the results.json an evaluation of it would write (only what the trend reads)."""
    ckpt, run = tmp_path / "model" / "checkpoints" / name, tmp_path / "run" / "trend" / name
    ckpt.mkdir(parents=True)
    run.mkdir(parents=True)
    (ckpt / "checkpoint.json").write_text(json.dumps({"step": step, "tokens": tokens, "lr": lr}))
    per_query = {m: {"mrr": [1.0, 0.5], "dp": [0.01, 0.02]} for m in ("bm25", "cosine", "trackstar")}
    if truth:
        per_query["truth"] = {"mrr": [1.0, 1.0], "dp": [0.03, 0.04]}
    results = {"settings": {"model": str(model or ckpt), "lr": lr, "n_docs": 10, "tail_patch_queries": 2, "k": 10},
               "queries": ["q1", "q2"], "model_correct": [True, False], "per_query": per_query}
    (run / "results.json").write_text(json.dumps(results))
    return ckpt, run


def test_points_are_read_in_order_and_summarised(tmp_path):
    a = trend.read_point(*fake_point(tmp_path, "step-000010", 10, 100))
    b = trend.read_point(*fake_point(tmp_path, "step-000020", 20, 200))
    trend.check_comparable([a, b])
    rows = trend.summary([a, b])
    assert [r["tokens"] for r in rows] == [100, 200] and rows[0]["trackstar_mrr"] == 0.75
    assert rows[0]["truth_dp"] == pytest.approx(0.035) and rows[0]["accuracy"] == 0.5
    lead = next(d for d in rows[0]["differences"] if d["a"] == "truth")  # truth − TrackStar Δp, paired
    assert lead["diff"] == pytest.approx(0.02) and lead["n"] == 2
    change = next(c for c in trend.across([a, b]) if c["what"] == "TrackStar MRR")
    assert change["diff"] == 0.0 and change["state"] == "not established"  # 2 queries decide nothing


def test_results_of_another_model_are_refused(tmp_path):
    ckpt, run = fake_point(tmp_path, "step-000010", 10, 100, model=tmp_path / "elsewhere")
    with pytest.raises(ts.TrackStarError, match="not the checkpoint"):
        trend.read_point(ckpt, run)


@pytest.mark.parametrize("change", ["lr", "truth", "queries"])
def test_points_made_under_different_settings_are_refused(tmp_path, change):
    a = trend.read_point(*fake_point(tmp_path, "step-000010", 10, 100))
    b = trend.read_point(*fake_point(tmp_path, "step-000020", 20, 200, lr=1e-3 if change == "lr" else 2e-4,
                                     truth=change != "truth"))
    if change == "queries":
        b["results"]["queries"] = ["q1", "q3"]
    with pytest.raises(ts.TrackStarError, match={"lr": "lr differs", "truth": "no ground truth",
                                                 "queries": "different queries"}[change]):
        trend.check_comparable([a, b])
