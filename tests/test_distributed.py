"""index.py and query.py under torchrun (two CPU ranks, gloo): R, the index rows and the proponents equal one
process's bit for bit; a share that is not this build's, in its place, is refused; a failed rank leaves the
previous index as it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, run
from test_index_query import fabricate_run, invoke

import query as query_cli
import trackstar as ts


def torchrun(script: str, *args, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    """A script under `torchrun --standalone --nproc_per_node nproc`, one thread a rank (as torchrun gives)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / script), *map(str, args)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


INDEX = ["--train-sample", "200", "--block", "50"]  # a sample smaller than the corpus; blocks inside chunks


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A corpus run of 300 documents in 5 chunks of 64 (an odd number: 3 for rank 0, 2 for rank 1), a queries
    run of 7 (R_eval) and one of 1 (a single query takes the matrix-vector path, whose rows depend most on the
    block's shape), indexed by one process (`one`) and by two torchrun ranks (`two`)."""
    w = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(0)
    d = 48
    docs = rng.standard_normal((300, d)) * np.linspace(3, 0.1, d)
    queries = rng.standard_normal((7, d))
    fabricate_run(w / "corpus", "corpus", {"vectors": docs}, chunk=64)
    fabricate_run(w / "queries", "queries", {"vectors": queries})
    fabricate_run(w / "ask", "queries", {"vectors": queries[:1] + docs[:1]})
    run("index.py", "--corpus", w / "corpus", "--queries", w / "queries", "--out", w / "one", *INDEX)
    torchrun("index.py", "--corpus", w / "corpus", "--queries", w / "queries", "--out", w / "two", *INDEX)
    return w


def settings(f: h5py.File) -> dict:
    """Every attribute of an HDF5 file but its provenance (which process wrote it: recorded, never compared) and
    its build id (drawn at random for every build, so two builds never share one)."""
    return {k: v for k, v in ts.read_attrs(f).items() if k not in ("provenance", "build")}


def answers(path: Path) -> list[str]:
    """A proponents file's lines as written (scores to the last bit), but for the index build its `made_by` names:
    drawn at random for every build, so two builds of the same index never share it."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        assert line["made_by"].pop("index_build")
    return [json.dumps(line) for line in lines]


def contents(path: Path) -> dict:
    """Every dataset's bytes and every setting of an HDF5 file."""
    with h5py.File(path, "r") as f:
        return {"attrs": settings(f), **{k: (f[k].dtype.str, f[k].shape, f[k][()].tobytes()) for k in f}}


def rows_by_id(index: Path) -> dict[int, bytes]:
    """Each stored row of an index, by document id, whichever file holds it."""
    rows = {}
    for path in [index / "index.h5", *sorted(index.glob("share-*.h5"))]:
        with h5py.File(path, "r") as f:
            if "G" in f:
                rows.update({int(i): g.tobytes() for i, g in zip(f["ids"][:], f["G"][:], strict=True)})
    return rows


def test_torchrun_index_and_query_equal_one_process_bit_for_bit(built):
    w = built
    one, two = w / "one", w / "two"
    assert sorted(p.name for p in two.iterdir()) == ["hessian.h5", "index.h5", "share-00000-of-00002.h5",
                                                      "share-00001-of-00002.h5", "spectrum.png"]
    # R: the float64 spectra would show any re-associated sum of XᵀX; R^(-1/2), λ, δ, shrinkage, settings
    assert contents(one / "hessian.h5") == contents(two / "hessian.h5")
    with h5py.File(one / "index.h5") as a, h5py.File(two / "index.h5") as b:
        assert np.array_equal(a["query_transform"][:], b["query_transform"][:]) and "G" not in b
        assert settings(a) == {k: v for k, v in settings(b).items() if k != "shares"}
    with h5py.File(two / "share-00000-of-00002.h5") as f:
        assert f["ids"][:].tolist() == [*range(0, 64), *range(128, 192), *range(256, 300)]  # chunks 0, 2, 4
    assert rows_by_id(one) == rows_by_id(two) and len(rows_by_id(one)) == 300
    for queries in ("queries", "ask"):
        args = ["--queries", w / queries, "--k", "10", "--block", "7"]
        run("query.py", "--index", one, "--out", w / f"{queries}-one.jsonl", *args)
        torchrun("query.py", "--index", two, "--out", w / f"{queries}-two.jsonl", *args)
        run("query.py", "--index", two, "--out", w / f"{queries}-shares.jsonl", *args)  # one process, two shares
        want = answers(w / f"{queries}-one.jsonl")
        assert answers(w / f"{queries}-two.jsonl") == want  # ids, scores, opponents, texts
        assert answers(w / f"{queries}-shares.jsonl") == want


@pytest.mark.slow
def test_a_share_not_of_this_build_or_place_is_refused_naming_both(built, tmp_path):
    w = built
    torchrun("index.py", "--corpus", w / "corpus", "--queries", w / "queries", "--out", tmp_path / "other",
             *INDEX, "--sample-seed", "1")
    torchrun("index.py", "--corpus", w / "corpus", "--queries", w / "queries", "--out", tmp_path / "three",
             *INDEX, nproc=3)
    # three ranks hold chunks (0, 3), (1, 4), (2): the same R and rows as one process
    assert contents(w / "one" / "hessian.h5") == contents(tmp_path / "three" / "hessian.h5")
    assert rows_by_id(w / "one") == rows_by_id(tmp_path / "three")
    builds = [contents(index / "index.h5")["attrs"]["shares"]["build"] for index in (w / "two", tmp_path / "other")]
    # refused when the index is opened, before any row is scanned ("rebuild"), not by the readers' guard against
    # an index rebuilt during a scan ("run again")
    cases = {"another build": (tmp_path / "other" / "share-00001-of-00002.h5", [*builds, "rebuild the index"]),
             "another world size": (tmp_path / "three" / "share-00001-of-00003.h5", ["share 1 of 3", "share 1 of 2"]),
             "missing": (None, ["share-00001-of-00002.h5", "2 shares"])}
    for case, (share, words) in cases.items():
        index = tmp_path / case.replace(" ", "-")
        shutil.copytree(w / "two", index)
        (index / "share-00001-of-00002.h5").unlink()
        if share is not None:
            shutil.copy(share, index / "share-00001-of-00002.h5")
        r = invoke(query_cli.app, ["--index", index, "--queries", w / "queries", "--out", tmp_path / "p.jsonl"])
        assert isinstance(r.exception, ts.TrackStarError), (case, r.output)
        assert all(word in str(r.exception) for word in words), (case, str(r.exception))
        assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.slow
def test_a_failed_rank_leaves_the_previous_index_as_it_was(built, tmp_path):
    w = built
    corpus, out = tmp_path / "corpus", tmp_path / "index"
    shutil.copytree(w / "corpus", corpus)
    shutil.copytree(w / "two", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    damaged = corpus / ts.chunk_name(1)  # rank 1's; with --hessian none rank 0 never reads it
    damaged.write_bytes(damaged.read_bytes()[:1000])
    r = torchrun("index.py", "--corpus", corpus, "--out", out, "--hessian", "none", check=False)
    assert r.returncode != 0 and ts.chunk_name(1) in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # rank 0's finished share never appears
    shutil.copy(w / "corpus" / ts.chunk_name(1), damaged)
    torchrun("index.py", "--corpus", corpus, "--out", out, "--hessian", "none")
    assert rows_by_id(out).keys() == set(range(300)) and not list(tmp_path.glob(".index.*tmp*"))


def test_the_text_baselines_refuse_torchrun(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for method in ("bm25", "dense"):
        index = ["--index", tmp_path] if method == "dense" else []  # BM25 reads no index
        r = invoke(query_cli.app, ["--method", method, "--corpus", tmp_path / "c.jsonl", *index,
                                   "--queries", tmp_path / "q.jsonl", "--out", tmp_path / "p.jsonl"])
        assert isinstance(r.exception, ts.TrackStarError) and "torchrun" in str(r.exception)
