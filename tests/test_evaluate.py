"""Evaluation metrics: MRR / recall on hand-made rankings; tail-patch restores weights exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import CORPUS, bpe_tokenizer

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
    step = evaluate.load_step(str(model_dir), None, not with_v, 1e-3 if with_v else 1e-1, None)
    model, tok = step.model, step.tokenizer
    assert (step.v is not None) == with_v
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    queries = [{"prompt": "The capital of France is", "target": " Paris"}]
    doc, _, _ = ts.tokenize_document(tok, "The capital of France is Paris.", 128)
    base = evaluate.target_logprob(model, tok, queries, 128)
    dp, dlogp = evaluate.tail_patch(step, (doc, doc), queries, base)
    assert dp[0] > 0 and dlogp[0] > 0, "a step on the fact's own sentence must raise the target"
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert torch.equal(evaluate.target_logprob(model, tok, queries, 128), base)
    # and a step on an unrelated document moves it much less
    other, _, _ = ts.tokenize_document(tok, "Seven green bottles hanging on the wall.", 128)
    dp2, _ = evaluate.tail_patch(step, (other, other), queries, base)
    assert dp2[0] < dp[0]


def test_tail_patch_step_is_the_documents_share_of_adams_update(model_dir):
    """The documented rule, computed by hand on a copy of the model: θ' = θ − lr·(1−β1)·g/sqrt(β2·v + (1−β2)·g² + eps),
    g the gradient of the document's mean token loss (HF's own `labels=` loss), v the bias-corrected exp_avg_sq;
    Δlog p is read from HF's logits. Catches a dropped (1−β1), the stale v in place of v', or a summed loss."""
    import copy

    model, tok = ts.load_model(str(model_dir))
    V = ts.load_second_moment(str(model_dir / "optimizer.pt"), model)
    state = torch.load(model_dir / "optimizer.pt", weights_only=True)
    beta1, beta2 = state["param_groups"][0]["betas"]
    assert V.betas == (beta1, beta2)
    v, eps, lr = evaluate.full_second_moment(V, model), 1e-12, 1e-3
    text, prompt, target = "The capital of France is Paris. Rome is in Italy.", "Rome is in", " Italy"

    def logp(m) -> float:
        p_ids, t_ids = tok(prompt).input_ids, tok(target).input_ids
        ids = torch.tensor([p_ids + t_ids])
        with torch.no_grad():
            logits = m(ids).logits.double().log_softmax(-1)[0]
        return sum(float(logits[len(p_ids) - 1 + i, t]) for i, t in enumerate(t_ids))

    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
    ids = tok(text, return_tensors="pt").input_ids
    ref(ids, labels=ids).loss.backward()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            g = p.grad
            p -= lr * (1 - beta1) * g / (beta2 * v[name] + (1 - beta2) * g * g + eps).sqrt()
    want = logp(ref) - logp(model)

    doc, _, _ = ts.tokenize_document(tok, text, 128)
    queries = [{"prompt": prompt, "target": target}]
    base = evaluate.target_logprob(model, tok, queries, 128)
    step = evaluate.Step(model, tok, v, eps, lr, (beta1, beta2), 128, "adam")
    _, dlogp = evaluate.tail_patch(step, (doc, doc), queries, base)
    assert abs(want) > 1e-4 and float(dlogp[0]) == pytest.approx(want, rel=1e-3, abs=1e-7)


def test_tail_patch_in_place_is_the_cloned_step_bit_for_bit_and_keeps_the_weight_tensors(model_dir):
    """The step is computed in the gradient buffers and swapped in (no clone of the weights): its Δlog p must be
    bit-identical to the plain computation (clone, w.sub_(lr·d) with d from the textbook expression, restore by
    copy), no gradient may be left behind, and each parameter must hold its original tensor afterwards."""
    step = evaluate.load_step(str(model_dir), None, False, 1e-3, None)
    model, tok = step.model, step.tokenizer
    storage = {n: p.data_ptr() for n, p in model.named_parameters()}
    doc, _, _ = ts.tokenize_document(tok, "The capital of France is Paris. Rome is in Italy.", 128)
    queries = [{"prompt": "Rome is in", "target": " Italy"}, {"prompt": "The capital of France is", "target": " Paris"}]
    base = evaluate.target_logprob(model, tok, queries, 128)
    _, dlogp = evaluate.tail_patch(step, (doc, doc), queries, base)
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == storage

    (beta1, beta2), saved = step.betas, {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    batch = ts.collate([(doc, doc)], "cpu")
    n_tokens = (batch["labels"][:, 1:] != ts.IGNORE).sum()
    (ts.per_example_loss(model, batch).sum() / n_tokens).backward()
    with torch.no_grad():
        for n, p in model.named_parameters():
            g = p.grad
            d = (1 - beta1) * g / (beta2 * step.v[n] + (1 - beta2) * g * g + step.eps).sqrt()
            p.sub_(step.lr * d)
    model.zero_grad(set_to_none=True)
    want = evaluate.target_logprob(model, tok, queries, 128) - base
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    assert torch.equal(dlogp, want)


def test_greedy_answers_are_greedy_decoding_whatever_the_batching():
    """ts.greedy_answers (evaluate's "does the model know it", prepare's accuracy table) is True exactly when
    greedy decoding from the prompt produces every target token, decoded one token at a time without padding;
    batches of mixed lengths (right padded) give the same booleans as one query at a time. The model is trained
    until it knows some sentences; swapped targets and targets right on their first token only make the False
    cases (a check of the first target token alone would call those True)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = bpe_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=128,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    docs = [ts.tokenize_document(tok, text, 128)[:2] for text in CORPUS[:5]]
    for _ in range(150):
        ts.per_example_loss(model, ts.collate(docs, "cpu")).sum().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    queries = []
    for text in CORPUS:
        words = text.split(" ")
        for i in range(2, len(words)):
            queries.append({"prompt": " ".join(words[:i]), "target": " " + " ".join(words[i : i + 2])})
    targets = [q["target"] for q in queries]
    queries += [{**q, "target": t} for q, t in zip(queries[::3], targets[1::3], strict=False)]  # swapped
    queries += [{**q, "target": " " + q["target"].split()[0] + " zebra"} for q in queries[::2]]  # right, then wrong

    def decoded(q: dict) -> bool:
        ids, target = tok(q["prompt"]).input_ids, tok(q["target"], add_special_tokens=False).input_ids
        for t in target:
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt != t:
                return False
            ids = ids + [nxt]
        return True

    want = [decoded(q) for q in queries]
    assert 5 <= sum(want) <= len(want) - 5, "the model knows some targets and not others"
    for batch in (1, 7, 256):
        assert ts.greedy_answers(model, tok, queries, 128, batch=batch) == want, batch
    assert evaluate.model_answers(model, tok, queries, 128) == want
