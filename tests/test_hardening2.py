"""Nothing silently wrong under concurrency, odd paths and hand-edited files: another tokenizer, an index rebuilt
while it is read, proponents files that do not say what made them, ids in two Unicode forms, links that name
a file twice, outputs over inputs, and every compatibility key guarded."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import pytest
from conftest import refused, run, write_jsonl

import trackstar as ts


def encode(kind, model_dir, data, out, *extra, check=True):
    return run("encode.py", kind, "--model", model_dir, "--data", data, "--out", out, "--dim", 64,
               "--chunk-size", 8, *extra, check=check)


def model_with_other_tokenizer(model_dir: Path, tmp: Path) -> Path:
    """The same weights and config with a tokenizer.json whose vocabulary has two ids swapped: as many
    tokens, other ids for the same text."""
    other = tmp / "other-tokenizer"
    shutil.copytree(model_dir, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    return other


# 1. The tokenizer is part of the model's identity.


def test_the_fingerprint_covers_the_tokenizer_not_only_the_weights(model_dir, tmp_path):
    other = model_with_other_tokenizer(model_dir, tmp_path)
    mine, tok = ts.load_model(str(model_dir))
    theirs, other_tok = ts.load_model(str(other))
    assert ts.fingerprint(mine) == ts.fingerprint(theirs), "the weights are the same"
    assert len(tok) == len(other_tok) and tok.get_vocab() != other_tok.get_vocab()
    assert mine.trackstar_fingerprint != theirs.trackstar_fingerprint
    tok("Rome is in Italy.", truncation=True, max_length=3)  # call state is not identity
    assert ts.fingerprint(mine, tok) == mine.trackstar_fingerprint


def test_queries_encoded_with_another_tokenizer_are_refused_by_index_and_query(model_dir, corpus_file,
                                                                               queries_file, tmp_path):
    other = model_with_other_tokenizer(model_dir, tmp_path)
    corpus, queries, index = tmp_path / "corpus", tmp_path / "queries", tmp_path / "index"
    encode("corpus", model_dir, corpus_file, corpus)
    encode("queries", other, queries_file, queries)
    fps = [json.loads((d / "meta.json").read_text())["model"] for d in (corpus, queries)]
    assert fps[0] != fps[1]
    r = run("index.py", "--corpus", corpus, "--queries", queries, "--out", index, "--hessian", "none", check=False)
    refused(r, "'model'", *fps)
    assert not index.exists()
    run("index.py", "--corpus", corpus, "--out", index, "--hessian", "none")
    r = run("query.py", "--index", index, "--queries", queries, "--out", tmp_path / "p.jsonl", check=False)
    refused(r, "'model'", *fps)
    assert not (tmp_path / "p.jsonl").exists()


# 2. A reader sees one build: an index rebuilt between two of its opens is refused.


def build_of(index: Path) -> str:
    with h5py.File(index / "index.h5", "r") as f:
        return ts.read_attrs(f)["build"]


@pytest.fixture()
def two_builds(model_dir, corpus_file, queries_file, tmp_path) -> tuple[Path, Path, Path]:
    """(index, another build of an index over the same corpus, the queries run)."""
    corpus, queries = tmp_path / "corpus", tmp_path / "queries"
    encode("corpus", model_dir, corpus_file, corpus)
    encode("queries", model_dir, queries_file, queries)
    run("index.py", "--corpus", corpus, "--queries", queries, "--out", tmp_path / "index", "--hessian", "none")
    run("index.py", "--corpus", corpus, "--queries", queries, "--out", tmp_path / "rebuilt", "--hessian", "train",
        "--damping", "0.5")
    return tmp_path / "index", tmp_path / "rebuilt", queries


@pytest.mark.parametrize("after", ["read_index_meta", "prepare_queries"])
def test_an_index_swapped_between_two_opens_is_refused_naming_both_builds(two_builds, tmp_path, monkeypatch,
                                                                         after):
    """The rebuild lands after the settings were read (before the query transform is) or after the queries were
    transformed (before the rows are scanned): either way no answer mixes two builds."""
    import query

    index, rebuilt, queries = two_builds
    builds = [build_of(d) for d in (index, rebuilt)]
    assert builds[0] != builds[1]
    original = getattr(query, after)

    def then_swap(*args, **kwargs):
        got = original(*args, **kwargs)
        os.replace(index, tmp_path / "old")
        os.replace(rebuilt, index)
        return got

    monkeypatch.setattr(query, after, then_swap)
    out = tmp_path / "p.jsonl"
    with pytest.raises(ts.TrackStarError, match="another index build") as e:
        query.query_runs(index, queries, out, 3, 0, "cpu")
    assert builds[0] in str(e.value) and builds[1] in str(e.value)
    assert not out.exists()
