"""GPU checks and ratios in one run (a few minutes on one GPU): what a CPU cannot show.

    python -m bench.gpu [--model smollm2] [--device cuda] [--out bench-gpu.json]
    python -m bench.gpu --device cpu --model DIR --small      # the smoke test the suite runs

1. encode: tokens/s and peak memory of each gradient path (factored with a rank-one V, exact with a
   full V) in float32 and bfloat16, as ratios to a plain training step on the same batches and dtype.
   The batches fill the default token budget, so peak memory includes the chunked logits.
2. precision: cosine of each encoding to the float32 one (matmul precision "highest") on this device:
   TF32 ("high"), a bfloat16 model; and of this device's float32 encoding to the CPU's (P is drawn the
   same on every device, so they must agree to float tolerance).
3. scan: query.py's exact blocked scan of a float16 index in host memory (page cache), streamed
   through the pinned ping-pong buffers: GB/s ÷ the measured host-to-device bandwidth (the binding
   limit for an index that lives on the host) and ÷ device memory bandwidth; top-10 agreement with a
   CPU scan of the same index.
4. tail-patch: seconds per document and peak device memory ÷ the model's own size.

Ratios, not absolute figures, are the result: they survive a shared, noisy machine.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import typer

import evaluate
import query
import trackstar as ts
from bench import encoding as bench_encode
from bench import indexing as bench_index

app = typer.Typer(add_completion=False, rich_markup_mode=None)


def device_bandwidth(device: str, gib: float) -> tuple[float, float]:
    """(host-to-device GB/s from pinned memory, device memory GB/s of a copy: read + write)."""
    n = int(gib * 2**30) // 4
    host = torch.ones(n, pin_memory=device.startswith("cuda"))
    a, b = torch.ones(n, device=device), torch.empty(n, device=device)
    h2d = host.nbytes / best_of(lambda: a.copy_(host, non_blocking=True), device)
    mem = 2 * a.nbytes / best_of(lambda: b.copy_(a), device)
    return h2d / 1e9, mem / 1e9


def best_of(f: Callable[[], object], device: str, repeat: int = 3) -> float:
    """Fastest wall time of `repeat` runs, the device synchronised around each."""
    def once() -> None:
        f()
        bench_encode.sync(device)
    once()  # warm-up
    return bench_index.best_of(once, repeat)


def encode_section(model_path: str, device: str, dim: int, n: int, batch: int, length: int) -> list[dict]:
    """Speed and memory per (dtype, mode), as ratios to a training step in the same dtype."""
    rows = []
    for dtype in ("float32", "bfloat16"):
        model, _ = ts.load_model(model_path, dtype, device)
        data = bench_encode.batches(model.config.vocab_size, n + 1, batch, length, device)
        train = bench_encode.timed(bench_encode.mode_step("train", model, dim), data, device)
        if not device.startswith("cuda"):  # in-process peak RSS means nothing: bench_encode.py measures the CPU
            train["peak_mib"] = float("nan")
        rows.append({"dtype": dtype, "mode": "train", **train})
        for mode in ("factored", "exact"):
            r = bench_encode.timed(bench_encode.mode_step(mode, model, dim), data, device)
            r["peak_mib"] = r["peak_mib"] if device.startswith("cuda") else float("nan")
            rows.append({"dtype": dtype, "mode": mode, **r, "speed_vs_train": r["tokens_per_s"] / train["tokens_per_s"],
                         "memory_vs_train": r["peak_mib"] / max(train["peak_mib"], 1e-9)})
        del model, data
        free(device)
    return rows


def precision_section(model_path: str, device: str, dim: int, batch: int, length: int) -> list[dict]:
    """Cosine to this device's float32 encodings of one batch: TF32 matmuls, the model cast to bfloat16,
    and the CPU's float32 encodings."""
    model, _ = ts.load_model(model_path, "float32", device)
    cpu_model, _ = ts.load_model(model_path, "float32", "cpu")
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)  # a cast and back would round the float32 weights
    data = bench_encode.batches(model.config.vocab_size, 1, batch, length, device)[0]
    cpu_data = {k: t.cpu() for k, t in data.items()}

    def encode(m: torch.nn.Module, mode: str, precision: str, b: dict) -> torch.Tensor:
        ts.pin_precision(precision)
        try:
            return bench_encode.mode_step(mode, m, dim)(b)["vectors"].double().cpu()
        finally:
            ts.pin_precision("highest")

    rows = []
    for mode in ("factored", "exact"):
        ref = encode(model, mode, "highest", data)
        others = {"tf32": encode(model, mode, "high", data),
                  "cpu float32": encode(cpu_model, mode, "highest", cpu_data)}
        others["bfloat16"] = encode(bf16_model, mode, "highest", data)
        for name, x in others.items():
            cos = torch.nn.functional.cosine_similarity(x, ref, dim=1)
            rows.append({"mode": mode, "vs_float32": name, "min_cosine": float(cos.min()),
                         "mean_cosine": float(cos.mean())})
    return rows


def scan_section(device: str, rows: int, dim: int, queries: tuple[int, ...], gib: float) -> dict:
    """The exact scan from host memory on `device`: GB/s against the bus and the device's memory, and
    whether its top-10 agrees with the CPU's."""
    h2d, mem = device_bandwidth(device, gib)
    out = {"h2d_gb_s": h2d, "device_memory_gb_s": mem, "rows": rows, "dim": dim, "scans": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.h5"
        bench_index.make_index(path, rows, dim)
        bench_index.warm(path)
        gb = rows * dim * 2 / 1e9
        for n_queries in queries:
            q = torch.nn.functional.normalize(torch.randn(n_queries, dim, generator=torch.Generator().manual_seed(1)),
                                              dim=1)
            block = query.default_block(device, n_queries, dim)

            def scan(q=q.to(device), block=block) -> tuple:
                with torch.inference_mode():
                    return query.blocked_topk(q, query.iter_index_blocks(path, block, device), 10)

            seconds = best_of(scan, device, 2)
            top = scan()[1]
            with torch.inference_mode():
                top_cpu = query.blocked_topk(q, query.iter_index_blocks(path, 4096, "cpu"), 10)[1]
            agree = float(np.mean([set(a.tolist()) == set(b.tolist()) for a, b in zip(top, top_cpu, strict=True)]))
            out["scans"].append({"queries": n_queries, "block": block, "gb_s": gb / seconds,
                                 "vs_h2d": gb / seconds / h2d, "vs_device_memory": gb / seconds / mem,
                                 "top10_same_as_cpu": agree})
    return out


def tail_patch_section(model_path: str, device: str, n_docs: int, length: int) -> dict:
    """Seconds per document of a tail-patch step and its peak memory ÷ the model's size (model, V and
    one model-sized buffer are the floor: 3x)."""
    model, tok = ts.load_model(model_path, "float32", device)
    g = torch.Generator().manual_seed(0)
    v = {n: (torch.rand(p.shape, generator=g) + 0.1).to(device) for n, p in model.named_parameters()}
    step = evaluate.Step(model, tok, v, 1e-8, 1e-4, evaluate.DEFAULT_BETAS, ts.context_length(model), "bench")
    queries = [{"prompt": f"Question {i}: the answer is", "target": f" {i}"} for i in range(8)]
    docs = [torch.randint(0, model.config.vocab_size, (length,), generator=g).tolist() for _ in range(n_docs + 1)]
    base = evaluate.target_logprob(model, tok, queries, step.max_length)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    evaluate.tail_patch(step, (docs[0], docs[0]), queries, base)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for doc in docs[1:]:
        evaluate.tail_patch(step, (doc, doc), queries, base)
    bench_encode.sync(device)
    seconds = (time.perf_counter() - t0) / n_docs
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else float("nan")
    return {"seconds_per_doc": seconds, "doc_tokens": length, "peak_vs_model": peak / model_bytes,
            "model_gib": model_bytes / 2**30}


def free(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def markdown(r: dict) -> str:
    """The figures as README-ready tables (a failed section as its error)."""
    lines = [f"device: {r['device']}; model: {r['model']}; d = {r['dim']}; torch {r['torch']}, CUDA {r['cuda']}"]
    for name, table in (("encode", encode_table), ("precision", precision_table), ("scan", scan_table),
                        ("tail_patch", tail_patch_table)):
        part = r.get(name, {"error": "not run"})
        lines += [""] + ([f"{name}: FAILED: {part['error']}"] if isinstance(part, dict) and "error" in part
                         else table(part))
    return "\n".join(lines)


def encode_table(rows: list[dict]) -> list[str]:
    return ["| dtype | mode | tokens/s | ÷ train | peak MiB | ÷ train |",
            "| --- | --- | ---: | ---: | ---: | ---: |"] + [
        f"| {e['dtype']} | {e['mode']} | {e['tokens_per_s']:.0f} | {e.get('speed_vs_train', 1):.2f} | "
        f"{e['peak_mib']:.0f} | {e.get('memory_vs_train', 1):.2f} |" for e in rows]


def precision_table(rows: list[dict]) -> list[str]:
    return ["| path | vs float32 | min cosine | mean cosine |", "| --- | --- | ---: | ---: |"] + [
        f"| {p['mode']} | {p['vs_float32']} | {p['min_cosine']:.6f} | {p['mean_cosine']:.6f} |" for p in rows]


def scan_table(s: dict) -> list[str]:
    return [f"scan of {s['rows']} x {s['dim']} float16 from host memory; host-to-device {s['h2d_gb_s']:.1f} GB/s, "
            f"device memory {s['device_memory_gb_s']:.1f} GB/s", "",
            "| queries | block | GB/s | ÷ host-to-device | ÷ device memory | top-10 = CPU's |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |"] + [
        f"| {x['queries']} | {x['block']} | {x['gb_s']:.1f} | {x['vs_h2d']:.2f} | {x['vs_device_memory']:.3f} | "
        f"{x['top10_same_as_cpu']:.2f} |" for x in s["scans"]]


def tail_patch_table(t: dict) -> list[str]:
    return [f"tail-patch: {t['seconds_per_doc']:.3f} s per {t['doc_tokens']}-token document; peak memory "
            f"{t['peak_vs_model']:.2f}x the model ({t['model_gib']:.2f} GiB)"]


@app.command(help=__doc__)
def main(
    model: str = typer.Option("smollm2", help="Model directory (or `smollm2`, the packaged SmolLM2-135M)."),
    device: str = typer.Option("cuda", help="cuda (the point of this script) or cpu (a smoke test)."),
    dim: int = typer.Option(65536, help="Projection dimension d."),
    small: bool = typer.Option(False, help="Tiny sizes throughout: a smoke test of the script itself."),
    out: Path = typer.Option(Path("bench-gpu.json"), help="Where the figures are written (JSON; .md beside)."),
) -> None:
    device = ts.pick_device(device)
    ts.pin_precision("highest")
    if small:
        dim, n, batch, length, scan_rows, scan_dim, gib, docs = 256, 2, 4, 32, 4096, 256, 0.01, 2
    else:  # 16 x 512 = 8,192 tokens a batch: the default token budget
        n, batch, length, scan_rows, scan_dim, gib, docs = 5, 16, 512, 524_288, 4096, 1.0, 8
    t0 = time.perf_counter()
    result = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "model": model,
              "dim": dim, "torch": torch.__version__, "cuda": torch.version.cuda}
    sections = {"encode": lambda: encode_section(model, device, dim, n, batch, length),
                "precision": lambda: precision_section(model, device, dim, min(batch, 4), length),
                "scan": lambda: scan_section(device, scan_rows, scan_dim, (1, 1024), gib),
                "tail_patch": lambda: tail_patch_section(model, device, docs, length)}
    failed = []
    for name, section in sections.items():
        # GPU time is scarce: a section that fails is recorded and the others still run; what is done so
        # far is on disk after each section, so a run cut short keeps its figures.
        try:
            result[name] = section()
        except Exception as e:  # noqa: BLE001 — reported, and the exit status says so
            traceback.print_exc()
            result[name] = {"error": ts.first_line(e)}
            failed.append(name)
        free(device)
        result["seconds"] = time.perf_counter() - t0
        with ts.atomic_path(out) as tmp:
            tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    md = markdown(result)
    with ts.atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(md + "\n", encoding="utf-8")
    print(md)
    print(f"({result['seconds']:.0f} s; {out} and {out.with_suffix('.md')})")
    if failed:
        raise ts.TrackStarError(f"bench_gpu sections failed: {', '.join(failed)} (tracebacks above)")

if __name__ == "__main__":
    ts.run_cli(app)
