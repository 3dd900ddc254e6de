"""Encode benchmark: encode throughput and peak memory as ratios to a plain training step and MFU.

    python -m bench.encoding [--dim 65536] [--device auto] [--out FILE.json]      (from the repository root)

Each mode runs in its own process on the same batches of a small GPT-2-like model, so peak memory
(CPU: max RSS above the process's baseline; GPU: torch.cuda.max_memory_allocated above baseline)
is the mode's own. Ratios, not absolute figures, are the result: these machines are shared. MFU
divides each mode's tokens/s x 6N by the device's matmul peak, measured in the same run (an
n x n x n matmul in the model's dtype, before and after the modes). Targets: factored >= 0.8x,
exact >= 0.4x a training step's tokens/s; memory <= 1.5x.
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
from bench.limits import matmul_rate, sync

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
ROOT = Path(__file__).resolve().parents[1]


def build(arch: str, dtype: str, device: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2-small":  # ~100M parameters, for the GPU
        model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024))
    elif arch == "llama-1b":  # Llama 3.2 1B's shape: 1.2B parameters (the 128k-row embedding tied to the head)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                             tie_word_embeddings=True, max_position_embeddings=8192))
    elif arch == "llama-tiny":  # the same code paths in a second: the smoke tests' stand-in for llama-1b
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                             tie_word_embeddings=True, max_position_embeddings=512))
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


def adam_like_v(model: torch.nn.Module, seed: int = 0) -> ts.SecondMoment:
    """A full V for every parameter, uniform in [0.1, 1.1), seeded: the same for every mode and dtype of a model."""
    g = torch.Generator().manual_seed(seed)
    v = {n: torch.rand(p.shape, generator=g) + 0.1 for n, p in model.named_parameters()}
    return ts.SecondMoment(v, "file", None, None, 0.0, "bench")


def mode_step(mode: str, model: torch.nn.Module, dim: int) -> Callable[[dict], object]:
    """What one batch costs in `mode`: a training step, or encoding on a gradient path ("factored" with a
    rank-one V, as --factor-v gives; "exact" with a full V), "+emb" tracing the embedding lookups too."""
    if mode == "train":
        return train_step(model)
    gradient, params = mode.split("+")[0], "all" if mode.endswith("+emb") else "matrices"
    modules = ts.weight_modules(model)
    lookups = ts.lookup_modules(model) if params == "all" else []
    V = adam_like_v(model)
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


# Encoder modes: gradient path, and "+emb" for --params all (the embedding lookups too).
MODES = ("train", "factored", "exact", "factored+emb", "exact+emb")


@app.command()
def main(
    dim: int = typer.Option(65536, help="Projection dimension."),
    arch: str = typer.Option("gpt2-tiny", help="gpt2-tiny (CPU) | gpt2-small | llama-100m (GPU, ~100M) | llama-1b "
                             "(GPU, Llama 3.2 1B's shape) | llama-tiny."),
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("auto"),
    n: int = typer.Option(6, help="Timed batches per mode."),
    batch: int = typer.Option(8),
    length: int = typer.Option(128),
    out: Path | None = typer.Option(None, help="Also write the figures as JSON (what tools/record.py keeps)."),
    mode: str = typer.Option("", hidden=True, help="Internal: run one mode and print JSON."),
) -> None:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if mode:
        print(json.dumps(run_mode(mode, arch, dtype, device, dim, n, batch, length)))
        return
    # The peak before and after the modes, the best of both: neighbours on a shared machine come and go.
    peak = matmul_rate(device, dtype)
    results = {}
    for m in MODES:
        cmd = [sys.executable, "-m", "bench.encoding", "--mode", m, "--dim", str(dim), "--arch", arch, "--dtype", dtype,
               "--device", device, "--n", str(n), "--batch", str(batch), "--length", str(length)]
        run = subprocess.run(cmd, capture_output=True, encoding="utf-8", check=True, cwd=ROOT)
        results[m] = json.loads(run.stdout.strip().splitlines()[-1])
    peak = max(peak, matmul_rate(device, dtype))
    summary = summarize(results, build(arch, dtype, "cpu"), dim, length, peak)
    summary.update(arch=arch, dtype=dtype, device=device, dim=dim, batch=batch, length=length, batches=n)
    print(markdown(summary))
    if out is not None:
        ts.write_json(out, summary)


def summarize(results: dict[str, dict], model: torch.nn.Module, dim: int, length: int, peak: float) -> dict:
    """Each mode's figures (`results`: "train" and the encode modes, in order) as ratios: to the training step,
    to the device's measured matmul peak (`peak`, GFLOP/s) and to the model's bytes.

    MFU = tokens/s x 6N ÷ the peak for every mode, N the traced weight-matrix parameters (ts.weight_modules:
    attention, MLP and the LM head; embeddings, norms and biases left out, as is attention's own T² work): the
    share of the device a training step's useful work would use at that speed. `work ÷ peak` counts each mode's
    own FLOP model instead (docs/scale.md). Peak memory is above the process's baseline (model and batches
    loaded), ÷ the model's parameter bytes."""
    flops = flop_model(model, dim, length)
    matrices = flops["train"] / 6
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    train = results["train"]
    rows = []
    for m, r in results.items():
        rows.append({"mode": m, "tokens_per_s": r["tokens_per_s"], "peak_mib": r["peak_mib"],
                     "speed_vs_train": r["tokens_per_s"] / train["tokens_per_s"],
                     "memory_vs_train": r["peak_mib"] / max(train["peak_mib"], 1e-9),
                     "gflop_s": r["tokens_per_s"] * flops[m] / 1e9,
                     "mfu": r["tokens_per_s"] * 6 * matrices / (peak * 1e9),
                     "work_vs_peak": r["tokens_per_s"] * flops[m] / (peak * 1e9),
                     "memory_vs_model": r["peak_mib"] / model_mib})
    return {"matmul_gflop_s": peak, "matrix_params": matrices, "model_mib": model_mib, "modes": rows}


TARGETS = {"factored": "≥ 0.8× speed", "exact": "≥ 0.4× speed", "factored+emb": "vs factored: --params all",
           "exact+emb": "vs exact: --params all"}


def markdown(s: dict) -> str:
    """The figures as a table, under a line saying what ran and the measured peak."""
    head = (f"{s['arch']} in {s['dtype']} on {s['device']}, d = {s['dim']:,}, batches of {s['batch']} × "
            f"≤ {s['length']} tokens; N = {s['matrix_params'] / 1e6:.1f}M traced matrix parameters, model "
            f"{s['model_mib']:.0f} MiB; "
            f"measured {s['dtype']} matmul peak {s['matmul_gflop_s']:.0f} GFLOP/s.\n\n"
            "| mode | tokens/s | ÷ train | peak MiB | ÷ train | ÷ model | GFLOP/s | work ÷ peak | MFU (6N) | target |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    return "\n".join([head] + [
        f"| {r['mode']} | {r['tokens_per_s']:.0f} | {r['speed_vs_train']:.2f} | {r['peak_mib']:.0f} | "
        f"{r['memory_vs_train']:.2f} | {r['memory_vs_model']:.2f} | {r['gflop_s']:.1f} | {r['work_vs_peak']:.3f} | "
        f"{r['mfu']:.3f} | {TARGETS.get(r['mode'], '')} |" for r in s["modes"]])


def flop_model(model: torch.nn.Module, dim: int, length: int) -> dict[str, float]:
    """FLOPs per token of each mode, from the traced matrices' shapes (docs/scale.md)."""
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
