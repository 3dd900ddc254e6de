"""index.py and query.py: exact top-k equals brute force, bounded memory, the Hessian math, refusing
mismatched runs, BM25, and the pipeline end to end on fabricated runs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, write_jsonl
from typer.testing import CliRunner

import encode as encode_cli
import index as index_cli
import query as query_cli
import trackstar as ts

META = {"tool": f"trackstar {ts.VERSION}", "model": "fingerprint-A", "model_path": "/nowhere", "dtype": "float32",
        "dim": 32, "seed": 0, "factors": [4, 8], "modules": "12 matrices/abc", "correction": "adam",
        "v_digest": "v-1", "v_file": None, "eps": 1e-8, "lr": None, "factor_v": False, "max_length": 64,
        "loss": "all tokens", "gradient": "exact", "params": "matrices", "matmul_precision": "highest",
        "device_type": "cpu", "token_budget": 8192, "truncated": 0, "data_digest": None, "chunk_dtype": "float32"}


def fabricate_run(run: Path, kind: str, vectors: dict[str, np.ndarray], chunk: int = 64, **meta) -> Path:
    """An encoded run as encode.py writes it, with the given vectors and a matching JSONL."""
    n = len(vectors["vectors"])
    data = run.parent / f"{run.name}.jsonl"
    if kind == "corpus":
        rows = [{"id": f"doc{i}", "text": f"document number {i}"} for i in range(n)]
    else:
        rows = [{"id": f"q{i}", "prompt": f"prompt {i}", "target": f" target {i}"} for i in range(n)]
    write_jsonl(data, rows)
    m = ts.RunSettings(**{**META, "kind": kind, "data": str(data.resolve()), "n_examples": n, "chunk_size": chunk,
                          "n_chunks": -(-n // chunk), "datasets": list(vectors), "dim": vectors["vectors"].shape[1],
                          **meta})
    for i, lo in enumerate(range(0, n, chunk)):
        part = {k: v[lo : lo + chunk].astype(np.float32) for k, v in vectors.items()}
        encode_cli.write_chunk(run / ts.chunk_name(i), part, np.arange(lo, lo + len(part["vectors"])), m)
    ts.write_json(run / "meta.json", dataclasses.asdict(m))
    return run


def runs(tmp_path: Path, n_docs: int = 200, n_queries: int = 7, d: int = 32, seed: int = 0, **meta):
    rng = np.random.default_rng(seed)
    docs = rng.standard_normal((n_docs, d)) * np.linspace(3, 0.1, d)  # an anisotropic spectrum
    queries = rng.standard_normal((n_queries, d))
    corpus = fabricate_run(tmp_path / "corpus", "corpus", {"vectors": docs, "vectors_uncorrected": docs[:, ::-1]})
    qrun = fabricate_run(tmp_path / "queries", "queries", {"vectors": queries, "vectors_uncorrected": queries}, **meta)
    return corpus, qrun


def invoke(app, args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result) -> None:
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"


def write_index_file(path: Path, x: np.ndarray, ids: np.ndarray, dtype: str, chunked: bool = False) -> Path:
    """An index file; contiguous (as index.py writes it: memory-mapped by the scan) or chunked
    (compressed: read through HDF5 into a staging buffer)."""
    kw = {"chunks": True, "compression": "gzip"} if chunked else {}
    with h5py.File(path, "w") as f:
        f.create_dataset("G", data=x.astype(dtype), **kw)
        f.create_dataset("ids", data=ids.astype(np.int64), **kw)
    return path


def brute_force(q: np.ndarray, x: np.ndarray, ids: np.ndarray, k: int):
    """A stable sort of the full score matrix: by score, ties to the lower id."""
    s = q.astype(np.float64) @ x.astype(np.float64).T
    top = [ids[np.lexsort((ids, -row))][:k] for row in s]
    bottom = [ids[np.lexsort((ids, row))][:k] for row in s]
    return np.array(top), np.array(bottom)


# ----------------------------------------------------------------------------------------------
# 1. Exact top-k


def planted_ties(n: int = 301, d: int = 24, n_queries: int = 9, seed: int = 0):
    """Small-integer vectors (every dot product exact in fp16 storage and fp32 arithmetic) with
    duplicated rows and zero rows, so many scores tie."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=(n, d)).astype(np.float32)
    x[rng.choice(n, 60, replace=False)] = x[rng.choice(n, 60)]  # duplicates: equal scores, distinct ids
    x[rng.choice(n, 10, replace=False)] = 0  # score 0 against everything (and -x·q = -0.0 cases)
    q = rng.integers(-2, 3, size=(n_queries, d)).astype(np.float32)
    ids = rng.permutation(3 * n)[:n]  # not in row order: ties must go to the lower *id*
    return q, x, ids


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("k,block", [(5, 64), (100, 64), (20, 301), (400, 7)])
def test_exact_topk_equals_brute_force_with_ties(tmp_path, dtype, k, block, chunked):
    q, x, ids = planted_ties()
    path = write_index_file(tmp_path / "index.h5", x, ids, dtype, chunked)
    blocks = query_cli.iter_index_blocks(path, block)
    top_s, top_i, bot_s, bot_i = query_cli.blocked_topk(torch.from_numpy(q), blocks, k)
    want_top, want_bottom = brute_force(q, x, ids, k)
    assert np.array_equal(top_i.numpy(), want_top) and np.array_equal(bot_i.numpy(), want_bottom)
    row = {int(i): r for r, i in enumerate(ids)}
    for scores, got in ((top_s, top_i), (bot_s, bot_i)):
        exact = np.einsum("qd,qkd->qk", q, x[np.vectorize(row.get)(got.numpy())])
        assert np.array_equal(scores.numpy(), exact)


def test_order_keys_sort_like_floats_and_identify_signed_zeros():
    v = torch.tensor([-np.inf, -3e38, -1.5, -1e-45, -0.0, 0.0, 1e-45, 1e-38, 2.0, 3e38, np.inf])
    keys = query_cli.order_keys(v)
    assert torch.all(keys[1:] >= keys[:-1]) and keys[4] == keys[5]
    assert torch.equal(query_cli.order_to_scores(keys)[5:], v[5:]) and query_cli.order_to_scores(keys)[4] == 0.0
    packed = query_cli.pack_keys(keys, torch.arange(len(v)))
    assert torch.equal(torch.stack(query_cli.unpack_keys(packed)), torch.stack([keys, torch.arange(len(v))]))


# ----------------------------------------------------------------------------------------------
# 2. Memory bounded by the block, not the corpus


@pytest.mark.parametrize("chunked", [False, True])
def test_scan_never_holds_more_than_a_block(tmp_path, monkeypatch, chunked):
    n, d, block, nq = 20000, 64, 256, 3
    rng = np.random.default_rng(1)
    path = write_index_file(tmp_path / "index.h5", rng.standard_normal((n, d)), np.arange(n), "float16", chunked)
    seen = []
    real = query_cli.score_block
    monkeypatch.setattr(query_cli, "score_block", lambda q, v: seen.append(real(q, v).numel()) or real(q, v))
    q = torch.from_numpy(rng.standard_normal((nq, d)).astype(np.float32))
    tracemalloc.start()
    query_cli.blocked_topk(q, query_cli.iter_index_blocks(path, block), k=10)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(seen) == -(-n // block) and max(seen) <= nq * block, "a score matrix larger than one block"
    # numpy memory (a memory map reads the page cache in place; an HDF5 read needs one staging block)
    # stays far below the index's n*d*2 bytes
    assert peak < 4 * block * d * 2 + 200_000 < n * d * 2


# ----------------------------------------------------------------------------------------------
# 3. Hessian math


def test_inverse_sqrt_whitens_to_float64_precision():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((48, 200))
    R = a @ a.T / 200
    W = index_cli.inverse_sqrt(R.copy())  # in place: R's memory becomes W
    assert np.allclose(W, W.T, atol=0, rtol=0) or np.abs(W - W.T).max() < 1e-13
    assert np.abs(W @ R @ W - np.eye(48)).max() < 1e-12


def test_inverse_roots_in_place_equal_the_straightforward_formulas():
    """R^(-1/2) = (VΛ^(-1/4))(VΛ^(-1/4))ᵀ in R's memory, and TRAK's R^(-1) in the spare matrix's (no third
    d x d matrix), equal V·Λ^p·Vᵀ written out in numpy, to float64 round-off."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((96, 400)) * np.geomspace(1, 1e-2, 96)[:, None]
    R = a @ a.T / 400 + 1e-4 * np.eye(96)  # condition number ~1e4
    w, V = np.linalg.eigh(R)
    R_copy, spare = R.copy(), np.empty_like(R)
    inv_sqrt, inverse, e_R = index_cli.inverse_roots(R_copy, spare, inverse=True)
    for got, want in ((inv_sqrt, V @ np.diag(w**-0.5) @ V.T), (inverse, V @ np.diag(1 / w) @ V.T)):
        assert np.linalg.norm(got - want) <= 1e-10 * np.linalg.norm(want)
    assert np.allclose(e_R, w[::-1], rtol=1e-12)
    assert np.shares_memory(inv_sqrt, R_copy) and np.shares_memory(inverse, spare)


def test_inverse_roots_allocate_one_matrix_the_eigenvectors():
    """At d = 2^16 a d x d float64 matrix is 34 GB: on the CPU the eigensolver works in R's own memory and
    needs O(d) workspace (LAPACK's MRRR), so the only new d x d matrix is V. A copy of R (a C-order array
    handed to LAPACK) or divide and conquer's 2·d² workspace would each show here (numpy's allocations, the
    solver's included, are traced)."""
    import tracemalloc

    d = 256
    a = np.random.default_rng(2).standard_normal((d, 2 * d))
    R, spare = a @ a.T / (2 * d), np.empty((d, d))
    tracemalloc.start()
    try:
        index_cli.inverse_roots(R, spare, inverse=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.25 * d * d * 8


def test_lambda_crosses_the_spectra_at_component_k():
    dim = 128  # k_target = round(1000 * 128 / 65536) = 2
    e_train = np.array([16.0, 8, 4, 2, 1] + [0.5] * 123)
    e_eval = np.array([100.0, 50, 12, 1, 0.1] + [0.01] * 123)
    k, k_target = index_cli.crossing_component(dim, e_train, e_eval)
    assert (k, k_target) == (2, 2)
    lam = index_cli.mix_lambda(e_train, e_eval, k)
    assert lam == pytest.approx(0.25) and lam * e_eval[k] == pytest.approx((1 - lam) * e_train[k])
    # R_eval of 2 queries has rank 2: k is clipped below it
    e_eval_rank2 = np.array([100.0, 50] + [1e-18] * 126)
    assert index_cli.crossing_component(dim, e_train, e_eval_rank2) == (1, 2)


def test_lambda_on_matrices_makes_the_scaled_spectra_cross():
    rng = np.random.default_rng(0)
    d = 128
    train = rng.standard_normal((1000, d)) * np.geomspace(1, 1e-2, d)
    evals = rng.standard_normal((50, d)) * np.geomspace(1, 1e-3, d) * 5
    R_train, _, _ = index_cli.second_moment_matrix([train[:400], train[400:]])
    R_eval, _, _ = index_cli.second_moment_matrix([evals])
    assert np.allclose(R_train, train.T @ train / 1000, rtol=1e-12, atol=1e-15)
    e_train, e_eval = index_cli.spectrum(R_train), index_cli.spectrum(R_eval)
    k, _ = index_cli.crossing_component(d, e_train, e_eval)
    lam = index_cli.mix_lambda(e_train, e_eval, k)
    assert lam * index_cli.spectrum(R_eval)[k] == pytest.approx((1 - lam) * index_cli.spectrum(R_train)[k], rel=1e-9)
    assert np.array_equal(index_cli.mixed_hessian(R_train, R_eval, 0.0), R_train)
    assert np.array_equal(index_cli.mixed_hessian(R_train, R_eval, 1.0), R_eval)


def ledoit_wolf_by_definition(X: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit & Wolf (2004) written out sample by sample, uncentred, with their norm ‖A‖² = trace(AAᵀ)/d."""
    n, d = X.shape
    S = X.T @ X / n
    mu = np.trace(S) / d
    norm2 = lambda A: np.trace(A @ A.T) / d  # noqa: E731
    delta2 = norm2(S - mu * np.eye(d))
    beta2 = sum(norm2(np.outer(x, x) - S) for x in X) / n**2
    rho = min(beta2, delta2) / delta2
    return rho * mu * np.eye(d) + (1 - rho) * S, rho


@pytest.mark.parametrize("n", [5, 40, 400])
def test_ledoit_wolf_shrinkage_equals_its_definition(n):
    """The one-pass formula (Σ‖x‖⁴ instead of a loop over samples) is the textbook estimator; fewer samples
    than dimensions shrink more, and the shrunk matrix is positive definite even when S is singular."""
    rng = np.random.default_rng(n)
    X = rng.standard_normal((n, 12)) * np.geomspace(3, 0.1, 12)
    S, m, norm4 = index_cli.second_moment_matrix([X[: n // 2], X[n // 2 :]])
    rank = np.linalg.matrix_rank(S)
    got, rho = index_cli.ledoit_wolf(S, m, norm4)  # in S's memory
    want, want_rho = ledoit_wolf_by_definition(X)
    assert m == n and rho == pytest.approx(want_rho, rel=1e-9) and 0 < rho <= 1
    assert np.allclose(got, want, rtol=1e-9, atol=1e-12)
    assert np.linalg.eigvalsh(got).min() > 0
    more = rng.standard_normal((400, 12)) * np.geomspace(3, 0.1, 12)  # the same distribution, sampled more
    if n == 5:
        assert rank == 5 and rho > ledoit_wolf_by_definition(more)[1]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("kind", ["mixed", "train", "eval", "trak"])
def test_hessian_built_in_place_equals_the_straightforward_pipeline(kind):
    """Shrinkage, mix, damping and R^(-1/2) overwrite R_train's and R_eval's memory (at d = 2^16 one matrix
    is 34 GB) and give what each step written out with fresh matrices gives, to 1e-10."""
    rng = np.random.default_rng(2)
    d = 64
    x = rng.standard_normal((300, d)) * np.geomspace(3, 0.05, d)
    q = rng.standard_normal((20, d)) * np.geomspace(1, 1e-3, d) * 4
    train = index_cli.second_moment_matrix([x])
    moment_eval, n_eval, _ = index_cli.second_moment_matrix([q])
    opts = index_cli.HessianOptions("train" if kind == "trak" else kind, trak=kind == "trak")
    fit = index_cli.hessian_from_moments(train, moment_eval, n_eval, opts)
    inputs = (train[0], moment_eval)  # the transforms live in their memory: no d x d matrix was added
    assert [np.shares_memory(fit.inverse_sqrt, m) for m in inputs] == [kind != "eval", kind == "eval"]
    assert kind != "trak" or np.shares_memory(fit.query_transform, moment_eval)

    R_train, R_eval = ledoit_wolf_by_definition(x)[0], q.T @ q / len(q)  # damping auto
    e_train, e_eval = np.linalg.eigvalsh(R_train)[::-1], np.linalg.eigvalsh(R_eval)[::-1]
    lam = {"mixed": e_train[1] / (e_train[1] + e_eval[1]), "eval": 1.0}.get(kind, 0.0)  # k = round(1000·64/65536)
    assert fit.lam == pytest.approx(lam, rel=1e-9)
    R = lam * R_eval + (1 - lam) * R_train
    R = R + 1e-3 * np.trace(R) / d * np.eye(d)
    w, V = np.linalg.eigh(R)
    assert relative_error(fit.inverse_sqrt, V @ np.diag(w**-0.5) @ V.T) < 1e-10
    assert relative_error(fit.e_R, w[::-1]) < 1e-10
    if kind == "trak":
        assert fit.corpus_transform is None and relative_error(fit.query_transform, V @ np.diag(1 / w) @ V.T) < 1e-10
    else:
        assert fit.corpus_transform is fit.inverse_sqrt and fit.query_transform is fit.inverse_sqrt


def test_damping_auto_records_its_shrinkage_and_refuses_nonsense(tmp_path):
    corpus, queries = runs(tmp_path)
    ok(invoke(index_cli.app, ["--corpus", corpus, "--queries", queries, "--out", tmp_path / "auto",
                              "--damping", "auto"]))
    with h5py.File(tmp_path / "auto" / "hessian.h5") as f:
        attrs = {k: json.loads(v) for k, v in f.attrs.items()}
    assert attrs["damping"] == "auto" and 0 < attrs["shrinkage"] <= 1
    for bad in ("nan", "-1", "lots"):
        r = invoke(index_cli.app, ["--corpus", corpus, "--queries", queries, "--out", tmp_path / bad,
                                   "--damping", bad])
        assert isinstance(r.exception, ts.TrackStarError) and "--damping" in str(r.exception)
        assert not (tmp_path / bad).exists()


def test_lambda_0_and_1_give_the_train_and_eval_indexes(tmp_path):
    corpus, queries = runs(tmp_path)
    for args, name in ((["--hessian", "train"], "train"), (["--lam", "0"], "lam0"),
                       (["--hessian", "eval"], "eval"), (["--lam", "1"], "lam1")):
        ok(invoke(index_cli.app, ["--corpus", corpus, "--queries", queries, "--out", tmp_path / name, *args]))
    vec = {n: h5py.File(tmp_path / n / "index.h5")["G"][:] for n in ("train", "lam0", "eval", "lam1")}
    assert np.array_equal(vec["train"], vec["lam0"]) and np.array_equal(vec["eval"], vec["lam1"])
    assert not np.array_equal(vec["train"], vec["eval"])


def test_sample_is_seeded_and_streams_only_sampled_rows(tmp_path):
    corpus, _ = runs(tmp_path)
    a = np.concatenate(list(index_cli.sample_blocks(corpus, "vectors", 50, seed=3)))
    b = np.concatenate(list(index_cli.sample_blocks(corpus, "vectors", 50, seed=3)))
    c = np.concatenate(list(index_cli.sample_blocks(corpus, "vectors", 50, seed=4)))
    _, all_rows = ts.read_vectors(corpus)
    assert a.shape == (50, 32) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert {r.tobytes() for r in a} <= {r.tobytes() for r in all_rows}


# ----------------------------------------------------------------------------------------------
# 4. Refusing runs that do not belong together


@pytest.mark.parametrize("key,value", [("model", "fingerprint-B"), ("seed", 7), ("correction", "none"),
                                       ("dim", 64), ("params", "all"), ("matmul_precision", "high")])
def test_index_refuses_mismatched_runs_naming_both_values(tmp_path, key, value):
    corpus, _ = runs(tmp_path)
    queries = fabricate_run(tmp_path / "q2", "queries", {"vectors": np.ones((3, 64 if key == "dim" else 32))},
                            **{key: value})
    out = tmp_path / "index"
    r = invoke(index_cli.app, ["--corpus", corpus, "--queries", queries, "--out", out])
    assert r.exit_code != 0 and isinstance(r.exception, ts.TrackStarError)
    msg = str(r.exception)
    assert repr(key) in msg and repr(META[key]) in msg and repr(value) in msg
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("key,value", [("model", "fingerprint-B"), ("seed", 7), ("correction", "none"),
                                       ("dim", 64), ("params", "all")])
def test_query_refuses_an_index_from_another_run(tmp_path, key, value):
    corpus, queries = runs(tmp_path)
    ok(invoke(index_cli.app, ["--corpus", corpus, "--queries", queries, "--out", tmp_path / "index"]))
    other = fabricate_run(tmp_path / "q2", "queries", {"vectors": np.ones((3, 64 if key == "dim" else 32))},
                          **{key: value})
    out = tmp_path / "props.jsonl"
    r = invoke(query_cli.app, ["--index", tmp_path / "index", "--queries", other, "--out", out])
    assert r.exit_code != 0 and isinstance(r.exception, ts.TrackStarError)
    assert repr(META[key]) in str(r.exception) and repr(value) in str(r.exception)
    assert not out.exists() and not list(tmp_path.glob(".props.jsonl*"))


def test_cli_error_is_one_line_and_exit_2(tmp_path):
    corpus, _ = runs(tmp_path)
    queries = fabricate_run(tmp_path / "q2", "queries", {"vectors": np.ones((3, 32))}, seed=7)
    r = subprocess.run([sys.executable, str(ROOT / "index.py"), "--corpus", str(corpus), "--queries", str(queries),
                        "--out", str(tmp_path / "index")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "'seed': 0 vs 7" in r.stderr


def test_uncorrected_needs_the_uncorrected_vectors(tmp_path):
    rng = np.random.default_rng(0)
    corpus = fabricate_run(tmp_path / "corpus", "corpus", {"vectors": rng.standard_normal((20, 32))})
    queries = fabricate_run(tmp_path / "queries", "queries", {"vectors": rng.standard_normal((3, 32))})
    r = invoke(index_cli.app, ["--corpus", corpus, "--queries", queries, "--out", tmp_path / "i", "--uncorrected"])
    assert isinstance(r.exception, ts.TrackStarError) and "--also-uncorrected" in str(r.exception)


# ----------------------------------------------------------------------------------------------
# 5. BM25


def test_bm25_ranks_the_document_with_the_rare_words_first(tmp_path):
    texts = ["the cat sat on the mat", "the dog sat on the log", "a zebra named Quagga lives in Namibia",
             "the cat and the dog", "on the mat the cat sat again", "the the the the"]
    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)]
    queries = [{"id": "q0", "prompt": "Where does the zebra Quagga", "target": " live?"},
               {"id": "q1", "prompt": "the cat sat on", "target": " the mat"}]
    corpus_f, queries_f = write_jsonl(tmp_path / "c.jsonl", docs), write_jsonl(tmp_path / "q.jsonl", queries)
    ok(invoke(query_cli.app, ["--method", "bm25", "--corpus", corpus_f, "--queries", queries_f,
                              "--out", tmp_path / "bm25.jsonl", "--k", "3"]))
    out = [json.loads(line) for line in (tmp_path / "bm25.jsonl").read_text().splitlines()]
    assert out[0]["query_id"] == "q0" and out[0]["proponents"][0]["id"] == "d2"
    assert out[1]["proponents"][0]["id"] in ("d0", "d4") and len(out[1]["opponents"]) == 3
    assert out[0]["opponents"][0]["score"] <= out[0]["proponents"][-1]["score"]


def test_bm25_scores_equal_rank_bm25_bit_for_bit():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    docs = [list(rng.choice(words, size=rng.integers(1, 15))) for _ in range(300)]
    bm25 = query_cli.BM25Index(docs)
    for _ in range(20):
        q = list(rng.choice(words + ["unseen"], size=4))
        assert np.array_equal(bm25.scores(q), bm25.okapi.get_scores(q))


def test_numpy_topk_breaks_ties_to_the_lower_position():
    s = np.array([1.0, 3.0, 3.0, 0.0, 3.0, 0.0, -1.0])
    assert query_cli.exact_topk_numpy(s, 2).tolist() == [1, 2]
    assert query_cli.exact_topk_numpy(s, 5).tolist() == [1, 2, 4, 0, 3]
    assert query_cli.exact_topk_numpy(s, 3, largest=False).tolist() == [6, 3, 5]


# ----------------------------------------------------------------------------------------------
# 6. End to end on fabricated runs


def expected_ranking(tmp_path: Path, corpus: Path, queries: Path, k: int, damping: str = "auto"
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Brute force from first principles: R from all vectors (R_train shrunk by Ledoit–Wolf's definition for
    damping auto), λ by the crossing rule, float64."""
    _, x = ts.read_vectors(corpus)
    _, q = ts.read_vectors(queries)
    x, q = x.astype(np.float64), q.astype(np.float64)
    R_train, R_eval = x.T @ x / len(x), q.T @ q / len(q)
    if damping == "auto":
        R_train = ledoit_wolf_by_definition(x)[0]
    e_train, e_eval = np.linalg.eigvalsh(R_train)[::-1], np.linalg.eigvalsh(R_eval)[::-1]
    kk = min(round(1000 * x.shape[1] / 65536), len(q) - 1)
    lam = e_train[kk] / (e_train[kk] + e_eval[kk])
    R = lam * R_eval + (1 - lam) * R_train
    R += (1e-3 if damping == "auto" else float(damping)) * np.trace(R) / len(R) * np.eye(len(R))
    w, V = np.linalg.eigh(R)
    W = (V / np.sqrt(w)) @ V.T
    g = x @ W
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    h = q @ W
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    s = h @ g.T
    return np.argsort(-s, kind="stable", axis=1)[:, :k], np.take_along_axis(s, np.argsort(-s, axis=1), 1)[:, :k]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("damping", ["auto", "1e-3"])
def test_index_then_query_matches_brute_force(tmp_path, damping):
    corpus, queries = runs(tmp_path)
    ok(invoke(index_cli.app, ["--corpus", corpus, "--queries", queries, "--out", tmp_path / "index",
                              "--dtype", "float32", "--block", "50", "--damping", damping]))
    assert {"hessian.h5", "spectrum.png", "index.h5"} <= {p.name for p in (tmp_path / "index").iterdir()}
    ok(invoke(query_cli.app, ["--index", tmp_path / "index", "--queries", queries, "--out", tmp_path / "p.jsonl",
                              "--k", "10", "--block", "33"]))
    out = read_jsonl(tmp_path / "p.jsonl")
    want, want_scores = expected_ranking(tmp_path, corpus, queries, 10, damping)
    assert [r["query_id"] for r in out] == [f"q{i}" for i in range(7)]
    for r, ids, scores in zip(out, want, want_scores, strict=True):
        assert [p["id"] for p in r["proponents"]] == [f"doc{i}" for i in ids]
        assert np.allclose([p["score"] for p in r["proponents"]], scores, atol=1e-5)
        assert r["proponents"][0]["text"] == f"document number {ids[0]}" and len(r["opponents"]) == 10
        assert [p["score"] for p in r["opponents"]] == sorted(p["score"] for p in r["opponents"])
    with h5py.File(tmp_path / "index" / "hessian.h5") as f:
        attrs = ts.read_attrs(f)
        assert attrs["hessian"] == "mixed" and 0 < attrs["lam"] < 1 and f["inverse_sqrt"].shape == (32, 32)


def test_float16_index_ranks_as_brute_force_on_its_stored_vectors(tmp_path):
    corpus, queries = runs(tmp_path)
    ok(invoke(index_cli.app, ["--corpus", corpus, "--queries", queries, "--out", tmp_path / "index"]))
    ok(invoke(query_cli.app, ["--index", tmp_path / "index", "--queries", queries, "--out", tmp_path / "p.jsonl",
                              "--k", "12", "--block", "64"]))
    with h5py.File(tmp_path / "index" / "index.h5") as f:
        stored, ids, T = f["G"][:], f["ids"][:], f["query_transform"][:]
    assert stored.dtype == np.float16 and np.allclose(np.linalg.norm(stored.astype(np.float32), axis=1), 1, atol=1e-2)
    _, q = ts.read_vectors(queries)
    h = torch.as_tensor(q) @ torch.as_tensor(T)
    h = (h / h.norm(dim=1, keepdim=True)).numpy()
    want_top, _ = brute_force(h, stored.astype(np.float32), ids, 12)
    for r, top in zip(read_jsonl(tmp_path / "p.jsonl"), want_top, strict=True):
        assert [p["id"] for p in r["proponents"]] == [f"doc{i}" for i in top]


def test_a_query_equal_to_a_document_finds_it_with_score_one(tmp_path):
    rng = np.random.default_rng(5)
    docs = rng.standard_normal((100, 32))
    corpus = fabricate_run(tmp_path / "corpus", "corpus", {"vectors": docs})
    queries = fabricate_run(tmp_path / "queries", "queries", {"vectors": docs[[17, 42, 99]]})
    ok(invoke(index_cli.app, ["--corpus", corpus, "--queries", queries, "--out", tmp_path / "index"]))
    ok(invoke(query_cli.app, ["--index", tmp_path / "index", "--queries", queries, "--out", tmp_path / "p.jsonl"]))
    for r, doc in zip(read_jsonl(tmp_path / "p.jsonl"), [17, 42, 99], strict=True):
        assert r["proponents"][0]["id"] == f"doc{doc}" and r["proponents"][0]["score"] == pytest.approx(1, abs=2e-3)


@pytest.mark.parametrize("variant", ["dot", "cosine", "trak"])
def test_ablation_variants_score_as_their_formulas(tmp_path, variant):
    corpus, queries = runs(tmp_path)
    flags = {"dot": ["--hessian", "none", "--no-unit-norm", "--uncorrected"],
             "cosine": ["--hessian", "none", "--uncorrected"], "trak": ["--trak", "--uncorrected"]}[variant]
    ok(invoke(index_cli.app, ["--corpus", corpus, "--queries", queries, "--out", tmp_path / "i", *flags]))
    ok(invoke(query_cli.app, ["--index", tmp_path / "i", "--queries", queries, "--out", tmp_path / "p.jsonl"]))
    _, x = ts.read_vectors(corpus, "vectors_uncorrected")
    _, q = ts.read_vectors(queries, "vectors_uncorrected")
    x, q = x.astype(np.float64), q.astype(np.float64)
    if variant == "cosine":
        x, q = x / np.linalg.norm(x, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
    if variant == "trak":  # the whole corpus is the R_train sample here; default damping: Ledoit–Wolf, then 1e-3
        R = ledoit_wolf_by_definition(x)[0]
        q = q @ np.linalg.inv(R + 1e-3 * np.trace(R) / len(R) * np.eye(len(R)))
    s = q @ x.T
    for r, row in zip(read_jsonl(tmp_path / "p.jsonl"), s, strict=True):
        top = np.argsort(-row, kind="stable")[:10]
        assert [p["id"] for p in r["proponents"]] == [f"doc{i}" for i in top]
        assert np.allclose([p["score"] for p in r["proponents"]], row[top], rtol=2e-3, atol=1e-3 * abs(row).max())


def test_dot_product_index_in_float16_scales_large_gradients_instead_of_overflowing(tmp_path):
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((50, 32)) * 1e6  # far beyond float16's 65504
    corpus = fabricate_run(tmp_path / "corpus", "corpus", {"vectors": docs})
    queries = fabricate_run(tmp_path / "queries", "queries", {"vectors": docs[:2]})
    ok(invoke(index_cli.app, ["--corpus", corpus, "--queries", queries, "--out", tmp_path / "i",
                              "--hessian", "none", "--no-unit-norm"]))
    ok(invoke(query_cli.app, ["--index", tmp_path / "i", "--queries", queries, "--out", tmp_path / "p.jsonl"]))
    s = docs[:2] @ docs.T
    for r, row in zip(read_jsonl(tmp_path / "p.jsonl"), s, strict=True):
        assert r["proponents"][0]["score"] == pytest.approx(row.max(), rel=1e-2)


def test_adhoc_query_matches_the_encoded_queries_run(model_dir, corpus_file, queries_file, tmp_path):
    """`--prompt/--target` encodes with the corpus run's own settings: same top-k as the queries run."""
    def encode(kind, data, out):
        r = subprocess.run([sys.executable, str(ROOT / "encode.py"), kind, "--model", str(model_dir), "--data",
                            str(data), "--out", str(out), "--dim", "64", "--also-uncorrected"],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]

    encode("corpus", corpus_file, tmp_path / "corpus")
    encode("queries", queries_file, tmp_path / "queries")
    ok(invoke(index_cli.app, ["--corpus", tmp_path / "corpus", "--queries", tmp_path / "queries",
                              "--out", tmp_path / "index", "--dtype", "float32"]))
    ok(invoke(query_cli.app, ["--index", tmp_path / "index", "--queries", tmp_path / "queries",
                              "--out", tmp_path / "p.jsonl", "--k", "5"]))
    first = read_jsonl(tmp_path / "p.jsonl")[0]
    r = invoke(query_cli.app, ["--index", tmp_path / "index", "--prompt", "The capital of France is",
                               "--target", " Paris", "--k", "5"])
    ok(r)
    lines = r.output.split("opponents")[0].splitlines()
    shown = [line.split()[2] for line in lines if line.strip()[:1].isdigit()]
    assert shown == [p["id"] for p in first["proponents"]]
