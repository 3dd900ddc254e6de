"""Where the time of a training step and of an encode goes: the profiler's self time by operator, grouped.

    python -m bench.breakdown [--model smollm2 | DIR | gpt2-tiny | llama-1b ...] [--device auto] [--batch 8]
                              [--length 128] [--dim 16384] [--out F.json]

MFU (bench.encoding) says how far a step is from the device's matmul peak; this says why. One batch per
mode (train, factored, exact; after a warm-up) runs under torch.profiler, and each operator's self time
(device time on a GPU, CPU time on a CPU) falls in one group: matmul (mm, addmm, bmm), attention
(scaled_dot_product_attention's kernels), loss (log-softmax, NLL and their backward), copies and casts,
and the rest (elementwise: norms, activations, residual adds, the hooks' small ops). For each mode:

* each group's share of the busy time, and the matmuls' achieved FLOP/s (the profiler's FLOP counts ÷
  their time) ÷ the device's measured peak: slow matmuls (small shapes) or a large rest;
* busy ÷ wall: the device's busy time ÷ the profiled step's wall time. Far below 1 on a GPU,
  the step waits on the host (kernel launches, Python): a larger batch or fewer, larger kernels help,
  faster kernels do not;
* the step's wall time without the profiler, operators per step, and that time ÷ operators (µs each);
* the largest operators of the rest, each with its share of the busy time.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import typer
from torch.profiler import ProfilerActivity, profile

import trackstar as ts
from bench import encoding as bench_encode
from bench.limits import best_of, matmul_rate, sync

app = typer.Typer(add_completion=False, rich_markup_mode=None)

GROUPS = ("matmul", "attention", "loss", "copies and casts", "the rest")
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation"}
COPIES = {"aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::index",
          "aten::cat"}


def group(name: str) -> str:
    """The group an operator's time counts in."""
    if name in MATMULS:
        return "matmul"
    if "attention" in name or "flash" in name:
        return "attention"
    if "log_softmax" in name or "nll_loss" in name or "cross_entropy" in name:
        return "loss"
    return "copies and casts" if name in COPIES else "the rest"


def profiled(step, batch: dict, device: str) -> dict:
    """Self time (µs) and FLOPs per group, operator count and wall time of one `step(batch)` under the profiler."""
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, with_flops=True) as prof:
        t0 = time.perf_counter()
        step(batch)
        sync(device)
        wall = time.perf_counter() - t0
    us = dict.fromkeys(GROUPS, 0.0)
    flops = dict.fromkeys(GROUPS, 0.0)
    ops, rest = 0, {}
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue  # the profiler's own ranges and CUDA runtime calls: no work of their own
        t = e.self_device_time_total if cuda else e.self_cpu_time_total
        us[group(e.key)] += t
        flops[group(e.key)] += e.flops or 0
        ops += e.count
        if group(e.key) == "the rest":
            rest[e.key.removeprefix("aten::")] = t
    top = sorted(rest.items(), key=lambda kv: -kv[1])[:4]
    return {"us": us, "flops": flops, "ops": ops, "wall_s": wall, "rest_top": top}


def breakdown(model: torch.nn.Module, device: str, dim: int, batch: int, length: int, peak: float) -> list[dict]:
    """One row a mode: its groups' shares of the busy time, matmul FLOP/s ÷ `peak` (GFLOP/s), busy ÷ wall."""
    data = bench_encode.batches(model.config.vocab_size, 1, batch, length, device)[0]
    rows = []
    for mode in ("train", "factored", "exact"):
        step = bench_encode.mode_step(mode, model, dim)
        step(data)  # warm-up: allocator, kernels
        wall = best_of(lambda step=step: step(data), 3, device)
        p = profiled(step, data, device)
        busy = sum(p["us"].values()) / 1e6
        mm = p["us"]["matmul"] / 1e6
        rows.append({"mode": mode, "wall_s": wall, "busy_s": busy, "busy_vs_wall": busy / p["wall_s"],
                     "shares": {g: p["us"][g] / 1e6 / busy for g in GROUPS},
                     "matmul_vs_peak": p["flops"]["matmul"] / max(mm, 1e-12) / (peak * 1e9),
                     "ops": p["ops"], "us_per_op": wall * 1e6 / max(p["ops"], 1),
                     "rest_top": [(name, t / 1e6 / busy) for name, t in p["rest_top"]],
                     "tokens": int(data["attention_mask"].sum())})
    return rows


def load(name: str, dtype: str, device: str) -> torch.nn.Module:
    """A bench.encoding shape (random weights) by its name, else a model directory (or smollm2)."""
    if name in ("gpt2-tiny", "gpt2-small", "llama-100m", "llama-1b", "llama-tiny"):
        return bench_encode.build(name, dtype, device)
    return ts.load_model(name, dtype, device)[0]


def markdown(r: dict) -> str:
    lines = [f"{r['model']} in {r['dtype']} on {r['device']}, one batch of {r['batch']} × ≤ {r['length']} tokens, "
             f"d = {r['dim']:,}; measured matmul peak {r['matmul_gflop_s']:.0f} GFLOP/s.\n",
             "| mode | wall s | busy ÷ wall | " + " | ".join(GROUPS) + " | matmul ÷ peak | operators | µs / op | "
             "the rest's largest: share |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in GROUPS) + " | ---: | ---: | ---: | --- |"]
    for m in r["modes"]:
        shares = " | ".join(f"{m['shares'][g]:.2f}" for g in GROUPS)
        lines.append(f"| {m['mode']} | {m['wall_s']:.3f} | {m['busy_vs_wall']:.2f} | {shares} | "
                     f"{m['matmul_vs_peak']:.2f} | {m['ops']:,} | {m['us_per_op']:.0f} | "
                     + "; ".join(f"{n} {x:.2f}" for n, x in m.get("rest_top", [])) + " |")
    return "\n".join(lines)


@app.command(help=__doc__)
def main(model: str = typer.Option("smollm2", help="A model directory, smollm2, or a bench.encoding shape "
                                   "(gpt2-tiny, gpt2-small, llama-100m, llama-1b, llama-tiny: random weights)."),
         dtype: str = typer.Option("float32"), device: str = typer.Option("auto"),
         dim: int = typer.Option(16384), batch: int = typer.Option(8), length: int = typer.Option(128),
         out: Path | None = typer.Option(None, help="Write the figures here (JSON).")) -> None:
    device = ts.pick_device(device)
    ts.pin_precision("highest")
    t0 = time.perf_counter()
    peak = matmul_rate(device, dtype)
    rows = breakdown(load(model, dtype, device), device, dim, batch, length, peak)
    result = {"model": model, "dtype": dtype, "device": device, "dim": dim, "batch": batch, "length": length,
              "matmul_gflop_s": peak, "modes": rows,
              "seconds": time.perf_counter() - t0}
    print(markdown(result))
    if out is not None:
        ts.write_json(out, result)


if __name__ == "__main__":
    ts.run_cli(app)
