"""Streamed-input benchmark: encode.py's peak memory does not grow with the corpus.

    python -m bench.streaming [--sizes 10000,1000000] [--modes read,hold,encode]

For each size N, a corpus of N tiny documents (4-12 words) in a directory of 8 JSONL shards, and for each mode a
fresh process whose peak RSS (ru_maxrss, bench_encode.peak_memory) is the mode's own:

    read    the streamed pass alone: every record read and validated, ids checked unique (ts.iter_records)
    hold    the corpus held in memory (ts.read_jsonl), as encode.py did before it streamed: for contrast
    encode  encode.py itself: a tiny GPT-2 built here from a config, d = 64, chunks of 1,024, --no-correction

The result is RSS(largest N) / RSS(smallest N) per mode: 1.0 is flat. What does grow with N in read and encode
is the 8-byte hash of each id that the duplicate check keeps (8 MB a million documents, and a sorted copy).
Data and chunks go to bench-out/stream (deleted after each size; 1M documents write ~0.3 GB of chunks).

This process only writes data and starts the others: it imports neither torch nor trackstar, because Linux
carries a process's peak RSS across fork and exec into ru_maxrss of the program it starts (a parent of 260 MB
made every child read at least 260 MB).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench-out" / "stream"
WORDS = ("paris rome berlin madrid tokyo lisbon vienna capital country river city tower bridge north south "
         "the of is in and a was born lives near old new great small").split()
SHARDS = 8
DIM, CHUNK = 64, 1024


def write_corpus(folder: Path, n: int) -> None:
    """n documents of 4-12 random words in SHARDS JSONL files of equal size, one shard in memory at a time."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, rows in enumerate(np.array_split(np.arange(n), SHARDS)):
        lengths, words = rng.integers(4, 13, len(rows)), rng.integers(0, len(WORDS), (len(rows), 12))
        with open(folder / f"part-{k:02d}.jsonl", "w", encoding="utf-8") as f:
            for i, length, w in zip(rows, lengths, words, strict=True):
                text = " ".join(WORDS[j] for j in w[:length])
                f.write(json.dumps({"id": f"d{i}", "text": text.capitalize() + "."}) + "\n")


def write_model(folder: Path) -> None:
    """A 2-layer, 32-wide GPT-2 and a byte-level BPE trained on the words: the smallest model that encodes."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator([" ".join(WORDS)] * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)


def child(mode: str, data: Path, model: Path, out: Path) -> dict:
    """One mode in this (fresh) process: peak RSS in MiB, the RSS before it (imports done) and seconds."""
    import trackstar as ts
    from bench import encoding as bench_encode

    if mode == "encode":
        import encode  # its imports (transformers) peak above the read modes' whole use: only where needed
    base, t0 = bench_encode.memory_now("cpu"), time.perf_counter()
    if mode == "read":
        n = sum(1 for _ in ts.iter_records(data, "corpus"))
    elif mode == "hold":
        n = len(ts.read_jsonl(data, "corpus"))
    else:
        typer.main.get_command(encode.app).main(
            ["corpus", "--model", str(model), "--data", str(data), "--out", str(out), "--dim", str(DIM),
             "--chunk-size", str(CHUNK), "--no-correction", "--device", "cpu"], standalone_mode=False)
        n = ts.read_meta(out).n_examples
    return {"n": n, "peak_mib": bench_encode.peak_memory("cpu"), "base_mib": base, "s": time.perf_counter() - t0}


@app.command()
def main(
    sizes: str = typer.Option("10000,1000000", help="Corpus sizes (documents), comma-separated, smallest first."),
    modes: str = typer.Option("read,hold,encode", help="Which of read, hold, encode to measure."),
    mode: str = typer.Option("", hidden=True, help="Internal: run one mode and print JSON."),
    data: Path = typer.Option(OUT, hidden=True),
) -> None:
    if mode == "model":
        write_model(OUT / "model")
    elif mode:
        print(json.dumps(child(mode, data, OUT / "model", data.parent / "run")))
    if mode:
        return
    if not (OUT / "model" / "config.json").exists():
        subprocess.run([sys.executable, "-m", "bench.streaming", "--mode", "model"], check=True, cwd=ROOT)
    ns, wanted = [int(s) for s in sizes.split(",")], modes.split(",")
    results = {}
    for n in ns:
        data = OUT / f"corpus-{n}"
        shutil.rmtree(OUT / f"run-{n}", ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
        write_corpus(data, n)
        for m in wanted:
            shutil.rmtree(OUT / "run", ignore_errors=True)
            cmd = [sys.executable, "-m", "bench.streaming", "--mode", m, "--data", str(data.resolve())]
            r = subprocess.run(cmd, capture_output=True, encoding="utf-8", cwd=ROOT)
            if r.returncode:
                raise SystemExit(f"{m} on {n} documents failed:\n{r.stderr[-3000:]}")
            results[m, n] = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{m:7} {n:>10,} documents: peak RSS {results[m, n]['peak_mib']:8.1f} MiB "
                  f"(before: {results[m, n]['base_mib']:.1f}) in {results[m, n]['s']:.1f} s", flush=True)
        shutil.rmtree(data)
        shutil.rmtree(OUT / "run", ignore_errors=True)
    lo, hi = ns[0], ns[-1]
    print(f"\nstream benchmark: {SHARDS} JSONL shards of tiny documents; encode: 2-layer 32-wide GPT-2, d={DIM}, "
          f"chunks of {CHUNK}")
    print(f"{'mode':7} {'peak MiB, ' + format(lo, ','):>18} {'peak MiB, ' + format(hi, ','):>20} {'ratio':>6} "
          f"{'growth MiB':>11} {'bytes/doc':>10}")
    for m in wanted:
        a, b = results[m, lo]["peak_mib"], results[m, hi]["peak_mib"]
        print(f"{m:7} {a:18.1f} {b:20.1f} {b / a:6.2f} {b - a:11.1f} {(b - a) * 2**20 / (hi - lo):10.1f}")
    print("ratio: peak RSS at the largest size over the smallest (1.00 = flat); the process's imports and model "
          "are in both.")


if __name__ == "__main__":
    app()
