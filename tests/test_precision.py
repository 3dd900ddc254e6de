"""A bfloat16 model encodes in float32 where it matters: the loss, δ, the projections and the vectors; and its
encodings stay within a stated cosine of float32's on the tiny models of every architecture."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

import trackstar as ts


def batch(vocab: int = 96) -> dict[str, torch.Tensor]:
    """Three examples of mixed lengths (padding in the batch), every token a target."""
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (12, 7, 3)]
    return ts.collate([(s, s) for s in seqs], "cpu")


def adam_like(model: torch.nn.Module) -> ts.SecondMoment:
    g = torch.Generator().manual_seed(0)
    return ts.SecondMoment({n: torch.rand(p.shape, generator=g) + 0.1 for n, p in model.named_parameters()},
                           "file", None, None, 0.0, "test")


def encode(model: torch.nn.Module, gradient: str, dim: int = 64) -> torch.Tensor:
    V = adam_like(model)
    V = ts.factor_second_moment(V, 1e-8) if gradient == "factored" else V
    enc = ts.make_encoder(model, dim, 0, ts.correction_scales(model, V, 1e-8, ts.weight_modules(model)), gradient,
                          also_uncorrected=True)
    return ts.encode_batch(enc, batch())


@pytest.mark.parametrize("gradient", ["factored", "exact"])
def test_a_bf16_model_forms_its_loss_delta_and_vectors_in_float32(gradient, monkeypatch):
    """The float32 islands: cross-entropy reads float32 logits, every module's δ reaches the projection as
    float32, the factored path keeps x·P_in in float32, and the vectors are float32. A bf16 δ or loss would
    round the per-example gradient to 8 bits before it is projected."""
    model = tiny_model("llama").to(torch.bfloat16)
    seen: dict[str, set] = {"logits": set(), "delta": set(), "saved": set()}
    cross_entropy, accumulate = torch.nn.functional.cross_entropy, ts._accumulate

    def spy_cross_entropy(logits, *a, **k):
        seen["logits"].add(logits.dtype)
        return cross_entropy(logits, *a, **k)

    def spy_accumulate(enc, name, saved, delta, acc):
        seen["delta"].add(delta.dtype)
        if gradient == "factored":
            seen["saved"].update(x.dtype for x in saved)
        return accumulate(enc, name, saved, delta, acc)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy_cross_entropy)
    monkeypatch.setattr(ts, "_accumulate", spy_accumulate)
    out = encode(model, gradient)
    assert seen["logits"] == {torch.float32} and seen["delta"] == {torch.float32}
    assert seen["saved"] == ({torch.float32} if gradient == "factored" else set())
    assert {v.dtype for v in out.values()} == {torch.float32}


# The stated bound: on these models and this batch the lowest cosine over the three architectures, both paths
# and both vectors measured 0.99992 (a 2-core Intel Xeon, torch 2.13; `python -m bench.precision` measures real
# models). Rounding δ alone to bf16 would cost far less than this bound (relative noise 2^-9 moves a cosine by
# ~1e-6), which is why the islands have their own test above.
BF16_COSINE = 0.9995


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("gradient", ["factored", "exact"])
def test_a_bf16_encoding_stays_within_the_stated_cosine_of_float32(arch, gradient):
    model = tiny_model(arch)
    ref = encode(model, gradient)
    low = encode(copy.deepcopy(model).to(torch.bfloat16), gradient)
    for key in ("vectors", "vectors_uncorrected"):
        cos = torch.nn.functional.cosine_similarity(low[key].double(), ref[key].double(), dim=1)
        assert cos.min() > BF16_COSINE, (key, cos.tolist())
