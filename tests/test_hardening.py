"""Nothing silently wrong: foreign or damaged chunks, NaN vectors, mismatched inputs to evaluate, badly typed
ground truth, bidirectional models and options that used to be ignored are each refused with one line."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import refused, run, tiny_model, write_jsonl

import trackstar as ts


def encode(kind, model_dir, data, out, *extra, check=True):
    return run("encode.py", kind, "--model", model_dir, "--data", data, "--out", out, "--dim", 64,
               "--chunk-size", 8, *extra, check=check)


def vectors_of(out: Path) -> dict[str, bytes]:
    got = {}
    for f in sorted(out.glob("chunk-*.h5")):
        with h5py.File(f, "r") as h:
            got[f.name] = h["vectors"][:].tobytes()
    return got


# 1. Chunks are checked against the run, not trusted by file name.


def test_chunk_from_another_seed_is_refused_even_without_meta_json(model_dir, corpus_file, tmp_path):
    out = tmp_path / "run"
    encode("corpus", model_dir, corpus_file, out, "--seed", "0")
    (out / "meta.json").unlink()
    r = encode("corpus", model_dir, corpus_file, out, "--seed", "1", check=False)
    refused(r, "chunk-000000.h5", "'seed'", "0 vs 1")


def test_truncated_chunk_is_named_by_index_and_re_encoded_by_encode(model_dir, corpus_file, tmp_path):
    out = tmp_path / "run"
    encode("corpus", model_dir, corpus_file, out)
    whole = vectors_of(out)
    chunk = out / "chunk-000001.h5"
    chunk.write_bytes(chunk.read_bytes()[:3000])
    r = run("index.py", "--corpus", out, "--out", tmp_path / "index", "--hessian", "none", check=False)
    refused(r, "chunk-000001.h5", "damaged")
    r = encode("corpus", model_dir, corpus_file, out)
    assert "chunk-000001.h5" in r.stderr and "encoding it again" in r.stderr
    assert vectors_of(out) == whole, "the re-encoded chunk must equal the original bit for bit"


def test_chunk_with_other_dimension_is_refused_by_index_naming_the_file(model_dir, corpus_file, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    encode("corpus", model_dir, corpus_file, a)
    run("encode.py", "corpus", "--model", model_dir, "--data", corpus_file, "--out", b, "--dim", 32,
        "--chunk-size", 8)
    shutil.copy(b / "chunk-000002.h5", a / "chunk-000002.h5")
    r = run("index.py", "--corpus", a, "--out", tmp_path / "index", "--hessian", "none", check=False)
    refused(r, "chunk-000002.h5")


# 2. NaN/inf is refused at encode time, naming the first bad example; nothing is written for that chunk.


def test_model_with_a_nan_weight_is_refused_before_anything_is_written(model_dir, corpus_file, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan-model"
    shutil.copytree(model_dir, bad)
    weights = load_file(bad / "model.safetensors")
    name = next(n for n in weights if n.endswith("mlp.c_fc.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "run"
    refused(encode("corpus", bad, corpus_file, out, check=False), name, "NaN")
    assert not out.exists()


def test_nan_vectors_are_refused_naming_the_first_bad_example(tmp_path):
    """What an overflow in a narrow --dtype gives: caught before the chunk is written."""
    import encode as encode_cli

    rows = [{"_where": f"data.jsonl:{n}"} for n in (3, 7, 9)]
    vectors = np.ones((3, 4), np.float32)
    vectors[1, 2] = np.inf
    with pytest.raises(ts.TrackStarError, match=r"data\.jsonl:7: .*NaN or inf"):
        encode_cli.check_storable_rows({"vectors": vectors}, rows, "float32")


def test_second_moment_with_negative_entries_is_refused_naming_the_parameter(model_dir, tmp_path):
    model, _ = ts.load_model(str(model_dir))
    v = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    name = next(iter(v))
    v[name][0] = -1.0
    torch.save(v, tmp_path / "v.pt")
    with pytest.raises(ts.TrackStarError, match=name.replace(".", r"\.")):
        ts.load_second_moment(str(tmp_path / "v.pt"), model)


# 3. evaluate.py (and report.py) refuse a corpus, queries or model other than the ones the run was encoded with.


@pytest.fixture()
def bm25_run(model_dir, corpus_file, queries_file, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    encode("corpus", model_dir, corpus_file, run_dir / "corpus")
    run("query.py", "--method", "bm25", "--corpus", corpus_file, "--queries", queries_file,
        "--out", run_dir / "proponents-bm25.jsonl", "--k", 3)
    return run_dir


def test_evaluate_refuses_another_corpus_with_the_same_ids(bm25_run, corpus_file, queries_file, tmp_path):
    rows = [json.loads(line) for line in corpus_file.read_text().splitlines()]
    other = write_jsonl(tmp_path / "other.jsonl", [{**r, "text": r["text"] + " Changed."} for r in rows])
    r = run("report.py", "--run", bm25_run, "--corpus", other, "--queries", queries_file, check=False)
    refused(r, "other.jsonl", "corpus.jsonl")


def test_evaluate_refuses_another_model(bm25_run, model_dir, corpus_file, queries_file, tmp_path):
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other-model"
    shutil.copytree(model_dir, other)
    weights = load_file(other / "model.safetensors")
    next(iter(weights.values())).mul_(1.5)
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    r = run("evaluate.py", "--run", bm25_run, "--model", other, "--corpus", corpus_file, "--queries", queries_file,
            "--methods", "bm25", "--k", 3, check=False)
    refused(r, "fingerprint", str(other))


# 4. Ground-truth fields are type-checked at read time, with the line number.


@pytest.mark.parametrize("kind,row", [
    ("corpus", {"id": "a", "text": "Paris is in France.", "facts": "f10"}),
    ("corpus", {"id": "a", "text": "Paris is in France.", "facts": [1, 2]}),
    ("queries", {"id": "q", "prompt": "Paris is in", "target": " France", "fact": ["f1"]}),
])
def test_ground_truth_of_the_wrong_type_is_refused_with_its_line(tmp_path, kind, row):
    good = {"corpus": {"id": "z", "text": "Rome is in Italy."},
            "queries": {"id": "z", "prompt": "Rome is in", "target": " Italy"}}[kind]
    path = write_jsonl(tmp_path / "in.jsonl", [good, row])
    with pytest.raises(ts.TrackStarError, match=r"in\.jsonl:2: 'facts?' must be"):
        ts.read_jsonl(path, kind)


# 5. A bidirectional model is not a causal LM.


def test_bidirectional_model_is_refused_naming_its_class():
    from transformers import BertConfig, BertLMHeadModel

    bert = BertLMHeadModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, is_decoder=False)).eval()
    with pytest.raises(ts.TrackStarError, match="BertLMHeadModel is not a causal"):
        ts.check_causal(bert)
    for arch in ("gpt2", "llama", "neox"):
        ts.check_causal(tiny_model(arch))  # the real causal families pass


# 6. Options that used to be ignored are refused or honoured.


def test_non_positive_max_length_is_refused(model_dir, corpus_file, tmp_path):
    refused(encode("corpus", model_dir, corpus_file, tmp_path / "o", "--max-length", "-3", check=False),
            "--max-length")
    assert not (tmp_path / "o").exists()


def test_shard_without_num_shards_is_refused(model_dir, corpus_file, tmp_path):
    refused(encode("corpus", model_dir, corpus_file, tmp_path / "o", "--shard", "1", check=False), "--num-shards")


def test_resume_with_another_estimate_size_is_refused(model_dir, corpus_file, tmp_path):
    out = tmp_path / "run"
    encode("corpus", model_dir, corpus_file, out, "--estimate-v", "4")
    r = encode("corpus", model_dir, corpus_file, out, "--estimate-v", "16", check=False)
    refused(r, "second_moment.pt", "n=4", "n=16")


def test_bad_dimension_is_refused_before_the_estimate_is_written(model_dir, corpus_file, tmp_path):
    out = tmp_path / "run"
    refused(encode("corpus", model_dir, corpus_file, out, "--estimate-v", "4", "--dim", "3", check=False), "--dim")
    assert not (out / "second_moment.pt").exists()


def test_a_clean_run_still_passes_every_check(model_dir, corpus_file, tmp_path):
    """The checks must not refuse what they should accept: a fresh encode, resumed, indexes fine."""
    out = tmp_path / "run"
    encode("corpus", model_dir, corpus_file, out)
    first = vectors_of(out)
    r = encode("corpus", model_dir, corpus_file, out)
    assert "0 to encode" in r.stdout and vectors_of(out) == first
    run("index.py", "--corpus", out, "--out", tmp_path / "index", "--hessian", "none")
    with h5py.File(tmp_path / "index" / "index.h5") as f:
        assert np.isfinite(f["G"][:]).all()


# 7. A failed rerun keeps the previous output; a concurrent writer is refused.


def test_failed_index_rerun_leaves_the_previous_index_intact(model_dir, corpus_file, tmp_path):
    out, index = tmp_path / "run", tmp_path / "index"
    encode("corpus", model_dir, corpus_file, out)
    run("index.py", "--corpus", out, "--out", index, "--hessian", "train")
    before = {p.name: p.read_bytes() for p in index.iterdir()}
    # 23 documents in d = 64: R_train is singular, so an undamped R^(-1/2) fails
    r = run("index.py", "--corpus", out, "--out", index, "--hessian", "train", "--damping", "0", check=False)
    refused(r, "positive definite")
    assert {p.name: p.read_bytes() for p in index.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".index")) == [".index.lock"]


def test_second_live_writer_is_refused_and_a_dead_ones_lock_is_taken_over(model_dir, corpus_file, tmp_path):
    import fcntl

    out = tmp_path / "run"
    encode("corpus", model_dir, corpus_file, out)
    lock = tmp_path / ".index.lock"
    lock.write_text(f"process {os.getpid()} on this host")  # a file only: its writer is gone (no flock held)
    run("index.py", "--corpus", out, "--out", tmp_path / "index", "--hessian", "none")
    with open(lock, "r+") as held:  # a live holder
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(f"process {os.getpid()} on this host")
        held.flush()
        r = run("index.py", "--corpus", out, "--out", tmp_path / "index", "--hessian", "none", check=False)
    refused(r, str(os.getpid()), "being written")


def test_index_refuses_an_out_directory_holding_other_files(model_dir, corpus_file, tmp_path):
    """--out RUN (the encoded run itself) or a folder with a user's file must never be replaced."""
    out = tmp_path / "run"
    encode("corpus", model_dir, corpus_file, out / "corpus")
    r = run("index.py", "--corpus", out / "corpus", "--out", out, "--hessian", "none", check=False)
    refused(r, "corpus", "holds the input")
    assert (out / "corpus" / "meta.json").exists()
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "notes.txt").write_text("mine")
    r = run("index.py", "--corpus", out / "corpus", "--out", tmp_path / "index", "--hessian", "none", check=False)
    refused(r, "notes.txt")
    assert (tmp_path / "index" / "notes.txt").read_text() == "mine"


def test_encode_refuses_a_chunk_of_another_dimension_and_keeps_it(model_dir, corpus_file, tmp_path):
    """A chunk from a --dim 32 run in a --dim 64 run's directory is foreign, not damaged: refused, never deleted,
    and meta.json is left as it was."""
    a, b = tmp_path / "a", tmp_path / "b"
    encode("corpus", model_dir, corpus_file, a)
    run("encode.py", "corpus", "--model", model_dir, "--data", corpus_file, "--out", b, "--dim", 32,
        "--chunk-size", 8)
    shutil.copy(b / "chunk-000002.h5", a / "chunk-000002.h5")
    meta = (a / "meta.json").read_bytes()
    refused(encode("corpus", model_dir, corpus_file, a, check=False), "chunk-000002.h5", "'dim'")
    assert (a / "chunk-000002.h5").exists() and (a / "meta.json").read_bytes() == meta


def test_factor_v_run_takes_the_factored_gradient(model_dir, corpus_file, tmp_path):
    """--factor-v makes every traced matrix's V rank-one, so auto must pick the factored gradient (norms and
    biases keep a full V, but they are not traced)."""
    out = tmp_path / "run"
    encode("corpus", model_dir, corpus_file, out, "--estimate-v", "6", "--factor-v")
    assert json.loads((out / "meta.json").read_text())["gradient"] == "factored"


# 8. A tokenizer larger than its model is refused before any file is written.


def test_token_beyond_the_embeddings_is_refused_before_meta_json(model_dir, corpus_file, tmp_path):
    from safetensors.torch import load_file, save_file

    small = tmp_path / "small-vocab"
    shutil.copytree(model_dir, small)
    weights = load_file(small / "model.safetensors")
    cfg = json.loads((small / "config.json").read_text())
    keep = 40  # the byte-level tokenizer has ~400 tokens; this model only embeds 40
    for name in list(weights):
        if weights[name].shape[0] == cfg["vocab_size"]:
            weights[name] = weights[name][:keep].contiguous()
    save_file(weights, small / "model.safetensors", metadata={"format": "pt"})
    (small / "config.json").write_text(json.dumps({**cfg, "vocab_size": keep}))
    out = tmp_path / "run"
    refused(encode("corpus", small, corpus_file, out, check=False), f"{corpus_file}:1", "beyond the model")
    assert not out.exists()


# 9. Tokenization of a huge document is bounded by the max length, and gives the same tokens.


def test_long_document_is_tokenized_from_a_prefix_with_the_same_first_tokens():
    from conftest import bpe_tokenizer

    tok = bpe_tokenizer()
    calls = []
    text = "The capital of France is Paris, and the river is the Seine. " * 20000  # 1.2 MB on one line
    ids, labels, truncated = ts.tokenize_document(lambda t: calls.append(len(t)) or tok(t), text, 128)
    assert truncated and ids == tok(text).input_ids[:128] and labels == ids
    assert max(calls) <= 64 * (128 + 64), "only a bounded prefix may be tokenized"
    short = "Rome is in Italy."
    assert ts.tokenize_document(tok, short, 128) == (tok(short).input_ids, tok(short).input_ids, False)


# The one-line errors: exit 2, the culprit named, no traceback, nothing left behind.


def _bytes(tmp: Path, raw: bytes, name: str = "c.jsonl") -> Path:
    p = tmp / name
    p.write_bytes(raw)
    return p


def _model_without_tokenizer(tmp: Path, model_dir: Path) -> Path:
    m = tmp / "no-tok"
    m.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / f, m / f)
    return m


def _t5(tmp: Path, model_dir: Path) -> Path:
    m = _model_without_tokenizer(tmp, model_dir)
    for f in model_dir.iterdir():
        if "token" in f.name or f.suffix in (".txt",) or f.name == "vocab.json":
            shutil.copy(f, m / f.name)
    (m / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 64, "d_model": 8, "d_kv": 4,
                                               "d_ff": 8, "num_layers": 1, "num_heads": 2}))
    return m


GOOD_DOC = b'{"id": "a", "text": "The capital of France is Paris."}\n'

CASES = {
    # name: (builder(tmp, model_dir, corpus) -> argv after the script, words the message must hold)
    "non-UTF-8 bytes": (lambda t, m, c: ["encode.py", "corpus", "--model", m, "--data",
                                         _bytes(t, GOOD_DOC + b'{"text": "caf\xe9"}\n'), "--out", t / "o"],
                        ["c.jsonl:2", "UTF-8"]),
    "lone surrogate": (lambda t, m, c: ["encode.py", "corpus", "--model", m, "--data",
                                        _bytes(t, GOOD_DOC + b'{"text": "a \\ud800 b"}\n'), "--out", t / "o"],
                       ["c.jsonl:2", "surrogate"]),
    "gz that is not gzip": (lambda t, m, c: ["encode.py", "corpus", "--model", m, "--data",
                                             _bytes(t, GOOD_DOC, "c.jsonl.gz"), "--out", t / "o"],
                            ["c.jsonl.gz", "gzip"]),
    "data is an empty directory": (lambda t, m, c: ["encode.py", "corpus", "--model", m, "--data", t, "--out",
                                                    t / "o"], ["the directory", "holds no *.jsonl"]),
    "data is a missing file": (lambda t, m, c: ["encode.py", "corpus", "--model", m, "--data", t / "no.jsonl",
                                                "--out", t / "o"], ["no.jsonl", "no such file"]),
    "out is a file": (lambda t, m, c: ["encode.py", "corpus", "--model", m, "--data", c, "--out",
                                       _bytes(t, b"x", "out.txt")], ["out.txt", "not a directory"]),
    "optimizer state is a directory": (lambda t, m, c: ["encode.py", "corpus", "--model", m, "--data", c, "--out",
                                                        t / "o", "--optimizer-state", t],
                                       ["is a directory"]),
    "model without tokenizer": (lambda t, m, c: ["encode.py", "corpus", "--model", _model_without_tokenizer(t, m),
                                                 "--data", c, "--out", t / "o"], ["tokenizer", "no-tok"]),
    "T5 is not a causal LM": (lambda t, m, c: ["encode.py", "corpus", "--model", _t5(t, m), "--data", c, "--out",
                                               t / "o"], ["cannot load the model", "T5"]),
    "bad config.json": (lambda t, m, c: ["encode.py", "corpus", "--model", _bad_config(t, m), "--data", c, "--out",
                                         t / "o"], ["bad-config"]),
    "truncated weights": (lambda t, m, c: ["encode.py", "corpus", "--model", _truncated_weights(t, m), "--data", c,
                                           "--out", t / "o"], ["cannot load the model", "cut"]),
    "empty optimizer.pt": (lambda t, m, c: ["encode.py", "corpus", "--model", m, "--data", c, "--out", t / "o",
                                            "--optimizer-state", _bytes(t, b"", "opt.pt")], ["opt.pt"]),
    "text optimizer.pt": (lambda t, m, c: ["encode.py", "corpus", "--model", m, "--data", c, "--out", t / "o",
                                           "--optimizer-state", _bytes(t, b"not a torch file", "opt.pt")], ["opt.pt"]),
    "non-weights-only optimizer.pt": (lambda t, m, c: ["encode.py", "corpus", "--model", m, "--data", c, "--out",
                                                       t / "o", "--optimizer-state", _pickled_object(t)],
                                      ["obj.pt"]),
    "chunk size 0": (lambda t, m, c: ["encode.py", "corpus", "--model", m, "--data", c, "--out", t / "o",
                                      "--chunk-size", "0"], ["--chunk-size"]),
    "dtype float16 (no loss scaling)": (lambda t, m, c: ["encode.py", "corpus", "--model", m, "--data", c,
                                                        "--out", t / "o", "--dtype", "float16"],
                                        ["float16", "bfloat16"]),
    "dtype float8": (lambda t, m, c: ["encode.py", "corpus", "--model", m, "--data", c, "--out", t / "o",
                                      "--dtype", "float8"], ["--dtype", "float8"]),
    "cuda without CUDA": (lambda t, m, c: ["encode.py", "corpus", "--model", m, "--data", c, "--out", t / "o",
                                           "--device", "cuda"], ["--device cuda", "no CUDA"]),
    "corrupt meta.json": (lambda t, m, c: ["index.py", "--corpus", _corrupt_meta(t), "--out", t / "o"],
                          ["meta.json", "corrupt"]),
    "damping nan": (lambda t, m, c: ["index.py", "--corpus", t, "--out", t / "o", "--damping", "nan"],
                    ["--damping", "nan"]),
    "proponents without query_id": (lambda t, m, c: _evaluate_with(t, m, c, [{"proponents": []}]),
                                    ["proponents-bm25.jsonl:1", "query_id"]),
    "proponents naming unknown documents": (
        lambda t, m, c: _evaluate_with(t, m, c, [{"query_id": "q0", "proponents": [{"id": "nope", "score": 1}]},
                                                 {"query_id": "q1", "proponents": []}]), ["nope"]),
    "max-queries -1": (lambda t, m, c: _evaluate_with(t, m, c, None, "--max-queries", "-1"), ["--max-queries"]),
    "k 0": (lambda t, m, c: ["query.py", "--method", "bm25", "--corpus", c, "--queries", c, "--out", t / "p.jsonl",
                             "--k", "0"], ["--k"]),
    "blank ad-hoc target": (lambda t, m, c: ["query.py", "--index", t, "--prompt", "Paris is in", "--target", "   "],
                            ["--target"]),
    # Outputs, checked before the work (ts.check_output): never an input, another artifact or a file of one.
    "out is bm25's own queries file": (lambda t, m, c: ["query.py", "--method", "bm25", "--corpus", c, "--queries",
                                                        _queries(t), "--out", t / "q.jsonl"], ["q.jsonl", "input"]),
    "out is the corpus file": (lambda t, m, c: ["query.py", "--method", "bm25", "--corpus", c, "--queries",
                                                _queries(t), "--out", c], ["corpus.jsonl", "input"]),
    "encode into the model's folder": (lambda t, m, c: ["encode.py", "corpus", "--model", m, "--data", c, "--out",
                                                        m / "run"], ["inside the input", "gpt2-tiny"]),
    "encode into its own data folder": (lambda t, m, c: ["encode.py", "corpus", "--model", m, "--data",
                                                         _data_folder(t, c), "--out", t / "data" / "run"],
                                        ["inside the input", "data"]),
    "out is a run's meta.json": (lambda t, m, c: ["query.py", "--method", "bm25", "--corpus", c, "--queries",
                                                  _queries(t), "--out", _fake_run(t) / "meta.json"],
                                 ["meta.json", "inside the corpus run"]),
    "out is an index's index.h5": (lambda t, m, c: ["query.py", "--method", "bm25", "--corpus", c, "--queries",
                                                    _queries(t), "--out", _fake_index(t, "index") / "index.h5"],
                                   ["index.h5", "inside the index"]),
    "index over a dense index": (lambda t, m, c: ["index.py", "--corpus", _fake_run(t), "--out",
                                                  _fake_index(t, "dense index"), "--hessian", "none"],
                                 ["is a dense index, not an index"]),
    "queries encoded over a corpus run": (lambda t, m, c: ["encode.py", "queries", "--model", m, "--data",
                                                           _queries(t), "--out", _fake_run(t)],
                                          ["is a corpus run, not a queries run"]),
    "out over a user's file": (lambda t, m, c: ["query.py", "--method", "bm25", "--corpus", c, "--queries",
                                                _queries(t), "--out", _bytes(t, b"my notes\n", "notes.jsonl")],
                               ["notes.jsonl", "not written by this toolkit"]),
    "out is a dangling link": (lambda t, m, c: ["encode.py", "corpus", "--model", m, "--data", c, "--out",
                                                _dangling(t)], ["is a link to", "gone", "does not exist"]),
    "out is ''": (lambda t, m, c: ["encode.py", "corpus", "--model", m, "--data", c, "--out", ""],
                  ["--out", "empty"]),
    "data is ''": (lambda t, m, c: ["encode.py", "corpus", "--model", m, "--data", "", "--out", t / "o"],
                   ["--data", "empty"]),
    "out under a file": (lambda t, m, c: ["query.py", "--method", "bm25", "--corpus", c, "--queries", _queries(t),
                                          "--out", _bytes(t, b"x", "f.txt") / "p.jsonl"], ["f.txt", "not a directory"]),
    "out where nothing can be written": (lambda t, m, c: ["query.py", "--method", "bm25", "--corpus", c, "--queries",
                                                          _queries(t), "--out", "/proc/trackstar/p.jsonl"],
                                         ["/proc", "cannot write"]),
    "evaluate where nothing can be written": (lambda t, m, c: ["evaluate.py", "--run", "/proc/self", "--model", m,
                                                               "--corpus", c, "--queries", _queries(t), "--methods",
                                                               "bm25"], ["--run", "cannot write"]),
}


def _queries(tmp: Path) -> Path:
    return write_jsonl(tmp / "q.jsonl", [{"id": "q0", "prompt": "Paris is in", "target": " France"}])


def _data_folder(tmp: Path, corpus: Path) -> Path:
    (tmp / "data").mkdir()
    shutil.copy(corpus, tmp / "data" / "corpus.jsonl")
    return tmp / "data"


def _fake_run(tmp: Path) -> Path:
    """A folder that says it is an encoded corpus run (its meta.json's kind): what a check of the output reads."""
    (tmp / "run").mkdir()
    (tmp / "run" / "meta.json").write_text(json.dumps({"kind": "corpus"}))
    return tmp / "run"


def _fake_index(tmp: Path, kind: str) -> Path:
    (tmp / "ix").mkdir()
    with h5py.File(tmp / "ix" / "index.h5", "w") as f:
        ts.write_attrs(f, {"kind": kind})
    return tmp / "ix"


def _dangling(tmp: Path) -> Path:
    (tmp / "link").symlink_to(tmp / "gone" / "run")
    return tmp / "link"


def _bad_config(tmp: Path, model_dir: Path) -> Path:
    m = tmp / "bad-config"
    shutil.copytree(model_dir, m)
    (m / "config.json").write_text("{not json")
    return m


def _truncated_weights(tmp: Path, model_dir: Path) -> Path:
    m = tmp / "cut"
    shutil.copytree(model_dir, m)
    w = m / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    return m


def _pickled_object(tmp: Path) -> Path:
    torch.save({"state": Counter(a=1)}, tmp / "obj.pt")  # not plain tensors: refused by weights_only
    return tmp / "obj.pt"


def _corrupt_meta(tmp: Path) -> Path:
    run_dir = tmp / "enc"
    run_dir.mkdir()
    (run_dir / "meta.json").write_text('{"tool": ')
    return run_dir


def _evaluate_with(tmp: Path, model_dir: Path, corpus: Path, proponents: list[dict] | None, *extra) -> list:
    """evaluate.py's argv over a run whose proponents-bm25.jsonl holds `proponents` (each line saying what made
    it, as query.py writes it; default: no proponents for either query)."""
    import query

    queries = write_jsonl(tmp / "q.jsonl", [{"id": "q0", "prompt": "Paris is in", "target": " France"},
                                            {"id": "q1", "prompt": "Rome is in", "target": " Italy"}])
    run_dir = tmp / "run"
    run_dir.mkdir()
    made = query.made_by("bm25", 10, None, queries, ts.data_digest(queries))
    lines = proponents or [{"query_id": "q0", "proponents": []}, {"query_id": "q1", "proponents": []}]
    write_jsonl(run_dir / "proponents-bm25.jsonl", [{"made_by": made, **line} for line in lines])
    return ["evaluate.py", "--run", run_dir, "--model", model_dir, "--corpus", corpus, "--queries", queries,
            "--methods", "bm25", *extra]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_the_culprit(case, model_dir, corpus_file, tmp_path):
    if case == "cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    build, words = CASES[case]
    work = tmp_path / "w"
    work.mkdir()
    argv = build(work, model_dir, corpus_file)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = run(*argv, check=False)
    refused(r, *[str(w) for w in words])
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before, "a refused run must leave nothing behind"


def test_an_output_link_is_followed_its_target_replaced_and_the_link_kept(corpus_file, tmp_path):
    queries = _queries(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    target, link = tmp_path / "elsewhere" / "p.jsonl", tmp_path / "p.jsonl"
    link.symlink_to(target)
    run("query.py", "--method", "bm25", "--corpus", corpus_file, "--queries", queries, "--out", link, "--k", 2)
    run("query.py", "--method", "bm25", "--corpus", corpus_file, "--queries", queries, "--out", link, "--k", 3)
    assert link.is_symlink() and os.readlink(link) == str(target), "the link stays a link to the same target"
    assert len(json.loads(target.read_text().splitlines()[0])["proponents"]) == 3, "its target holds the rerun"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "elsewhere", "p.jsonl", "q.jsonl"]
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["p.jsonl"], "no .old or .tmp left"


def test_temporary_files_of_killed_runs_are_removed_and_a_live_runs_kept(tmp_path):
    dead = 2 ** 22 + 12345  # above the default pid_max: no process has it
    assert not ts._alive(dead) and ts._alive(os.getpid())
    run_dir = tmp_path / "corpus"
    run_dir.mkdir()
    (run_dir / "meta.json").write_text(json.dumps({"kind": "corpus"}))
    killed_chunk, live_chunk = run_dir / f".chunk-000001.h5.tmp-{dead}", run_dir / f".chunk-000002.h5.tmp-{os.getpid()}"
    killed_dir = tmp_path / f".corpus.tmp-{dead}"
    for f in (killed_chunk, live_chunk):
        f.write_bytes(b"half a chunk")
    killed_dir.mkdir()
    (killed_dir / "index.h5").write_bytes(b"half an index")
    assert ts.check_output(run_dir, "corpus run") == run_dir
    assert not killed_chunk.exists() and not killed_dir.exists(), "a killed run's temporaries are removed"
    assert live_chunk.exists(), "a live process's temporary file is its own"


def test_every_artifact_says_what_it_is(model_dir, corpus_file, tmp_path):
    """The kind each stage writes is what ts.artifact_kind reads back, so one kind is never taken for another."""
    queries = _queries(tmp_path)
    run("encode.py", "corpus", "--model", model_dir, "--data", corpus_file, "--out", tmp_path / "c", "--dim", 16)
    run("index.py", "--corpus", tmp_path / "c", "--out", tmp_path / "ix", "--hessian", "none")
    run("query.py", "--method", "bm25", "--corpus", corpus_file, "--queries", queries, "--out", tmp_path / "p.jsonl")
    assert ts.artifact_kind(tmp_path / "c") == "corpus run"
    assert ts.artifact_kind(tmp_path / "ix") == "index"
    assert ts.artifact_kind(tmp_path / "p.jsonl") == "proponents"
    assert ts.artifact_kind(model_dir) == "model"
    assert ts.artifact_kind(queries) is None, "a user's JSONL is no artifact"
