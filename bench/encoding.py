"""Encode benchmark: encode throughput and peak memory as ratios to a plain training step.

    python -m bench.encoding [--dim 65536] [--device auto]      (from the repository root)

Each mode runs in its own process on the same batches of a small GPT-2-like model, so peak memory
(CPU: max RSS above the process's baseline; GPU: torch.cuda.max_memory_allocated above baseline)
is the mode's own. Ratios, not absolute figures, are the result: these machines are shared.
Targets: factored >= 0.8x, exact >= 0.4x a training step's tokens/s; memory <= 1.5x.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import typer

import trackstar as ts

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
ROOT = Path(__file__).resolve().parents[1]


def build(arch: str, dtype: str, device: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2-small":  # ~100M parameters, for the GPU
        model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024))
    elif arch == "llama-100m":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                             num_attention_heads=12, vocab_size=32000))
    else:  # a small GPT-2-like model that a 2-core CPU runs in seconds
        model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=512))
    return model.eval().to(device=device, dtype=getattr(torch, dtype))


def batches(vocab: int, n: int, batch: int, length: int, device: str):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        lengths = [length - (i * length // (4 * batch)) for i in range(batch)]  # mixed lengths, padded
        out.append(ts.collate([(ids := torch.randint(0, vocab, (L,), generator=g).tolist(), ids) for L in lengths],
                              device))
    return out


def memory_now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm", encoding="utf-8") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_memory(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_mode(mode: str, arch: str, dtype: str, device: str, dim: int, n: int, batch: int, length: int) -> dict:
    """One mode in this process: warm up, then time n batches; memory above the set-up baseline."""
    model = build(arch, dtype, device)
    data = batches(model.config.vocab_size, n + 1, batch, length, device)
    return {"mode": mode, **timed(mode_step(mode, model, dim), data, device)}


def mode_step(mode: str, model: torch.nn.Module, dim: int) -> Callable[[dict], object]:
    """What one batch costs in `mode`: a training step, or encoding on a gradient path ("factored" with a
    rank-one V, as --factor-v gives; "exact" with a full V), "+emb" tracing the embedding lookups too."""
    if mode == "train":
        return train_step(model)
    gradient, params = mode.split("+")[0], "all" if mode.endswith("+emb") else "matrices"
    modules = ts.weight_modules(model)
    lookups = ts.lookup_modules(model) if params == "all" else []
    g = torch.Generator().manual_seed(0)  # an Adam-like V for every parameter
    v = {p: torch.rand(prm.shape, generator=g) + 0.1 for p, prm in model.named_parameters()}
    V = ts.SecondMoment(v, "file", None, None, 0.0, "bench")
    V = ts.factor_second_moment(V, 1e-8) if gradient == "factored" else V
    enc = ts.make_encoder(model, dim, 0, ts.correction_scales(model, V, 1e-8, modules, lookups), gradient,
                          params=params)
    return lambda b: ts.encode_batch(enc, b)


def timed(step: Callable[[dict], object], data: list[dict], device: str) -> dict:
    """tokens/s over data[1:] after a warm-up on data[0]; peak memory (MiB) above the baseline before it."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base = memory_now(device)
    step(data[0])  # warm-up (allocator, kernels)
    sync(device)
    t0 = time.perf_counter()
    tokens = 0
    for b in data[1:]:
        step(b)
        tokens += int(b["attention_mask"].sum())
    sync(device)
    return {"tokens_per_s": tokens / (time.perf_counter() - t0), "peak_mib": peak_memory(device) - base,
            "base_mib": base}


def train_step(model):
    for p in model.parameters():
        p.requires_grad_(True)

    def step(b):
        ts.per_example_loss(model, b).sum().backward()
        model.zero_grad(set_to_none=True)

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# Encoder modes: gradient path, and "+emb" for --params all (the embedding lookups too).
MODES = ("train", "factored", "exact", "factored+emb", "exact+emb")


@app.command()
def main(
    dim: int = typer.Option(65536, help="Projection dimension."),
    arch: str = typer.Option("gpt2-tiny", help="gpt2-tiny (CPU) | gpt2-small | llama-100m (GPU, ~100M)."),
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("auto"),
    n: int = typer.Option(6, help="Timed batches per mode."),
    batch: int = typer.Option(8),
    length: int = typer.Option(128),
    mode: str = typer.Option("", hidden=True, help="Internal: run one mode and print JSON."),
) -> None:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if mode:
        print(json.dumps(run_mode(mode, arch, dtype, device, dim, n, batch, length)))
        return
    results = {}
    for m in MODES:
        cmd = [sys.executable, "-m", "bench.encoding", "--mode", m, "--dim", str(dim), "--arch", arch, "--dtype", dtype,
               "--device", device, "--n", str(n), "--batch", str(batch), "--length", str(length)]
        out = subprocess.run(cmd, capture_output=True, encoding="utf-8", check=True, cwd=ROOT)
        results[m] = json.loads(out.stdout.strip().splitlines()[-1])
    flops = flop_model(arch, dim, length)
    train = results["train"]
    print(f"\nencode benchmark: {arch} {dtype} on {device}, d={dim}, batch={batch} x <= {length} tokens (padded)")
    print(f"{'mode':12} {'tokens/s':>10} {'÷ train':>8} {'peak MiB':>9} {'÷ train':>8} {'model GFLOP/s':>14}  target")
    targets = {"factored": ">= 0.8x speed", "exact": ">= 0.4x speed", "factored+emb": "vs factored: --params all",
               "exact+emb": "vs exact: --params all"}
    for m in MODES:
        r, target = results[m], targets.get(m, "")
        print(f"{m:12} {r['tokens_per_s']:10.0f} {r['tokens_per_s'] / train['tokens_per_s']:8.2f} "
              f"{r['peak_mib']:9.0f} {r['peak_mib'] / max(train['peak_mib'], 1e-9):8.2f} "
              f"{r['tokens_per_s'] * flops[m] / 1e9:14.1f}  {target}")
    print("model GFLOP/s: tokens/s x the FLOP model of docs/scale.md (train 6N; factored 4N + projections;\n"
          "exact 6N + per-example projections), N = traced weight-matrix parameters. Compare with the\n"
          "machine's matmul rate (bench/indexing.py prints it) to see what fraction of peak each mode reaches.")


def flop_model(arch: str, dim: int, length: int) -> dict[str, float]:
    """FLOPs per token of each mode, from the traced matrices' shapes (docs/scale.md)."""
    model = build(arch, "float32", "cpu")
    s_out, s_in = ts.factor_dims(dim)
    shapes = [(m.weight.shape[::-1] if t else m.weight.shape) for _, m, _, t in ts.weight_modules(model)]
    n = sum(o * i for o, i in shapes)
    projections = sum(2 * (i * s_in + o * s_out) + 2 * dim for o, i in shapes)
    per_example = sum(2 * o * i * s_out + 2 * s_out * i * s_in for o, i in shapes)  # P_outᵀ G, then · P_in
    mean_length = 0.89 * length  # of the unpadded examples in `batches`
    flops = {"train": 6 * n, "factored": 4 * n + projections, "exact": 6 * n + per_example / mean_length}
    # a lookup adds a row gather and one (h x s_in) projection per token, per lookup
    lookups = sum(2 * m.weight.shape[1] * s_in + 2 * dim for _, m, _ in ts.lookup_modules(model))
    return {**flops, "factored+emb": flops["factored"] + lookups, "exact+emb": flops["exact"] + lookups}


if __name__ == "__main__":
    app()
