"""Encode: per-example projected gradients equal an independent per-example backward loop."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, project_full_gradient, tiny_model

import encode
import trackstar as ts

DIM = 256
SEED = 7


def examples(kind: str, vocab: int = 96) -> list[tuple[list[int], list[int]]]:
    """Mixed lengths in one batch, so the batch is padded; queries mask their prompt."""
    g = torch.Generator().manual_seed(1)
    out = []
    for n in (5, 11, 3, 8):
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        labels = list(ids) if kind == "corpus" else [ts.IGNORE] * (n - 2) + ids[-2:]
        out.append((ids, labels))
    return out


def reference_vector(model, ids, labels, dim, seed, v_full=None, v_factored=None, eps=0.0,
                     params="matrices") -> torch.Tensor:
    """One example alone: full weight gradients by ordinary autograd, corrected, projected, summed.

    params="all" adds every nn.Embedding's whole gradient; a tied embedding is one parameter, whose
    gradient (lookup + LM head) autograd sums, projected once as the LM head."""
    m = copy.deepcopy(model)
    if params == "matrices" and m.get_output_embeddings().weight is m.get_input_embeddings().weight:
        # Untie, so the LM head's gradient is its own use only (as the encoder traces it).
        m.get_output_embeddings().weight = torch.nn.Parameter(m.get_output_embeddings().weight.detach().clone())
    for p in m.parameters():
        p.requires_grad_(True)
    x = torch.tensor([ids])
    logp = torch.log_softmax(m(input_ids=x).logits[0].double(), -1)
    loss = sum(-logp[t, labels[t + 1]] for t in range(len(ids) - 1) if labels[t + 1] != ts.IGNORE)
    loss.backward()
    total = torch.zeros(dim)
    traced = [(name, pname, transposed) for name, _, pname, transposed in ts.weight_modules(model)]
    if params == "all":
        traced += [(name, pname, False) for name, mod, pname in ts.lookup_modules(model)
                   if not any(name == t[0] for t in traced)]  # tied: already in the LM head's gradient
    for name, pname, transposed in traced:
        mod = dict(m.named_modules())[name]
        grad = mod.weight.grad.double()
        if v_full is not None:
            grad = grad / (v_full[pname].double() + eps).sqrt()
        if v_factored is not None:
            row, col = v_factored[pname]
            grad = grad / (torch.outer(row, col).double() / row.double().mean()).sqrt()
        grad = grad.T if transposed else grad
        total += project_full_gradient(grad.float(), seed, name, dim)
    return total


def encoded(model, exs, scales, path, dim=DIM, seed=SEED, also_uncorrected=False, params="matrices"):
    enc = ts.make_encoder(model, dim, seed, scales, path, also_uncorrected, params)
    return ts.encode_batch(enc, ts.collate(exs, "cpu"))


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got - want).abs().max() / want.abs().max()
    assert err < 2e-4, f"relative error {err:.2e}"


def random_v(model, seed=3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) * 1e-2 + 1e-4 for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("kind", ["corpus", "queries"])
def test_exact_path_with_full_adam_v_matches_per_example_backward(arch, kind, tmp_path):
    model = tiny_model(arch)
    v = random_v(model)
    torch.save(v, tmp_path / "v.pt")
    V = ts.load_second_moment(str(tmp_path / "v.pt"), model)
    eps = 1e-6
    scales = ts.correction_scales(model, V, eps, ts.weight_modules(model))
    exs = examples(kind)
    got = encoded(model, exs, scales, "exact", also_uncorrected=True)
    for b, (ids, labels) in enumerate(exs):
        assert_matches(got["vectors"][b], reference_vector(model, ids, labels, DIM, SEED, v_full=v, eps=eps))
        assert_matches(got["vectors_uncorrected"][b], reference_vector(model, ids, labels, DIM, SEED))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("kind", ["corpus", "queries"])
def test_factored_path_without_correction_matches_per_example_backward(arch, kind):
    model = tiny_model(arch)
    exs = examples(kind)
    got = encoded(model, exs, {}, "factored")["vectors"]
    for b, (ids, labels) in enumerate(exs):
        assert_matches(got[b], reference_vector(model, ids, labels, DIM, SEED))


def adafactor_state(model, tmp_path):
    """A real HF Adafactor state after two steps, saved as optimizer.pt."""
    from transformers.optimization import Adafactor

    m = copy.deepcopy(model)
    opt = Adafactor(m.parameters(), lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False)
    x = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    for _ in range(2):
        m(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    return tmp_path / "optimizer.pt"


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("kind", ["corpus", "queries"])
def test_factored_path_with_adafactor_v_matches_per_example_backward(arch, kind, tmp_path):
    model = tiny_model(arch)
    path = adafactor_state(model, tmp_path)
    V = ts.load_second_moment(str(path), model)
    assert V.source == "adafactor" and any(isinstance(v, ts.RankOne) for v in V.values.values())
    scales = ts.correction_scales(model, V, 0.0, ts.weight_modules(model))
    exs = examples(kind)
    got = encoded(model, exs, scales, "auto")  # auto picks factored for a factored V
    # the reference reads Adafactor's raw row/column statistics from the file, in parameter order
    state = torch.load(path, weights_only=True)["state"]
    fact = {n: (state[i]["exp_avg_sq_row"], state[i]["exp_avg_sq_col"])
            for i, (n, _) in enumerate(model.named_parameters()) if "exp_avg_sq_row" in state.get(i, {})}
    for b, (ids, labels) in enumerate(exs):
        assert_matches(got["vectors"][b], reference_vector(model, ids, labels, DIM, SEED, v_factored=fact))
    exact = encoded(model, exs, scales, "exact")["vectors"]  # both paths agree on a factored V
    assert_matches(exact, got["vectors"])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_padding_invariance_vector_does_not_depend_on_batch(arch):
    model = tiny_model(arch)
    exs = examples("corpus")
    together = encoded(model, exs, {}, "factored")["vectors"]
    for b, ex in enumerate(exs):
        alone = encoded(model, [ex], {}, "factored")["vectors"][0]
        assert_matches(alone, together[b])
    # and with a different, longer neighbour
    longer = (list(range(1, 40)), list(range(1, 40)))
    assert_matches(encoded(model, [exs[2], longer], {}, "factored")["vectors"][0], together[2])


def test_projected_inner_products_match_full_gradient_inner_products():
    """Johnson–Lindenstrauss for the Kronecker projection: for each pair, |<Pg,Ph> - <g,h>| stays
    within 6 sigma, sigma^2 = (|g|²|h|² + <g,h>²)(1/s_out + 1/s_in + 1/d) per module, summed."""
    model = tiny_model("llama")
    dim = 4096
    s_out, s_in = ts.factor_dims(dim)
    exs = examples("corpus")
    got = encoded(model, exs, {}, "factored", dim=dim)["vectors"].double()
    full = []  # per-example list of per-module full gradients
    for ids, labels in exs:
        m = copy.deepcopy(model)
        for p in m.parameters():
            p.requires_grad_(True)
        ts.per_example_loss(m, ts.collate([(ids, labels)], "cpu")).sum().backward()
        full.append([dict(m.named_modules())[n].weight.grad.double() for n, *_ in ts.weight_modules(model)])
    for i in range(len(exs)):
        for j in range(len(exs)):
            true = sum((a * b).sum() for a, b in zip(full[i], full[j], strict=True))
            var = sum(((a * a).sum() * (b * b).sum() + (a * b).sum() ** 2) * (1 / s_out + 1 / s_in + 1 / dim)
                      for a, b in zip(full[i], full[j], strict=True))
            assert abs(got[i] @ got[j] - true) < 6 * math.sqrt(var), (i, j)
    # self inner products (squared norms) are close in relative terms
    norms = torch.tensor([sum((a * a).sum() for a in f) for f in full])
    assert torch.allclose((got * got).sum(1), norms, rtol=0.35)


def test_same_seed_same_matrices_in_a_fresh_process():
    here = ts.projection_matrix(11, "model.layers.0.mlp.up_proj", "in", 48, 16)
    code = ("import trackstar as ts; m = ts.projection_matrix(11, 'model.layers.0.mlp.up_proj', 'in', 48, 16);"
            "print(m.double().sum().item(), m.double().square().sum().item(), m[3, 5].item())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    want = f"{here.double().sum().item()} {here.double().square().sum().item()} {here[3, 5].item()}"
    assert out.stdout.strip() == want
    assert not torch.equal(here, ts.projection_matrix(12, "model.layers.0.mlp.up_proj", "in", 48, 16))
    assert not torch.equal(here, ts.projection_matrix(11, "model.layers.0.mlp.down_proj", "in", 48, 16))
    # variance 1/s per factor, so the Kronecker product has variance 1/d
    big = ts.projection_matrix(0, "x", "in", 512, 256)
    assert abs(big.var().item() * 256 - 1) < 0.02


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_factored_full_v_matches_exact_path_on_its_rank_one_estimate(arch, tmp_path):
    """--factor-v: the factored path on Adafactor's row/column means of V + eps equals the reference
    gradient divided by sqrt(row ⊗ col / mean(row))."""
    model = tiny_model(arch)
    v = random_v(model)
    torch.save(v, tmp_path / "v.pt")
    eps = 1e-4
    V = ts.factor_second_moment(ts.load_second_moment(str(tmp_path / "v.pt"), model), eps)
    scales = ts.correction_scales(model, V, 0.0, ts.weight_modules(model))
    exs = examples("queries")
    got = encoded(model, exs, scales, "auto")["vectors"]
    fact = {n: ((x + eps).mean(1), (x + eps).mean(0)) for n, x in v.items() if x.ndim == 2}
    for b, (ids, labels) in enumerate(exs):
        assert_matches(got[b], reference_vector(model, ids, labels, DIM, SEED, v_factored=fact))


# --params all: the embedding lookups too, on padded batches of mixed lengths, against the same reference.

EMBED_ARCHS = ["gpt2", "llama", "llama-tied", "neox"]  # GPT-2: tied, with `wpe`; Llama untied and tied


@pytest.mark.parametrize("arch", EMBED_ARCHS)
@pytest.mark.parametrize("kind", ["corpus", "queries"])
def test_embeddings_without_correction_match_per_example_backward(arch, kind):
    model = tiny_model(arch)
    names = {n for n, *_ in ts.lookup_modules(model)}
    assert ("transformer.wpe" in names) == (arch == "gpt2")
    exs = examples(kind)
    got = encoded(model, exs, {}, "factored", params="all")["vectors"]
    for b, (ids, labels) in enumerate(exs):
        want = reference_vector(model, ids, labels, DIM, SEED, params="all")
        assert_matches(got[b], want)
        without = reference_vector(model, ids, labels, DIM, SEED)
        assert (want - without).norm() > 0.05 * want.norm(), "the embeddings must add something"


@pytest.mark.parametrize("arch", EMBED_ARCHS)
def test_embeddings_with_full_adam_v_match_per_example_backward(arch, tmp_path):
    """V applied to the rows actually touched: each token's row divided by its own sqrt(V + eps)."""
    model = tiny_model(arch)
    v = random_v(model)
    torch.save(v, tmp_path / "v.pt")
    V, eps = ts.load_second_moment(str(tmp_path / "v.pt"), model), 1e-6
    scales = ts.correction_scales(model, V, eps, ts.weight_modules(model), ts.lookup_modules(model))
    exs = examples("corpus")
    got = encoded(model, exs, scales, "exact", also_uncorrected=True, params="all")
    for b, (ids, labels) in enumerate(exs):
        assert_matches(got["vectors"][b], reference_vector(model, ids, labels, DIM, SEED, v_full=v, eps=eps,
                                                           params="all"))
        assert_matches(got["vectors_uncorrected"][b], reference_vector(model, ids, labels, DIM, SEED, params="all"))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_embeddings_with_rank_one_v_match_per_example_backward(arch, tmp_path):
    model = tiny_model(arch)
    v = random_v(model)
    torch.save(v, tmp_path / "v.pt")
    eps = 1e-4
    V = ts.factor_second_moment(ts.load_second_moment(str(tmp_path / "v.pt"), model), eps)
    scales = ts.correction_scales(model, V, 0.0, ts.weight_modules(model), ts.lookup_modules(model))
    exs = examples("queries")
    got = encoded(model, exs, scales, "auto", params="all")["vectors"]
    fact = {n: ((x + eps).mean(1), (x + eps).mean(0)) for n, x in v.items() if x.ndim == 2}
    for b, (ids, labels) in enumerate(exs):
        assert_matches(got[b], reference_vector(model, ids, labels, DIM, SEED, v_factored=fact, params="all"))


def test_embedding_padding_row_gets_no_gradient():
    """Llama's embedding has padding_idx = pad_token_id; that row never gets a gradient, so a document that
    contains the pad token (often the EOS) must not add one: checked against autograd."""
    model = tiny_model("llama")
    assert model.get_input_embeddings().padding_idx == 0
    exs = [([5, 0, 9, 3, 0, 7], [5, 0, 9, 3, 0, 7]), ([4, 0, 8], [4, 0, 8])]
    got = encoded(model, exs, {}, "factored", params="all")["vectors"]
    for b, (ids, labels) in enumerate(exs):
        assert_matches(got[b], reference_vector(model, ids, labels, DIM, SEED, params="all"))


def test_a_batch_that_runs_out_of_memory_is_split_and_retried_never_lost(monkeypatch):
    """An out-of-memory batch (a GPU's OutOfMemoryError, or the CPU allocator's RuntimeError) is halved and each
    half retried until it fits: every example comes back, in order, equal to the unsplit batch's vectors up to
    round-off; one example that does not fit alone is an error naming its length; other errors pass through."""
    model = tiny_model("llama")
    enc = ts.make_encoder(model, 64, 0, {}, "factored")
    examples = [(ids, ids) for ids in ([5, 9, 3, 7, 2], [4, 8], [6, 1, 6], [3, 3, 9, 1], [7])]
    want = ts.encode_tokenized(enc, examples, 10**6)["vectors"]
    real, sizes = ts.encode_batch, []

    def tight(enc, batch, error=torch.OutOfMemoryError("CUDA out of memory (simulated)")):
        sizes.append(batch["input_ids"].shape[0])
        if batch["input_ids"].shape[0] > 2:
            raise error
        return real(enc, batch)

    monkeypatch.setattr(ts, "encode_batch", tight)
    split = ts.encode_fitting(enc, examples, torch.device("cpu"))
    assert split["vectors"].shape[0] == len(examples), "a split batch returns every example, not one half"
    sizes.clear()
    got = ts.encode_tokenized(enc, examples, 10**6)["vectors"]
    assert sizes == [5, 2, 3, 1, 2]  # 5 -> 2 + 3, and 3 -> 1 + 2
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    cpu_error = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(ts, "encode_batch", lambda e, b: tight(e, b, cpu_error))
    np.testing.assert_allclose(ts.encode_tokenized(enc, examples, 10**6)["vectors"], want, rtol=1e-5, atol=1e-6)

    def never(enc, batch):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(ts, "encode_batch", never)
    with pytest.raises(ts.TrackStarError, match="one example of 5 tokens does not fit in memory"):
        ts.encode_tokenized(enc, examples[:1], 10**6)

    def broken(enc, batch):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(ts, "encode_batch", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        ts.encode_tokenized(enc, examples, 10**6)


def test_automatic_token_budget_follows_model_size_and_memory():
    """A power of two within [256, cap], fewer tokens for a larger model or less memory, more on a GPU of the
    same size (no page cache to share), and the same for the same machine (ranks and resumes agree)."""
    small, large = tiny_model("llama"), tiny_model("gpt2")
    large.config.n_layer, large.config.n_embd = 48, 4096  # the budget reads the shape from the config
    for model in (small, large):
        budgets = [encode.auto_token_budget(model, "cpu", gib << 30) for gib in (1, 4, 16, 64, 256)]
        assert all(256 <= b <= 8192 and b & (b - 1) == 0 for b in budgets)
        assert budgets == sorted(budgets)
    assert encode.auto_token_budget(large, "cpu", 64 << 30) < encode.auto_token_budget(small, "cpu", 64 << 30)
    assert (encode.auto_token_budget(large, "cpu", 64 << 30) <= encode.auto_token_budget(large, "cuda", 64 << 30)
            <= 65536)
    assert encode.auto_token_budget(large, "cpu", 1 << 30) == 256
    assert encode.auto_token_budget(small, "cpu") == encode.auto_token_budget(small, "cpu")
