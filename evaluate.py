"""Evaluate stage: attribution (MRR, recall@10) and influence (tail-patch) for every method, the
ablation table, and a report a person can browse.

    python evaluate.py --run RUN --model DIR --corpus corpus.jsonl --queries queries.jsonl \
        [--methods bm25,dot,cosine,trak,optcorr,train,eval,trackstar] [--optimizer-state F] [--lr F]

Reads RUN/proponents-<method>.jsonl (query.py's output for each method), writes RUN/results.json,
RUN/results.md and RUN/report.html. A "ground truth" row uses the documents that state each
query's fact, as an upper reference for tail-patch.

Tail-patch: for each of a query's top-k proponents, one training step on that
document alone from the final weights (lr · ∇L/sqrt(V + eps), no momentum; SGD without V), the
change in p(target | prompt), weights restored exactly; averaged over proponents, then queries.
Each distinct document is stepped once and every query that retrieved it is measured together.
"""

from __future__ import annotations

import html
import json
import math
import random
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import typer
from torch import nn
from tqdm import tqdm

import trackstar as ts

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__)

NAMES = {
    "bm25": "BM25 (lexical)",
    "dot": "Gradient dot product",
    "cosine": "Gradient cosine",
    "trak": "TRAK-like (no opt. corr., R_train, no unit norm)",
    "optcorr": "+ optimizer correction (cosine)",
    "train": "+ R_train",
    "eval": "+ R_eval (λ = 1)",
    "trackstar": "TrackStar (mixed R)",
    "truth": "Ground truth (documents stating the fact)",
}


# ----------------------------------------------------------------------------------------------
# Metrics. Attribution: does a retrieved document state the query's fact? Influence (tail-patch):
# does one training step on a proponent raise the target's probability?


def reciprocal_rank(retrieved_facts: list[list[str]], fact: str) -> float:
    """1 / rank of the first retrieved document stating `fact`, 0 if none does."""
    for rank, facts in enumerate(retrieved_facts, 1):
        if fact in facts:
            return 1.0 / rank
    return 0.0


def recall_at(retrieved_facts: list[list[str]], fact: str, k: int = 10) -> float:
    """1 if any of the top k retrieved documents states `fact`."""
    return float(any(fact in facts for facts in retrieved_facts[:k]))


def target_logprob(model: nn.Module, tokenizer: Any, queries: list[dict], max_length: int) -> torch.Tensor:
    """log p(target | prompt) of each query under the current weights (float64 on the CPU)."""
    dev = next(model.parameters()).device
    tokenized, _ = ts.tokenize_rows(tokenizer, queries, "queries", max_length)
    with torch.no_grad():
        return -ts.per_example_loss(model, ts.collate(tokenized, dev)).double().cpu()


# Adam's defaults, for a V that came without its optimizer's settings (an estimate).
DEFAULT_BETAS = (0.9, 0.999)


def adam_increment(
    model: nn.Module, tokenized: tuple[list[int], list[int]], v: dict[str, torch.Tensor] | None, eps: float,
    betas: tuple[float, float] = DEFAULT_BETAS,
) -> dict[str, torch.Tensor]:
    """This document's own share of the next Adam update, per unit learning rate (SGD's g when V is unknown).

    Had the next training batch been this document alone (L = its mean token loss, gradient g), Adam
    would set m' = β1·m + (1−β1)·g and v' = β2·v + (1−β2)·g² and step by lr·m'/sqrt(v' + eps). The
    β1·m part is the momentum of earlier batches, the same whichever document comes next, so the part
    this document contributes is (1−β1)·g / sqrt(v' + eps). Weight decay is left out for the same
    reason. v is the saved, bias-corrected second moment; with v' (not v) in the denominator a
    document with a rare token (v ≈ 0 in its rows) still moves each coordinate at most
    lr·(1−β1)/sqrt(1−β2), as Adam would.
    """
    beta1, beta2 = betas
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    dev = next(model.parameters()).device
    batch = ts.collate([tokenized], dev)
    n_tokens = (batch["labels"][:, 1:] != ts.IGNORE).sum()
    (ts.per_example_loss(model, batch).sum() / n_tokens).backward()
    out = {}
    for name, p in params.items():
        if p.grad is None:
            continue
        g = p.grad.detach()
        if v is not None:
            v_next = beta2 * v[name].to(g.device) + (1 - beta2) * g * g
            g = (1 - beta1) * g / (v_next + eps).sqrt()
        out[name] = g
    model.zero_grad(set_to_none=True)
    return out


def tail_patch(
    model: nn.Module, tokenizer: Any, doc: tuple[list[int], list[int]], queries: list[dict], lr: float,
    v: dict[str, torch.Tensor] | None, eps: float, max_length: int, base: torch.Tensor,
    betas: tuple[float, float] = DEFAULT_BETAS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Δp and Δlog p of each query's target after the step lr·adam_increment(doc); weights restored bit-exactly.

    `base` is log p(target) of the queries under the untouched weights.
    """
    step = adam_increment(model, doc, v, eps, betas)
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in step}
    try:
        with torch.no_grad():
            for n, d in step.items():
                params[n].sub_(lr * d)
        after = target_logprob(model, tokenizer, queries, max_length)
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)
    return after.exp() - base.exp(), after - base


def full_second_moment(sm: ts.SecondMoment, model: nn.Module) -> dict[str, torch.Tensor]:
    """V for every parameter, expanding Adafactor's factored estimate; missing ones are an error."""
    v = {}
    for name, _ in model.named_parameters():
        if name in sm.full:
            v[name] = sm.full[name]
        elif name in sm.factored:
            row, col = sm.factored[name]
            v[name] = torch.outer(row, col) / row.mean()
        else:
            raise ts.TrackStarError(f"the optimizer state has no second moment for parameter {name!r}")
    return v


def read_rankings(run: Path, method: str, n_queries: int) -> dict[str, list[dict]]:
    """query id -> ranked proponents of one method."""
    path = run / f"proponents-{method}.jsonl"
    if not path.exists():
        raise ts.TrackStarError(f"{path} is missing: run query.py for method {method!r} first")
    out = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ts.TrackStarError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            out[row["query_id"]] = row["proponents"]
    if len(out) != n_queries:
        raise ts.TrackStarError(f"{path} ranks {len(out)} queries, the queries file has {n_queries}")
    return out


def truth_rankings(corpus: list[dict], queries: list[dict], k: int) -> dict[str, list[dict]]:
    """The ground-truth "method": up to k documents stating each query's fact, in corpus order."""
    by_fact: dict[str, list[dict]] = {}
    for doc in corpus:
        for fact in doc.get("facts", []):
            by_fact.setdefault(fact, []).append({"id": doc["id"], "score": 1.0, "text": doc["text"]})
    return {q["id"]: by_fact.get(q.get("fact"), [])[:k] for q in queries}


def model_answers(model, tokenizer, queries: list[dict], max_length: int) -> list[bool]:
    """Does greedy decoding from the prompt reproduce the target's tokens (the model "knows" it)?"""
    dev = next(model.parameters()).device
    tokenized, _ = ts.tokenize_rows(tokenizer, queries, "queries", max_length)
    out = []
    with torch.no_grad():
        for ids, labels in tokenized:
            batch = ts.collate([(ids, labels)], dev)
            logits = model(input_ids=batch["input_ids"]).logits[0]
            pos = [t for t in range(len(ids) - 1) if labels[t + 1] != ts.IGNORE]
            out.append(all(int(logits[t].argmax()) == ids[t + 1] for t in pos))
    return out


def attribution(rankings: dict, queries: list[dict], facts_of: dict[str, list[str]], k: int) -> dict:
    """Per-query MRR and recall@k against the documents' ground-truth facts."""
    mrr, rec = [], []
    for q in queries:
        retrieved = [facts_of[p["id"]] for p in rankings[q["id"]][:k]]
        mrr.append(reciprocal_rank(retrieved, q["fact"]))
        rec.append(recall_at(retrieved, q["fact"], k))
    return {"mrr": mrr, "recall": rec}


def influence(model, tokenizer, corpus_tok: dict, rankings: dict, all_queries: list[dict], queries: list[dict],
              lr: float, v, eps: float, betas: tuple, max_length: int, k: int) -> dict[str, dict[str, list[float]]]:
    """Tail-patch Δp and Δlog p for every (method, query) of `all_queries`: the mean over its top-k
    proponents, measured for the queries in `queries` (a sample, or all), NaN for the others."""
    base = target_logprob(model, tokenizer, queries, max_length)
    qindex = {q["id"]: i for i, q in enumerate(queries)}
    need: dict[str, set[int]] = {}  # document id -> queries that retrieved it (any method)
    for ranks in rankings.values():
        for qid, props in ranks.items():
            if qid in qindex:
                for p in props[:k]:
                    need.setdefault(p["id"], set()).add(qindex[qid])
    effect: dict[tuple[str, int], tuple[float, float]] = {}
    for doc_id in tqdm(sorted(need), desc="tail-patch", unit="doc"):
        qs = sorted(need[doc_id])
        dp, dlp = tail_patch(model, tokenizer, corpus_tok[doc_id], [queries[i] for i in qs], lr, v, eps,
                                max_length, base[qs], betas)
        for i, a, b in zip(qs, dp.tolist(), dlp.tolist(), strict=True):
            effect[(doc_id, i)] = (a, b)
    out = {}
    for method, ranks in rankings.items():
        dps, dlps = [], []
        for q in all_queries:
            props = ranks[q["id"]][:k] if q["id"] in qindex else []
            pairs = [effect[(p["id"], qindex[q["id"]])] for p in props]
            dps.append(float(np.mean([a for a, _ in pairs])) if pairs else float("nan"))
            dlps.append(float(np.mean([b for _, b in pairs])) if pairs else float("nan"))
        out[method] = {"dp": dps, "dlogp": dlps}
    return out


def summarize(values: list[float], mask: list[bool]) -> tuple[float, float]:
    """Mean and standard error over the queries selected by mask (NaNs skipped)."""
    x = np.array([v for v, m in zip(values, mask, strict=True) if m and not math.isnan(v)])
    if len(x) == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def table(results: dict, methods: list[str], mask: list[bool], title: str) -> str:
    n = sum(mask)
    lines = [f"### {title} ({n} queries)", "",
             "| method | MRR | recall@10 | tail-patch Δp (×1e-3) | tail-patch Δlog p |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for m in methods:
        r = results["per_query"][m]
        cells = []
        for key, scale in (("mrr", 1), ("recall", 1), ("dp", 1e3), ("dlogp", 1)):
            mean, se = summarize(r[key], mask)
            cells.append("–" if math.isnan(mean) else f"{mean * scale:.3f} ± {se * scale:.3f}")
        lines.append(f"| {NAMES.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def findings(results: dict, methods: list[str]) -> str:
    """The paper's qualitative findings, checked against this run's numbers (all queries)."""
    allq = [True] * len(results["queries"])
    mean = {m: {k: summarize(results["per_query"][m][k], allq)[0] for k in ("mrr", "recall", "dp")}
            for m in methods}
    checks = []

    def check(text: str, ok: bool) -> None:
        checks.append(f"- [{'x' if ok else ' '}] {text}")

    chain = [m for m in ("cosine", "optcorr", "train", "trackstar") if m in mean]
    for a, b in zip(chain, chain[1:], strict=False):
        check(f"{NAMES[b]} raises tail-patch over {NAMES[a]}: {mean[a]['dp']:.2e} → {mean[b]['dp']:.2e}",
              mean[b]["dp"] > mean[a]["dp"])
    for base in ("cosine", "trak"):
        if base in mean and "trackstar" in mean:
            check(f"TrackStar beats {NAMES[base]} on tail-patch ({mean['trackstar']['dp']:.2e} vs "
                  f"{mean[base]['dp']:.2e}) and on MRR ({mean['trackstar']['mrr']:.3f} vs {mean[base]['mrr']:.3f})",
                  mean["trackstar"]["dp"] > mean[base]["dp"] and mean["trackstar"]["mrr"] > mean[base]["mrr"])
    if "bm25" in mean and "trackstar" in mean:
        check(f"BM25 beats TrackStar on MRR ({mean['bm25']['mrr']:.3f} vs {mean['trackstar']['mrr']:.3f}) "
              f"and recall@10 ({mean['bm25']['recall']:.3f} vs {mean['trackstar']['recall']:.3f})",
              mean["bm25"]["mrr"] > mean["trackstar"]["mrr"] and mean["bm25"]["recall"] > mean["trackstar"]["recall"])
        check(f"TrackStar's proponents raise the target more than BM25's ({mean['trackstar']['dp']:.2e} vs "
              f"{mean['bm25']['dp']:.2e})", mean["trackstar"]["dp"] > mean["bm25"]["dp"])
    return "\n".join(checks) + "\n"


def diagnostics(run: Path, methods: list[str]) -> str:
    """How each gradient row was built, and the one condition known to make R_train rows unreliable:
    fewer sampled training vectors than dimensions (a rank-deficient R_train, see README)."""
    lines = []
    meta = ts.read_meta(run / "corpus") if (run / "corpus" / "meta.json").exists() else {}
    if meta:
        lines.append(f"- encoding: d = {meta['dim']}, V = {meta['correction']}, eps = {meta['eps']:.3g}, "
                     f"path = {meta['path']}, model dtype {meta['dtype']}")
    for m in methods:
        hessian = run / f"index-{m}" / "hessian.h5"
        if not hessian.exists():
            continue
        with h5py.File(hessian, "r") as f:
            a = ts.read_attrs(f)
        if a.get("hessian") in (None, "none"):
            continue
        line = (f"- {NAMES.get(m, m)}: R = {a['hessian']}, λ = {a['lam']:.3g}, R_train from {a['n_train']} vectors, "
                f"R_eval from {a['n_eval']}, damping {a['damping']} (δ = {a['delta']:.3g}, "
                f"Ledoit–Wolf shrinkage of R_train {a.get('shrinkage', 0.0):.3g})")
        if meta and a["hessian"] in ("train", "mixed") and a["n_train"] < meta["dim"]:
            line += (f" — **R_train is rank-deficient ({a['n_train']} < d = {meta['dim']}): "
                     "whitening by it is unreliable**")
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, results: dict, methods: list[str]) -> None:
    known = results["model_correct"]
    s = results["settings"]
    md = [f"# TrackStar evaluation: {s['run']}", "",
          f"Model `{s['model']}`, {s['n_docs']} documents, {s['n_queries']} queries, top-k = {s['k']}; "
          f"tail-patch lr = {s['lr']:.3g}, V = {s['v_source']}, eps = {s['eps']:.3g}. "
          f"The model answers {sum(known)} of {len(known)} queries correctly (greedy). "
          f"Tail-patch measured on {s['tail_patch_queries']} of the {len(known)} queries.", "",
          "Mean ± standard error over queries. MRR / recall@10: does a retrieved document state the query's "
          "fact. Tail-patch: change in p(target | prompt) after one training step on each proponent, "
          "averaged over the top 10.", "",
          table(results, methods, [True] * len(known), "All queries"),
          table(results, methods, known, "Queries the model answers correctly"),
          table(results, methods, [not c for c in known], "Queries the model gets wrong"),
          "## The paper's findings, checked on this run", "", findings(results, methods),
          "## How the rows were built", "", diagnostics(Path(s["run"]), methods)]
    with ts.atomic_path(path) as tmp:
        tmp.write_text("\n".join(md))


def write_report(path: Path, results: dict, queries: list[dict], rankings: dict, facts_of: dict,
                 methods: list[str], k: int) -> None:
    """A self-contained HTML page: per query, each method's proponents, fact-stating ones marked."""
    e = html.escape
    table_md = (path.parent / "results.md").read_text()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>TrackStar report</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
        "font-size:13px;vertical-align:top}.hit{background:#d4f7d4}.q{margin:1em 0;padding:.5em;"
        "border:1px solid #999;border-radius:6px}summary{cursor:pointer;font-weight:600}"
        "pre{white-space:pre-wrap;background:#f6f6f6;padding:1em}.ok{color:#070}.bad{color:#a00}",
        "</style></head><body><h1>TrackStar report</h1>",
        f"<pre>{e(table_md)}</pre><h2>Queries</h2>",
        "<p>Each query lists every method's top proponents; <span class='hit'>green</span> rows state the "
        "query's fact. Δp is the tail-patch effect averaged over the shown proponents.</p>",
    ]
    for qi, q in enumerate(queries):
        ok = results["model_correct"][qi]
        parts.append(f"<details class='q'><summary>{e(q['id'])}: {e(q['prompt'])} <u>{e(q['target'])}</u> "
                     f"<span class='{'ok' if ok else 'bad'}'>({'model correct' if ok else 'model wrong'})"
                     f"</span> — fact {e(str(q.get('fact')))}</summary>")
        for m in methods:
            r = results["per_query"][m]
            parts.append(f"<h4>{e(NAMES.get(m, m))}: RR={r['mrr'][qi]:.3f}, Δp={r['dp'][qi]:.2e}</h4><table>"
                         "<tr><th>#</th><th>score</th><th>id</th><th>text</th></tr>")
            for rank, p in enumerate(rankings[m][q["id"]][:k], 1):
                hit = q.get("fact") in facts_of.get(p["id"], [])
                parts.append(f"<tr class='{'hit' if hit else ''}'><td>{rank}</td><td>{p['score']:.4g}</td>"
                             f"<td>{e(p['id'])}</td><td>{e(p['text'][:300])}</td></tr>")
            parts.append("</table>")
        parts.append("</details>")
    parts.append("</body></html>")
    with ts.atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts))


@app.command()
def main(
    run: Path = typer.Option(..., help="Run directory holding proponents-<method>.jsonl."),
    model: str = typer.Option(..., help="The model directory (for tail-patch)."),
    corpus: Path = typer.Option(..., help="Corpus JSONL (with ground-truth `facts`)."),
    queries: Path = typer.Option(..., help="Queries JSONL (with `fact`)."),
    methods: str = typer.Option("bm25,dot,cosine,trak,optcorr,train,eval,trackstar", help="Comma-separated."),
    optimizer_state: str | None = typer.Option(None, help="V for the tail-patch step (default MODEL/optimizer.pt)."),
    no_correction: bool = typer.Option(False, help="Tail-patch with plain SGD steps."),
    lr: float | None = typer.Option(None, help="Tail-patch learning rate (default: the optimizer's final lr)."),
    eps: float | None = typer.Option(None, help="eps in sqrt(V + eps) (default as encode.py)."),
    k: int = typer.Option(10, help="Proponents per query for metrics and tail-patch."),
    max_queries: int = typer.Option(0, help="Evaluate a seeded sample of this many queries (0: all)."),
    tail_queries: int = typer.Option(0, help="Tail-patch a seeded sample of this many queries (0: all); "
                                     "MRR/recall still use every query. Costs a training step per document."),
    device: str = typer.Option("auto"),
) -> None:
    device = ts.pick_device(device)
    docs = ts.read_jsonl(corpus, "corpus")
    qs = ts.read_jsonl(queries, "queries")
    n_all = len(qs)  # query.py ranked every query of the file
    if max_queries and max_queries < len(qs):
        qs = sorted(random.Random(0).sample(qs, max_queries), key=lambda q: q["_line"])
    if any("fact" not in q for q in qs):
        raise ts.TrackStarError(f"{queries}: every query needs a 'fact' for attribution metrics")
    method_list = [m for m in methods.split(",") if m]
    rankings = {m: read_rankings(run, m, n_all) for m in method_list}
    rankings["truth"] = truth_rankings(docs, qs, k)
    method_list.append("truth")
    facts_of = {d["id"]: d.get("facts", []) for d in docs}

    mdl, tok = ts.load_model(model, "float32", device)
    max_length = ts.context_length(mdl)
    sm = None
    if not no_correction:
        state = optimizer_state or str(Path(model) / "optimizer.pt")
        sm = ts.load_second_moment(state, mdl)
    lr = lr if lr is not None else (sm.lr if sm else None)
    if lr is None:
        raise ts.TrackStarError("no learning rate in the optimizer state: pass --lr")
    v = full_second_moment(sm, mdl) if sm else None
    eps = eps if eps is not None else (ts.default_eps(sm, list(v)) if sm else 0.0)
    tokenized, _ = ts.tokenize_rows(tok, docs, "corpus", max_length)
    corpus_tok = {d["id"]: t for d, t in zip(docs, tokenized, strict=True)}

    correct = model_answers(mdl, tok, qs, max_length)
    per_query = {m: attribution(rankings[m], qs, facts_of, k) for m in method_list}
    betas = sm.betas if sm and sm.betas else DEFAULT_BETAS
    tail_qs = sorted(random.Random(1).sample(qs, tail_queries), key=lambda q: q["_line"]) \
        if 0 < tail_queries < len(qs) else qs
    infl = influence(mdl, tok, corpus_tok, rankings, qs, tail_qs, lr, v, eps, betas, max_length, k)
    for m in method_list:
        per_query[m].update(infl[m])
    results = {
        "settings": {"run": str(run), "model": model, "n_docs": len(docs), "n_queries": len(qs), "k": k,
                     "lr": lr, "v_source": sm.source if sm else "none (SGD)", "eps": eps, "methods": method_list,
                     "tail_patch_queries": len(tail_qs)},
        "queries": [q["id"] for q in qs], "model_correct": correct, "per_query": per_query,
        "summary": {m: {key: summarize(per_query[m][key], [True] * len(qs))[0]
                        for key in ("mrr", "recall", "dp", "dlogp")} for m in method_list},
    }
    ts.write_json(run / "results.json", results)
    write_markdown(run / "results.md", results, method_list)
    write_report(run / "report.html", results, qs, rankings, facts_of, method_list, k)
    typer.echo(f"wrote {run / 'results.json'}, {run / 'results.md'}, {run / 'report.html'}")


if __name__ == "__main__":
    ts.run_cli(app)
