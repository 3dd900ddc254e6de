"""The bill before the run (`encode.py --plan`, `make plan`): its bytes are what encode and index then write,
its FLOPs follow the formula stated in encode.py, and it writes nothing."""

from __future__ import annotations

import re

from conftest import CORPUS, run, write_jsonl

import encode
import trackstar as ts

DIM = 1024


def plan_lines(model_dir, corpus, out) -> dict[str, str]:
    r = run("encode.py", "corpus", "--model", model_dir, "--data", corpus, "--out", out, "--dim", DIM,
            "--also-uncorrected", "--plan")
    rows = {}
    for line in r.stdout.splitlines():
        m = re.match(r"(encode \(factored\)|encode \(exact\)|R \(index\.py\)|index transform|scan, per query)\s+(.*)",
                     line)
        if m:
            rows[m.group(1)] = m.group(2).split()
    return rows


def test_the_plans_bytes_are_what_encode_and_index_write_and_it_writes_nothing(model_dir, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl",
                         [{"id": f"d{i}", "text": CORPUS[i % len(CORPUS)] + f" Number {i}."} for i in range(800)])
    rows = plan_lines(model_dir, corpus, tmp_path / "run")
    assert not (tmp_path / "run").exists(), "a plan writes nothing"
    model, tok = ts.load_model(str(model_dir))
    tokens = sum(len(ids) for ids, _ in ts.tokenize_rows(tok, ts.read_jsonl(corpus, "corpus"), "corpus", 128)[0])
    b = encode.bill(model, ts.weight_modules(model), [], 800, tokens, DIM, "float32", 2, 1024)
    assert rows["encode (factored)"][0] == f"{b['encode FLOPs (factored)']:.3g}"
    run("encode.py", "corpus", "--model", model_dir, "--data", corpus, "--out", tmp_path / "run", "--dim", DIM,
        "--also-uncorrected")
    run("index.py", "--corpus", tmp_path / "run", "--out", tmp_path / "ix", "--hessian", "train")
    written = sum(f.stat().st_size for f in (tmp_path / "run").glob("chunk-*.h5"))
    assert abs(written / b["chunk bytes"] - 1) < 0.01, (written, b["chunk bytes"])
    for name, key in (("index.h5", "index bytes"), ("hessian.h5", "hessian bytes")):
        size = (tmp_path / "ix" / name).stat().st_size
        assert abs(size / b[key] - 1) < 0.01, (name, size, b[key])


def test_the_plans_flops_follow_the_stated_formula(model_dir):
    """GPT-2 traced as its matrices: per layer c_attn (3h x h), attn c_proj (h x h), c_fc (4h x h), mlp c_proj
    (h x 4h), and the LM head (V x h); N = L·12h² + V·h, written out here from the config, not from the modules."""
    model, _ = ts.load_model(str(model_dir))
    c = model.config
    h, L, V = c.n_embd, c.n_layer, c.vocab_size
    shapes = [(3 * h, h), (h, h), (4 * h, h), (h, 4 * h)] * L + [(V, h)]
    s_out, s_in = 32, 32  # d = 1024
    N = sum(a * b for a, b in shapes)
    assert N == L * 12 * h * h + V * h
    b = encode.bill(model, ts.weight_modules(model), [], 10, 1000, DIM, "bfloat16", 1, 1024)
    per_token = 4 * N + sum(2 * (a * s_out + b_ * s_in) + 2 * DIM for a, b_ in shapes)
    assert b["traced parameters"] == N
    assert b["encode FLOPs (factored)"] == 1000 * per_token
    assert b["encode FLOPs (exact)"] == 1000 * (per_token + 2 * N) + 10 * sum(
        2 * a * b_ * s_in + 2 * a * s_in * s_out for a, b_ in shapes)
    assert b["chunk bytes"] == 10 * (DIM * 2 + 8), "one bfloat16 dataset and int64 ids"
    assert b["R peak bytes"] == 3 * DIM * DIM * 8 and b["index FLOPs"] == 2 * 10 * DIM ** 2


def test_the_papers_bill_is_the_scale_documents_figure():
    """8B Llama shape, 160B tokens, d = 2^16: 7.5B traced parameters (the LM head included), the factored encode
    5.0e21 FLOPs and the float32 chunks 96 TB, as docs/scale.md and README state."""
    b = encode.paper_bill()
    assert round(b["traced parameters"] / 1e8) == 75
    assert f"{b['encode FLOPs (factored)']:.2g}" == "5e+21"
    assert round(b["chunk bytes"] / 1e12) == 96
