"""Evidence: paired differences with seeded bootstrap CIs, and the paper's claims in three states (holds,
contradicted, not established), decided by the CI and never by the means alone."""

from __future__ import annotations

import dataclasses
import itertools
import types

import numpy as np
import pytest
import torch

import evaluate
import report


def test_bootstrap_ci_equals_the_exact_percentiles_on_fixed_numbers():
    """Two queries with differences 0 and 1: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4,
    so the 2.5th and 97.5th percentiles are 0 and 1. Three queries 0, 0, 3: P(mean = 0) = 8/27 and P(mean = 3)
    = 1/27, both beyond 2.5%, so the interval is [0, 3]. A constant difference has a point interval."""
    assert evaluate.bootstrap_ci(np.array([0.0, 1.0])) == (0.0, 1.0)
    assert evaluate.bootstrap_ci(np.array([0.0, 0.0, 3.0])) == (0.0, 3.0)
    assert evaluate.bootstrap_ci(np.full(12, 0.25)) == (0.25, 0.25)


def test_bootstrap_ci_matches_the_enumerated_distribution_of_resample_means():
    """Four queries: all 4^4 equally likely resamples enumerated by hand; the seeded bootstrap's percentiles
    lie within one support point of the exact ones."""
    d = np.array([-1.0, 0.0, 2.0, 5.0])
    exact = sorted(np.mean(c) for c in itertools.product(d, repeat=4))
    lo, hi = np.percentile(exact, [2.5, 97.5])
    blo, bhi = evaluate.bootstrap_ci(d)
    assert abs(blo - lo) <= 0.25 + 1e-12 and abs(bhi - hi) <= 0.25 + 1e-12  # support points are 0.25 apart


def test_the_bootstrap_resamples_queries_keeping_each_querys_seeds_together():
    """Queries × seeds: a query whose seeds disagree but whose seed mean equals every other query's has no
    spread across queries, so the interval is a point; resampling cells instead would give a wide one."""
    d = np.array([[0.0, 2.0], [2.0, 0.0], [1.0, 1.0]] * 4)
    assert evaluate.bootstrap_ci(d) == (1.0, 1.0)


@pytest.mark.parametrize(("ci", "n", "state"), [
    ((0.01, 0.2), 40, evaluate.HOLDS),
    ((-0.2, -0.01), 40, evaluate.CONTRADICTED),
    ((-0.01, 0.2), 40, evaluate.NOT_ESTABLISHED),
    ((0.0, 0.2), 40, evaluate.NOT_ESTABLISHED),  # a CI touching 0 contains it
    ((0.01, 0.2), evaluate.MIN_QUERIES - 1, evaluate.NOT_ESTABLISHED),  # too few queries to tell
])
def test_claim_states_are_decided_by_the_ci_and_the_number_of_queries(ci, n, state):
    assert evaluate.claim_state(ci, n) == state


def per_query(values: dict[str, list[float | None]]) -> dict:
    return {m: {key: list(v) for key in evaluate.METRICS} for m, v in values.items()}


def test_a_claim_whose_ci_spans_zero_is_not_established_in_results_and_report():
    """Cosine beats dot on half the queries and loses on the other half by the same amount: the mean difference
    is 0, the CI spans 0, and results.json and results.md say "not established" (not holds, not contradicted)."""
    n = 20
    dot = [0.5] * n
    cosine = [0.5 + (0.25 if i % 2 else -0.25) for i in range(n)]
    truth = [0.01 * (i + 1) for i in range(n)]
    pq = per_query({"dot": dot, "cosine": cosine, "truth": truth})
    ev = evaluate.evidence(pq, [i < n // 2 for i in range(n)], attributed=True)
    unit = next(c for c in ev["claims"] if c["claim"].startswith("Unit normalisation raises MRR")
                and c["split"] == "All queries")
    assert unit["diff"] == pytest.approx(0.0) and unit["ci"][0] < 0 < unit["ci"][1]
    assert unit["state"] == evaluate.NOT_ESTABLISHED
    probe = [c for c in ev["claims"] if c["a"] == "truth"]
    assert {c["split"]: c["state"] for c in probe} == {s: evaluate.HOLDS for s, _ in evaluate.splits([True, False])}
    head, rows, states = report.claim_rows({"claims": ev["claims"], "model_correct": [i < n // 2 for i in range(n)]})
    row = next(r for r in rows if r[0].startswith("Unit normalisation raises MRR"))
    assert "not established (n = 20)" in row[1] and "holds" not in row[1]


def test_a_split_without_queries_is_not_established_rather_than_holding():
    """The model answers none of the queries: the 'known' split is empty, so the probe's validity there is not
    established (a check over no queries once passed vacuously)."""
    n = 12
    pq = per_query({"truth": [0.02] * n})
    ev = evaluate.evidence(pq, [False] * n, attributed=False)
    states = {c["split"]: (c["state"], c["n"]) for c in ev["claims"]}
    assert states["Queries the model answers correctly"] == (evaluate.NOT_ESTABLISHED, 0)
    assert states["Queries the model gets wrong"] == (evaluate.HOLDS, n)


def test_not_measured_queries_are_left_out_pairwise():
    """Tail-patch is measured on a sample: a query measured for one row but not the other is not a pair."""
    pq = per_query({"cosine": [0.1, None, 0.3] * 5, "dot": [0.0, 0.2, None] * 5})
    d = evaluate.paired_difference(pq["cosine"]["dp"], pq["dot"]["dp"], [True] * 15)
    assert d["n"] == 5 and d["diff"] == pytest.approx(0.1)


def test_contradicted_claims_are_reported_as_such():
    """R_train lowering tail-patch on every query is a contradiction of the paper's claim, not a miss."""
    n = 30
    pq = per_query({"optcorr": [0.02 + 0.001 * i for i in range(n)], "train": [0.01 + 0.001 * i for i in range(n)]})
    ev = evaluate.evidence(pq, [True] * n, attributed=True)
    c = next(c for c in ev["claims"] if c["claim"] == "R_train raises tail-patch over the correction alone"
             and c["split"] == "All queries")
    assert c["state"] == evaluate.CONTRADICTED and c["ci"][1] < 0


def test_the_lr_rule_takes_the_smallest_lr_whose_ground_truth_ci_is_above_zero(monkeypatch):
    """The calibration reads only the ground-truth row: with Δp below zero up to 3e-5 and above from 1e-4, the
    rule picks 1e-4; when no lr of the grid gives a CI above zero it takes the largest and says the probe is
    invalid."""
    queries = [{"id": f"q{i}", "prompt": "p", "target": " t"} for i in range(12)]
    truth = {q["id"]: [{"id": f"d{i}"}, {"id": f"e{i}"}] for i, q in enumerate(queries)}
    monkeypatch.setattr(evaluate, "target_logprob", lambda *a: torch.zeros(len(a[2]), dtype=torch.float64))

    def fake(sign_at):
        def tail_patch_lrs(step, docs, qs, base, lrs):
            return [(torch.full((len(qs),), sign_at(lr) * (1 + 0.1 * len(docs[0][0]))), torch.zeros(len(qs)))
                    for lr in lrs]
        return tail_patch_lrs

    corpus_tok = {f"{c}{i}": ([1] * (i + 2), [1] * (i + 2)) for i in range(12) for c in "de"}
    step = types.SimpleNamespace(model=None, tokenizer=None, max_length=8)
    monkeypatch.setattr(evaluate, "tail_patch_lrs", fake(lambda lr: 1.0 if lr >= 1e-4 else -1.0))
    c = evaluate.calibrate_lr_rule(step, corpus_tok, truth, queries, k=10)
    assert c["lr"] == 1e-4 and c["valid"]
    assert [r["state"] for r in c["per_lr"]][:3] == [evaluate.CONTRADICTED, evaluate.CONTRADICTED, evaluate.HOLDS]
    monkeypatch.setattr(evaluate, "tail_patch_lrs", fake(lambda lr: -1.0))
    c = evaluate.calibrate_lr_rule(step, corpus_tok, truth, queries, k=10)
    assert c["lr"] == evaluate.LR_GRID[-1] and not c["valid"]


def test_calibration_queries_are_never_tail_patched():
    qs = [{"id": f"q{i}"} for i in range(40)]
    tail = qs[::2]
    calib = evaluate.calibration_sample(qs, [True] * 40, tail, 15)
    assert len(calib) == 15 and not {q["id"] for q in calib} & {q["id"] for q in tail}
    with pytest.raises(evaluate.ts.TrackStarError, match="--calibrate-lr needs"):
        evaluate.calibration_sample(qs, [True] * 40, qs[:35], 15)


def test_stepping_at_a_grid_of_lrs_equals_one_step_at_each(model_dir):
    """tail_patch_lrs takes the gradient once and steps at each lr: the same numbers as tail_patch at that lr;
    the top-k-together step on one document is that document's own step."""
    step = evaluate.load_step(str(model_dir), None, False, 1e-3, None)
    tok = step.tokenizer
    queries = [{"prompt": "The capital of France is", "target": " Paris"}]
    doc, _, _ = evaluate.ts.tokenize_document(tok, "The capital of France is Paris.", 128)
    base = evaluate.target_logprob(step.model, tok, queries, 128)
    grid = evaluate.tail_patch_lrs(step, [(doc, doc)], queries, base, [1e-4, 1e-3])
    for lr, (dp, dlogp) in zip([1e-4, 1e-3], grid, strict=True):
        one = evaluate.tail_patch(dataclasses.replace(step, lr=lr), (doc, doc), queries, base)
        assert torch.equal(dp, one[0]) and torch.equal(dlogp, one[1])
    assert grid[1][0][0] > grid[0][0][0] > 0  # a larger step on the fact's sentence raises it more
