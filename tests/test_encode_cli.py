"""encode.py as users run it: resume after SIGKILL, shards, torchrun, and clear errors on bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, refused, write_jsonl

ENCODE = [sys.executable, str(ROOT / "encode.py")]


def encode(kind, model_dir, data, out, *extra, check=True, launcher=None, threads=None):
    cmd = (launcher or ENCODE) + [kind, "--model", str(model_dir), "--data", str(data), "--out", str(out),
                                  "--dim", "1024", "--chunk-size", "4", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def chunks_of(run: Path) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for f in sorted(run.glob("chunk-*.h5")):
        with h5py.File(f, "r") as h:
            out[f.name] = {k: h[k][:] for k in h} | {"attrs": dict(h.attrs)}
    return out


def assert_bit_identical(a: Path, b: Path) -> None:
    ca, cb = chunks_of(a), chunks_of(b)
    assert ca.keys() == cb.keys() and ca
    for name in ca:
        for key in ("ids", "vectors"):
            assert ca[name][key].tobytes() == cb[name][key].tobytes(), (name, key)
    assert json.loads((a / "meta.json").read_text())["n_chunks"] == len(ca)


@pytest.fixture()
def big_corpus(tmp_path) -> Path:
    words = "paris rome berlin madrid tokyo capital country river city tower".split()
    rng = np.random.default_rng(0)
    rows = [{"id": f"d{i}", "text": " ".join(rng.choice(words, size=3 + i % 13))} for i in range(120)]
    return write_jsonl(tmp_path / "big.jsonl", rows)


def test_killed_run_resumes_to_bit_identical_chunks(model_dir, big_corpus, tmp_path):
    whole = tmp_path / "whole"
    encode("corpus", model_dir, big_corpus, whole, "--gradient", "exact")

    killed = tmp_path / "killed"
    cmd = ENCODE + ["corpus", "--model", str(model_dir), "--data", str(big_corpus), "--out", str(killed),
                    "--dim", "1024", "--chunk-size", "4", "--gradient", "exact", "--token-budget", "16"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen_whole = 0
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        # Every chunk visible under its final name must already be whole.
        for f in killed.glob("chunk-*.h5"):
            with h5py.File(f, "r") as h:
                assert h["vectors"].shape == (4, 1024) and h["ids"].shape == (4,)
            seen_whole += 1
        if len(list(killed.glob("chunk-*.h5"))) >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    n_before = len(list(killed.glob("chunk-*.h5")))
    assert 0 < n_before < 30 and seen_whole > 0
    encode("corpus", model_dir, big_corpus, killed, "--gradient", "exact", "--token-budget", "16")
    # Chunks do not depend on how batches were cut across runs *with the same settings*.
    rerun = tmp_path / "rerun"
    encode("corpus", model_dir, big_corpus, rerun, "--gradient", "exact", "--token-budget", "16")
    assert_bit_identical(killed, rerun)
    # and the resumed run is the same computation as the uninterrupted one, to float precision
    a, b = chunks_of(killed), chunks_of(whole)
    for name in a:
        va, vb = a[name]["vectors"], b[name]["vectors"]
        assert np.abs(va - vb).max() < 1e-5 * np.abs(vb).max(), name


def test_resume_refuses_different_settings(model_dir, corpus_file, tmp_path):
    """Against meta.json itself too: another shard's run may have written it before any chunk of ours."""
    out = tmp_path / "run"
    encode("corpus", model_dir, corpus_file, out)
    meta = (out / "meta.json").read_bytes()
    r = encode("corpus", model_dir, corpus_file, out, "--seed", "5", check=False)
    assert r.returncode != 0 and "'seed'" in r.stderr and "0 vs 5" in r.stderr
    for chunk in out.glob("chunk-*.h5"):
        chunk.unlink()
    r = encode("corpus", model_dir, corpus_file, out, "--seed", "5", check=False)
    assert r.returncode != 0 and "existing run" in r.stderr and "0 vs 5" in r.stderr
    assert (out / "meta.json").read_bytes() == meta


def test_two_shards_equal_one_process(model_dir, big_corpus, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    encode("corpus", model_dir, big_corpus, one, "--no-correction")
    for i in range(2):
        encode("corpus", model_dir, big_corpus, two, "--no-correction", "--shard", str(i), "--num-shards", "2")
    assert_bit_identical(one, two)


def test_torchrun_two_processes_equal_one_process(model_dir, big_corpus, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # torchrun gives each rank one thread; a float sum's rounding depends on how it is split across threads,
    # so "identical" holds at the same thread count per process.
    encode("corpus", model_dir, big_corpus, one, "--no-correction", threads=1)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(ROOT / "encode.py")]
    encode("corpus", model_dir, big_corpus, two, "--no-correction", launcher=launcher)
    assert_bit_identical(one, two)


def test_estimated_v_is_recorded_and_reused_by_queries(model_dir, corpus_file, queries_file, tmp_path):
    c, q = tmp_path / "c", tmp_path / "q"
    encode("corpus", model_dir, corpus_file, c, "--estimate-v", "8")
    meta = json.loads((c / "meta.json").read_text())
    assert meta["correction"].startswith("estimate(n=8") and meta["v_file"].endswith("second_moment.pt")
    encode("queries", model_dir, queries_file, q, "--optimizer-state", str(c / "second_moment.pt"))
    mq = json.loads((q / "meta.json").read_text())
    assert mq["v_digest"] == meta["v_digest"] and mq["eps"] == meta["eps"]


def head_commit() -> str | None:
    """The commit of the checkout the tests run from, or None (no git, or not a checkout)."""
    if shutil.which("git") is None:
        return None
    r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def test_provenance_is_recorded_in_every_artifact_and_never_compared(model_dir, corpus_file, tmp_path):
    """meta.json, hessian.h5 and index.h5 record the command line, the versions, the checkout's commit, the host
    and the time. A resume from another checkout, host or command line is accepted (the run's provenance is
    kept), an older meta.json without provenance still reads and resumes, and a changed setting is refused."""
    import trackstar as ts

    run, index = tmp_path / "corpus", tmp_path / "index"
    encode("corpus", model_dir, corpus_file, run, "--no-correction")
    r = subprocess.run([sys.executable, str(ROOT / "index.py"), "--corpus", str(run), "--out", str(index),
                        "--hessian", "none"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    with h5py.File(index / "hessian.h5", "r") as h, h5py.File(index / "index.h5", "r") as i:
        recorded = {"meta.json": json.loads((run / "meta.json").read_text())["provenance"],
                    "hessian.h5": ts.read_attrs(h)["provenance"], "index.h5": ts.read_attrs(i)["provenance"]}
    head = head_commit()
    for name, p in recorded.items():
        script, out = ("encode.py", run) if name == "meta.json" else ("index.py", index)
        assert Path(p["command"][0]).name == script and str(out) in p["command"], (name, p["command"])
        assert set(p["versions"]) == {"torch", "transformers", "numpy", "h5py", "python"}, name
        assert p["versions"]["torch"] == torch.__version__ and p["host"] == os.uname().nodename, name
        assert re.fullmatch(rf"{head}(\+dirty)?", p["commit"]) if head else p["commit"] is None, (name, p)

    meta = json.loads((run / "meta.json").read_text())
    elsewhere = {**meta["provenance"], "commit": "0" * 40, "host": "elsewhere", "command": ["elsewhere"]}
    (run / "meta.json").write_text(json.dumps({**meta, "provenance": elsewhere}))
    (run / ts.chunk_name(1)).unlink()
    encode("corpus", model_dir, corpus_file, run, "--no-correction")  # a resume: accepted
    assert (run / ts.chunk_name(1)).exists()
    assert json.loads((run / "meta.json").read_text())["provenance"] == elsewhere

    settings = {k: v for k, v in meta.items() if k != "provenance"}  # as an older encode.py wrote it
    (run / "meta.json").write_text(json.dumps(settings))
    assert dataclasses.asdict(ts.read_meta(run)) == settings
    (run / ts.chunk_name(2)).unlink()
    encode("corpus", model_dir, corpus_file, run, "--no-correction")
    assert json.loads((run / "meta.json").read_text())["provenance"]["command"][0].endswith("encode.py")

    before = (run / "meta.json").read_bytes()
    refused(encode("corpus", model_dir, corpus_file, run, "--no-correction", "--seed", "1", check=False),
            "'seed'", "0 vs 1")
    assert (run / "meta.json").read_bytes() == before


def bad(tmp_path: Path, model_dir: Path, kind: str, lines: list[str], *extra) -> subprocess.CompletedProcess:
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    r = encode(kind, model_dir, data, out, *extra, check=False)
    assert r.returncode != 0
    assert not out.exists() or not any(out.iterdir()), "bad input left output behind"
    assert "Traceback" not in r.stderr
    return r


GOOD = json.dumps({"id": "a", "text": "The capital of France is Paris."})


def test_empty_text_names_its_line(tmp_path, model_dir):
    r = bad(tmp_path, model_dir, "corpus", [GOOD, json.dumps({"id": "b", "text": "  "})])
    assert "bad.jsonl:2" in r.stderr and "empty" in r.stderr


def test_malformed_json_names_its_line(tmp_path, model_dir):
    r = bad(tmp_path, model_dir, "corpus", [GOOD, GOOD.replace('"a"', '"b"'), '{"id": "c", "text": '])
    assert "bad.jsonl:3" in r.stderr and "not valid JSON" in r.stderr


def test_query_without_target_names_its_line(tmp_path, model_dir):
    r = bad(tmp_path, model_dir, "queries", [json.dumps({"id": "q", "prompt": "The capital of France is"})])
    assert "bad.jsonl:1" in r.stderr and "'target'" in r.stderr


def test_unknown_parameter_in_optimizer_state_is_named(tmp_path, model_dir):
    state = torch.load(model_dir / "optimizer.pt", weights_only=True)
    v = {"transformer.h.0.attn.c_attn.weight": state["state"][4]["exp_avg_sq"], "transformer.h.9.mlp.w": torch.ones(2)}
    torch.save(v, tmp_path / "v.pt")
    r = bad(tmp_path, model_dir, "corpus", [GOOD], "--optimizer-state", str(tmp_path / "v.pt"))
    assert "transformer.h.9.mlp.w" in r.stderr


def test_state_for_a_different_model_is_refused(tmp_path, model_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    other = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=2, vocab_size=50257, n_positions=128))
    opt = torch.optim.Adam(other.parameters())
    other(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "other.pt")
    r = bad(tmp_path, model_dir, "corpus", [GOOD], "--optimizer-state", str(tmp_path / "other.pt"))
    assert "shape" in r.stderr and "another model" in r.stderr


def test_fingerprint_names_the_weights_not_the_path(model_dir, tmp_path, monkeypatch):
    """The same model loaded by a relative and an absolute path (Makefile vs meta.json) is the same
    model; different weights are not."""
    import trackstar as ts

    monkeypatch.chdir(model_dir.parent)
    rel, _ = ts.load_model(model_dir.name)
    absolute, tokenizer = ts.load_model(str(model_dir))
    assert rel.trackstar_fingerprint == absolute.trackstar_fingerprint == ts.fingerprint(absolute, tokenizer)
    with torch.no_grad():
        absolute.lm_head.weight[0, 0] += 1e-3
    assert ts.fingerprint(absolute, tokenizer) != rel.trackstar_fingerprint


def test_token_budget_is_chosen_printed_recorded_and_kept_on_resume(model_dir, corpus_file, tmp_path):
    """Without --token-budget the budget comes from the model and the machine (printed, recorded in meta.json);
    a rerun into a run encoded with another budget keeps that budget instead of being refused for it."""
    import encode as encode_cli
    import trackstar as ts

    model, _ = ts.load_model(str(model_dir))
    r = encode("corpus", model_dir, corpus_file, tmp_path / "auto")
    chosen = encode_cli.auto_token_budget(model, "cpu")
    assert f"token budget: {chosen} padded tokens a batch" in r.stdout
    assert json.loads((tmp_path / "auto" / "meta.json").read_text())["token_budget"] == chosen
    encode("corpus", model_dir, corpus_file, tmp_path / "set", "--token-budget", "16")
    before = (tmp_path / "set" / "meta.json").read_text()
    r = encode("corpus", model_dir, corpus_file, tmp_path / "set")  # a resume: nothing left, nothing refused
    assert "token budget: 16 padded tokens a batch" in r.stdout
    assert (tmp_path / "set" / "meta.json").read_text() == before
