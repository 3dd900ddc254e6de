"""What each float32 island of a bfloat16 encode costs in speed and buys in accuracy.

    python -m bench.islands --corpus data/lama-.../corpus.jsonl [--model smollm2] [--n 64] [--device cpu]
                            [--out F.json]

`encode.py --dtype bfloat16` runs the model's matmuls in bfloat16 and keeps two islands in float32
(trackstar.LOSS_DTYPE and GRADIENT_DTYPE):

* loss: the cross-entropy reads the logits in float32 (a float32 copy of a chunk of B·T·vocab at a time);
* gradient: δ, each traced module's input x, the projections P_out and P_in and the V scaling.

For each gradient path (factored with a rank-one V, exact with a full V: the same Adam-like V throughout) and
each input set (the corpus's texts; long documents: those texts concatenated to --long tokens), five variants
encode the same batches: bf16 with both islands (what encode.py runs), bf16 without the loss island, without
the gradient island, without either, and the float32 model. Speed: tokens/s ÷ the bf16 with both islands' in
the same round, the median over --rounds rounds (the variants' order rotates each round: neighbours on a
shared machine come and go). Accuracy: each encoding's cosine to the float32 model's and to the bf16 encode
with both islands (what the islands themselves change), mean and min.
The vectors are accumulated in float32 by every variant.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import typer
from tqdm import tqdm

import trackstar as ts
from bench.encoding import adam_like_v
from bench.limits import sync
from bench.precision import input_sets

app = typer.Typer(add_completion=False, rich_markup_mode=None)

# variant -> (model dtype, loss island kept, gradient island kept)
VARIANTS = {"bf16, both islands": (torch.bfloat16, True, True),
            "bf16, no loss island": (torch.bfloat16, False, True),
            "bf16, no gradient island": (torch.bfloat16, True, False),
            "bf16, no islands": (torch.bfloat16, False, False),
            "float32": (torch.float32, True, True)}
BASE = "bf16, both islands"


def islands(dtype: torch.dtype, loss: bool, gradient: bool) -> None:
    """Keep or drop each float32 island (trackstar's module constants, read at call time)."""
    ts.LOSS_DTYPE = torch.float32 if loss else dtype
    ts.GRADIENT_DTYPE = torch.float32 if gradient else dtype


def in_dtype(scale: object, dtype: torch.dtype) -> object:
    if isinstance(scale, ts.RankOne):
        return ts.RankOne(scale.a.to(dtype), scale.b.to(dtype))
    return scale.to(dtype)


def encoder(model: torch.nn.Module, V: ts.SecondMoment, gradient: str, dim: int, dtype: torch.dtype) -> ts.Encoder:
    """An encoder whose projections and V scaling are in `dtype` (float32: the gradient island)."""
    enc = ts.make_encoder(model, dim, 0, ts.correction_scales(model, V, 1e-8, ts.weight_modules(model)), gradient)
    enc.factors = {k: (p.to(dtype), q.to(dtype)) for k, (p, q) in enc.factors.items()}
    enc.scales = {k: in_dtype(s, dtype) for k, s in enc.scales.items()}
    return enc


def run(enc: ts.Encoder, batches: list[dict], device: str) -> tuple[float, torch.Tensor]:
    """(seconds, the (n, d) float64 encodings) of one pass over the batches."""
    sync(device)
    t0 = time.perf_counter()
    out = [ts.encode_batch(enc, b)["vectors"] for b in batches]
    sync(device)
    return time.perf_counter() - t0, torch.cat(out).double().cpu()


def measure(models: dict[torch.dtype, torch.nn.Module], seqs: list[list[int]], batch: int, dim: int, rounds: int,
            device: str) -> list[dict]:
    """Each (path, variant)'s speed ratio to the bf16 encode with both islands and cosine to float32."""
    batches = [ts.collate([(s, s) for s in seqs[lo:lo + batch]], device) for lo in range(0, len(seqs), batch)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    V = adam_like_v(models[torch.float32])
    rows = []
    for path, v in (("factored, rank-one V", ts.factor_second_moment(V, 1e-8)), ("exact, full V", V)):
        gradient = path.split(",")[0]
        names = list(VARIANTS)
        encs = {}
        for name, (dtype, _, keep_gradient) in VARIANTS.items():
            encs[name] = encoder(models[dtype], v, gradient, dim, torch.float32 if keep_gradient else dtype)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        vectors = {}
        for r in range(rounds + 1):  # round 0 warms up (allocator, kernels) and is not timed
            for name in names[r % len(names):] + names[:r % len(names)]:
                islands(*VARIANTS[name])
                dt, vectors[name] = run(encs[name], batches, device)
                if r:
                    seconds[name].append(dt)
        islands(torch.float32, True, True)
        for name in names:
            cos = torch.nn.functional.cosine_similarity(vectors[name], vectors["float32"], dim=1)
            own = torch.nn.functional.cosine_similarity(vectors[name], vectors[BASE], dim=1)
            ratio = statistics.median(b / s for s, b in zip(seconds[name], seconds[BASE], strict=True))
            rows.append({"path": path, "variant": name, "tokens_per_s": tokens / statistics.median(seconds[name]),
                         "speed_vs_bf16": ratio, "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                         "mean_cosine_to_bf16": float(own.mean()), "min_cosine_to_bf16": float(own.min())})
    return rows


def markdown(results: dict) -> str:
    lines = [f"{results['model']} on {results['device']}, d = {results['dim']:,}, the median of {results['rounds']} "
             "rounds; speed ÷ the bf16 encode with both islands in the same round.\n",
             "| inputs | path | variant | tokens/s | speed ÷ bf16 with islands | cosine to float32: mean / min | "
             "cosine to bf16 with islands: mean / min |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for s in results["sets"]:
        for r in s["rows"]:
            lines.append(f"| {s['inputs']} ({s['n']} × {s['tokens'] // s['n']} tokens) | {r['path']} | {r['variant']}"
                         f" | {r['tokens_per_s']:.0f} | {r['speed_vs_bf16']:.2f} | {r['mean_cosine']:.5f} / "
                         f"{r['min_cosine']:.5f} | {r['mean_cosine_to_bf16']:.6f} / {r['min_cosine_to_bf16']:.6f} |")
    return "\n".join(lines)


def islands_of(model: str, corpus: Path, device: str, n: int, dim: int, batch: int, long: int, rounds: int) -> dict:
    """The figures for `model` on the corpus's texts and long documents (batches of `batch`, halved for those)."""
    ts.check_bf16_attention(device)
    m32, tok = ts.load_model(model, "float32", device)
    models = {torch.float32: m32, torch.bfloat16: ts.load_model(model, "bfloat16", device)[0]}
    texts = [d["text"] for d in ts.read_jsonl(corpus, "corpus")]
    todo = input_sets(texts, tok, m32.config.vocab_size, n, long, ts.context_length(m32))
    sets = []
    for inputs in tqdm(("real text", "long documents"), desc="islands", unit="set"):
        seqs = todo[inputs]
        b = batch if inputs == "real text" else max(1, batch // 2)
        sets.append({"inputs": inputs, "n": len(seqs), "tokens": sum(map(len, seqs)),
                     "rows": measure(models, seqs, b, dim, rounds, device)})
    return {"model": "SmolLM2-135M" if model == "smollm2" else Path(model).name, "device": device, "dim": dim,
            "rounds": rounds, "sets": sets}


@app.command(help=__doc__)
def main(corpus: Path = typer.Option(..., help="Corpus JSONL whose texts are the inputs."),
         model: str = typer.Option("smollm2", help="The model (a directory, or smollm2)."),
         n: int = typer.Option(64, help="Texts encoded (and n/4 long documents)."),
         dim: int = typer.Option(4096), batch: int = typer.Option(8), long: int = typer.Option(512),
         rounds: int = typer.Option(3, help="Timed rounds (after one untimed)."),
         device: str = typer.Option("cpu", help="cpu or cuda."),
         out: Path | None = typer.Option(None, help="Write the figures here (JSON).")) -> None:
    ts.pin_precision("highest")
    results = islands_of(model, corpus, ts.pick_device(device), n, dim, batch, long, rounds)
    print(markdown(results))
    if out is not None:
        ts.write_json(out, results)


if __name__ == "__main__":
    ts.run_cli(app)
