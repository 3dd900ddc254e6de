"""One world on every machine: the fact world's model is the same bit for bit whatever the thread count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_world

SAME_FILES = ("corpus.jsonl", "queries.jsonl", "model/model.safetensors", "model/optimizer.pt",
              "model/tokenizer.json", "model/config.json", "model/checkpoint.json")


@pytest.mark.slow
def test_the_tiny_world_is_byte_identical_whatever_the_thread_count_with_or_without_checkpoints(tiny_run, tmp_path):
    """Weights, optimizer state, tokenizer and data: the same bytes trained under another OMP_NUM_THREADS (1 or
    2) and without intermediate checkpoints as `make all` trained them (with three checkpoints saved on the way),
    since training pins its own thread count and records it and saving touches no random state. So every
    machine's `make all` starts from the same model, and a trend's final point is `make all`'s."""
    made = tiny_world(tiny_run[0])
    threads = "2" if os.environ.get("OMP_NUM_THREADS") == "1" else "1"  # not the count `make all` ran with
    env = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2",  # the CPU kernels `make all` pins, unless set
           **os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    one = tmp_path / "one"
    r = subprocess.run([sys.executable, str(ROOT / "prepare.py"), "factworld", "--out", str(one), "--size", "tiny",
                        "--checkpoints", "0"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (made / "model" / "checkpoints").is_dir() and not (one / "model" / "checkpoints").exists()
    for name in SAME_FILES:
        assert (one / name).read_bytes() == (made / name).read_bytes(), name
    for info in (json.loads((w / "world.json").read_text()) for w in (one, made)):
        assert info["training"]["threads"] == 1
