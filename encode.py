"""Encode stage: a corpus or a query set -> optimizer-corrected, projected per-example gradients.

    python encode.py corpus  --model DIR --data corpus.jsonl  --out RUN/corpus
    python encode.py queries --model DIR --data queries.jsonl --out RUN/queries

Writes RUN/.../meta.json (the run's settings, and the provenance of the command that started the run) and
HDF5 chunks `chunk-000123.h5` (datasets `vectors`, `ids`, and with --also-uncorrected `vectors_uncorrected`;
vectors computed in float32, stored as --chunk-dtype: float32, bfloat16 as uint16 bits, or float16, and read
back as float32). Chunk i holds input rows [i*C, (i+1)*C). A chunk file appears under its final name only when
whole, so a rerun skips finished chunks and resumes; under torchrun or --shard/--num-shards each process
encodes chunks i with i % n == shard.

--data is one JSONL, .jsonl.gz or Parquet file, a directory of them, or a quoted glob pattern ('shards/*.parquet').
It is streamed twice and never held: a first pass validates and tokenizes every record (so a bad one is named
before anything is written, and the run's counts are known), a second tokenizes and encodes one chunk's
records at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import typer
from torch import nn
from tqdm import tqdm

import trackstar as ts

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__)

LOSS = {"corpus": "all tokens", "queries": "target tokens given the prompt"}
FIELDS = {"corpus": '{"id", "text", "facts": [fact ids] (optional)}',
          "queries": '{"id", "prompt", "target", "fact" (optional)}, the target being the words after the prompt: '
                     'a space is put before a target that has none when the prompt does not end with one (" Paris", '
                     'never "Paris", after "The capital of France is"), for every method alike'}
# What a run folder holds before meta.json says what it is (a run killed after its V estimate).
OWN = ("meta.json", "second_moment.pt", "chunk-*.h5", "chunk-*.h5.damaged")
PARAMS = ("matrices", "all")  # what `--params` traces: the weight matrices, or those and the embedding lookups


@dataclasses.dataclass(frozen=True)
class Options:
    """The command line as given (`main` says what each option means)."""

    kind: str
    model: str
    data: Path
    out: Path
    dim: int
    seed: int
    optimizer_state: str | None
    estimate_v: int
    no_correction: bool
    eps: float | None
    factor_v: bool
    params: str
    gradient: str
    max_length: int | None
    token_budget: int | None
    chunk_size: int
    also_uncorrected: bool
    dtype: str
    chunk_dtype: str
    matmul_precision: str
    device: str
    shard: int | None
    num_shards: int | None
    plan_only: bool


def check_options(o: Options) -> None:
    """Every option checked before any work is done or any file written."""
    if o.kind not in LOSS:
        raise ts.TrackStarError(f"KIND must be corpus or queries, got {o.kind!r}")
    if o.gradient not in ("auto", "factored", "exact"):
        raise ts.TrackStarError(f"--gradient must be auto, factored or exact, got {o.gradient!r}")
    ts.factor_dims(o.dim)  # a power of two >= 4
    for name, value in (("--max-length", o.max_length), ("--token-budget", o.token_budget),
                        ("--chunk-size", o.chunk_size)):
        if value is not None and value < 1:
            raise ts.TrackStarError(f"{name} must be >= 1, got {value}")
    if o.max_length is not None and o.max_length < 2:  # one token to predict from, one to predict
        raise ts.TrackStarError(f"--max-length {o.max_length} leaves no token to carry a loss: every example needs "
                                "at least 2 tokens")
    if o.estimate_v < 0:
        raise ts.TrackStarError(f"--estimate-v must be >= 0, got {o.estimate_v}")
    if o.dtype == "float16":  # without loss scaling, δ underflows in the lower layers
        raise ts.TrackStarError("--dtype float16 is not supported (gradients underflow without loss scaling); "
                                "use bfloat16 or float32")
    if o.dtype not in ("float32", "bfloat16"):
        raise ts.TrackStarError(f"--dtype must be float32 or bfloat16, got {o.dtype!r}")
    if o.chunk_dtype not in ts.CHUNK_DTYPES:
        raise ts.TrackStarError(f"--chunk-dtype must be one of {list(ts.CHUNK_DTYPES)}, got {o.chunk_dtype!r}")
    if o.params not in PARAMS:
        raise ts.TrackStarError(f"--params must be one of {PARAMS}, got {o.params!r}")
    if sum([o.optimizer_state is not None, o.estimate_v > 0, o.no_correction]) > 1:
        raise ts.TrackStarError("give only one of --optimizer-state, --estimate-v, --no-correction")


def resolve_shard(shard: int | None, num_shards: int | None) -> tuple[int, int]:
    """--shard/--num-shards, else torchrun's RANK/WORLD_SIZE, else a single process."""
    if shard is not None and num_shards is None:
        raise ts.TrackStarError(f"--shard {shard} needs --num-shards (how many shards there are)")
    if num_shards is not None:
        if shard is None or not 0 <= shard < num_shards:
            raise ts.TrackStarError(f"--shard must be in [0, {num_shards}), got {shard}")
        return shard, num_shards
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ----------------------------------------------------------------------------------------------
# Planning: everything a run is settled by before its first chunk, in the order it is found out: the options,
# the model, the first pass over the data, the token budget, V, and the settings every chunk will carry.


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run as planning leaves it: the options, the model, what the first pass found, and (once chosen) V and
    the run's settings."""

    o: Options
    model: nn.Module
    tokenizer: Any
    device: str
    rank: int
    world: int
    max_length: int
    n_rows: int
    truncated: int
    token_budget: int
    digest: str  # of --data, read once: for a folder of shards it reads every byte of them
    modules: list  # the traced matrices (ts.weight_modules) and lookups (ts.lookup_modules)
    lookups: list
    V: ts.SecondMoment | None = None
    run: ts.RunSettings | None = None


def plan(o: Options) -> Plan:
    """Options checked, the model loaded, the data surveyed (the first pass), V chosen and the run's settings
    built; nothing is written but a V estimate."""
    check_options(o)
    rank, world = resolve_shard(o.shard, o.num_shards)
    device = ts.pick_device(o.device)
    if o.dtype == "bfloat16":
        ts.check_bf16_attention(device)
    ts.pin_precision(o.matmul_precision)
    ts.data_files(o.data)  # a missing input, or a folder holding other files, is named before the model loads
    state_file = o.optimizer_state if o.optimizer_state and Path(o.optimizer_state).is_file() else None
    o = dataclasses.replace(o, out=ts.check_output(o.out, f"{o.kind} run", [o.model, o.data, state_file], own=OWN))
    model, tokenizer = ts.load_model(o.model, o.dtype, device)
    max_length = min(o.max_length or ts.context_length(model), ts.context_length(model))
    n_rows, truncated, shown, n_tokens = survey(o.data, o.kind, tokenizer, max_length, model, o.chunk_size)
    if truncated:
        typer.echo(f"truncated {truncated} documents to {max_length} tokens ({', '.join(shown)}...)")
    token_budget = o.token_budget or recorded_budget(o.out) or auto_token_budget(model, device)
    typer.echo(f"token budget: {token_budget} padded tokens a batch")
    modules = ts.weight_modules(model)
    lookups = ts.lookup_modules(model) if o.params == "all" else []
    if o.plan_only:  # the bill, from the survey alone: nothing is estimated or written
        datasets = 2 if o.also_uncorrected and not o.no_correction else 1
        print_bill(bill(model, modules, lookups, n_rows, n_tokens, o.dim, o.chunk_dtype, datasets, token_budget),
                   device)
        raise typer.Exit(0)
    p = Plan(o, model, tokenizer, device, rank, world, max_length, n_rows, truncated, token_budget,
             ts.data_digest(o.data), modules, lookups)
    V, v_file = second_moment(p)
    return dataclasses.replace(p, V=V, run=settings(p, V, v_file))


def survey(data: Path, kind: str, tokenizer, max_length: int, model: nn.Module, chunk_size: int
           ) -> tuple[int, int, list[str], int]:
    """The first pass: every record read, validated and tokenized, then dropped, before anything is written.
    Returns how many records there are, how many documents are truncated, where the first ten of those are, and
    how many tokens the records hold (after truncation)."""
    n, n_truncated, shown, tokens, unspaced = 0, 0, [], 0, (0, None)
    with tqdm(desc=f"check {kind}", unit="ex") as bar:
        for window in windows(ts.iter_records(data, kind), chunk_size):
            tokenized, truncated = ts.tokenize_rows(tokenizer, window, kind, max_length)
            check_vocabulary(tokenized, window, model)
            n, n_truncated, shown = n + len(window), n_truncated + len(truncated), (shown + truncated)[:10]
            tokens += sum(len(ids) for ids, _ in tokenized)
            if kind == "queries":
                unspaced = ts.unspaced_targets(window, *unspaced)
            bar.update(len(window))
    if warning := ts.unspaced_target_warning(*unspaced):
        typer.echo(warning, err=True)
    return n, n_truncated, shown, tokens


def windows(records: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Consecutive lists of `size` records (the last may be shorter): window i is chunk i's rows."""
    it = iter(records)
    while window := list(itertools.islice(it, size)):
        yield window


def check_vocabulary(tokenized: list, rows: list[dict], model: nn.Module) -> None:
    """Every token id must have an embedding row: a tokenizer larger than its model is refused up front."""
    vocab = model.get_input_embeddings().weight.shape[0]
    for (ids, _), row in zip(tokenized, rows, strict=True):
        if max(ids) >= vocab:
            raise ts.TrackStarError(f"{row['_where']}: token id {max(ids)} is beyond the model's {vocab} "
                                    "embeddings: the tokenizer does not belong to this model")


def recorded_budget(out: Path) -> int | None:
    """The token budget an existing run was encoded with: a resume keeps it (batches, and so round-off, alike)."""
    return ts.read_meta(out).token_budget if (out / "meta.json").exists() else None


def auto_token_budget(model: nn.Module, device: str, total_bytes: int | None = None) -> int:
    """Padded tokens per encoding batch, from the model's shape and the device's memory: the largest power
    of two whose activations (kept for the backward pass: 3x a rough per-token count, a margin that covers
    the fact world's model and SmolLM2 as measured) fit in 80% of a GPU's memory or 40% of a CPU's, besides
    the model and V, between 256 and 65,536 tokens (8,192 on a CPU, where larger batches buy no speed).
    Total, not free, memory: every rank and every resumed run on one machine type picks the same budget
    (it is recorded; a resume keeps its own)."""
    per_token = activation_bytes(model)
    gpu = torch.device(device).type == "cuda"
    if total_bytes is None:
        if gpu:
            total_bytes = torch.cuda.get_device_properties(torch.device(device)).total_memory
        else:
            total_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    usable = int((0.8 if gpu else 0.4) * total_bytes)  # a CPU shares its memory with the page cache and the rest
    fits = max(0, usable - 2 * model_bytes) // per_token  # the model, and V or its scales
    cap = 65536 if gpu else 8192
    return int(min(cap, max(256, 1 << max(fits, 1).bit_length() - 1)))


def activation_bytes(model: nn.Module) -> int:
    """Bytes a token's activations take while kept for the backward pass: 3x a rough per-token count, a margin
    that covers the fact world's model and SmolLM2 as measured."""
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 768)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 12)
    inner = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    return 3 * next(model.parameters()).element_size() * layers * (16 * hidden + 3 * inner)


# ----------------------------------------------------------------------------------------------
# The bill (--plan, `make plan`): what each stage will cost, from the model's shape and the survey's counts.
# FLOPs count 2 per multiply-add. Encode, factored path, per token: forward 2N + activation-gradient backward 2N
# (frozen weights: no weight-gradient GEMMs), and per traced matrix (out, in) the projections 2(out·s_out +
# in·s_in) and the outer product 2d; the exact path adds the weight gradient 2N a token and, per example and
# matrix, P_out·(∇W/sqrt(V+eps))·P_in: 2·out·in·s_in + 2·out·s_in·s_out. Lookups (--params all) add their
# projections, not 4N (a lookup is a gather). R: the sample Gram 2·n·d² and a d³ eigendecomposition (float64);
# the index transform 2·n·d²; a scan 2·n·d per query.

GPU_RATE = 0.4 * 989e12  # an H100's bf16 dense rate at an assumed 40% utilisation, FLOP/s
INDEX_BYTES = 2  # float16 index rows (index.py --dtype float16, the default)


def bill(model: nn.Module, modules: list, lookups: list, n_docs: int, n_tokens: int, dim: int, chunk_dtype: str,
         datasets: int, token_budget: int) -> dict:
    """FLOPs, bytes and peak memory of each stage for n_docs examples of n_tokens tokens in all, at d = dim, with
    `datasets` vectors a row (2 with --also-uncorrected) stored as chunk_dtype."""
    s_out, s_in = ts.factor_dims(dim)
    shapes = [tuple(m.weight.shape[::-1] if t else m.weight.shape) for _, m, _, t in modules]  # (out, in)
    shapes += [tuple(m.weight.shape) for _, m, _ in lookups]  # (rows, h): ∇E is a (rows, h) matrix
    n_matrix = sum(out * inp for out, inp in shapes[: len(modules)])
    projections = sum(2 * (out * s_out + inp * s_in) + 2 * dim for out, inp in shapes)
    factored = n_tokens * (4 * n_matrix + projections)
    exact = factored + 2 * n_matrix * n_tokens + n_docs * sum(2 * out * inp * s_in + 2 * out * s_in * s_out
                                                              for out, inp in shapes)
    itemsize = np.dtype(ts.CHUNK_DTYPES[chunk_dtype]).itemsize
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sample = min(n_docs, 100000)  # index.py --train-sample's default
    return {
        "documents": n_docs, "tokens": n_tokens, "traced parameters": n_matrix, "dim": dim,
        "encode FLOPs (factored)": factored, "encode FLOPs (exact)": exact,
        "chunk bytes": n_docs * (dim * itemsize * datasets + 8),  # vectors (+ uncorrected) and int64 ids
        "encode peak bytes": 2 * model_bytes + token_budget * activation_bytes(model),  # model, V (or scales)
        "R FLOPs": 2 * sample * dim ** 2 + dim ** 3, "R peak bytes": 3 * dim ** 2 * 8,
        # a Hessian-corrected index (TrackStar's): index.h5 holds the rows, their ids and the d x d float32 query
        # transform; hessian.h5 R^(-1/2) (float32) and three spectra (float64)
        "index FLOPs": 2 * n_docs * dim ** 2, "index bytes": n_docs * (dim * INDEX_BYTES + 8) + 4 * dim ** 2,
        "hessian bytes": 4 * dim ** 2 + 3 * 8 * dim,
        "scan FLOPs per query": 2 * n_docs * dim,
    }


def paper_bill() -> dict:
    """The paper's setting: an 8B Llama shape (built without weights), 365M documents of 160B tokens, d = 2^16,
    float32 chunks of the corrected vectors only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return bill(model, ts.weight_modules(model), [], 365_000_000, 160_000_000_000, 65536, "float32", 1, 4096)


def measured_rate(device: str, n: int = 1024, seconds: float = 0.5) -> float:
    """This machine's float32 matmul rate (FLOP/s), measured on an n x n product for about `seconds`."""
    a = torch.randn(n, n, device=device)
    (a @ a).sum().item()  # warm-up
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        (a @ a).sum().item()
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def print_bill(b: dict, device: str) -> None:
    rate = measured_rate(device)
    hours = lambda flops, r: f"{flops / r / 3600:.3g} h"  # noqa: E731
    size = lambda x: "-" if x is None else f"{x / 2**30:.3g} GiB"  # noqa: E731
    typer.echo(f"the bill: {b['documents']:,} examples, {b['tokens']:,} tokens, {b['traced parameters']:,} traced "
               f"parameters, d = {b['dim']}; hours at this machine's measured {rate / 1e9:.0f} GFLOP/s float32 "
               f"matmul rate (an upper bound on speed) and at {GPU_RATE / 1e12:.0f} TFLOP/s (an H100 at 40% of bf16)")
    rows = [("encode (factored)", b["encode FLOPs (factored)"], b["chunk bytes"], b["encode peak bytes"]),
            ("encode (exact)", b["encode FLOPs (exact)"], b["chunk bytes"], b["encode peak bytes"]),
            ("R (index.py)", b["R FLOPs"], None, b["R peak bytes"]),
            ("index transform", b["index FLOPs"], b["index bytes"] + b["hessian bytes"], None),
            ("scan, per query", b["scan FLOPs per query"], None, None)]
    typer.echo(f"{'stage':<18} {'FLOPs':>10} {'written':>10} {'peak memory':>12} {'measured':>10} {'H100':>10}")
    for name, flops, written, peak in rows:
        typer.echo(f"{name:<18} {flops:>10.3g} {size(written):>10} {size(peak):>12} {hours(flops, rate):>10} "
                   f"{hours(flops, GPU_RATE):>10}")


def second_moment(p: Plan) -> tuple[ts.SecondMoment | None, str | None]:
    """Where V comes from: a state file, an estimate over a corpus sample (cached in --out), or none."""
    o = p.o
    if o.no_correction:
        return None, None
    if o.estimate_v > 0:
        v_file = o.out / "second_moment.pt"
        if not v_file.exists() and p.rank == 0:
            estimate_to_file(p, v_file)
        wait_for(v_file, "shard 0's V estimate")  # one estimate for all shards: they must share its digest
        V = ts.load_second_moment(str(v_file), p.model)
        want = estimate_source(p)
        if V.source != want:  # a rerun with another --estimate-v must not reuse the old estimate
            raise ts.TrackStarError(f"{v_file} holds {V.source}, this run asks for {want}; "
                                    "delete it or encode into a new --out")
        return V, str(v_file.resolve())
    optimizer_state = o.optimizer_state
    if optimizer_state is None:
        default = Path(p.model.trackstar_path) / "optimizer.pt"
        if not default.exists():
            raise ts.TrackStarError(
                f"no optimizer state at {default}; pass --optimizer-state FILE, --estimate-v N or --no-correction"
            )
        optimizer_state = str(default)
    return ts.load_second_moment(optimizer_state, p.model), str(Path(optimizer_state).resolve())


def wait_for(path: Path, what: str, poll_s: float = 2.0, timeout_s: float = 7 * 24 * 3600) -> None:
    """Block until `path` exists (written atomically by another process), saying once what we wait for."""
    if path.exists():
        return
    typer.echo(f"waiting for {what} at {path}", err=True)
    start = time.monotonic()
    while not path.exists():
        if time.monotonic() - start > timeout_s:
            raise ts.TrackStarError(f"gave up waiting for {what} at {path}")
        time.sleep(poll_s)


def estimate_second_moment(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """V ≈ mean over minibatches of (minibatch gradient)², for every parameter.

    For models without a saved optimizer state. Each minibatch gradient is of the
    mean per-example loss, as a training step would take it.
    """
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    v = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        ts.per_example_loss(model, batch).mean().backward()
        for n, p in params.items():
            if p.grad is not None:
                v[n] += p.grad.float() ** 2
        count += 1
    model.zero_grad(set_to_none=True)
    return {n: (x / max(count, 1)).cpu() for n, x in v.items()}


def estimate_to_file(p: Plan, v_file: Path) -> None:
    """V from mean squared minibatch gradients over a seeded sample of --estimate-v of the corpus's documents.

    Minibatches hold at most 8 documents of similar length and at most `token_budget` padded tokens:
    a plain backward keeps every layer's activations and the B·T·vocab logits, so one long document
    in a fixed batch of 8 once took 24 GB on SmolLM2.
    """
    picks = random.Random(p.o.seed).sample(range(p.n_rows), min(p.o.estimate_v, p.n_rows))  # as sampling the rows
    wanted = set(picks)
    found = {i: row for i, row in enumerate(ts.iter_records(p.o.data, "corpus")) if i in wanted}
    sample = [found[i] for i in picks]
    tokenized, _ = ts.tokenize_rows(p.tokenizer, sample, "corpus", p.max_length)
    dev = next(p.model.parameters()).device
    groups = ts.length_batches([len(ids) for ids, _ in tokenized], p.token_budget, max_batch=8)
    batches = (ts.collate([tokenized[i] for i in idx], dev) for idx in groups)
    v = estimate_second_moment(p.model, tqdm(batches, total=len(groups), desc="estimate V", unit="batch"))
    with ts.atomic_path(v_file) as tmp:
        torch.save({"second_moment": v, "source": estimate_source(p), "lr": None}, tmp)


def estimate_source(p: Plan) -> str:
    """What the run's estimate of V is recorded as: everything it depends on (how many documents, how they are
    batched, the sample's seed, the data's digest)."""
    n = min(p.o.estimate_v, p.n_rows)
    return f"estimate(n={n}, batch<=8 docs and {p.token_budget} tokens, seed={p.o.seed}, data={p.digest})"


def settings(p: Plan, V: ts.SecondMoment | None, v_file: str | None) -> ts.RunSettings:
    """The settings every chunk of the run carries, V's included: eps (by default the optimizer's own, see
    ts.default_eps), V as the encoder divides by it, and the gradient path it allows."""
    o = p.o
    eps = o.eps
    if V is not None and eps is None:
        eps = ts.default_eps(V, [name for _, _, name, _ in p.modules])
    applied, _ = ts.applied_second_moment(V, eps or 0.0, o.factor_v)
    gradient = o.gradient
    if gradient == "auto":  # the factored gradient is exact for no V and for a rank-one V of every traced matrix
        rank_one = applied is None or all(isinstance(applied.values.get(name), ts.RankOne)
                                          for _, _, name, _ in p.modules)
        gradient = "factored" if rank_one else "exact"
    return ts.RunSettings(
        tool=f"trackstar {ts.VERSION}", kind=o.kind, loss=LOSS[o.kind],
        data=str(o.data.resolve()), data_digest=p.digest, n_examples=p.n_rows,
        chunk_size=o.chunk_size, n_chunks=-(-p.n_rows // o.chunk_size), token_budget=p.token_budget,
        datasets=["vectors", "vectors_uncorrected"] if (o.also_uncorrected and V is not None) else ["vectors"],
        model=p.model.trackstar_fingerprint, model_path=p.model.trackstar_path, dtype=o.dtype,
        max_length=p.max_length, truncated=p.truncated,
        dim=o.dim, seed=o.seed, factors=list(ts.factor_dims(o.dim)), modules=modules_digest(p.modules, p.lookups),
        params=o.params, gradient=gradient, matmul_precision=o.matmul_precision,
        device_type=torch.device(p.device).type, chunk_dtype=o.chunk_dtype,
        correction=applied.source if applied else "none",
        v_digest=applied.digest if applied else None, v_file=v_file, eps=eps or 0.0,
        lr=V.lr if V else None, factor_v=o.factor_v,
    )


def modules_digest(modules: list, lookups: list) -> str:
    """Identity of the traced modules and lookups and their shapes (part of the projection's definition)."""
    desc = ";".join(f"{n}{tuple(m.weight.shape)}" for n, m, *_ in [*modules, *lookups])
    extra = f" + {len(lookups)} lookups" if lookups else ""
    return f"{len(modules)} matrices{extra}/" + hashlib.sha256(desc.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# Encoding: the second pass. Chunk i is window i of the records; each is encoded, checked and written whole, and
# a rerun skips the chunks that are done (resume) or that are other shards'.


def encode(p: Plan) -> None:
    """Encode this process's chunks of the planned run that are not done yet."""
    run, out = p.run, p.o.out
    enc = ts.build_encoder(p.model, p.V, run, p.o.also_uncorrected)
    with ts.writer_lock(out, f"-shard{p.rank}"):  # a second process encoding the same shard is refused
        check_resume(out, run)
        # every chunk already there is checked before meta.json is (re)written: a refused run changes nothing
        done = {i for i in range(p.rank, run.n_chunks, p.world) if finished(out, run, i)}
        write_meta(out, run)
        mine = [i for i in range(p.rank, run.n_chunks, p.world) if i not in done]
        typer.echo(f"{run.kind}: {run.n_examples} examples, {run.n_chunks} chunks, {len(mine)} to encode here "
                   f"(shard {p.rank}/{p.world}), gradient={run.gradient}, correction={run.correction}, d={run.dim}")
        encode_chunks(p, enc, mine)


def check_resume(out: Path, run: ts.RunSettings) -> None:
    """A rerun into an existing directory must have exactly the same settings; when the data or a setting
    changed, the refusal says what to run (a run is never replaced without being asked)."""
    if (out / "meta.json").exists():
        try:
            ts.check_same(ts.read_meta(out), run, ts.CHUNK_KEYS, f"existing run {out}", "this run")
        except ts.TrackStarError as e:
            raise ts.TrackStarError(f"{e}. To encode it anew: rm -r {out}, then rerun (make reruns every "
                                    "stage after it), or give another --out") from None


def finished(out: Path, run: ts.RunSettings, i: int) -> bool:
    """Whether chunk i is done: present, whole and this run's. A damaged chunk is re-encoded; one written
    with other settings is refused (check_same names the setting and both values)."""
    path = out / ts.chunk_name(i)
    if not path.exists():
        return False
    try:
        ts.check_chunk(path, run, i)
    except ts.DamagedChunk as e:
        kept = path.with_name(path.name + ".damaged")
        os.replace(path, kept)  # kept for inspection, never deleted
        typer.echo(f"{e}: encoding it again (the damaged file is kept as {kept.name})", err=True)
        return False
    return True


def write_meta(out: Path, run: ts.RunSettings) -> None:
    """meta.json: the run's settings, and the provenance of the process that started the run. A resume or
    another shard keeps the provenance recorded (it is never compared), so only a run's settings decide
    whether a rerun may add to it."""
    path = out / "meta.json"
    recorded = json.loads(path.read_text(encoding="utf-8")).get("provenance") if path.exists() else None
    ts.write_json(path, {**dataclasses.asdict(run), "provenance": recorded or ts.provenance()})


def encode_chunks(p: Plan, enc: ts.Encoder, mine: list[int]) -> None:
    """Chunks `mine`, from their windows of the records. Other shards' chunks and finished ones are read past,
    never tokenized; reading stops after this process's last chunk."""
    o, run = p.o, p.run
    todo = sum(min(o.chunk_size, p.n_rows - i * o.chunk_size) for i in mine)
    left = set(mine)
    with tqdm(total=todo, desc=f"encode {o.kind}", unit="ex") as bar:
        for i, rows in enumerate(windows(ts.iter_records(o.data, o.kind), o.chunk_size)):
            if not left:
                break
            if i not in left:
                continue
            left.remove(i)
            tokenized, _ = ts.tokenize_rows(p.tokenizer, rows, o.kind, p.max_length)
            arrays = ts.encode_tokenized(enc, tokenized, p.token_budget, bar)
            check_storable_rows(arrays, rows, o.chunk_dtype)
            lo = i * o.chunk_size
            write_chunk(o.out / ts.chunk_name(i), arrays, np.arange(lo, lo + len(rows)), run)
    if left:
        raise ts.TrackStarError(f"{o.data} has fewer records than the first pass counted ({p.n_rows}): it changed "
                                "while being encoded")


def check_storable_rows(arrays: dict[str, np.ndarray], rows: list[dict], chunk_dtype: str) -> None:
    """Refuse NaN/inf vectors, and vectors beyond --chunk-dtype's range (float16: ±65504; they would be stored
    as inf), before they are written, naming the first example that gave one."""
    for key, a in arrays.items():
        bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
        if len(bad):
            raise ts.TrackStarError(f"{rows[bad[0]]['_where']}: the example's {key} are NaN or inf "
                                    f"({len(bad)} of {len(rows)} in this chunk): a model with NaN weights, or an "
                                    "overflow in --dtype? Nothing was written for this chunk")
        bad = unstorable_rows(a, chunk_dtype)
        if len(bad):
            raise ts.TrackStarError(f"{rows[bad[0]]['_where']}: the example's {key} reach "
                                    f"{np.abs(a[bad[0]]).max():.6g}, beyond --chunk-dtype {chunk_dtype}'s "
                                    f"±{chunk_limit(chunk_dtype):.6g} "
                                    f"({len(bad)} of {len(rows)} in this chunk); use --chunk-dtype bfloat16 or "
                                    "float32. Nothing was written for this chunk")


def write_chunk(path: str | Path, arrays: dict[str, np.ndarray], ids: np.ndarray, run: ts.RunSettings) -> None:
    """One chunk: datasets `ids` and each of `arrays` (stored as run.chunk_dtype; check_storable_rows has
    refused what it cannot hold), the run's settings as attributes."""
    with ts.atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("ids", data=ids.astype(np.int64))
            for key, a in arrays.items():
                f.create_dataset(key, data=to_chunk_dtype(a, run.chunk_dtype)).attrs["dtype"] = run.chunk_dtype
            ts.write_attrs(f, dataclasses.asdict(run))


def to_chunk_dtype(a: np.ndarray, chunk_dtype: str) -> np.ndarray:
    """float32 vectors as a chunk stores them (bfloat16 as its bits, uint16)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if chunk_dtype == "bfloat16":
        return torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return a.astype(ts.CHUNK_DTYPES[chunk_dtype])


def unstorable_rows(a: np.ndarray, chunk_dtype: str) -> np.ndarray:
    """Indices of rows with NaN, inf, or an entry beyond `chunk_dtype`'s range."""
    return np.flatnonzero(~(np.abs(a) <= chunk_limit(chunk_dtype)).all(axis=1))  # NaN fails <= too


def chunk_limit(chunk_dtype: str) -> float:
    """The largest magnitude `chunk_dtype` holds (float16: 65504); beyond it a value is stored clipped or inf."""
    return float(torch.finfo(getattr(torch, chunk_dtype)).max)


@app.command()
def main(
    kind: str = typer.Argument(..., help="corpus (loss on every token) | queries (on the target given the prompt)."),
    model: str = typer.Option(..., help="Hugging Face model directory (config + weights, or a .gguf file)."),
    data: Path = typer.Option(..., help=f"Input: JSONL (one object a line), .jsonl.gz or Parquet with the same "
                              "fields, or a directory or quoted glob pattern of such files (read in sorted order). "
                              f"corpus: {FIELDS['corpus']}; queries: {FIELDS['queries']}."),
    out: Path = typer.Option(..., help="Output directory of HDF5 chunks (resumed if it exists)."),
    dim: int = typer.Option(65536, help="Projection dimension d (a power of two; the paper: 2^16)."),
    seed: int = typer.Option(0, help="Projection seed (and V-estimate sample seed)."),
    optimizer_state: str | None = typer.Option(
        None, help="Optimizer state: torch/HF optimizer.pt (Adam or Adafactor) or name->tensor file. "
        "Default: MODEL/optimizer.pt if present."),
    estimate_v: int = typer.Option(0, help="Estimate V from N corpus documents (no saved optimizer state)."),
    no_correction: bool = typer.Option(False, help="No optimizer correction (V = none; ablations)."),
    eps: float | None = typer.Option(None, help="eps in sqrt(V + eps). Default: Adam's eps², else 1e-3·mean V."),
    factor_v: bool = typer.Option(False, help="Replace a full V by Adafactor's rank-1 factors (row and column "
                                  "means), so the factored gradient applies: ~a training step's cost."),
    params: str = typer.Option("matrices", help="What g(z) covers: matrices (attention, MLP, LM head) | all (also "
                               "the token and position embedding lookups; docs/results.md has the measured effect)."),
    gradient: str = typer.Option("auto", help="How per-example gradients are formed: auto | factored (project "
                                 "δ and x, never form ∇W; needs no V or a rank-one V) | exact (form ∇W, divide by "
                                 "sqrt(V + eps), project)."),
    max_length: int | None = typer.Option(None, help="Max tokens per example (default: model context)."),
    token_budget: int | None = typer.Option(None, help="Max padded tokens per batch. Default: chosen from the "
                                            "model's shape and the machine's memory, and printed (a resumed run "
                                            "keeps its recorded budget). A batch that runs out of memory is split."),
    chunk_size: int = typer.Option(1024, help="Examples per HDF5 chunk (the unit of resume and sharding)."),
    also_uncorrected: bool = typer.Option(False, help="Also write the uncorrected projection (one model pass)."),
    dtype: str = typer.Option("float32", help="Model compute dtype: float32 | bfloat16."),
    chunk_dtype: str = typer.Option("float32", help="How chunks store the vectors (computed in float32, rounded "
                                    "when written; read back as float32): float32 | bfloat16 | float16 (half the "
                                    "disk; float16 refuses vectors beyond ±65504)."),
    matmul_precision: str = typer.Option("highest", help="float32 matmuls: highest (fp32) | high (TF32 on a GPU "
                                         "that has it: faster, ~1e-3 relative error; recorded, never mixed)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    shard: int | None = typer.Option(None, help="This process's shard index."),
    num_shards: int | None = typer.Option(None, help="Number of shards (default: torchrun WORLD_SIZE or 1)."),
    plan_only: bool = typer.Option(False, "--plan", help="Print the bill (FLOPs, bytes, memory, hours of every stage) "
                              "from the model's shape and the data's token count, and stop: nothing is encoded."),
) -> None:
    """Encode a corpus or a query set into g(z) = P · ∇θL(z) / sqrt(V + eps), one HDF5 chunk at a time."""
    encode(plan(Options(**locals())))  # every option above, as given


if __name__ == "__main__":
    ts.run_cli(app)
