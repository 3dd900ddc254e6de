"""One world on every machine: the fact world's model is the same bit for bit whatever the thread count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

SAME_FILES = ("corpus.jsonl", "queries.jsonl", "model/model.safetensors", "model/optimizer.pt",
              "model/tokenizer.json", "model/config.json", "model/checkpoint.json")


def tiny_world(out, threads: int):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, str(ROOT / "prepare.py"), "factworld", "--out", str(out), "--size", "tiny",
                        "--checkpoints", "0"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_the_tiny_world_trained_on_one_and_on_two_threads_is_byte_identical(tmp_path):
    """Weights, optimizer state, tokenizer and data: the same bytes with OMP_NUM_THREADS=1 and 2 (training
    pins its own thread count and records it), so every machine's `make all` starts from the same model."""
    one, two = tiny_world(tmp_path / "one", 1), tiny_world(tmp_path / "two", 2)
    for name in SAME_FILES:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    info = json.loads((one / "world.json").read_text())
    assert info["training"]["threads"] == 1
