"""experiments/compare.py: two runs of the same queries compared row by row, paired, with the top-k overlap."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

import trackstar as ts
from experiments import compare


def fake_run(path, mrr: list[float], tops: list[list[str]], queries=None):
    path.mkdir(parents=True)
    queries = queries or [f"q{i}" for i in range(len(mrr))]
    per_query = {"trackstar": {"mrr": mrr, "recall": [1.0] * len(mrr), "dp": [None] * len(mrr),
                               "dlogp": [None] * len(mrr)}}
    (path / "results.json").write_text(json.dumps({"settings": {"k": 10, "methods": ["trackstar"]},
                                                   "queries": queries, "per_query": per_query}))
    write_jsonl(path / "proponents-trackstar.jsonl",
                [{"query_id": q, "proponents": [{"id": d} for d in t]} for q, t in zip(queries, tops, strict=True)])
    return path


def test_paired_differences_and_overlap_of_two_runs(tmp_path):
    n = 12
    a = fake_run(tmp_path / "a", [0.5 + 0.01 * i for i in range(n)], [["d1", "d2"]] * n)
    b = fake_run(tmp_path / "b", [0.4 + 0.01 * i for i in range(n)], [["d1", "d3"]] * n)
    out = compare.compare(a, b)
    row = out["rows"][0]
    assert row["mrr"]["diff"] == pytest.approx(0.1) and row["mrr"]["state"] == "holds"  # A higher on every query
    assert row["recall"]["diff"] == 0 and row["recall"]["state"] == "not established"
    assert row["dp"]["n"] == 0 and row["overlap"] == pytest.approx(0.5)
    assert "A higher" in compare.markdown(out)


def test_runs_of_different_queries_are_refused(tmp_path):
    a = fake_run(tmp_path / "a", [0.5], [["d1"]])
    b = fake_run(tmp_path / "b", [0.5], [["d1"]], queries=["other"])
    with pytest.raises(ts.TrackStarError, match="different queries"):
        compare.compare(a, b)
