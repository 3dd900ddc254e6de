"""Evaluation metrics: MRR / recall on hand-made rankings; tail-patch restores weights exactly."""

from __future__ import annotations

import pytest
import torch

import evaluate
import trackstar as ts


def test_reciprocal_rank_is_one_over_first_hit():
    ranked = [["f2"], [], ["f1", "f3"], ["f1"]]
    assert evaluate.reciprocal_rank(ranked, "f1") == pytest.approx(1 / 3)
    assert evaluate.reciprocal_rank(ranked, "f2") == 1.0
    assert evaluate.reciprocal_rank(ranked, "f9") == 0.0


def test_recall_at_k_counts_only_the_top_k():
    ranked = [[]] * 10 + [["f1"]]
    assert evaluate.recall_at(ranked, "f1", 10) == 0.0
    assert evaluate.recall_at(ranked, "f1", 11) == 1.0


@pytest.mark.parametrize("with_v", [True, False])
def test_tail_patch_restores_weights_bit_exactly_and_raises_target(model_dir, with_v):
    model, tok = ts.load_model(str(model_dir))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sm = ts.load_second_moment(str(model_dir / "optimizer.pt"), model) if with_v else None
    v = evaluate.full_second_moment(sm, model) if sm else None
    eps = ts.default_eps(sm, list(v)) if sm else 0.0
    queries = [{"prompt": "The capital of France is", "target": " Paris"}]
    doc, _, _ = ts.tokenize_document(tok, "The capital of France is Paris.", 128)
    base = evaluate.target_logprob(model, tok, queries, 128)
    lr = 1e-3 if with_v else 1e-1
    dp, dlogp = evaluate.tail_patch(model, tok, (doc, doc), queries, lr, v, eps, 128, base)
    assert dp[0] > 0 and dlogp[0] > 0, "a step on the fact's own sentence must raise the target"
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert torch.equal(evaluate.target_logprob(model, tok, queries, 128), base)
    # and a step on an unrelated document moves it much less
    other, _, _ = ts.tokenize_document(tok, "Seven green bottles hanging on the wall.", 128)
    dp2, _ = evaluate.tail_patch(model, tok, (other, other), queries, lr, v, eps, 128, base)
    assert dp2[0] < dp[0]
