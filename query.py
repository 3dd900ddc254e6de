"""Exact top-k proponents and opponents per query (DESIGN.md §1, §4), and the BM25 baseline.

    python query.py --index RUN/index --queries RUN/queries --out RUN/proponents.jsonl [--k 10]
    python query.py --index RUN/index --prompt "The capital of France is" --target " Paris"
    python query.py --method bm25 --corpus corpus.jsonl --queries queries.jsonl --out RUN/bm25.jsonl

score(m, q) = Ḡ(m) · Ḡ(q): the index holds Ḡ(m); each query vector g(q) gets the same transform and
normalisation the index recorded. A blocked scan keeps the running top-k (highest scores,
proponents) and bottom-k (lowest, opponents) per query; the result equals a stable sort of the
full score matrix (ties: lower corpus row first), with memory bounded by --block, not the corpus.
Output, one line per query, in the queries file's order:

    {"query_id", "proponents": [{"id", "score", "text"}, ...], "opponents": [...]}
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from enum import Enum
from pathlib import Path

import numpy as np
import torch
import typer
from tqdm import tqdm

import trackstar as ts

app = typer.Typer(add_completion=False, rich_markup_mode=None)


class Method(str, Enum):
    trackstar = "trackstar"
    bm25 = "bm25"




def default_block(device: str, n_queries: int) -> int:
    """Index rows scored per step. A GPU wants large matmuls. On a CPU, a few queries are bound by
    memory bandwidth: a block small enough to stay in cache is converted to float32 and scored in
    one pass over memory. Many queries are bound by the matmul, and larger blocks amortise the
    per-block top-k work."""
    if torch.device(device).type == "cuda":
        return 65536
    return 512 if n_queries < ts.FEW_QUERIES else 4096


def read_checked_jsonl(path: str, kind: str, digest: str | None) -> list[dict]:
    """Rows of the JSONL a run was encoded from, refusing a file that changed since."""
    if digest and Path(path).exists() and ts.file_digest(path) != digest:
        raise ts.TrackStarError(f"{path} has changed since it was encoded (digest {ts.file_digest(path)} vs "
                                f"{digest}); re-encode it")
    return ts.read_jsonl(path, kind)


# ----------------------------------------------------------------------------------------------
# Queries: the index's own transform and normalisation, then the scan.


def prepare_queries(vectors: np.ndarray, index: Path, meta: dict, device: str) -> torch.Tensor:
    """g(q) -> what the index's documents are scored against: same transform, same normalisation.

    The index stores documents divided by `scale` (a power of two, float16 range); multiplying the
    queries by it gives back the true scores exactly.
    """
    ts.check_finite(vectors, "the query vectors")
    matrix = ts.read_query_transform(index)
    matrix = None if matrix is None else torch.as_tensor(matrix, device=device)
    q = ts.transform(torch.as_tensor(vectors, dtype=torch.float32, device=device), matrix, meta["unit_norm"])
    return q * meta["scale"]


def progress_blocks(index: Path, block: int, device: str, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The index's blocks with a progress bar (documents/s and index GB/s)."""
    with tqdm(total=n, desc="scan", unit="doc", unit_scale=True) as bar:
        for ids, vectors in ts.iter_index_blocks(index / "index.h5", block, device):
            yield ids, vectors
            bar.update(len(ids))


def search(queries: torch.Tensor, index: Path, k: int, block: int, device: str, n: int) -> tuple:
    """(top_scores, top_ids, bottom_scores, bottom_ids) as numpy, each (Q, min(k, N))."""
    block = block or default_block(device, len(queries))
    with torch.inference_mode():
        out = ts.blocked_topk(queries, progress_blocks(index, block, device, n), k)
    return tuple(t.numpy() for t in out)


def ranked(rows: list[dict], ids: np.ndarray, scores: np.ndarray) -> list[dict]:
    return [{"id": rows[i]["id"], "score": float(s), "text": rows[i]["text"]} for i, s in zip(ids, scores,
                                                                                            strict=True)]


def write_results(out: Path, query_ids: list[str], corpus_rows: list[dict], result: tuple) -> None:
    top_s, top_i, bot_s, bot_i = result
    with ts.atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for j, qid in enumerate(query_ids):
            record = {"query_id": qid, "proponents": ranked(corpus_rows, top_i[j], top_s[j]),
                      "opponents": ranked(corpus_rows, bot_i[j], bot_s[j])}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def corpus_rows_for(meta: dict) -> list[dict]:
    rows = read_checked_jsonl(meta["corpus_data"], "corpus", meta.get("data_digest"))
    if len(rows) != meta["n_examples"]:
        raise ts.TrackStarError(f"{meta['corpus_data']} has {len(rows)} documents, the index {meta['n_examples']}")
    return rows


def query_runs(index: Path, queries: Path, out: Path, k: int, block: int, device: str) -> None:
    meta, qmeta = ts.read_index_meta(index), ts.read_meta(queries)
    if qmeta.get("kind") != "queries":
        raise ts.TrackStarError(f"--queries {queries} holds an encoded {qmeta.get('kind')!r} run, not 'queries'")
    ts.check_same(meta, qmeta, ts.COMPATIBLE_KEYS, f"index {index}", f"queries run {queries}")
    if qmeta["data"] != meta["queries_data"]:
        typer.echo(f"note: the index's R_eval was fit on {meta['queries_data']}, not on these queries", err=True)
    rows, vectors = ts.read_vectors(queries, meta["vector_dataset"])
    order = np.argsort(rows, kind="stable")  # output in the queries file's order
    query_rows = read_checked_jsonl(qmeta["data"], "queries", qmeta.get("data_digest"))
    corpus_rows = corpus_rows_for(meta)
    q = prepare_queries(vectors[order], index, meta, device)
    t0 = time.perf_counter()
    result = search(q, index, k, block, device, meta["n_rows"])
    dt = time.perf_counter() - t0
    write_results(out, [query_rows[r]["id"] for r in rows[order]], corpus_rows, result)
    typer.echo(f"wrote {out}: {len(rows)} queries x {meta['n_rows']} documents, top/bottom {min(k, meta['n_rows'])}"
               f" in {dt:.2f} s")


# ----------------------------------------------------------------------------------------------
# Ad hoc: one prompt/target, encoded with the corpus run's own settings.


def encode_one(meta: dict, prompt: str, target: str, device: str) -> np.ndarray:
    enc, tokenizer = ts.encoder_from_meta(meta, device)
    if meta["vector_dataset"] == "vectors_uncorrected" and enc.scales:
        enc = dataclasses.replace(enc, also_uncorrected=True)
    row = {"id": "ad-hoc", "prompt": prompt, "target": target, "_line": 1}
    arrays = ts.encode_rows(enc, tokenizer, [row], "queries", meta["max_length"], meta.get("token_budget", 8192))
    return arrays[meta["vector_dataset"]] if meta["vector_dataset"] in arrays else arrays["vectors"]


def print_table(title: str, rows: list[dict], width: int = 72) -> None:
    typer.echo(f"\n{title}\n{'rank':>4}  {'score':>10}  {'id':<12}  text")
    for r, row in enumerate(rows, 1):
        text = " ".join(row["text"].split())
        text = text if len(text) <= width else text[: width - 1] + "…"
        typer.echo(f"{r:>4}  {row['score']:>10.4g}  {row['id']:<12}  {text}")


def query_adhoc(index: Path, prompt: str, target: str, k: int, block: int, device: str) -> None:
    meta = ts.read_index_meta(index)
    q = prepare_queries(encode_one(meta, prompt, target, device), index, meta, device)
    top_s, top_i, bot_s, bot_i = search(q, index, k, block, device, meta["n_rows"])
    rows = corpus_rows_for(meta)
    typer.echo(f"query: {prompt!r} -> {target!r}")
    print_table("proponents (highest scores)", ranked(rows, top_i[0], top_s[0]))
    print_table("opponents (lowest scores)", ranked(rows, bot_i[0], bot_s[0]))


# ----------------------------------------------------------------------------------------------
# BM25 over the raw text: query text = prompt + target.


def query_bm25(corpus: Path, queries: Path, out: Path, k: int) -> None:
    docs = ts.read_jsonl(corpus, "corpus")
    qs = ts.read_jsonl(queries, "queries")
    bm25 = ts.BM25Index([ts.bm25_tokenize(d["text"]) for d in docs])
    with ts.atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for q in tqdm(qs, desc="bm25", unit="query"):
            s = bm25.scores(ts.bm25_tokenize(q["prompt"] + " " + q["target"]))
            top, bottom = ts.exact_topk_numpy(s, k, largest=True), ts.exact_topk_numpy(s, k, largest=False)
            record = {"query_id": q["id"], "proponents": ranked(docs, top, s[top]),
                      "opponents": ranked(docs, bottom, s[bottom])}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    typer.echo(f"wrote {out}: BM25, {len(qs)} queries x {len(docs)} documents")


@app.command(help=__doc__.replace("\n\n    ", "\n\n\b\n    "))  # \b: click keeps those lines as written
def main(
    index: Path | None = typer.Option(None, help="Index directory written by index.py."),
    queries: Path | None = typer.Option(None, help="Encoded queries run directory (bm25: the queries JSONL)."),
    out: Path | None = typer.Option(None, help="Output JSONL of proponents and opponents per query."),
    k: int = typer.Option(10, help="Proponents (and opponents) per query."),
    prompt: str | None = typer.Option(None, help="Ad-hoc query prompt (with --target): prints a table."),
    target: str | None = typer.Option(None, help="Ad-hoc query target; its tokens carry the loss."),
    method: Method = typer.Option(Method.trackstar, help="trackstar (gradient index) or bm25 (text baseline)."),
    corpus: Path | None = typer.Option(None, help="Corpus JSONL (--method bm25)."),
    block: int = typer.Option(0, help="Index rows scored per step; bounds memory. 0: auto (a GPU: 65536; "
                              "a CPU: 512 for a few queries, 4096 for many)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (auto: the GPU when there is one)."),
) -> None:
    if k < 1 or block < 0:
        raise ts.TrackStarError("--k must be >= 1 and --block >= 0")
    if method == Method.bm25:
        if corpus is None or queries is None or out is None:
            raise ts.TrackStarError("--method bm25 needs --corpus, --queries (JSONL files) and --out")
        return query_bm25(corpus, queries, out, k)
    if index is None:
        raise ts.TrackStarError("give --index (or --method bm25)")
    device = ts.pick_device(device)
    if prompt is not None or target is not None:
        if not (prompt and target):
            raise ts.TrackStarError("an ad-hoc query needs both --prompt and --target")
        return query_adhoc(index, prompt, target, k, block, device)
    if queries is None or out is None:
        raise ts.TrackStarError("give --queries RUN/queries and --out FILE (or --prompt and --target)")
    query_runs(index, queries, out, k, block, device)


if __name__ == "__main__":
    ts.run_cli(app)
