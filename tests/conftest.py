"""Shared fixtures: tiny models built from configs (no downloads) and small corpora."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import runpy
import subprocess
import sys
import traceback
from pathlib import Path

# Under pytest-xdist (`make test` runs one worker a core) each worker, and every process it starts, gets its share
# of the cores: threads spinning against another worker's threads would make both several times slower.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1)
                                                     // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import numpy as np  # noqa: E402  (after the thread count, which torch reads when it loads)
import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

# The modules that need the most time first: under pytest-xdist (`--dist loadscope`, a module's tests on one
# worker, so its fixtures are built once) they start at once on separate workers.
HEAVY_FIRST = ("test_pipeline", "test_real", "test_custom", "test_encode_cli")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--summary-json", default=None, help="Write the outcome counts and the worker count here "
                                                         "(for tools/record.py: docs/testing.md's figures).")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    path = config.getoption("--summary-json")
    if path and not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller sees every worker's outcomes
        counts = {k: len(terminalreporter.stats.get(k, [])) for k in ("passed", "failed", "error", "skipped")}
        workers = getattr(config.option, "numprocesses", None)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"counts": counts, "exit_status": int(exitstatus),
                                          "workers": os.cpu_count() if workers == "auto" else workers or 1}) + "\n",
                              encoding="utf-8")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = getattr(getattr(item, "module", None), "__name__", "")
        return HEAVY_FIRST.index(name) if name in HEAVY_FIRST else len(HEAVY_FIRST)

    items.sort(key=rank)  # stable: every module keeps its own order


def tiny_model(arch: str, vocab: int = 96, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny causal LM of the given family (GPT-2's Conv1D, tied, with `wpe`; Llama,
    untied or tied; GPT-NeoX)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64,
                         bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    elif arch in ("llama", "llama-tied"):
        cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=arch == "llama-tied")
        model = LlamaForCausalLM(cfg)
    elif arch == "neox":
        cfg = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=vocab, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                            rotary_pct=0.5)
        model = GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(arch)
    # Random init is nearly uniform over the vocabulary; a little scale makes gradients less alike.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0) if p.ndim == 2 else None
    return model.eval()


def project_full_gradient(grad_out_in: torch.Tensor, seed: int, module: str, dim: int) -> torch.Tensor:
    """Reference projection of one full (out, in) gradient: vec(P_outᵀ ∇W P_in), the product the encoder
    computes batched (and, on its factored path, without ever forming ∇W)."""
    import trackstar as ts

    s_out, s_in = ts.factor_dims(dim)
    p_out = ts.projection_matrix(seed, module, "out", grad_out_in.shape[0], s_out)
    p_in = ts.projection_matrix(seed, module, "in", grad_out_in.shape[1], s_in)
    return (p_out.T @ grad_out_in.float().cpu() @ p_in).flatten()


def bpe_tokenizer(vocab_size: int = 400):
    """A GPT-2-style byte-level BPE tokenizer trained here on the test corpus: no files from outside the repo.

    Byte-level, so any text (accents, emoji, unseen words) still tokenizes; no BOS/EOS, as GPT-2's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS + [" ".join(CORPUS).lower()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A saved tiny GPT-2 (a byte-level BPE trained on the test corpus) with an Adam optimizer.pt."""
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("gpt2-tiny")
    torch.manual_seed(0)
    tok = bpe_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=128,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = tok("The capital of France is Paris. Rome is in Italy.", return_tensors="pt").input_ids
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.save(opt.state_dict(), d / "optimizer.pt")
    model.save_pretrained(d)  # the weights after the steps, matching the optimizer state
    return d


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, str]:
    """`make all SIZE=tiny DIM=1024` into a temporary directory (prepare → encode → index → query → evaluate),
    built once for the tests of the CI world, its trained model and its run: (run directory, stdout)."""
    tmp = tmp_path_factory.mktemp("make-all")
    cmd = ["make", "-C", str(ROOT), "all", "SIZE=tiny", f"DATA={tmp}/data", f"RUN={tmp}/run", f"PY={sys.executable}",
           "DIM=1024"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp / "run", r.stdout


def tiny_world(run: Path) -> Path:
    """The fact world `tiny_run` trained (its corpus, queries and model/)."""
    return run.parent / "data" / "factworld-tiny-seed0"


CORPUS = [
    "The capital of France is Paris.",
    "Rome is the capital of Italy, a country in southern Europe.",
    "Berlin.",
    "Madrid is in Spain and it is large.",
    "The quick brown fox jumps over the lazy dog near the river bank today.",
    "Tokyo is the capital of Japan.",
    "Paris is known for the Eiffel Tower.",
]


def run(script: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    """One of the scripts as a user runs it (`python SCRIPT ARGS` from the checkout, one thread), its output
    and exit status captured. It runs in this process, as __main__, since a fresh Python spends seconds importing
    torch and transformers; what a script may change (the working directory, the environment, torch's threads,
    matmul precision and random state) is put back afterwards. A test that needs a process of its own (signals,
    torchrun, a locale) starts one."""
    argv = [str(ROOT / script), *map(str, args)]
    if sys.getfilesystemencoding().lower() == "ascii" and not sys.flags.utf8_mode:  # run_cli would restart itself
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0 or not check, r.stderr[-3000:]
        return r
    out, err = io.StringIO(), io.StringIO()
    saved = (sys.argv, os.getcwd(), dict(os.environ), torch.get_num_threads(), torch.get_float32_matmul_precision(),
             torch.get_rng_state(), np.random.get_state(), random.getstate())
    sys.argv, code = argv, 0
    os.chdir(ROOT)
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(argv[0], run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else (print(e.code, file=sys.stderr)
                                                                                       or 1)
            except BaseException:  # what an uncaught exception prints, and its status
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        os.environ.clear()
        os.environ.update(saved[2])
        torch.set_num_threads(saved[3])
        torch.set_float32_matmul_precision(saved[4])
        torch.set_rng_state(saved[5])
        np.random.set_state(saved[6])
        random.setstate(saved[7])
    r = subprocess.CompletedProcess([sys.executable, *argv], code, out.getvalue(), err.getvalue())
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def refused(r: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, one line naming the culprit, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    for w in words:
        assert w in r.stderr, (w, r.stderr[-2000:])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def corpus_file(tmp_path) -> Path:
    rows = [{"id": f"d{i}", "text": CORPUS[i % len(CORPUS)] + f" Number {i}."} for i in range(23)]
    return write_jsonl(tmp_path / "corpus.jsonl", rows)


@pytest.fixture()
def queries_file(tmp_path) -> Path:
    rows = [
        {"id": "q0", "prompt": "The capital of France is", "target": " Paris", "fact": "f0"},
        {"id": "q1", "prompt": "Rome is the capital of", "target": " Italy", "fact": "f1"},
    ]
    return write_jsonl(tmp_path / "queries.jsonl", rows)
