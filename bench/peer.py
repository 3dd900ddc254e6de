"""TrackStar's corpus encode beside bergson's `build` (EleutherAI's gradient-index tool), on one model and one
corpus, in one run.

    python -m bench.peer --bergson-python /path/to/bergson-venv/bin/python [--docs 512] [--out F.json]

bergson is never imported by this interpreter: it runs in its own virtual environment (its dependencies,
transformers 5 and peft among them, need not fit this one's), as a child process started with the
interpreter given. Every arm is a fresh process on the same saved model folder and the same documents:

* model: a Llama-shaped causal LM built from a config under a fixed seed (4 layers, 256 wide, an MLP of 688,
  4 heads, an untied LM head over a 4,096-token byte-level BPE trained on Tiny Shakespeare), saved once as a
  Hugging Face folder that every arm loads, so all see the same weights, in float32 on the CPU;
* documents: the first --docs speeches of corpora/tinyshakespeare.txt of 32 to --max-tokens tokens, tokenized
  once; bergson is given those very ids (a pre-tokenized JSONL), and TrackStar's own tokenization of the
  texts is checked to give the same ids, so no document is truncated and both see identical tokens;
* batches: the same budget of padded tokens a batch (--token-budget) on both sides, documents grouped by
  length (TrackStar's length_batches, bergson's allocate_batches);
* projection: TrackStar's d = --dim is one (s_out × s_in) Kronecker factor pair per traced matrix, the
  projected gradients of every matrix summed into one d-vector; bergson's `per_module` target draws the same
  two-sided shape per module (p × p with p = sqrt(d)), Gaussian entries of variance 1/p a side as ours
  (--projection_type normal, jl scale), but keeps each module's p² block apart, so it stores d floats per
  module where TrackStar stores d in all. A second bergson arm at p = 16 (its own TrackStar pipeline's
  default) stores a vector of about TrackStar's size instead.

Arms, run in turn for --repeats rounds (A B C ... A B C ...) so that load on a shared machine falls on all:
`trackstar` is encode.py's corpus stage as a user runs it (encode.plan, then encode.encode: the factored path,
no optimizer correction, every nn.Linear including the LM head); `trackstar-nohead` the same with the LM head
left out, the modules bergson traces (it hooks the base model, not the head); `bergson-p64` and
`bergson-p16` bergson's CLI `build` (no optimizer state, so no normalisation); `train` a plain training step
(forward and backward, summed token loss) on TrackStar's batches: the common yardstick.

Each arm's tokens/s is the documents' tokens ÷ the wall time of its gradient build alone: from the model and
data loaded (TrackStar: after encode.plan; bergson: the call of its collect_gradients) to the index written,
projection matrices drawn and writes included. Peak memory is the child's peak RSS (os.wait4), and that peak
above the RSS when its build began. Best of the rounds is reported (load only slows a run), with every
round's figure beside it and each round's own ratio to bergson (runs of one round share the load of the
moment). The wall time of the whole process (imports and model load too) is reported as well.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "corpora" / "tinyshakespeare.txt"
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

ARMS = ("trackstar", "trackstar-nohead", "bergson-p64", "bergson-p16", "train")
SHAPE = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "vocab_size": 4096}
RESULT = "PEER-RESULT "  # the line prefix a child prints its figures after

# Runs inside bergson's interpreter: its own CLI, with its gradient collection timed. bergson's build calls
# collect_gradients through the module bergson.build, so wrapping that name times exactly the collection
# (forward, backward, projection, index writes) and leaves the rest of the command as it is.
BERGSON_DRIVER = r"""
import json, sys, time
t0 = time.perf_counter()
import bergson.build as build
from bergson.__main__ import main

spans = {}
collect = build.collect_gradients

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

def timed(*args, **kwargs):
    spans["rss_before_mib"] = rss_mib()
    spans["load_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    collect(*args, **kwargs)
    spans["build_s"] = time.perf_counter() - t

build.collect_gradients = timed
sys.argv = ["bergson", *sys.argv[1:]]
main()
spans["total_s"] = time.perf_counter() - t0
spans["index"] = sys.argv[2]
print("PEER-RESULT " + json.dumps(spans), flush=True)
"""


def rss_mib() -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def tokenizer_for(texts: list[str], vocab_size: int) -> Any:
    """Byte-level BPE trained on the corpus, GPT-2 style: no BOS or EOS added, so a document's ids are the
    same whichever tool calls the tokenizer and whether or not it asks for special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def prepare(work: Path, n_docs: int, max_tokens: int, context: int) -> dict:
    """The model folder, TrackStar's corpus JSONL and bergson's pre-tokenized JSONL; returns their facts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import trackstar as ts

    speeches = [s.strip() for s in re.split(r"\n\s*\n", CORPUS.read_text(encoding="utf-8")) if s.strip()]
    tok = tokenizer_for(speeches, SHAPE["vocab_size"])
    docs = []
    for text in speeches:
        ids = tok(text).input_ids
        if 32 <= len(ids) <= max_tokens:
            docs.append((text, ids))
        if len(docs) == n_docs:
            break
    if len(docs) < n_docs:
        raise SystemExit(f"only {len(docs)} speeches of 32 to {max_tokens} tokens in {CORPUS}")
    torch.manual_seed(0)
    # max_position_embeddings is the context bergson checks its token budget against; RoPE adds no weights
    config = LlamaConfig(**SHAPE, max_position_embeddings=context, tie_word_embeddings=False,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    with open(work / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i, (text, _) in enumerate(docs):
            f.write(json.dumps({"id": f"speech-{i}", "text": text}) + "\n")
    with open(work / "bergson.jsonl", "w", encoding="utf-8") as f:
        for _, ids in docs:
            f.write(json.dumps({"input_ids": ids}) + "\n")
    # the ids TrackStar's own tokenization gives must be the ones bergson is handed
    ours, _ = ts.tokenize_rows(tok, [{"text": t} for t, _ in docs], "corpus", max_tokens)
    if [ids for ids, _ in ours] != [ids for _, ids in docs]:
        raise SystemExit("TrackStar's tokenization differs from the pre-tokenized ids given to bergson")
    lengths = [len(ids) for _, ids in docs]
    params = sum(p.numel() for p in model.parameters())
    return {"docs": len(docs), "tokens": sum(lengths), "mean_tokens": sum(lengths) / len(lengths),
            "max_tokens": max(lengths), "parameters": params,
            "lm_head_parameters": model.lm_head.weight.numel()}


def trackstar_child(work: Path, dim: int, token_budget: int, max_tokens: int, nohead: bool) -> dict:
    """encode.py corpus, in this process: plan (model, survey, V), then the timed encode."""
    import encode
    import trackstar as ts

    t0 = time.perf_counter()
    o = encode.Options(kind="corpus", model=str(work / "model"), data=work / "corpus.jsonl",
                       out=work / f"ts-{time.monotonic_ns()}", dim=dim, seed=0, optimizer_state=None, estimate_v=0,
                       no_correction=True, eps=None, factor_v=False, params="matrices", gradient="factored",
                       max_length=max_tokens, token_budget=token_budget, chunk_size=1024, also_uncorrected=False,
                       dtype="float32", chunk_dtype="float32", matmul_precision="highest", device="cpu", shard=None,
                       num_shards=None, plan_only=False)
    p = encode.plan(o)
    build = ts.build_encoder

    def headless(model: Any, *args: Any, **kwargs: Any) -> ts.Encoder:
        """The encoder encode.py builds, tracing the modules bergson traces: the base model's, not the LM head."""
        enc = build(model, *args, **kwargs)
        head = model.get_output_embeddings()
        return dataclasses.replace(enc, modules=[m for m in enc.modules if m[1] is not head])

    if nohead:
        ts.build_encoder = headless
    spans = {"rss_before_mib": rss_mib(), "load_s": time.perf_counter() - t0}
    t = time.perf_counter()
    try:
        encode.encode(p)
    finally:
        ts.build_encoder = build
    spans["build_s"] = time.perf_counter() - t
    spans["index"] = str(p.o.out)
    return spans


def train_child(work: Path, token_budget: int) -> dict:
    """A plain training step (forward, backward of the summed token loss) on TrackStar's batches."""
    import torch

    import trackstar as ts
    from bench.encoding import train_step

    t0 = time.perf_counter()
    model, tok = ts.load_model(str(work / "model"), "float32", "cpu")
    texts = [json.loads(line)["text"] for line in open(work / "corpus.jsonl", encoding="utf-8")]
    tokenized, _ = ts.tokenize_rows(tok, [{"text": t} for t in texts], "corpus", 10**6)
    step = train_step(model)
    spans = {"rss_before_mib": rss_mib(), "load_s": time.perf_counter() - t0}
    t = time.perf_counter()
    for idx in ts.length_batches([len(ids) for ids, _ in tokenized], token_budget):
        step(ts.collate([tokenized[i] for i in idx], torch.device("cpu")))
    spans["build_s"] = time.perf_counter() - t
    return spans


def bergson_command(python: str, work: Path, arm: str, token_budget: int) -> list[str]:
    p = int(arm.removeprefix("bergson-p"))
    return [python, "-c", BERGSON_DRIVER, "build", str(work / f"{arm}-{time.monotonic_ns()}"),
            "--model", str(work / "model"), "--dataset", str(work / "bergson.jsonl"), "--precision", "fp32",
            "--projection_dim", str(p), "--projection_type", "normal", "--projection_scale", "jl",
            "--projection_target", "per_module", "--projection_seed", "0", "--token_batch_size", str(token_budget),
            "--loss_reduction", "sum"]


def run_arm(cmd: list[str], env: dict[str, str], logs: Path) -> dict:
    """One child: its printed spans, its wall time and its peak RSS (from wait4, so its own and no other's)."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "w+", encoding="utf-8") as out, open(logs / "stderr", "w+", encoding="utf-8") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, so its rusage is read before Popen's own wait
        wall = time.perf_counter() - t0
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if code:
        raise SystemExit(f"{' '.join(cmd[:2])} ... failed (exit {code}):\n{stderr[-3000:]}")
    line = next((x for x in reversed(stdout.splitlines()) if x.startswith(RESULT)), None)
    if line is None:
        raise SystemExit(f"{' '.join(cmd[:2])} ... printed no result:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    spans = json.loads(line[len(RESULT):])
    peak = usage.ru_maxrss / 1024  # kB on Linux
    return {**spans, "wall_s": wall, "peak_rss_mib": peak, "peak_above_start_mib": peak - spans["rss_before_mib"]}


def measure(arms: list[str], repeats: int, work: Path, o: dict, bergson_python: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(work / "hf-datasets"),
           "PYTHONHASHSEED": "0"}
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for r in range(repeats):
        for arm in arms:
            if arm.startswith("bergson"):
                cmd = bergson_command(bergson_python, work, arm, o["token_budget"])
            else:
                cmd = [sys.executable, "-m", "bench.peer", "--child", arm, "--work", str(work), "--dim",
                       str(o["dim"]), "--token-budget", str(o["token_budget"]), "--max-tokens", str(o["max_tokens"])]
            res = run_arm(cmd, env, work / "logs" / f"{arm}-{r}")
            res["tokens_per_s"] = o["tokens"] / res["build_s"]
            # what each writes as its index: bergson's gradients.bin, TrackStar's chunks (metadata left out)
            files = ["gradients.bin"] if arm.startswith("bergson") else ["chunk-*.h5"]
            res["index_bytes_per_doc"] = sum(f.stat().st_size for pat in files for f in Path(res.get("index", work))
                                             .glob(pat)) / o["docs"] if "index" in res else 0.0
            runs[arm].append(res)
            print(f"  repeat {r + 1} {arm:17} build {res['build_s']:6.1f} s  {res['tokens_per_s']:7.0f} tokens/s  "
                  f"process {res['wall_s']:5.1f} s  peak RSS {res['peak_rss_mib']:5.0f} MiB", flush=True)
    return runs


def squared_norms(arm: str, index: str) -> Any:
    """Each document's squared vector norm, in document order: TrackStar's d-vector, or bergson's per-module
    blocks together (read from its gradients.bin and info.json, without bergson)."""
    import h5py
    import numpy as np

    if arm.startswith("bergson"):
        info = json.loads((Path(index) / "info.json").read_text(encoding="utf-8"))
        grads = np.memmap(Path(index) / "gradients.bin", dtype=np.dtype(info["base_dtype"]), mode="r",
                          shape=(info["num_grads"], sum(info["grad_sizes"].values())))
        return np.square(grads.astype(np.float64)).sum(axis=1), len(info["grad_sizes"])
    rows = []
    for chunk in sorted(Path(index).glob("chunk-*.h5")):
        with h5py.File(chunk, "r") as f:
            rows.append((f["ids"][:], np.square(f["vectors"][:].astype(np.float64)).sum(axis=1)))
    ids = np.concatenate([i for i, _ in rows])
    return np.concatenate([n for _, n in rows])[np.argsort(ids)], None


def exact_squared_norms(work: Path, n: int) -> Any:
    """The first n documents' unprojected gradient squared norms over the modules bergson traces (every
    nn.Linear but the LM head), one backward pass a document: what both projections estimate."""
    import numpy as np
    import torch

    import trackstar as ts

    model, tok = ts.load_model(str(work / "model"), "float32", "cpu")
    head = model.get_output_embeddings()
    weights = [m.weight for _, m, _, _ in ts.weight_modules(model) if m is not head]
    texts = [json.loads(line)["text"] for line in open(work / "corpus.jsonl", encoding="utf-8")][:n]
    tokenized, _ = ts.tokenize_rows(tok, [{"text": t} for t in texts], "corpus", 10**6)
    out = []
    for example in tokenized:
        grads = torch.autograd.grad(ts.per_example_loss(model, ts.collate([example], "cpu")).sum(), weights)
        out.append(sum(float(g.double().square().sum()) for g in grads))
    return np.array(out)


def agreement(runs: dict[str, list[dict]], work: Path, n: int = 64) -> dict:
    """Whether both tools projected the same gradients. A projection with entries of variance 1/p a side keeps
    a gradient's squared norm in expectation, so on the same modules each document's squared norm from either
    tool over the unprojected gradient's is 1 up to the projection's noise (the same P for every document,
    so the documents' errors are correlated and the median need not be 1 to within 1/sqrt(n))."""
    import numpy as np

    if not runs.get("trackstar-nohead") or not runs.get("bergson-p64"):
        return {}
    ours, _ = squared_norms("trackstar-nohead", runs["trackstar-nohead"][-1]["index"])
    theirs, modules = squared_norms("bergson-p64", runs["bergson-p64"][-1]["index"])
    exact = exact_squared_norms(work, n)

    def summary(r: Any) -> dict:
        return {"median": float(np.median(r)), "p05": float(np.quantile(r, 0.05)),
                "p95": float(np.quantile(r, 0.95))}

    return {"docs": int(len(exact)), "bergson_modules": modules, "trackstar_over_exact": summary(ours[:n] / exact),
            "bergson_over_exact": summary(theirs[:n] / exact), "trackstar_over_bergson": summary(ours / theirs)}


def best(runs: list[dict]) -> dict:
    return {"tokens_per_s": max(r["tokens_per_s"] for r in runs),
            "wall_s": min(r["wall_s"] for r in runs),
            "peak_rss_mib": min(r["peak_rss_mib"] for r in runs),
            "peak_above_start_mib": min(r["peak_above_start_mib"] for r in runs),
            "tokens_per_s_each": [round(r["tokens_per_s"]) for r in runs],
            "index_kib_per_doc": runs[-1]["index_bytes_per_doc"] / 1024}


def markdown(results: dict) -> str:
    """The side-by-side table: each arm's figures, and TrackStar's ÷ bergson's at the matched projection."""
    arms, s = results["arms"], results["settings"]
    base = arms.get("bergson-p64")
    train = arms.get("train")
    head = ["arm", "tokens/s (each round)", "÷ bergson p=64", "each round", "÷ training step", "process s",
            "peak RSS MiB", "above start MiB", "÷ bergson p=64", "index KiB/doc"]
    runs = results.get("runs", {})
    rows = []
    # in the order they ran (a recorded file keeps its keys sorted)
    for name, a in ((n, arms[n]) for n in s.get("arms", arms) if n in arms):
        def ratio(k: str, a: dict = a) -> str:
            return f"{a[k] / base[k]:.2f}" if base else "–"

        # the same round's runs ran minutes apart at most, so their ratio shares the machine's load of the moment
        paired = [f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}"
                  for r, b in zip(runs.get(name, []), runs.get("bergson-p64", []), strict=False)]
        rows.append([name, f"{a['tokens_per_s']:,.0f} ({', '.join(f'{x:,}' for x in a['tokens_per_s_each'])})",
                     ratio("tokens_per_s"), ", ".join(paired) or "–",
                     f"{a['tokens_per_s'] / train['tokens_per_s']:.2f}" if train else "–",
                     f"{a['wall_s']:.1f}", f"{a['peak_rss_mib']:,.0f}", f"{a['peak_above_start_mib']:,.0f}",
                     ratio("peak_rss_mib"), f"{a['index_kib_per_doc']:.0f}" if a["index_kib_per_doc"] else "–"])
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    d = results["data"]
    lines += ["", f"{d['docs']} documents, {d['tokens']:,} tokens (mean {d['mean_tokens']:.0f}, max "
              f"{d['max_tokens']}); a {d['parameters'] / 1e6:.2f}M-parameter Llama shape (LM head "
              f"{d['lm_head_parameters'] / 1e6:.2f}M); d = {s['dim']:,}; {s['token_budget']:,} padded tokens a "
              f"batch; {s['threads']} thread{'s' if s['threads'] != 1 else ''} a process; best of {s['repeats']}; "
              f"bergson {results['versions'].get('bergson', '?')}, torch {results['versions'].get('torch', '?')} "
              f"in both environments; the machine's 1-minute load average {s['load_average'][0]:.1f} before and "
              f"{s['load_average'][1]:.1f} after, on {s['cores']} cores."]
    if c := results.get("agreement"):
        def q(r: dict) -> str:
            return f"median {r['median']:.3f} (5–95%: {r['p05']:.3f}–{r['p95']:.3f})"

        lines += ["", f"Same gradients: on the first {c['docs']} documents, each one's squared vector norm over its "
                  f"unprojected gradient's (every nn.Linear but the LM head, bergson's {c['bergson_modules']} "
                  f"modules): TrackStar {q(c['trackstar_over_exact'])}, bergson p = 64 "
                  f"{q(c['bergson_over_exact'])}; 1 up to the projections' noise."]
    return "\n".join(lines)


def versions(python: str) -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({k: m.version(k) for k in "
            "('bergson', 'torch', 'transformers', 'datasets', 'peft')}))")
    out = subprocess.run([python, "-c", code], capture_output=True, encoding="utf-8", check=True)
    return json.loads(out.stdout)


@app.command()
def main(
    bergson_python: str = typer.Option("", help="The Python of a virtual environment with bergson installed."),
    docs: int = typer.Option(512, help="Tiny Shakespeare speeches to encode."),
    max_tokens: int = typer.Option(128, help="Longest speech kept (tokens): no document is truncated."),
    dim: int = typer.Option(4096, help="TrackStar's d (a power of four, so that bergson's p = sqrt(d))."),
    token_budget: int = typer.Option(2048, help="Padded tokens a batch, on both sides."),
    repeats: int = typer.Option(3, help="Rounds: each arm runs once a round, in turn."),
    threads: int = typer.Option(1, help="Torch threads a process (OMP_NUM_THREADS)."),
    arms: str = typer.Option(",".join(ARMS), help="Arms to run, comma-separated."),
    out: Path = typer.Option(Path("bench-out/peer.json"), help="JSON of the figures (a Markdown table beside it)."),
    child: str = typer.Option("", hidden=True, help="Internal: run one arm and print its spans."),
    work: Path = typer.Option(Path(), hidden=True),
) -> None:
    if child:
        spans = (train_child(work, token_budget) if child == "train" else
                 trackstar_child(work, dim, token_budget, max_tokens, child == "trackstar-nohead"))
        print(RESULT + json.dumps(spans), flush=True)
        return
    chosen = [a.strip() for a in arms.split(",") if a.strip()]
    if unknown := set(chosen) - set(ARMS):
        raise SystemExit(f"unknown arms {sorted(unknown)} (known: {', '.join(ARMS)})")
    p = round(dim ** 0.5)
    if "bergson-p64" in chosen and p * p != dim:
        raise SystemExit(f"--dim {dim} is not a square: bergson's per-module p x p cannot match it")
    if any(a.startswith("bergson") for a in chosen) and not bergson_python:
        raise SystemExit("give --bergson-python (bergson runs in its own environment), or leave its arms out")
    vers = versions(bergson_python) if bergson_python else {}
    with tempfile.TemporaryDirectory(prefix="peer-") as tmp:
        work = Path(tmp)
        context = max(token_budget, max_tokens)  # bergson refuses a token budget above the model's context
        data = prepare(work, docs, max_tokens, context)
        print(f"{data['docs']} documents, {data['tokens']:,} tokens; arms {', '.join(chosen)}; {repeats} repeats",
              flush=True)
        o = {"dim": dim, "token_budget": token_budget, "max_tokens": max_tokens, "tokens": data["tokens"],
             "docs": data["docs"]}
        load = [os.getloadavg()[0]]  # the machine's 1-minute load before and after: other jobs' share of it
        runs = measure(chosen, repeats, work, o, bergson_python, threads)
        load.append(os.getloadavg()[0])
        check = agreement(runs, work)
    results = {"settings": {"dim": dim, "bergson_p": [int(a.removeprefix("bergson-p")) for a in chosen
                                                     if a.startswith("bergson")],
                            "token_budget": token_budget, "max_tokens": max_tokens, "repeats": repeats,
                            "threads": threads, "arms": chosen, "load_average": load, "cores": os.cpu_count()},
               "data": data, "versions": vers, "python": platform.python_version(),
               "arms": {a: best(runs[a]) for a in chosen}, "agreement": check,
               "runs": {a: [{k: v for k, v in r.items() if k != "index"} for r in rs] for a, rs in runs.items()}}
    table = markdown(results)
    print("\n" + table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    app()
