"""--chunk-dtype: compact chunks hold the float32 vectors rounded to bfloat16 or float16, read back as float32
exactly, at half the disk; the dtype is a setting like any other (checked per chunk, on resume, between runs),
and a vector float16 cannot hold is refused, never stored as inf."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import CORPUS, refused, run, write_jsonl

import trackstar as ts

DATASETS = ("vectors", "vectors_uncorrected")


def encode(kind: str, model_dir: Path, data: Path, out: Path, *extra, check: bool = True):
    return run("encode.py", kind, "--model", model_dir, "--data", data, "--out", out, "--dim", 1024,
               "--chunk-size", 4, "--also-uncorrected", *extra, check=check)


@pytest.fixture(scope="module")
def encoded(model_dir, tmp_path_factory) -> dict[str, Path]:
    """The same corpus encoded with each --chunk-dtype (same settings otherwise, so the float32 vectors are
    the same numbers in every run: encoding is deterministic on the CPU)."""
    tmp = tmp_path_factory.mktemp("chunk-dtype")
    data = write_jsonl(tmp / "corpus.jsonl", [{"id": f"d{i}", "text": CORPUS[i % len(CORPUS)] + f" Number {i}."}
                                              for i in range(10)])
    runs = {"data": data}
    for dtype in ts.CHUNK_DTYPES:
        runs[dtype] = tmp / dtype
        encode("corpus", model_dir, data, runs[dtype], "--chunk-dtype", dtype)
    return runs


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_compact_chunks_read_back_as_the_float32_vectors_rounded(encoded, dtype):
    for dataset in DATASETS:
        ids, full = ts.read_vectors(encoded["float32"], dataset)
        ids_c, got = ts.read_vectors(encoded[dtype], dataset)
        want = torch.from_numpy(full).to(getattr(torch, dtype)).float().numpy()
        assert got.dtype == np.float32 and np.array_equal(ids_c, ids)
        assert np.array_equal(got, want), dataset  # bit for bit: rounded once, widened exactly
        assert not np.array_equal(got, full)  # and it was rounded (not float32 under another name)
    # index.py's R_train sample reads rows through the same decoding
    import index as index_cli

    sample = np.concatenate(list(index_cli.sample_blocks(encoded[dtype], "vectors", 5, seed=0)))
    assert np.isin(sample, ts.read_vectors(encoded[dtype])[1]).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_compact_chunks_take_half_the_disk(encoded, dtype):
    def sizes(run: Path) -> tuple[int, int]:
        vec = total = 0
        for f in ts.chunk_files(run):
            total += f.stat().st_size
            with h5py.File(f, "r") as h:
                vec += sum(h[k].id.get_storage_size() for k in DATASETS)
        return vec, total

    (vec32, total32), (vec16, total16) = sizes(encoded["float32"]), sizes(encoded[dtype])
    assert vec16 * 2 == vec32
    # the files shrink by just that: ids and the settings attributes (a few kB a chunk) are the rest
    assert abs((total32 - total16) - vec32 // 2) <= 64 * len(ts.chunk_files(encoded[dtype]))


def test_bfloat16_corpus_refuses_float32_queries(model_dir, encoded, queries_file, tmp_path):
    queries = tmp_path / "queries"
    encode("queries", model_dir, queries_file, queries)
    r = run("index.py", "--corpus", encoded["bfloat16"], "--queries", queries, "--out", tmp_path / "i", check=False)
    refused(r, "'chunk_dtype'", "'bfloat16' vs 'float32'")
    # an index of the bfloat16 corpus refuses the float32 queries too
    run("index.py", "--corpus", encoded["bfloat16"], "--out", tmp_path / "index", "--hessian", "none")
    r = run("query.py", "--index", tmp_path / "index", "--queries", queries, "--out", tmp_path / "p.jsonl",
            check=False)
    refused(r, "'chunk_dtype'", "'bfloat16' vs 'float32'")


def test_chunk_dtype_survives_resume(model_dir, encoded, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(encoded["bfloat16"], out)
    with h5py.File(out / "chunk-000001.h5", "r") as h:
        before = {k: h[k][:].tobytes() for k in DATASETS}
    (out / "chunk-000001.h5").unlink()
    meta = (out / "meta.json").read_bytes()
    refused(encode("corpus", model_dir, encoded["data"], out, check=False), "'chunk_dtype'",
            "'bfloat16' vs 'float32'")  # a rerun without the flag: float32, not this run
    assert (out / "meta.json").read_bytes() == meta and not (out / "chunk-000001.h5").exists()
    encode("corpus", model_dir, encoded["data"], out, "--chunk-dtype", "bfloat16")
    assert json.loads((out / "meta.json").read_text())["chunk_dtype"] == "bfloat16"
    with h5py.File(out / "chunk-000001.h5", "r") as h:
        assert {k: h[k][:].tobytes() for k in DATASETS} == before
        assert all(h[k].dtype == np.uint16 and h[k].attrs["dtype"] == "bfloat16" for k in DATASETS)
    ts.chunk_files(out)


def test_chunk_storing_another_dtype_than_its_settings_is_refused(encoded, tmp_path):
    """A bfloat16 run's chunk whose vectors were rewritten as float32 would otherwise be read as unrounded."""
    out = tmp_path / "run"
    shutil.copytree(encoded["bfloat16"], out)
    with h5py.File(out / "chunk-000001.h5", "r+") as h:
        x = ts.chunk_rows(h, "vectors")
        del h["vectors"]
        h.create_dataset("vectors", data=x)
    with pytest.raises(ts.DamagedChunk, match=r"chunk-000001\.h5 stores .*vectors.*float32.*not bfloat16"):
        ts.chunk_files(out)


def test_float16_overflow_is_refused_naming_the_example(model_dir, encoded, tmp_path):
    import encode as encode_cli

    rows = [{"_where": f"data.jsonl:{n}"} for n in (3, 7, 9)]
    x = np.full((3, 4), 65504.0, np.float32)  # float16's largest value: stored as it is
    encode_cli.check_storable_rows({"vectors": x}, rows, "float16")
    x[1, 2] = -65505.0  # a float32 beyond float16: stored, it would be -65504 (and from 65520 on, -inf)
    with pytest.raises(ts.TrackStarError, match=r"data\.jsonl:7: .*reach 65505, beyond .* float16's ±65504"):
        encode_cli.check_storable_rows({"vectors": x}, rows, "float16")
    encode_cli.check_storable_rows({"vectors": x}, rows, "bfloat16")
    # end to end: a tiny V makes the corrected vectors ~1e6; float16 refuses them, bfloat16 holds them
    model, _ = ts.load_model(str(model_dir))
    torch.save({n: torch.full_like(p, 1e-12) for n, p in model.named_parameters()}, tmp_path / "v.pt")
    out = tmp_path / "run"
    r = encode("corpus", model_dir, encoded["data"], out, "--optimizer-state", tmp_path / "v.pt",
               "--chunk-dtype", "float16", check=False)
    refused(r, "corpus.jsonl:", "beyond --chunk-dtype float16's ±65504")
    assert not list(out.glob("chunk-*.h5"))
    encode("corpus", model_dir, encoded["data"], tmp_path / "bf16", "--optimizer-state", tmp_path / "v.pt",
           "--chunk-dtype", "bfloat16")
    assert np.abs(ts.read_vectors(tmp_path / "bf16")[1]).max() > 65504
