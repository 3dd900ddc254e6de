"""The conventions a careless refactor breaks without failing the reference tests: each test computes its
expectation independently of the code it checks (its own labels, its own optimizer run, its own BM25)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import bpe_tokenizer, project_full_gradient, tiny_model

import query
import trackstar as ts

DIM, SEED = 256, 5


def hf_query_vector(model, tok, prompt: str, target: str, prompt_carries_loss: bool = False) -> torch.Tensor:
    """A query's projected gradient from HF's own `labels=` loss: labels built here, prompt masked with -100
    (or not), summed over target tokens (HF averages: multiply back by the number of labelled tokens)."""
    m = tiny_model("llama", vocab=len(tok))
    m.load_state_dict(model.state_dict())
    for p in m.parameters():
        p.requires_grad_(True)
    p_ids, t_ids = tok(prompt).input_ids, tok(target).input_ids
    ids = torch.tensor([p_ids + t_ids])
    labels = ids.clone() if prompt_carries_loss else torch.tensor([[-100] * len(p_ids) + t_ids])
    n_labelled = int((labels[0, 1:] != -100).sum())
    (m(ids, labels=labels).loss * n_labelled).backward()
    total = torch.zeros(DIM)
    for name, _, _, transposed in ts.weight_modules(m):
        grad = dict(m.named_modules())[name].weight.grad
        total += project_full_gradient(grad.T if transposed else grad, SEED, name, DIM)
    return total


def test_query_loss_is_on_the_target_tokens_only():
    """Catches a query loss that includes the prompt: the encoder's vector equals the target-only reference
    and differs clearly from the vector with the prompt's loss added."""
    tok = bpe_tokenizer()
    model = tiny_model("llama", vocab=len(tok))  # untied: the LM head's gradient is its own (as traced)
    prompt, target = "The capital of France is", " Paris"
    enc = ts.make_encoder(model, DIM, SEED, {}, "factored")
    row = {"id": "q", "prompt": prompt, "target": target, "_line": 1}
    tokenized, _ = ts.tokenize_rows(tok, [row], "queries", 64)
    got = torch.from_numpy(ts.encode_tokenized(enc, tokenized, 4096)["vectors"][0])
    want = hf_query_vector(model, tok, prompt, target)
    with_prompt = hf_query_vector(model, tok, prompt, target, prompt_carries_loss=True)
    assert (got - want).abs().max() / want.abs().max() < 2e-4
    assert torch.nn.functional.cosine_similarity(got, with_prompt, dim=0) < 0.99


def hf_trainer_adam_state(model, steps: int = 3) -> tuple[dict, torch.optim.AdamW]:
    """A real AdamW run, its state_dict as HF Trainer saves it (two groups: decayed weights, then the rest)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "ln" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "ln" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-6)
    ids = torch.randint(1, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt.state_dict(), opt


def test_adam_v_is_bias_corrected_and_eps_is_squared(tmp_path):
    """Catches a dropped bias correction (V = exp_avg_sq / (1 − β2^step)) and an eps that is not Adam's eps²
    (Adam divides by sqrt(v) + eps ≈ sqrt(v + eps²)): both by hand from torch's own optimizer."""
    model = tiny_model("gpt2")
    state, opt = hf_trainer_adam_state(model)
    torch.save(state, tmp_path / "optimizer.pt")
    V = ts.load_second_moment(str(tmp_path / "optimizer.pt"), model)
    assert V.source == "adam" and V.betas == (0.9, 0.95)
    for name, p in model.named_parameters():
        s = opt.state[p]
        want = s["exp_avg_sq"] / (1 - 0.95 ** float(s["step"]))
        assert torch.allclose(V.values[name], want, rtol=1e-6, atol=0), name
    assert ts.default_eps(V, list(V.values)) == pytest.approx(1e-12)


def test_estimated_and_adafactor_eps_conventions(tmp_path):
    """An estimated V gets eps = 1e-3 · mean(V) (damping relative to V's scale); Adafactor's eps lives inside its
    statistics, so none is added."""
    model = tiny_model("gpt2")
    v = {n: torch.full(p.shape, 4.0) for n, p in model.named_parameters()}
    torch.save({"second_moment": v, "source": "estimate(n=4)"}, tmp_path / "est.pt")
    V = ts.load_second_moment(str(tmp_path / "est.pt"), model)
    assert ts.default_eps(V, list(v)) == pytest.approx(4e-3)
    from transformers.optimization import Adafactor

    opt = Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=False)
    ids = torch.randint(1, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "adafactor.pt")
    V = ts.load_second_moment(str(tmp_path / "adafactor.pt"), model)
    assert V.source == "adafactor" and ts.default_eps(V, list(V.values)) == 0.0


# "cat" and "sat" are each in fewer than half the documents, so their idf is positive (rank-bm25 floors
# negative ones at eps · mean idf, which the hand formula below does not model).
DOCS = ["the cat sat on the mat", "the dog sat", "a bird sang on the wire near the river", "cats and dogs",
        "the the the cat", "a fish swam", "rain fell on the hills all day long"]


def test_bm25_equals_rank_bm25_and_a_hand_computation():
    """Catches a change in the IDF or length normalisation shared by both of our scorers: compare with a fresh
    rank-bm25 object and with Okapi BM25 written out for one (query, document) pair."""
    from rank_bm25 import BM25Okapi

    docs = [query.bm25_tokenize(d) for d in DOCS]
    ours = query.BM25Index(docs).scores(["cat", "sat"])
    theirs = BM25Okapi([list(d) for d in docs]).get_scores(["cat", "sat"])
    assert np.array_equal(ours, theirs)
    # by hand, document 0 ("the cat sat on the mat"): k1 = 1.5, b = 0.75, rank-bm25's idf = ln((N − n + .5)/(n + .5))
    n_docs, avgdl, k1, b = len(docs), sum(map(len, docs)) / len(docs), 1.5, 0.75
    score = 0.0
    for term in ("cat", "sat"):
        n = sum(term in d for d in docs)
        idf = math.log((n_docs - n + 0.5) / (n + 0.5))
        f = docs[0].count(term)
        assert idf > 0
        score += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(docs[0]) / avgdl))
    assert ours[0] == pytest.approx(score, rel=1e-12) and ours[0] == ours.max()


def test_batches_are_right_padded_whatever_the_tokenizer_says():
    """Catches a collate that pads on the left (as many chat tokenizers do): real tokens sit at positions
    0..n−1, so a causal model never attends to padding and position ids match an unpadded run."""
    tok = bpe_tokenizer()
    tok.padding_side = "left"
    a, b = tok("The capital of France is Paris.").input_ids, tok("Rome").input_ids
    batch = ts.collate([(a, a), (b, b)], "cpu")
    assert batch["attention_mask"][1].tolist() == [1] * len(b) + [0] * (len(a) - len(b))
    assert batch["input_ids"][1, : len(b)].tolist() == b
    assert (batch["labels"][1, len(b):] == ts.IGNORE).all()
