"""bfloat16 against float32 encodings, on the inputs users encode: which inputs drift, and which step costs it.

    python -m bench.precision --corpus data/lama-.../corpus.jsonl [--model smollm2] [--world DIR] [--device cuda]
                              [--out F.json]

For each input set, the cosine of every example's encoding to its float32 encoding (matmul precision
"highest"), on each gradient path with an Adam-like V (the same V for every variant; the factored path with
its rank-one factors) and without correction, under these variants:

* weights: the float32 model with its weights rounded to bfloat16, computed in float32. What storing the
  weights in bfloat16 costs on its own.
* bf16: the model in bfloat16, as `encode.py --dtype bfloat16` runs it: forward activations, the backward's
  δ and the logits' inputs in bfloat16; the loss, the projections, the V scaling and the vectors in float32
  (the float32 islands `tests/test_precision.py` checks).
* tf32 (--device cuda only; a no-op on a CPU): the float32 model with float32 matmuls on TF32 tensor cores
  (`--matmul-precision high`).

The part of bf16's drift that `weights` does not show is the activations' and δ's rounding. For each input
set's worst example (factored path, bf16) a second table says where its drift comes from (`diagnose`): its
whole gradient's cosine, with no projection or V in the way, the parameters that carry most of that gradient,
and the largest magnitude in the residual stream, where bf16's spacing is coarsest.

Input sets: the corpus's texts (real text), the same number of sequences of uniformly random tokens of the
same lengths, long documents (the texts concatenated to --long tokens), and the texts with a third of their
tokens replaced by ids from the last tenth of the vocabulary (rare tokens: BPE's late merges); with
--world, the fact world's model on its own corpus. Figures are ratios of one run: cosines, not speeds.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import typer
from tqdm import tqdm

import trackstar as ts
from bench.encoding import adam_like_v

app = typer.Typer(add_completion=False, rich_markup_mode=None)


def input_sets(texts: list[str], tokenizer, vocab: int, n: int, long: int, max_length: int, seed: int = 0
               ) -> dict[str, list[list[int]]]:
    """Token id sequences for each input set (every token a target, as for a corpus document)."""
    g = torch.Generator().manual_seed(seed)
    real = [ids for ids, _ in ts.tokenize_rows(tokenizer, [{"text": t} for t in texts], "corpus", max_length)[0]]
    real = real[:n]
    flat = [t for ids in real for t in ids]
    per_doc = max(1, len(flat) // long) if flat else 1
    longs = [flat[i * long:(i + 1) * long] for i in range(min(per_doc, max(1, n // 4)))]
    rare = []
    for ids in real:
        ids = list(ids)
        where = torch.randperm(len(ids), generator=g)[: len(ids) // 3].tolist()
        for i in where:
            ids[i] = int(torch.randint(vocab - vocab // 10, vocab, (1,), generator=g))
        rare.append(ids)
    random = [torch.randint(0, vocab, (len(ids),), generator=g).tolist() for ids in real]
    return {"real text": real, "random tokens": random, "long documents": longs, "rare tokens": rare}


def encodings(model: torch.nn.Module, V: ts.SecondMoment | None, gradient: str, dim: int,
              seqs: list[list[int]], batch: int, precision: str = "highest") -> torch.Tensor:
    """(n, d) float64 corrected encodings (float32 as computed) of `seqs`, `batch` at a time, on the CPU;
    float32 matmuls at `precision` ("high": TF32 on a GPU that has it)."""
    ts.pin_precision(precision)
    dev = next(model.parameters()).device
    modules = ts.weight_modules(model)
    scales = ts.correction_scales(model, V, 1e-8, modules) if V is not None else {}
    enc = ts.make_encoder(model, dim, 0, scales, gradient)
    out = []
    for lo in range(0, len(seqs), batch):
        b = ts.collate([(ids, ids) for ids in seqs[lo:lo + batch]], dev)
        out.append(ts.encode_batch(enc, b)["vectors"].double().cpu())
    ts.pin_precision("highest")
    return torch.cat(out)


def compare(model32: torch.nn.Module, seqs: list[list[int]], dim: int, batch: int) -> list[dict]:
    """Cosine of each variant's encodings to float32's, per gradient path (and TF32's on a GPU)."""
    weights = copy.deepcopy(model32)
    with torch.no_grad():
        for p in weights.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    bf16 = copy.deepcopy(model32).to(torch.bfloat16)
    V = adam_like_v(model32)
    rows = []
    for path, v, gradient in (("factored, rank-one V", ts.factor_second_moment(V, 1e-8), "factored"),
                              ("exact, full V", V, "exact"), ("no correction", None, "factored")):
        ref = encodings(model32, v, gradient, dim, seqs, batch)
        variants = [("weights", weights, "highest"), ("bf16", bf16, "highest")]
        if next(model32.parameters()).is_cuda:
            variants.append(("tf32", model32, "high"))
        for name, m, precision in variants:
            x = encodings(m, v, gradient, dim, seqs, batch, precision)
            cos = torch.nn.functional.cosine_similarity(x, ref, dim=1)
            rows.append({"path": path, "variant": name, "mean_cosine": float(cos.mean()),
                         "min_cosine": float(cos.min()), "worst": int(cos.argmin()),
                         "below_0.99": int((cos < 0.99).sum()), "below_0.9": int((cos < 0.9).sum()), "n": len(seqs)})
    return rows


def diagnose(model32: torch.nn.Module, seq: list[int], top: int = 5) -> dict:
    """Where one example's bf16 drift comes from, without projection or V: the cosine of its whole gradient
    (every parameter) in a bf16 copy of the model to float32's, the parameters that carry most of its float32
    gradient (share of the squared norm) with each one's cosine, and the largest magnitude in the float32
    residual stream with bf16's spacing there (8 significant bits: 2^(floor(log2 |h|) - 7))."""
    grads, biggest = [], 0.0
    for m in (model32, copy.deepcopy(model32).to(torch.bfloat16)):
        for p in m.parameters():
            p.requires_grad_(True)
        b = ts.collate([(seq, seq)], next(m.parameters()).device)
        with torch.enable_grad():
            out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
            loss = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), b["labels"][0, 1:], reduction="sum")
            loss.backward()
        biggest = biggest or max(float(h.detach().abs().max()) for h in out.hidden_states)
        grads.append({n: p.grad.detach().double().flatten().cpu() for n, p in m.named_parameters()})
        for p in m.parameters():
            p.grad = None
            p.requires_grad_(False)
    g32, g16 = grads
    total = sum(float(g.pow(2).sum()) for g in g32.values())
    cos = torch.nn.functional.cosine_similarity
    params = sorted(({"param": n, "share": float(g.pow(2).sum()) / total, "cosine": float(cos(g, g16[n], dim=0))}
                     for n, g in g32.items()), key=lambda r: -r["share"])
    whole = cos(torch.cat(list(g32.values())), torch.cat(list(g16.values())), dim=0)
    return {"tokens": len(seq), "whole_gradient_cosine": float(whole), "top": params[:top],
            "max_abs_hidden": biggest, "bf16_spacing": 2.0 ** (math.floor(math.log2(biggest)) - 7)}


def markdown(results: dict) -> str:
    names = {"weights": "weights rounded", "bf16": "bf16", "tf32": "TF32"}
    shown = [v for v in names if any(r["variant"] == v for s in results["sets"] for r in s["rows"])]
    counted = all("below_0.9" in r for s in results["sets"] for r in s["rows"])
    lines = ["| model | inputs | path | " + " | ".join(f"{names[v]}: mean / min" for v in shown)
             + (" | bf16: examples below 0.99 / 0.9 |" if counted else " |"),
             "| --- | --- | --- | " + " | ".join("---:" for _ in shown) + (" | ---: |" if counted else " |")]
    for s in results["sets"]:
        by = {(r["path"], r["variant"]): r for r in s["rows"]}
        for path in dict.fromkeys(r["path"] for r in s["rows"]):
            cells = [f"{by[(path, v)]['mean_cosine']:.5f} / {by[(path, v)]['min_cosine']:.5f}" for v in shown]
            if counted:
                cells.append(f"{by[(path, 'bf16')]['below_0.99']} / {by[(path, 'bf16')]['below_0.9']}")
            lines.append(f"| {s['model']} | {s['inputs']} ({s['n']}) | {path} | " + " | ".join(cells) + " |")
    worst = [s for s in results["sets"] if "worst" in s]
    if worst:
        lines += ["", "| model | inputs | its worst example (factored, bf16) | whole gradient's cosine | "
                  "largest residual magnitude (bf16 spacing) | parameters with most of its gradient: share, cosine |",
                  "| --- | --- | ---: | ---: | ---: | --- |"]
        for s in worst:
            w, by = s["worst"], {(r["path"], r["variant"]): r for r in s["rows"]}
            params = "; ".join(f"{p['param'].removeprefix('model.')} {p['share']:.2f}, {p['cosine']:+.2f}"
                               for p in w["top"][:3])
            lines.append(f"| {s['model']} | {s['inputs']} | {by[('factored, rank-one V', 'bf16')]['min_cosine']:.3f}"
                         f" ({w['tokens']} tokens) | {w['whole_gradient_cosine']:+.3f} | {w['max_abs_hidden']:,.0f} "
                         f"({w['bf16_spacing']:g}) | {params} |")
    return "\n".join(lines)


def measure_sets(name: str, label: str, texts: list[str], device: str, n: int, dim: int, batch: int, long: int,
                 wanted: set[str] | None = None) -> list[dict]:
    """Each input set's rows (compare) and its worst example's diagnosis, for the model `name` on `texts`
    (`wanted`: the input sets to measure, None for all)."""
    m, tok = ts.load_model(name, "float32", device)
    todo = {k: v for k, v in input_sets(texts, tok, m.config.vocab_size, n, long, ts.context_length(m)).items()
            if wanted is None or k in wanted}
    sets = []
    for inputs, seqs in tqdm(todo.items(), desc=f"precision {label}", unit="set"):
        rows = compare(m, seqs, dim, batch)
        worst = next(r["worst"] for r in rows if r["variant"] == "bf16")  # on the factored path
        sets.append({"model": label, "inputs": inputs, "n": len(seqs), "tokens": sum(map(len, seqs)),
                     "rows": rows, "worst": {"example": worst, **diagnose(m, seqs[worst])}})
    return sets


@app.command()
def main(corpus: Path = typer.Option(..., help="Corpus JSONL whose texts are the real-text inputs."),
         model: str = typer.Option("smollm2", help="The model (a directory, or smollm2)."),
         world: Path | None = typer.Option(None, help="A fact world (prepare.py factworld): its model on its corpus."),
         n: int = typer.Option(24, help="Sequences per input set."),
         dim: int = typer.Option(4096), batch: int = typer.Option(8), long: int = typer.Option(512),
         device: str = typer.Option("cpu", help="cpu, or cuda (adds TF32 matmuls as a variant)."),
         out: Path | None = typer.Option(None, help="Write the figures here (JSON).")) -> None:
    device = ts.pick_device(device)
    texts = [d["text"] for d in ts.read_jsonl(corpus, "corpus")]
    jobs = [(model, texts, None)]  # (model, its texts, the input sets to measure: None for all)
    if world is not None:
        jobs.append((str(world / "model"), [d["text"] for d in ts.read_jsonl(world / "corpus.jsonl", "corpus")],
                     {"real text"}))
    sets = []
    for name, docs, wanted in jobs:
        label = "SmolLM2-135M" if name == "smollm2" else "fact world" if wanted else Path(name).name
        sets += measure_sets(name, label, docs, device, n, dim, batch, long, wanted)
    results = {"dim": dim, "sets": sets}
    print(markdown(results))
    if out is not None:
        ts.write_json(out, results)


if __name__ == "__main__":
    ts.run_cli(app)
