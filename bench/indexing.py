"""Benchmark the index scan and BM25 against this machine's own limits, measured in the same run.

    python -m bench.indexing [--rows 200000] [--dim 4096] [--keep DIR]

Prints: memory read bandwidth (GB/s), float32 matmul rate (GFLOP/s), then query.py's blocked
exact scan over a float16 index read from HDF5 (page cache warm) for 1 and for 1,024 queries,
as GB/s of index read and as a fraction of the binding limit (bandwidth for one query, matmul
for many), and BM25 queries/s on 100k short synthetic documents. Takes about 2-3 minutes on 2 cores.

    python -m bench.indexing --r-memory 4096,8192 [--r-memory-only]

adds the peak memory of index.py's R part (R_train, R_eval, λ, damping, R^(-1/2)) at each d, as a multiple
of one d x d float64 matrix (d = 8,192: about 3 minutes on one thread, mostly eigendecompositions).

    python -m bench.indexing --ranks 2 [--rows 100000 --dim 2048]

instead measures query.py's scan under torchrun: an index in 2 shares laid out as index.py writes it under
torchrun, scanned by one process and by 2 ranks (one thread each, as torchrun gives), for 1 and 256 queries:
each rank's GB per wall second and per CPU second ÷ the one process's (1.0: a rank scans as fast, and as
cheaply, as a process alone; the merge included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import typer

import index
import query
import trackstar as ts
from bench import encoding as bench_encode
from bench.limits import best_of, matmul_rate, memory_bandwidth

app = typer.Typer(add_completion=False, rich_markup_mode=None)


def make_index(path: Path, rows: int, dim: int) -> None:
    """A float16 index laid out as index.py writes it (contiguous), filled with random unit-ish rows."""
    rng = np.random.default_rng(0)
    base = (rng.standard_normal((8192, dim)) / np.sqrt(dim)).astype(np.float16)
    with h5py.File(path, "w") as f:
        vectors = f.create_dataset("G", shape=(rows, dim), dtype="float16")
        f.create_dataset("ids", data=np.arange(rows, dtype=np.int64))
        for lo in range(0, rows, len(base)):
            n = min(len(base), rows - lo)
            vectors[lo : lo + n] = np.roll(base, lo // len(base), axis=1)[:n]  # rows differ across blocks


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def scan_seconds(path: Path, n_queries: int, dim: int, block: int, repeat: int) -> float:
    q = torch.nn.functional.normalize(torch.randn(n_queries, dim), dim=1)
    with torch.inference_mode():
        return best_of(lambda: query.blocked_topk(q, query.iter_index_blocks(path, block), 10), repeat)


def profile_one_query(path: Path, dim: int, block: int) -> dict[str, float]:
    """Seconds per pass over the index for each stage of the 1-query scan run alone (one thread, as
    the scan runs for few queries): fp16 page cache -> fp32 block, the score matvec, keys + top-k;
    and the HDF5 read the memory map replaces."""
    q, ids = torch.randn(1, dim), torch.arange(block)
    wide = torch.empty(block, dim)
    with h5py.File(path, "r") as f, ts.cpu_threads(1):
        vectors = f["G"]
        mapped, n = query.mapped(path, vectors), vectors.shape[0]
        staging = np.empty((block, dim), dtype=np.float16)
        steps = range(0, n - block + 1, block)

        def convert() -> None:
            for lo in steps:
                wide.copy_(torch.from_numpy(mapped[lo : lo + block]))

        def score() -> None:
            for _ in steps:
                query.score_block(q, wide)

        def topk() -> None:
            s = query.score_block(q, wide)
            for _ in steps:
                query._merge(None, query.pack_keys(query.order_keys(s), ids), 10)

        def hdf5_read() -> None:
            for lo in steps:
                vectors.read_direct(staging, np.s_[lo : lo + block], np.s_[:block])

        return {name: best_of(fn, 2) * n / (len(steps) * block) for name, fn in
                (("fp16->fp32", convert), ("score", score), ("keys+top-k", topk), ("HDF5 read (unused)", hdf5_read))}


def bm25_rate(n_docs: int = 100_000, n_queries: int = 200) -> tuple[float, float, float]:
    """(build seconds, queries/s through BM25Index, queries/s through rank_bm25's own get_scores)."""
    rng = np.random.default_rng(0)
    vocab = np.array([f"w{i}" for i in range(20000)])
    p = 1 / np.arange(1, len(vocab) + 1)  # Zipf-like word frequencies
    p /= p.sum()
    docs = [list(vocab[rng.choice(len(vocab), size=rng.integers(8, 25), p=p)]) for _ in range(n_docs)]
    queries = [list(vocab[rng.choice(len(vocab), size=8, p=p)]) for _ in range(n_queries)]
    t = time.perf_counter()
    bm25 = query.BM25Index(docs)
    build = time.perf_counter() - t
    t = time.perf_counter()
    for qt in queries:
        s = bm25.scores(qt)
        query.exact_topk_numpy(s, 10), query.exact_topk_numpy(s, 10, largest=False)
    fast = n_queries / (time.perf_counter() - t)
    t = time.perf_counter()
    for qt in queries[:3]:
        bm25.okapi.get_scores(qt)
    slow = 3 / (time.perf_counter() - t)
    return build, fast, slow


def r_part_memory(dim: int) -> dict[str, float]:
    """Peak memory of index.py's R part at dimension `dim`, in a fresh process: ru_maxrss is the peak of the
    whole process (torch's allocations included, which tracemalloc cannot see), so each d gets its own."""
    code = f"from bench import indexing; import json; print(json.dumps(indexing.r_part_child({dim})))"
    r = subprocess.run([sys.executable, "-c", code], cwd=bench_encode.ROOT, capture_output=True, encoding="utf-8")
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.splitlines()[-1])


def r_part_child(dim: int, n_eval: int = 256) -> dict[str, float]:
    """R_train from `dim` synthetic vectors (an anisotropic spectrum, streamed in blocks as index.py reads
    chunks), R_eval from `n_eval`, then hessian_from_moments as index.py runs it: the peak RSS above the
    process's RSS before, in d x d float64 matrices (after the moments, and over the whole R part)."""
    rng = np.random.default_rng(0)
    scale = np.geomspace(1, 1e-2, dim).astype(np.float32)

    def blocks(n: int):
        for lo in range(0, n, 1024):
            yield rng.standard_normal((min(1024, n - lo), dim), dtype=np.float32) * scale

    index.inverse_sqrt(np.eye(64) * 2.0)  # LAPACK's code and thread buffers are loaded before measuring
    matrix, base = dim * dim * 8 / 2**20, bench_encode.memory_now("cpu")  # MiB, as bench_encode measures
    t = time.perf_counter()
    train = index.second_moment_matrix(blocks(dim))
    R_eval, n, _ = index.second_moment_matrix(blocks(n_eval))
    moments = bench_encode.peak_memory("cpu")
    index.hessian_from_moments(train, R_eval, n, index.HessianOptions("mixed"))
    return {"moments": (moments - base) / matrix, "peak": (bench_encode.peak_memory("cpu") - base) / matrix,
            "seconds": time.perf_counter() - t}


def sharded_index(directory: Path, rows: int, dim: int, shares: int, chunk: int = 1024) -> list[tuple[Path, int, int]]:
    """float16 share files laid out as index.py under torchrun writes them (chunk i in share i % shares, ids
    the corpus rows), random unit-ish rows; their chunk segments (file, first row, end row) in chunk order."""
    rng = np.random.default_rng(0)
    base = (rng.standard_normal((chunk, dim)) / np.sqrt(dim)).astype(np.float16)
    layout = ts.share_segments([min(chunk, rows - lo) for lo in range(0, rows, chunk)], shares)
    files = [directory / ts.share_name(r, shares) for r in range(shares)]
    for r, path in enumerate(files):
        mine = [(i, lo, hi) for i, (share, lo, hi) in enumerate(layout) if share == r]
        with h5py.File(path, "w") as f:
            vectors = f.create_dataset("G", shape=(mine[-1][2], dim), dtype="float16")
            ids = f.create_dataset("ids", shape=(mine[-1][2],), dtype=np.int64)
            for i, lo, hi in mine:
                vectors[lo:hi] = np.roll(base, i, axis=1)[: hi - lo]  # rows differ across chunks
                ids[lo:hi] = np.arange(i * chunk, i * chunk + hi - lo)
        warm(path)
    return [(files[r], lo, hi) for r, lo, hi in layout]


def scan_child(segments: str, n_queries: int, dim: int, repeat: int) -> None:
    """One rank's (or a lone process's) best wall and CPU seconds for query.search over the segments, printed
    with its rows. CPU time (this process's, gloo's threads included) is what the scan itself costs a rank,
    whoever else shares the cores; wall time is what it took."""
    rank, world = ts.distributed()
    segments = [(Path(p), lo, hi) for p, lo, hi in json.loads(segments)]
    q = torch.nn.functional.normalize(torch.randn(n_queries, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    mine = sum(hi - lo for _, lo, hi in segments[rank::world])
    wall = cpu = float("inf")
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        query.search(q, segments, 10, query.default_block("cpu", n_queries), "cpu")
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    print(json.dumps({"rank": rank, "rows": mine, "seconds": wall, "cpu_seconds": cpu}))


def rank_scans(segments: list, n_queries: int, dim: int, ranks: int, repeat: int) -> list[dict]:
    """scan_child under `torchrun --standalone --nproc_per_node ranks`, one thread a rank: each rank's line."""
    listed = json.dumps([(str(p), lo, hi) for p, lo, hi in segments])
    code = f"from bench import indexing; indexing.scan_child({listed!r}, {n_queries}, {dim}, {repeat})"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "--no-python",
           sys.executable, "-c", code]
    r = subprocess.run(cmd, cwd=bench_encode.ROOT, capture_output=True, encoding="utf-8",
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def rank_scaling(rows: int, dim: int, ranks: int, keep: Path | None) -> None:
    """Each rank's scan GB/s ÷ one process's, over the same index of `ranks` shares."""
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (other processes share these cores)")
    with tempfile.TemporaryDirectory(dir=keep) as tmp:
        segments = sharded_index(Path(tmp), rows, dim, ranks)
        print(f"index: {rows} x {dim} float16 = {rows * dim * 2 / 1e9:.2f} GB in {ranks} shares of 1,024-row chunks")
        for n_queries in (1, 256):
            one, many = rank_scans(segments, n_queries, dim, 1, 5), rank_scans(segments, n_queries, dim, ranks, 5)
            for clock in ("seconds", "cpu_seconds"):
                alone = one[0]["rows"] * dim * 2 / one[0][clock] / 1e9
                each = [r["rows"] * dim * 2 / r[clock] / 1e9 for r in many]
                print(f"scan {n_queries:>3} queries, GB per {'wall' if clock == 'seconds' else 'CPU'} second: one "
                      f"process {alone:.2f}; {ranks} ranks " + ", ".join(f"{g:.2f}" for g in each)
                      + f" each = {min(each) / alone:.2f}-{max(each) / alone:.2f} x one process per rank, "
                      f"{sum(each) / alone:.2f} x together")


@app.command(help=__doc__)
def main(
    rows: int = typer.Option(200_000, help="Index rows (200k x 4096 float16 = 1.6 GB)."),
    dim: int = typer.Option(4096, help="Vector dimension d."),
    keep: Path | None = typer.Option(None, help="Directory for the index file (default: a temporary one)."),
    r_memory: str = typer.Option("", help="Comma-separated d's at which to measure the R part's peak memory."),
    r_memory_only: bool = typer.Option(False, help="Only the R part's memory (skip the scan and BM25)."),
    ranks: int = typer.Option(0, help="Instead: the scan by this many torchrun ranks against one process."),
) -> None:
    if ranks:
        return rank_scaling(rows, dim, ranks, keep)
    for d in [int(x) for x in r_memory.split(",") if x]:
        m = r_part_memory(d)
        print(f"R part at d = {d}: peak {m['peak']:.2f} x one d x d float64 matrix ({d * d * 8 / 2**30:.2f} GiB); "
              f"{m['moments']:.2f} x while accumulating R_train and R_eval; {m['seconds']:.0f} s")
    if r_memory_only:
        return
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"load average {os.getloadavg()[0]:.2f} (other processes share these cores)")
    bw, gflops = memory_bandwidth(), matmul_rate()
    with tempfile.TemporaryDirectory(dir=keep) as tmp:
        path = Path(tmp) / "index.h5"
        t = time.perf_counter()
        make_index(path, rows, dim)
        warm(path)
        gb = rows * dim * 2 / 1e9
        print(f"index: {rows} x {dim} float16 = {gb:.2f} GB (written and read once in {time.perf_counter() - t:.1f} s)")
        timings = {}
        for n_queries, repeat in ((1, 3), (1024, 1)):
            timings[n_queries] = scan_seconds(path, n_queries, dim, query.default_block("cpu", n_queries), repeat)
        blocks = {b: scan_seconds(path, 1, dim, b, 2) for b in (128, 2048, 65536)}
        prof = profile_one_query(path, dim, query.default_block("cpu", 1))
    # The limits, measured again after the scans: neighbours come and go, so keep the best of both.
    bw, gflops = max(bw, memory_bandwidth()), max(gflops, matmul_rate())
    print(f"memory read bandwidth  {bw:8.1f} GB/s    (numpy sum over 1 GiB, one core)")
    print(f"float32 matmul         {gflops:8.1f} GFLOP/s (4096^3 sgemm, {torch.get_num_threads()} threads)")
    for n_queries, dt in timings.items():
        bw_bound = bw * 1e9 / (2 * dim)  # docs/s if the scan only had to read the index once
        mm_bound = gflops * 1e9 / (2 * n_queries * dim)  # docs/s if it only had to do the matmul
        bound, name = min((bw_bound, "bandwidth"), (mm_bound, "matmul"))
        print(f"scan {n_queries:>4} queries: {dt:6.2f} s  {gb / dt:6.2f} GB/s of index  {rows / dt / 1e3:7.1f}k docs/s"
              f"  = {rows / dt / bw_bound:.2f} of bandwidth, {rows / dt / mm_bound:.2f} of matmul"
              f"  -> binding: {name}, achieved {rows / dt / bound:.2f} of it")
    print("  1 query by --block: " + ", ".join(f"{b}: {gb / dt:.1f} GB/s" for b, dt in blocks.items()))
    print(f"  1-query stages alone (--block {query.default_block('cpu', 1)}): "
          + ", ".join(f"{k} {gb / v:.1f} GB/s" for k, v in prof.items()))

    build, fast, slow = bm25_rate()
    print(f"BM25: 100k docs indexed in {build:.1f} s; {fast:.0f} queries/s "
          f"(rank_bm25 get_scores alone: {slow:.1f} queries/s)")


if __name__ == "__main__":
    app()
