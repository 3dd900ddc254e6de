"""GPU-path properties that can be observed on the CPU: device per rank, one V estimate for all shards,
pinned and recorded matmul precision, P identical across CPU kernels, batched R_train updates, and the GPU
scan's streamed (threaded fill, ping-pong) and device-resident paths equal to the CPU scan bit for bit."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_model
from test_notebook import QUESTIONS, data, gradient_index  # noqa: F401 (fixtures)

import index
import trackstar as ts


@pytest.mark.parametrize("asked,local_rank,want", [("auto", "3", "cuda:1"), ("cuda", "2", "cuda:0"),
                                                   ("cuda:1", "0", "cuda:1"), ("cpu", "1", "cpu")])
def test_each_torchrun_rank_gets_its_own_gpu(monkeypatch, asked, local_rank, want):
    """Every rank on cuda:0 was the bug: auto and a bare "cuda" take LOCAL_RANK % device_count, and the
    process's current device is set to it."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(d))
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert ts.pick_device(asked) == want
    assert chosen == ([] if want == "cpu" else [want])


def test_matmul_precision_is_pinned_and_recorded(model_dir, corpus_file, tmp_path):
    """A caller's TF32 setting is not inherited: the run pins fp32 and records it; TF32 is an explicit,
    recorded choice that refuses to mix with fp32 runs."""
    from typer.testing import CliRunner

    import encode

    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        for name, extra, want in (("fp32", [], "highest"), ("tf32", ["--matmul-precision", "high"], "high")):
            torch.set_float32_matmul_precision("medium")  # whatever the caller had
            r = CliRunner().invoke(encode.app, ["corpus", "--model", str(model_dir), "--data", str(corpus_file),
                                                "--out", str(tmp_path / name), "--dim", "64", *extra])
            assert r.exit_code == 0, r.output
            assert torch.get_float32_matmul_precision() == want
        assert json.loads((tmp_path / "fp32" / "meta.json").read_text())["matmul_precision"] == "highest"
        assert json.loads((tmp_path / "tf32" / "meta.json").read_text())["matmul_precision"] == "high"
        assert json.loads((tmp_path / "fp32" / "meta.json").read_text())["device_type"] == "cpu"
        with pytest.raises(ts.TrackStarError, match="matmul_precision"):
            ts.check_same(ts.read_meta(tmp_path / "fp32"), ts.read_meta(tmp_path / "tf32"), ts.COMPATIBLE_KEYS,
                          "a", "b")
    finally:
        torch.set_float32_matmul_precision(old)


def test_one_v_estimate_is_shared_by_all_shards(model_dir, corpus_file, tmp_path):
    """Shard 1 waits for shard 0's estimate instead of writing its own (on a GPU two estimates differ in
    the last bits, and the shards would record different V digests)."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cmd(shard):
        return [sys.executable, str(ROOT / "encode.py"), "corpus", "--model", str(model_dir), "--data",
                str(corpus_file), "--out", str(out), "--dim", "64", "--chunk-size", "8", "--estimate-v", "6",
                "--shard", str(shard), "--num-shards", "2"]

    log = tmp_path / "shard1.log"
    with open(log, "w") as err_file:
        second = subprocess.Popen(cmd(1), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err_file, text=True)
    deadline = time.monotonic() + 300
    while "waiting for shard 0" not in log.read_text() and second.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert second.poll() is None and not (out / "second_moment.pt").exists(), "shard 1 must wait, not estimate"
    first = subprocess.run(cmd(0), cwd=ROOT, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    second.wait(timeout=300)
    err = log.read_text()
    assert second.returncode == 0, err[-2000:]
    assert "waiting for shard 0's V estimate" in err and "estimate V" not in err
    chunks = sorted(p.name for p in out.glob("chunk-*.h5"))
    assert chunks == [f"chunk-{i:06d}.h5" for i in range(3)]  # 23 documents in chunks of 8, both shards
    ts.chunk_files(out)  # every chunk carries the one v_digest of meta.json


def test_projection_is_bit_identical_across_cpu_kernels():
    """float32 randn differs in the last bits between the AVX2 and the default kernels; drawn in float64
    and rounded, P is the same on any host."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2 kernels to compare against the default ones")
    code = ("import hashlib, torch, trackstar as ts; print(torch.backends.cpu.get_cpu_capability(), "
            "hashlib.sha256(ts.projection_matrix(3, 'model.layers.0.mlp', 'out', 777, 64).numpy()"
            ".tobytes()).hexdigest())")
    digests = {}
    for capability in ("default", "avx2"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        used, digest = r.stdout.split()
        assert used.lower() == ("default" if capability == "default" else "avx2"), used
        digests[capability] = digest
    assert digests["default"] == digests["avx2"]
    p = ts.projection_matrix(3, "model.layers.0.mlp", "out", 777, 64)
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(b"trackstar/3/model.layers.0.mlp/out")
                                                     .digest()[:8], "little") & (2**63 - 1))
    assert torch.equal(p, (torch.randn(777, 64, generator=g, dtype=torch.float64) / 8).float())


def test_r_train_updates_are_batched_and_exact():
    """Each update of the d x d accumulator streams all of it: a chunk's few sampled rows are gathered
    into blocks of >= 4,096 rows first, in order, and the moment is unchanged."""
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((n, 16)) for n in [3, 700, 5, 4000, 1, 900, 2]]
    got = list(index.gathered(iter(blocks)))
    assert [len(b) for b in got] == [4708, 903]
    assert np.array_equal(np.concatenate(got), np.concatenate(blocks))
    X = np.concatenate(blocks)
    S, n, norm4 = index.second_moment_matrix(iter(blocks))
    assert n == len(X) and np.allclose(S, X.T @ X / n, rtol=1e-12)
    assert norm4 == pytest.approx(float(((X * X).sum(1) ** 2).sum()), rel=1e-12)


def test_chunked_loss_gives_the_same_losses_and_gradients(monkeypatch):
    """The cross-entropy in checkpointed chunks of positions: same per-example losses and same input
    gradients as one pass over all logits, on a padded batch."""
    model = tiny_model("llama")
    exs = [([5, 9, 3, 7, 11, 2], [5, 9, 3, 7, 11, 2]), ([4, 8, 1], [-100, 8, 1])]
    batch = ts.collate(exs, "cpu")

    def run():
        model.zero_grad(set_to_none=True)
        loss = ts.per_example_loss(model, batch)
        loss.sum().backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    original = ts.checkpoint
    monkeypatch.setattr(ts, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    one_pass = run()
    assert calls == [], "logits that fit in one chunk are kept for backward, not recomputed"
    monkeypatch.setattr(ts, "LOSS_CHUNK", 96 * 2)  # one position per chunk
    chunked = run()
    assert len(calls) == 5, "one checkpointed chunk per position (T - 1 = 5)"
    assert torch.equal(one_pass[0], chunked[0])
    assert all(torch.equal(one_pass[1][n], chunked[1][n]) for n in one_pass[1])


def test_exact_path_keeps_inputs_in_the_model_dtype_shared_by_q_k_v(monkeypatch):
    """x is kept as the model's own tensor (no float32 copy per module), so q, k and v, which read the same
    input, hold one tensor between them; it is upcast one slice at a time."""
    model = tiny_model("llama").to(torch.bfloat16)
    seen = {}
    original = ts._accumulate

    def spy(enc, name, saved, delta, acc):
        seen[name] = (saved.data_ptr(), saved.dtype)
        return original(enc, name, saved, delta, acc)

    monkeypatch.setattr(ts, "_accumulate", spy)
    V = ts.SecondMoment({n: torch.ones(p.shape) for n, p in model.named_parameters()}, "file", None, None, 0.0, "t")
    enc = ts.make_encoder(model, 64, 0, ts.correction_scales(model, V, 1e-8, ts.weight_modules(model)), "exact")
    ts.encode_batch(enc, ts.collate([([5, 9, 3, 7], [5, 9, 3, 7]), ([4, 8], [4, 8])], "cpu"))
    attn = "model.layers.0.self_attn."
    assert seen[attn + "q_proj"] == seen[attn + "k_proj"] == seen[attn + "v_proj"]
    assert all(dtype == torch.bfloat16 for _, dtype in seen.values())


def test_gpu_scan_block_is_sized_from_free_memory_and_d():
    """The scan's block on a GPU fits a quarter of free memory, whatever d: the fixed 65,536 rows needed
    26 GB at d = 2^16."""
    import query

    for dim, n_queries in ((1024, 10), (65536, 10), (65536, 5000)):
        for free in (4 << 30, 40 << 30, 120 << 30):
            rows = query.default_block("cuda", n_queries, dim, free_bytes=free)
            # per row: a float32 index row in each of the two ping-pong buffers (4 B each) and widened (4 B);
            # per query a float32 score, an int64 key, and the top/bottom merge buffers (two int64 keys each,
            # doubled while merging)
            need = rows * (dim * 12 + n_queries * (4 + 8 + 2 * 2 * 8))
            assert 1 <= rows <= 65536 and (need <= free / 4 or rows == 1024)
            assert rows * dim * 4 <= 2**30, "a pinned host buffer holds at most 1 GiB"
    assert query.default_block("cuda", 10, 1024, free_bytes=80 << 30) == 65536  # small d: as before


def test_bench_gpu_script_runs_end_to_end_on_the_cpu(model_dir, corpus_file, tmp_path, monkeypatch):
    """The GPU script (every section: encode ratios and MFU for the model and for a Llama shape, precision
    cosines on random and real text, the float32 islands' cost, the host buffers' fill rate, the scan streamed
    and resident, tail-patch) runs with --device cpu as a smoke test, and its figures are sane: on one device
    TF32 is a no-op and the CPU's own encodings agree exactly; a bfloat16 model still points the same way; every
    scan finds the CPU's top-10."""
    from typer.testing import CliRunner

    import query
    from bench import gpu as bench_gpu

    # --small keeps every sequence at 32 tokens, which bf16 attention runs even on the AVX2 kernels make pins;
    # the islands section's probe (128 tokens, as a real run needs) would refuse there
    monkeypatch.setattr(ts, "check_bf16_attention", lambda device: None)
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(bench_gpu.app, ["--device", "cpu", "--model", str(model_dir), "--small", "--out", str(out),
                                           "--corpus", str(corpus_file)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    for section in ("encode", "encode_1b"):
        assert {(e["dtype"], e["mode"]) for e in res[section]} == {(d, m) for d in ("float32", "bfloat16")
                                                                    for m in ("train", "factored", "exact")}
        assert all(e["tokens_per_s"] > 0 and e["mfu"] > 0 for e in res[section])
    assert res["encode_1b"][0]["matrix_params"] != res["encode"][0]["matrix_params"]  # another model
    assert [s["inputs"] for s in res["text_precision"]["sets"]] == ["real text", "random tokens", "long documents",
                                                                    "rare tokens"]
    assert all(0.9 < r["min_cosine"] <= 1 + 1e-9 for s in res["text_precision"]["sets"] for r in s["rows"])
    assert [s["inputs"] for s in res["islands"]["sets"]] == ["real text", "long documents"]
    assert all(r["speed_vs_bf16"] > 0 and 0.9 < r["min_cosine"] for s in res["islands"]["sets"] for r in s["rows"])
    cos = {(p["mode"], p["vs_float32"]): p["min_cosine"] for p in res["precision"]}
    for mode in ("factored", "exact"):
        assert cos[(mode, "tf32")] == pytest.approx(1, abs=1e-12)
        assert cos[(mode, "cpu float32")] == pytest.approx(1, abs=1e-12)
        assert 0.9 < cos[(mode, "bfloat16")] < 1
    assert all(e["mfu"] > 0 and e["matmul_gflop_s"] > 0 for e in res["encode"])
    assert [(s["queries"], s["source"]) for s in res["scan"]["scans"]] == [
        (q, source) for q in (1, 1024) for source in ("host", "host, one chunk a block", "resident")]
    assert [s["top10_same_as_cpu"] for s in res["scan"]["scans"]] == [1.0] * 6
    assert [s["block"] for s in res["scan"]["scans"]][3:5] == [4096, 1024]  # 1,024 queries: 4,096 rows a block
    assert [f["threads"] for f in res["fill"]["fills"]] == sorted({1, 2, query.FILL_THREADS})
    assert all(f["gb_s"] > 0 for f in res["fill"]["fills"]) and res["fill"]["fills"][0]["vs_one_thread"] == 1
    assert res["tail_patch"]["seconds_per_doc"] > 0
    assert (tmp_path / "bench.md").read_text().startswith("device: cpu")


# ----------------------------------------------------------------------------------------------
# The GPU scan's two host-side paths, run on the CPU standing in for the device: rows streamed through two
# host buffers filled by a thread pool, and rows resident in device memory. Both must give the CPU scan's
# top-k, scores and ids, bit for bit.


def fabricated_index(tmp_path, dtype: str, chunked: bool = False):
    """An index of 301 rows (not a multiple of any block below) with planted ties (duplicated and zero rows,
    ids out of row order), two chunk-like spans, and queries both small-integer (exact ties) and Gaussian (sums
    whose rounding depends on how each block is scored)."""
    from test_index_query import planted_ties, write_index_file

    q, x, ids = planted_ties()
    gauss = np.random.default_rng(1).standard_normal((4, q.shape[1])).astype(np.float32)
    path = write_index_file(tmp_path / "index.h5", x, ids, dtype, chunked)
    return path, [(path, 0, 128), (path, 128, len(x))], torch.from_numpy(np.concatenate([q, gauss]))


def scan(queries, segments, k=20, block=48, **how):
    import query

    with torch.inference_mode():
        return query.search(queries, segments, k, block, "cpu", **how)


def test_the_cpu_scan_has_ties_in_its_top_k(tmp_path):
    """The fabricated index tests tie-breaking: its top-20 lists hold equal scores (ordered by id)."""
    path, segments, q = fabricated_index(tmp_path, "float16")
    top_s, top_i, _, _ = scan(q, segments)
    tied = (top_s[:, 1:] == top_s[:, :-1])
    assert tied.any() and (top_i[:, 1:][tied] > top_i[:, :-1][tied]).all()


@pytest.mark.parametrize("dtype,chunked", [("float16", False), ("float32", False), ("float16", True)])
@pytest.mark.parametrize("threads", [1, 2])
def test_streamed_scan_equals_the_cpu_scan_bit_for_bit_and_fills_ahead(tmp_path, monkeypatch, dtype, chunked,
                                                                       threads):
    """The GPU's host-streamed path (two host buffers in turn, each block's rows split among `threads` fill
    threads, block i+1 filled while block i is copied and scored) returns the CPU scan's proponents and
    opponents, scores and ids bit for bit. A memory-mapped index is filled by `threads` copies a block, on the
    pool's threads (HDF5-read, chunked, by one); block i+1's fill starts before block i is scored."""
    import query

    path, segments, q = fabricated_index(tmp_path, dtype, chunked)
    want = scan(q, segments)
    events, copies = [], []
    real_fill, real_copyto, real_score = query.RowReader.fill, np.copyto, query.score_block

    def fill(self, lo, m, into):
        events.append(("fill", lo))
        return real_fill(self, lo, m, into)

    def copyto(dst, src, *a, **kw):
        copies.append((threading.current_thread().name, len(src)))
        return real_copyto(dst, src, *a, **kw)

    monkeypatch.setattr(query.RowReader, "fill", fill)
    monkeypatch.setattr(np, "copyto", copyto)
    monkeypatch.setattr(query, "score_block", lambda qs, v: events.append(("score", len(v))) or real_score(qs, v))
    with torch.inference_mode():
        got = query.blocked_topk(q, query.iter_index_blocks(path, 48, "cpu", [(0, 128), (128, 301)],
                                                            streamed=True, fill_threads=threads), 20)
    for a, b in zip(want, got, strict=True):
        assert np.array_equal(a, b.numpy())
    starts = query.block_starts([(0, 128), (128, 301)], 48)[1]
    assert [lo for e, lo in events if e == "fill"] == [lo for lo, _ in starts]
    for i in range(len(starts) - 1):  # before the i-th score: fills 0..i+1 already started
        before = events[: [j for j, e in enumerate(events) if e[0] == "score"][i]]
        assert sum(e == "fill" for e, _ in before) == i + 2
    if chunked:
        assert copies == []
    else:
        assert all(name.startswith("index-fill") for name, _ in copies)
        assert len(copies) == threads * len(starts) and sum(m for _, m in copies) == 301


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("threads", [1, 2])
def test_resident_scan_equals_the_cpu_scan_bit_for_bit_and_reads_no_file(tmp_path, monkeypatch, dtype, threads):
    """The device-resident index (loaded once through the streamed path, in its stored dtype) is scanned in the
    file scan's own blocks and returns its proponents and opponents, scores and ids bit for bit, at any block
    size; scanning it opens no file: the index file can be gone."""
    import query

    path, segments, q = fabricated_index(tmp_path, dtype)
    shapes = []
    real_score = query.score_block
    monkeypatch.setattr(query, "score_block", lambda qs, v: shapes.append(tuple(v.shape)) or real_score(qs, v))
    blocks = (48, 301, 1000)
    want = {}
    for block in blocks:
        want[block] = scan(q, segments, block=block), shapes[:]
        shapes.clear()
    resident = query.load_resident(segments, "cpu", fill_threads=threads)
    assert [rows.dtype for _, _, rows in resident.files] == [getattr(torch, dtype)]  # compact: as stored
    path.unlink()
    monkeypatch.setattr(query.h5py, "File", lambda *a, **kw: pytest.fail("a resident scan opened a file"))
    for block in blocks:
        got = scan(q, segments, block=block, resident=resident)
        assert shapes == want[block][1]
        shapes.clear()
        for a, b in zip(want[block][0], got, strict=True):
            assert np.array_equal(a, b)


def test_an_index_is_made_resident_only_when_it_fits_with_the_margin(tmp_path, monkeypatch):
    """On a GPU, the index goes to device memory when its bytes leave RESIDENT_MARGIN of the device free; on the
    CPU (the page cache read in place) never."""
    import query

    path, segments, _ = fabricated_index(tmp_path, "float16")
    need = query.resident_bytes(segments)
    assert need == 301 * (24 * 2 + 8)
    loaded = []
    monkeypatch.setattr(query, "load_resident", lambda segs, dev, build: loaded.append(dev) or "resident")
    total = 10 * need
    for free, want in ((need + 2 * need, "resident"), (need + 2 * need - 1, None)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev, free=free: (free, total))
        assert query.resident_if_it_fits(segments, "cuda:0", None) == want
    assert query.resident_if_it_fits(segments, "cpu", None) is None and len(loaded) == 1


def test_open_index_keeps_a_resident_index_for_every_question(gradient_index, monkeypatch):  # noqa: F811
    """Where the index fits on the GPU (the CPU standing in), open_index loads it once and each question scans
    it there: no index file is read after the open, and the answers are the streamed scan's, bit for bit."""
    import query

    index, _ = gradient_index
    monkeypatch.setattr(query, "resident_if_it_fits", query.load_resident)
    ix = query.open_index(index, device="cpu")
    reads = []
    real = query.iter_index_blocks
    monkeypatch.setattr(query, "iter_index_blocks", lambda *a, **kw: reads.append(a) or real(*a, **kw))
    answers = [ix.ask(p, t, k=5) for p, t, _ in QUESTIONS]
    assert reads == []
    monkeypatch.undo()
    streamed = query.open_index(index, device="cpu")
    assert answers == [streamed.ask(p, t, k=5) for p, t, _ in QUESTIONS]


def test_mfu_counts_six_n_per_token_of_the_traced_matrices_against_the_measured_peak():
    """MFU, as bench.encoding and bench.gpu print it: tokens/s x 6N ÷ the matmul peak for every mode, N the
    traced weight matrices (LM head in, embeddings out); memory ÷ the model's parameter bytes."""
    from bench import encoding as bench_encode

    model = tiny_model("llama")
    matrices = sum(m.weight.numel() for _, m, _, _ in ts.weight_modules(model))
    assert matrices < sum(p.numel() for p in model.parameters())  # the embedding is left out
    results = {"train": {"tokens_per_s": 1000.0, "peak_mib": 3.0}, "exact": {"tokens_per_s": 250.0, "peak_mib": 6.0}}
    s = bench_encode.summarize(results, model, 64, 32, peak=2.0)
    model_mib = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    train, exact = s["modes"]
    assert s["matrix_params"] == matrices
    assert train["mfu"] == pytest.approx(1000 * 6 * matrices / 2e9) == train["work_vs_peak"]
    assert exact["mfu"] == pytest.approx(train["mfu"] / 4) and exact["speed_vs_train"] == 0.25
    assert exact["memory_vs_model"] == pytest.approx(6 / model_mib) and exact["memory_vs_train"] == 2


def test_the_breakdown_bench_puts_every_operator_in_one_group_and_its_shares_add_up():
    """bench.breakdown: matmuls, attention, the loss and copies are told apart by operator name, each mode's
    group shares of its busy time sum to 1, every mode's matmuls have FLOPs counted, and busy time never exceeds
    the profiled wall time. A grouping that lost an operator or counted one twice would not sum to 1."""
    from bench import breakdown

    assert [breakdown.group(n) for n in ("aten::mm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                                         "aten::_log_softmax_backward_data", "aten::nll_loss_forward", "aten::copy_",
                                         "aten::mul")] == ["matmul", "matmul", "attention", "loss", "loss",
                                                           "copies and casts", "the rest"]
    model = breakdown.load("llama-tiny", "float32", "cpu")
    rows = breakdown.breakdown(model, "cpu", 256, 2, 32, 10.0)
    assert [r["mode"] for r in rows] == ["train", "factored", "exact"]
    for r in rows:
        assert sum(r["shares"].values()) == pytest.approx(1)
        assert r["ops"] > 50 and 0 < r["busy_vs_wall"] <= 1 and r["matmul_vs_peak"] > 0
        assert all(breakdown.group("aten::" + n) == "the rest" for n, _ in r["rest_top"])
        assert sum(x for _, x in r["rest_top"]) <= r["shares"]["the rest"] + 1e-9
    assert "| train |" in breakdown.markdown({"model": "m", "dtype": "float32", "device": "cpu", "batch": 2,
                                             "length": 32, "dim": 256, "matmul_gflop_s": 10.0, "modes": rows})
