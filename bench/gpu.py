"""GPU checks and ratios in one run (a few minutes on one GPU): what a CPU cannot show.

    python -m bench.gpu [--model smollm2] [--corpus LAMA.jsonl] [--device cuda] [--out bench-gpu.json]
                        [--sections fill,scan]
    python -m bench.gpu --device cpu --model DIR --small      # the smoke test the suite runs
    python -m bench.gpu --device cpu --sections fill          # the host buffers' fill rate on a CPU alone

1. encode: tokens/s and peak memory of each gradient path (factored with a rank-one V, exact with a
   full V) in float32 and bfloat16, as ratios to a plain training step on the same batches and dtype,
   to the model's bytes, and MFU: tokens/s x 6N ÷ the device's matmul peak in that dtype, measured
   in the same run (bench.encoding.summarize). The batches fill the default token budget, so peak
   memory includes the chunked logits.
   encode_1b: the same for a 1.2B-parameter Llama (Llama 3.2 1B's shape, random weights, d <= 16,384).
2. precision: cosine of each encoding to the float32 one (matmul precision "highest") on this device:
   TF32 ("high"), a bfloat16 model; and of this device's float32 encoding to the CPU's (P is drawn the
   same on every device, so they must agree to float tolerance).
   text_precision (with --corpus): bench.precision on this device, by input set (real text, random
   tokens, long documents, rare tokens); TF32 matmuls among the variants.
   islands (with --corpus): bench.islands on this device, what each float32 island of a bfloat16
   encode costs in tokens/s and buys in cosine.
3. fill: the streamed scan's host side alone, GB/s of filling 1,024-row host buffers (pinned on a
   GPU) from the page cache with 1, 2 (and query.FILL_THREADS) threads, ÷ the page cache's memcpy
   rate: with the host-to-device bandwidth of 4, what the scan from host memory can reach.
4. scan: query.py's exact blocked scan of a float16 index, streamed from host memory (the page cache,
   through the pinned ping-pong buffers) in the default blocks and in blocks of one 1,024-row chunk,
   and resident in device memory (as open_index keeps it): GB/s ÷ the measured host-to-device
   bandwidth (the binding limit for an index that lives on the host) and ÷ device memory bandwidth
   (for a resident one), FLOP/s ÷ the float32 matmul peak (many queries); top-10 agreement with a
   CPU scan of the same index.
5. tail-patch: seconds per document and peak device memory ÷ the model's own size.

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

import h5py
import numpy as np
import torch
import typer

import evaluate
import query
import trackstar as ts
from bench import encoding as bench_encode
from bench import indexing as bench_index
from bench import islands as bench_islands
from bench import limits
from bench import precision as bench_precision

app = typer.Typer(add_completion=False, rich_markup_mode=None)


def encode_section(load: Callable[[str], torch.nn.Module], device: str, dim: int, n: int, batch: int, length: int
                   ) -> list[dict]:
    """Speed and memory per (dtype, mode) of the model `load(dtype)` gives, as ratios to a training step in the
    same dtype, to the device's matmul peak in that dtype measured here (MFU, bench_encode.summarize) and to the
    model's bytes."""
    rows = []
    for dtype in ("float32", "bfloat16"):
        model = load(dtype)
        data = bench_encode.batches(model.config.vocab_size, n + 1, batch, length, device)
        results = {}
        for mode in ("train", "factored", "exact"):
            results[mode] = bench_encode.timed(bench_encode.mode_step(mode, model, dim), data, device)
            if not device.startswith("cuda"):  # in-process peak RSS means nothing: bench_encode.py measures the CPU
                results[mode]["peak_mib"] = float("nan")
        peak = limits.matmul_rate(device, dtype)
        summary = bench_encode.summarize(results, model, dim, length, peak)
        rows += [{"dtype": dtype, "matmul_gflop_s": peak, "matrix_params": summary["matrix_params"], **r}
                 for r in summary["modes"]]
        del model, data
        free(device)
    return rows


def text_precision_section(model_path: str, device: str, corpus: Path | None, dim: int, n: int, long: int
                           ) -> dict:
    """bench.precision on this device: the cosine to float32 of a bfloat16 model's and of TF32 matmuls'
    encodings, on the corpus's texts, random tokens, long documents and rare tokens."""
    if corpus is None:
        return {"skipped": "needs --corpus (a corpus JSONL of real text)"}
    texts = [d["text"] for d in ts.read_jsonl(corpus, "corpus")]
    return {"dim": dim, "sets": bench_precision.measure_sets(model_path, Path(model_path).name, texts, device, n,
                                                             dim, 8, long)}


def islands_section(model_path: str, device: str, corpus: Path | None, dim: int, n: int, long: int) -> dict:
    """bench.islands on this device: what each float32 island of a bfloat16 encode costs in tokens/s (on a GPU
    the islands' matmuls run on fp32 CUDA cores, the model's on bf16 tensor cores) and buys in cosine."""
    if corpus is None:
        return {"skipped": "needs --corpus (a corpus JSONL of real text)"}
    return bench_islands.islands_of(model_path, corpus, device, n, dim, 8, long, 2)


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


def fill_section(device: str, gib: float, dim: int = 4096, block: int = 1024) -> dict:
    """The streamed scan's host side alone: GB/s of filling one host buffer of `block` rows (pinned on a GPU)
    from a float16 index in the page cache, block after block, by query.RowReader with 1, 2 (and
    query.FILL_THREADS) threads, ÷ the page cache's memcpy rate: one numpy copy of the whole index out of a
    fresh memory map (the file read once first). Each pass maps the file afresh, as each scan does."""
    rows = max(block, int(gib * 1e9) // (dim * 2))
    cuda = device.startswith("cuda")
    host = torch.empty((block, dim), dtype=torch.float16, pin_memory=cuda)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.h5"
        bench_index.make_index(path, rows, dim)
        bench_index.warm(path)
        whole = np.empty((rows, dim), dtype=np.float16)

        def memcpy() -> None:
            with h5py.File(path, "r") as f:
                np.copyto(whole, query.mapped(path, f["G"]))

        def fill(threads: int) -> None:
            with h5py.File(path, "r") as f:
                reader = query.RowReader(path, f["G"], block, threads)
                try:
                    for lo, m in query.block_starts([(0, rows)], block)[1]:
                        for done in reader.fill(lo, m, host.numpy()):
                            done.result()
                finally:
                    reader.close()

        gb = rows * dim * 2 / 1e9
        base = gb / limits.best_of(memcpy)
        fills = {t: gb / limits.best_of(lambda t=t: fill(t)) for t in sorted({1, 2, query.FILL_THREADS})}
        base = max(base, gb / limits.best_of(memcpy))  # again after the fills: neighbours come and go
    return {"rows": rows, "dim": dim, "gb": gb, "block_rows": block, "pinned": cuda, "memcpy_gb_s": base,
            "fills": [{"threads": t, "gb_s": x, "vs_memcpy": x / base, "vs_one_thread": x / fills[1]}
                      for t, x in fills.items()]}


def scan_section(device: str, rows: int, dim: int, queries: tuple[int, ...], gib: float) -> dict:
    """query.py's exact scan of a float16 index on `device`, from three places: streamed from host memory (the
    page cache, through the pinned ping-pong buffers) in blocks as large as the default allows, streamed in
    blocks of one 1,024-row chunk (what an encoded index's chunks cap a block at), and resident in device memory
    (query.load_resident, as open_index keeps it). GB/s of index scanned ÷ the measured host-to-device bandwidth
    and ÷ device memory's; FLOP/s ÷ the device's float32 matmul peak (the scan's matmul is float32 at
    "highest"); whether the top-10 agrees with a CPU scan's."""
    h2d, mem = limits.device_bandwidth(device, gib)
    peak = limits.matmul_rate(device, "float32")
    out = {"h2d_gb_s": h2d, "device_memory_gb_s": mem, "matmul_gflop_s": peak, "rows": rows, "dim": dim,
           "scans": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.h5"
        bench_index.make_index(path, rows, dim)
        bench_index.warm(path)
        gb = rows * dim * 2 / 1e9
        chunks = [(lo, min(lo + 1024, rows)) for lo in range(0, rows, 1024)]
        spans = {"host": [(0, rows)], "host, one chunk a block": chunks, "resident": [(0, rows)]}
        t0 = time.perf_counter()
        resident = query.load_resident([(path, 0, rows)], device)
        limits.sync(device)
        out["resident_load_gb_s"] = gb / (time.perf_counter() - t0)
        for n_queries in queries:
            q = torch.nn.functional.normalize(torch.randn(n_queries, dim, generator=torch.Generator().manual_seed(1)),
                                              dim=1)
            block = query.default_block(device, n_queries, dim)
            with torch.inference_mode():
                top_cpu = query.blocked_topk(q, query.iter_index_blocks(path, 4096, "cpu"), 10)[1]
            for source in ("host", "host, one chunk a block", "resident"):

                def scan(q=q.to(device), block=block, source=source) -> tuple:
                    blocks = (resident.blocks(block) if source == "resident"
                              else query.iter_index_blocks(path, block, device, spans[source], streamed=True))
                    with torch.inference_mode():
                        return query.blocked_topk(q, blocks, 10)

                seconds = limits.best_of(scan, 2, device)
                top = scan()[1]
                agree = float(np.mean([set(a.tolist()) == set(b.tolist()) for a, b in zip(top, top_cpu, strict=True)]))
                out["scans"].append({"queries": n_queries, "source": source,
                                     "block": query.block_starts(spans[source], block)[0],
                                     "gb_s": gb / seconds, "vs_h2d": gb / seconds / h2d,
                                     "vs_device_memory": gb / seconds / mem,
                                     "mfu": 2 * n_queries * rows * dim / seconds / (peak * 1e9),
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
    limits.sync(device)
    seconds = (time.perf_counter() - t0) / n_docs
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else float("nan")
    return {"seconds_per_doc": seconds, "doc_tokens": length, "peak_vs_model": peak / model_bytes,
            "model_gib": model_bytes / 2**30}


def free(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def markdown(r: dict) -> str:
    """The figures as README-ready tables (a failed section as its error; a section not asked for left out)."""
    lines = [f"device: {r['device']}; model: {r['model']}; d = {r['dim']}; torch {r['torch']}, CUDA {r['cuda']}"]
    for name, table in (("encode", encode_table), ("encode_1b", encode_table), ("precision", precision_table),
                        ("text_precision", text_precision_table), ("islands", islands_table), ("fill", fill_table),
                        ("scan", scan_table), ("tail_patch", tail_patch_table)):
        if name in r:
            part = r[name]
            lines += [""] + ([f"{name}: FAILED: {part['error']}"] if isinstance(part, dict) and "error" in part
                             else table(part))
    return "\n".join(lines)


def encode_table(rows: list[dict]) -> list[str]:
    return [f"N = {rows[0]['matrix_params'] / 1e6:,.1f}M traced matrix parameters", "",
            "| dtype | mode | tokens/s | ÷ train | peak MiB | ÷ train | ÷ model | matmul peak GFLOP/s | MFU (6N) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"] + [
        f"| {e['dtype']} | {e['mode']} | {e['tokens_per_s']:.0f} | {e['speed_vs_train']:.2f} | {e['peak_mib']:.0f} | "
        f"{e['memory_vs_train']:.2f} | {e['memory_vs_model']:.2f} | {e['matmul_gflop_s']:.0f} | {e['mfu']:.3f} |"
        for e in rows]


def text_precision_table(r: dict) -> list[str]:
    return [r["skipped"]] if "skipped" in r else bench_precision.markdown(r).splitlines()


def islands_table(r: dict) -> list[str]:
    return [r["skipped"]] if "skipped" in r else bench_islands.markdown(r).splitlines()


def precision_table(rows: list[dict]) -> list[str]:
    return ["| path | vs float32 | min cosine | mean cosine |", "| --- | --- | ---: | ---: |"] + [
        f"| {p['mode']} | {p['vs_float32']} | {p['min_cosine']:.6f} | {p['mean_cosine']:.6f} |" for p in rows]


def fill_table(f: dict) -> list[str]:
    return [f"fill of {f['block_rows']:,}-row {'pinned ' if f['pinned'] else ''}host buffers from a "
            f"{f['rows']:,} × {f['dim']:,} float16 index in the page cache ({f['gb']:.2f} GB); the page cache's "
            f"memcpy rate (one numpy copy of the whole index from a fresh memory map): {f['memcpy_gb_s']:.1f} GB/s",
            "", "| threads | GB/s | ÷ memcpy | ÷ one thread |", "| ---: | ---: | ---: | ---: |"] + [
        f"| {x['threads']} | {x['gb_s']:.1f} | {x['vs_memcpy']:.2f} | {x['vs_one_thread']:.2f} |" for x in f["fills"]]


def scan_table(s: dict) -> list[str]:
    return [f"scan of {s['rows']:,} × {s['dim']:,} float16; host-to-device {s['h2d_gb_s']:.1f} GB/s, device memory "
            f"{s['device_memory_gb_s']:.1f} GB/s, float32 matmul {s['matmul_gflop_s']:.0f} GFLOP/s; the resident "
            f"index loaded at {s['resident_load_gb_s']:.1f} GB/s", "",
            "| queries | index | block | GB/s | ÷ host-to-device | ÷ device memory | ÷ matmul peak | top-10 = CPU's |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"] + [
        f"| {x['queries']} | {x['source']} | {x['block']} | {x['gb_s']:.1f} | {x['vs_h2d']:.2f} | "
        f"{x['vs_device_memory']:.3f} | {x['mfu']:.3f} | {x['top10_same_as_cpu']:.2f} |" for x in s["scans"]]


def tail_patch_table(t: dict) -> list[str]:
    return [f"tail-patch: {t['seconds_per_doc']:.3f} s per {t['doc_tokens']}-token document; peak memory "
            f"{t['peak_vs_model']:.2f}x the model ({t['model_gib']:.2f} GiB)"]


SECTIONS = ("encode", "encode_1b", "precision", "text_precision", "islands", "fill", "scan", "tail_patch")


@app.command(help=__doc__)
def main(
    model: str = typer.Option("smollm2", help="Model directory (or `smollm2`, the packaged SmolLM2-135M)."),
    device: str = typer.Option("cuda", help="cuda (the point of this script) or cpu (a smoke test)."),
    dim: int = typer.Option(65536, help="Projection dimension d."),
    small: bool = typer.Option(False, help="Tiny sizes throughout: a smoke test of the script itself."),
    out: Path = typer.Option(Path("bench-gpu.json"), help="Where the figures are written (JSON; .md beside)."),
    sections: str = typer.Option(",".join(SECTIONS), help="Which sections to run, comma-separated."),
    fill_gib: float = typer.Option(1.0, help="GB of index the fill section copies (the page cache holds it)."),
    corpus: Path | None = typer.Option(None, help="A corpus JSONL of real text (e.g. LAMA sentences) for the "
                                       "text_precision and islands sections; without it they are skipped."),
) -> None:
    device = ts.pick_device(device)
    ts.pin_precision("highest")
    unknown = set(sections.split(",")) - set(SECTIONS)
    if unknown:
        raise ts.TrackStarError(f"--sections: no section {', '.join(sorted(unknown))} (known: {', '.join(SECTIONS)})")
    if small:  # long documents of 32 tokens: CPU bf16 attention under make's AVX2 pin runs only short sequences
        dim, n, batch, length, scan_rows, scan_dim, gib, docs, texts = 256, 2, 4, 32, 4096, 256, 0.01, 2, 8
        fill_gib = min(fill_gib, 0.01)
    else:  # 16 x 512 = 8,192 tokens a batch: the default token budget
        n, batch, length, scan_rows, scan_dim, gib, docs, texts = 5, 16, 512, 524_288, 4096, 1.0, 8, 32
    shape = "llama-tiny" if small else "llama-1b"
    t0 = time.perf_counter()
    result = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "model": model,
              "dim": dim, "torch": torch.__version__, "cuda": torch.version.cuda}
    run = {"encode": lambda: encode_section(lambda dtype: ts.load_model(model, dtype, device)[0], device, dim, n,
                                            batch, length),
           "encode_1b": lambda: encode_section(lambda dtype: bench_encode.build(shape, dtype, device), device,
                                               min(dim, 16384), n, batch, length),
           "precision": lambda: precision_section(model, device, dim, min(batch, 4), length),
           "text_precision": lambda: text_precision_section(model, device, corpus, min(dim, 4096), texts, length),
           "islands": lambda: islands_section(model, device, corpus, min(dim, 4096), texts, length),
           "fill": lambda: fill_section(device, fill_gib, min(scan_dim, 4096)),
           "scan": lambda: scan_section(device, scan_rows, scan_dim, (1, 1024), gib),
           "tail_patch": lambda: tail_patch_section(model, device, docs, length)}
    failed = []
    for name in (s for s in SECTIONS if s in sections.split(",")):
        section = run[name]
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
