"""Evaluate stage: attribution (MRR, recall@10) and influence (tail-patch) for every method, the
ablation table, and a report a person can browse.

    python evaluate.py --run RUN --model DIR --corpus corpus.jsonl --queries queries.jsonl \
        [--methods bm25,dense,dot,cosine,trak,optcorr,train,eval,trackstar] [--optimizer-state F] [--lr F] \
        [--export-viewer RUN/viewer]

Reads RUN/proponents-<method>.jsonl (query.py's output for each method) and writes RUN/results.json:
every per-query value, the summaries per query split, and what the report shows. report.py renders it
(results.md, report.html); this stage computes, the renderer only presents. With --export-viewer it also
writes each method's retrievals in the schema of the paper authors' viewer (docs/files.md).

Ground truth is optional. Where queries carry a `fact` and documents their `facts`, MRR and
recall@k say whether a retrieved document states the fact, and a "ground truth" row uses those
documents as an upper reference for tail-patch; without it, both are left out (null in results.json).

Tail-patch: for each of a query's top-k proponents, one training step on that document alone from
the final weights, the change in p(target | prompt) (and log p), weights restored exactly; averaged
over proponents, then queries. The step is the document's own share of Adam's next update,
lr·(1−β1)·g/sqrt(β2·v + (1−β2)·g² + eps) (see `adam_increment`; plain SGD without V). Each distinct
document is stepped once and every query that retrieved it is measured together.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import re
from collections import Counter
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


# Proponent categories (the paper's §7): what a proponent shares with its query, read off the text alone.
CATEGORIES = ("fact", "subject+object", "relation", "subject", "object", "none")


@functools.lru_cache(maxsize=4096)
def word_pattern(phrase: str) -> re.Pattern:
    """`phrase` as whole words, in any case, any whitespace between its words: "Demar" is not in "Demarco"."""
    words = r"\s+".join(map(re.escape, phrase.split()))
    return re.compile(rf"(?<!\w){words}(?!\w)", re.IGNORECASE)


def mentions(text: str, phrase: str) -> bool:
    return word_pattern(phrase).search(text) is not None


def template_wording(template: str) -> list[str]:
    """A relation template's own words, the entities removed: "[X] was born in [Y]." -> ["was born in"];
    "Born in [Y], [X] spent a happy childhood there." -> ["Born in", "spent a happy childhood there"]. A
    possessive after an entity is the entity's: "[X]'s capital is [Y]." -> ["capital is"]."""
    out = []
    for part in re.split(r"\[[XY]\]", template):
        part = re.sub(r"^\s*['’]s(?!\w)", "", part)
        part = re.sub(r"^\W+|\W+$", "", part)
        if part:
            out.append(part)
    return out


def categorised(query: dict) -> bool:
    """Whether a query carries what categories need (prepare.py writes it; a user's queries may not)."""
    return query.get("subject") is not None and query.get("relation_templates") is not None


def proponent_category(doc: dict, query: dict) -> str:
    """What a document shares with a categorised query, the first that applies: it states the query's fact
    (its ground-truth `facts` list it), names both subject and object, holds every word of one of the
    relation's templates, names the subject only, the object (the target) only, or none of these."""
    if query.get("fact") is not None and query["fact"] in (doc.get("facts") or []):
        return "fact"
    text = doc["text"]
    subject, obj = mentions(text, query["subject"]), mentions(text, query["target"].strip())
    if subject and obj:
        return "subject+object"
    if any(all(mentions(text, w) for w in template_wording(t)) for t in query["relation_templates"]):
        return "relation"
    return "subject" if subject else "object" if obj else "none"


def proponent_categories(ranking: dict, queries: list[dict], docs_by_id: dict[str, dict],
                         k: int) -> list[list[str] | None]:
    """The categories of each query's top-k proponents; None for a query without `subject` and `relation_templates`."""
    return [[proponent_category(docs_by_id[p["id"]], q) for p in ranking[q["id"]][:k]] if categorised(q) else None
            for q in queries]


def category_shares(cats: list[list[str] | None], mask: list[bool]) -> dict[str, float] | None:
    """The share of each category among the proponents of the selected categorised queries (None: there are none)."""
    counts = Counter(c for cs, m in zip(cats, mask, strict=True) if m and cs for c in cs)
    total = sum(counts.values())
    return {c: counts[c] / total for c in CATEGORIES} if total else None


def category_summary(cats: dict[str, list], scored: list[bool], splits: list[tuple[str, list[bool]]]) -> dict | None:
    """results.json's "categories": the shares per query split and method; None when no query is categorised.
    The ground-truth row is left out: its proponents are "fact" by construction."""
    have = [c is not None for c in next(iter(cats.values()), [])]
    if not any(have):
        return None
    return {"order": list(CATEGORIES), "queries": sum(have),
            "without_fact": sum(h and not s for h, s in zip(have, scored, strict=True)),
            "split_queries": {title: sum(h and m for h, m in zip(have, mask, strict=True)) for title, mask in splits},
            "shares": {title: {m: category_shares(c, mask) for m, c in cats.items() if m != "truth"}
                       for title, mask in splits}}


def target_logprob(model: nn.Module, tokenizer: Any, queries: list[dict], max_length: int) -> torch.Tensor:
    """log p(target | prompt) of each query under the current weights (float64 on the CPU)."""
    dev = next(model.parameters()).device
    tokenized, _ = ts.tokenize_rows(tokenizer, queries, "queries", max_length)
    with torch.no_grad():
        return -ts.per_example_loss(model, ts.collate(tokenized, dev)).double().cpu()


# Adam's defaults, for a V that came without its optimizer's settings (an estimate).
DEFAULT_BETAS = (0.9, 0.999)


def adam_increment(
    model: nn.Module, docs: list[tuple[list[int], list[int]]], v: dict[str, torch.Tensor] | None, eps: float,
    betas: tuple[float, float] = DEFAULT_BETAS,
) -> dict[str, torch.Tensor]:
    """These documents' own share of the next Adam update, per unit learning rate (SGD's g when V is unknown).

    Had the next training batch been these documents alone (one document, or a method's top-k proponents
    together; L = the mean token loss over all their tokens, gradient g), Adam
    would set m' = β1·m + (1−β1)·g and v' = β2·v + (1−β2)·g² and step by lr·m'/sqrt(v' + eps). The
    β1·m part is the momentum of earlier batches, the same whichever document comes next, so the part
    this document contributes is (1−β1)·g / sqrt(v' + eps). Weight decay is left out for the same
    reason. v is the saved, bias-corrected second moment; with v' (not v) in the denominator a
    document with a rare token (v ≈ 0 in its rows) still moves each coordinate at most
    lr·(1−β1)/sqrt(1−β2), as Adam would.

    The increments are the parameters' own gradient buffers, overwritten in place (one parameter's
    scratch at a time), so a step never holds a second copy of the model's gradients.
    """
    beta1, beta2 = betas
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    dev = next(model.parameters()).device
    batch = ts.collate(docs, dev)
    n_tokens = (batch["labels"][:, 1:] != ts.IGNORE).sum()
    (ts.per_example_loss(model, batch).sum() / n_tokens).backward()
    out = {}
    with torch.no_grad():
        for name, p in params.items():
            if p.grad is None:
                continue
            g, p.grad = p.grad, None
            if v is not None:  # (1−β1)·g / sqrt(β2·v + (1−β2)·g·g + eps), in that order of operations
                denom = g.mul(1 - beta2).mul_(g).add_(v[name] * beta2).add_(eps).sqrt_()  # v: on the model's device
                g.mul_(1 - beta1).div_(denom)
                del denom
            out[name] = g
    return out


@dataclasses.dataclass
class Step:
    """What a tail-patch step needs: the final model, its V (None: plain SGD), eps, lr and Adam's betas."""

    model: nn.Module
    tokenizer: Any
    v: dict[str, torch.Tensor] | None
    eps: float
    lr: float
    betas: tuple[float, float]
    max_length: int
    source: str  # where V came from, or "none (SGD)"


def load_step(model_dir: str, optimizer_state: str | None, no_correction: bool, lr: float | None,
              eps: float | None, device: str = "cpu", fingerprint: str | None = None) -> Step:
    """The model and the optimizer state tail-patch steps with (MODEL/optimizer.pt unless given).
    With `fingerprint`, the model must be the one the run was encoded with (checked before V is read)."""
    if no_correction and (optimizer_state is not None or eps is not None):
        raise ts.TrackStarError("--no-correction takes plain SGD steps: it uses no --optimizer-state or --eps")
    model, tokenizer = ts.load_model(model_dir, "float32", device, fingerprint)
    V = None
    if not no_correction:
        V = ts.load_second_moment(optimizer_state or str(Path(model.trackstar_path) / "optimizer.pt"), model)
    lr = lr if lr is not None else (V.lr if V else None)
    if lr is None:
        raise ts.TrackStarError("pass --lr: " + ("plain SGD steps have no default" if no_correction else
                                                 "the optimizer state records no learning rate"))
    v = {n: t.to(device) for n, t in full_second_moment(V, model).items()} if V else None  # moved once
    eps = eps if eps is not None else (ts.default_eps(V, list(v)) if V else 0.0)
    betas = V.betas if V and V.betas else DEFAULT_BETAS
    return Step(model, tokenizer, v, eps, lr, betas, ts.context_length(model), V.source if V else "none (SGD)")


def tail_patch(step: Step, doc: tuple[list[int], list[int]], queries: list[dict], base: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Δp and Δlog p of each query's target after the step lr·adam_increment(doc); weights restored bit-exactly.
    `base` is log p(target) of the queries under the untouched weights."""
    return stepped_change(step, adam_increment(step.model, [doc], step.v, step.eps, step.betas), queries, base,
                          step.lr)


def tail_patch_lrs(step: Step, docs: list[tuple[list[int], list[int]]], queries: list[dict], base: torch.Tensor,
                   lrs: list[float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """tail_patch at each learning rate of `lrs` (one gradient, one step each), for the documents together."""
    increment = adam_increment(step.model, docs, step.v, step.eps, step.betas)
    return [stepped_change(step, {n: d.clone() for n, d in increment.items()}, queries, base, lr) for lr in lrs]


def stepped_change(step: Step, increment: dict[str, torch.Tensor], queries: list[dict], base: torch.Tensor,
                   lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Δp and Δlog p of each query after the step w − lr·increment, weights restored bit-exactly.

    The stepped weights are written into the increment's buffer (it is consumed) and swapped in; restoring
    swaps the untouched tensors back. So a step holds the model, V and one model-sized buffer (not a clone of
    the weights as well), and the restored weights are the very same tensors, not a copy.
    """
    model = step.model
    params = dict(model.named_parameters())
    untouched = {}
    try:
        with torch.no_grad():
            for n, d in increment.items():
                stepped = d.mul_(-lr).add_(params[n])  # (−lr·d) + w: the same bits as w − lr·d
                untouched[n], params[n].data = params[n].data, stepped
        after = target_logprob(model, step.tokenizer, queries, step.max_length)
    finally:
        for n, w in untouched.items():
            params[n].data = w
    return after.exp() - base.exp(), after - base


def full_second_moment(V: ts.SecondMoment, model: nn.Module) -> dict[str, torch.Tensor]:
    """V for every parameter, expanding Adafactor's factored estimate; missing ones are an error."""
    missing = [name for name, _ in model.named_parameters() if name not in V.values]
    if missing:
        raise ts.TrackStarError(f"the optimizer state has no second moment for parameter {missing[0]!r}")
    return {name: V.dense(name) for name, _ in model.named_parameters()}


# ----------------------------------------------------------------------------------------------
# Summaries: a mean and its standard error over the queries of a split (the model answers them correctly,
# or not), "not measured" (None, NaN) left out.

METRICS = ("mrr", "recall", "dp", "dlogp")  # per-query values of every method: MRR, recall@k, tail-patch Δp, Δlog p
TOGETHER = ("dp_joint", "dlogp_joint")  # tail-patch of the top-k together (--together)


def metrics_of(per_query: dict) -> list[str]:
    """The metrics a run measured: METRICS, and TOGETHER when it was asked for."""
    first = next(iter(per_query.values()), {})
    return [key for key in (*METRICS, *TOGETHER) if key in first]


def summarize(values: list[float | None], mask: list[bool]) -> tuple[float, float]:
    """Mean and standard error over the queries selected by mask (None and NaN, i.e. not measured, skipped)."""
    x = np.array([v for v, m in zip(values, mask, strict=True) if m and v is not None and not math.isnan(v)])
    if len(x) == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def splits(model_correct: list[bool]) -> list[tuple[str, list[bool]]]:
    """The query splits every table is shown for: all, the ones the model answers, the ones it does not."""
    return [("All queries", [True] * len(model_correct)),
            ("Queries the model answers correctly", list(model_correct)),
            ("Queries the model gets wrong", [not c for c in model_correct])]


# ----------------------------------------------------------------------------------------------
# Inputs. Ground truth (a query's `fact`, a document's `facts`; their types are checked as they are
# read) is optional: without it there is no attribution score, but tail-patch and the proponents
# themselves still say a lot.


def check_inputs(run: Path, corpus: Path, queries: Path) -> ts.RunSettings | None:
    """The corpus and queries given must be the files the run encoded (when it encoded any), and the
    corpus the one its dense index embedded: the rankings are row numbers into them. Returns the corpus
    run's settings, or None (text baselines only)."""
    settings, made_from = None, []  # (option, file given, artifact, its recorded file and digest)
    for kind, path in (("corpus", corpus), ("queries", queries)):
        if (run / kind / "meta.json").exists():
            encoded = ts.read_meta(run / kind)
            settings = settings or encoded
            made_from.append((kind, path, run / kind, encoded.data, encoded.data_digest))
    dense = run / "index-dense" / "index.h5"
    if dense.exists():
        with h5py.File(dense, "r") as f:
            embedded = ts.read_attrs(f).get("dense", {})
        made_from.append(("corpus", corpus, dense, embedded.get("data"), embedded.get("data_digest")))
    digests: dict = {}  # the corpus is named twice (encoded run, dense index): each input is read once
    for kind, path, artifact, data, digest in made_from:
        if path not in digests:
            digests[path] = ts.data_digest(path)
        if digests[path] != digest:
            raise ts.TrackStarError(f"--{kind} {path} (digest {digests[path]}) is not the data {artifact} "
                                    f"was encoded from ({data}, digest {digest})")
    return settings


def scored_queries(docs: list[dict], queries: list[dict]) -> list[bool]:
    """Which queries get MRR / recall: those with a `fact`, and none at all when no document lists `facts`
    (every rank would be a miss, a 0 that says nothing about the method)."""
    if not any(d.get("facts") for d in docs):
        return [False] * len(queries)
    return [q.get("fact") is not None for q in queries]


def unstated_facts(queries: list[dict], scored: list[bool], facts_of: dict[str, list[str]]) -> list[str]:
    """The scored queries whose fact no document states, said on stderr: their MRR and recall are 0 whatever a
    method retrieves (a fact id in another form than the corpus's, or another corpus?)."""
    stated = {f for facts in facts_of.values() for f in facts}
    missing = [q["id"] for q, s in zip(queries, scored, strict=True) if s and q["fact"] not in stated]
    if missing:
        first = next(q for q in queries if q["id"] == missing[0])
        typer.echo(f"note: {len(missing)} of {sum(scored)} queries with a fact name one no document states (first: "
                   f"query {missing[0]!r}, fact {first['fact']!r}); they score MRR 0 and recall 0 whatever is "
                   "retrieved", err=True)
    return missing


def read_rankings(run: Path, method: str, n_queries: int, k: int
                  ) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """query id -> ranked proponents, and query id -> opponents (lowest scores first), of one method, from a
    file checked line by line against what made it (check_ranking_line)."""
    path = run / f"proponents-{method}.jsonl"
    if not path.exists():
        raise ts.TrackStarError(f"{path} is missing: run query.py for method {method!r} first")
    props, opps, first, seen = {}, {}, None, {}
    for where, row in ts.jsonl_records(path):
        if not isinstance(row, dict) or "query_id" not in row or not isinstance(row.get("proponents"), list):
            raise ts.TrackStarError(f"{where}: expected {{\"query_id\", \"proponents\": [...]}}")
        first = first or (where, row.get("made_by"))
        check_ranking_line(where, row, first, k)
        qid = ts.nfc(str(row["query_id"]))
        if qid in seen:
            raise ts.TrackStarError(f"{where}: query {qid!r} ranked a second time (first at {seen[qid]}): "
                                    "two outputs in one file?")
        seen[qid] = where
        props[qid] = row["proponents"]
        opps[qid] = row.get("opponents", [])
    if len(props) != n_queries:
        raise ts.TrackStarError(f"{path} ranks {len(props)} queries, the queries file has {n_queries}")
    return props, opps


def check_ranking_line(where: str, row: dict, first: tuple[str, Any], k: int) -> None:
    """A line of a proponents file must say what made it, the same as its file's first line, be written
    with at least --k proponents; list proponents by descending score and opponents by ascending
    score, each document once."""
    made = row.get("made_by")
    if not isinstance(made, dict) or made.get("kind") != "proponents":
        raise ts.TrackStarError(f"{where}: no 'made_by' saying what wrote it (an older or hand-made file?); "
                                "rerun query.py")
    if made != first[1]:
        raise ts.TrackStarError(f"{where}: made by {made}, {first[0]} by {first[1]}: two outputs in one file?")
    if not isinstance(made.get("k"), int) or made["k"] < k:
        raise ts.TrackStarError(f"{where}: written with --k {made.get('k')}, fewer than --k {k}; rerun query.py "
                                f"with --k {k}, or evaluate with --k {made.get('k')}")
    for key, sign in (("proponents", 1), ("opponents", -1)):
        docs = row.get(key) or []
        if not all(isinstance(p, dict) and isinstance(p.get("score"), int | float) for p in docs):
            raise ts.TrackStarError(f"{where}: every one of its {key} needs an 'id' and a numeric 'score'")
        scores = [sign * p["score"] for p in docs]
        if any(a < b for a, b in zip(scores, scores[1:], strict=False)):
            order = "descending" if sign == 1 else "ascending"
            raise ts.TrackStarError(f"{where}: {key} are not in {order} score order ({[p['score'] for p in docs]})")
        ids = [ts.nfc(str(p.get("id"))) for p in docs]
        if len(set(ids)) != len(ids):
            twice = next(i for i in ids if ids.count(i) > 1)
            raise ts.TrackStarError(f"{where}: {key} name document {twice!r} more than once")


def truth_rankings(corpus: list[dict], queries: list[dict], k: int) -> dict[str, list[dict]]:
    """The ground-truth "method": up to k documents stating each query's fact, in corpus order."""
    by_fact: dict[str, list[dict]] = {}
    for doc in corpus:
        for fact in doc.get("facts") or []:
            by_fact.setdefault(fact, []).append({"id": doc["id"], "score": 1.0, "text": doc["text"]})
    return {q["id"]: by_fact.get(q.get("fact"), [])[:k] for q in queries}


def all_rankings(run: Path, methods: list[str], docs: list[dict], queries: list[dict], n_all: int,
                 k: int) -> tuple[dict, dict]:
    """Proponents and opponents of every method; "truth" is built from the corpus, not read."""
    rankings, opponents = {}, {}
    for m in methods:
        if m == "truth":
            rankings[m], opponents[m] = truth_rankings(docs, queries, k), {}
        else:
            rankings[m], opponents[m] = read_rankings(run, m, n_all, k)
            check_ids(run / f"proponents-{m}.jsonl", rankings[m], opponents[m], docs, queries)
    return rankings, opponents


def check_ids(path: Path, props: dict, opps: dict, docs: list[dict], queries: list[dict]) -> None:
    """Every evaluated query must be ranked, and every document named must exist in the corpus given."""
    missing = [q["id"] for q in queries if q["id"] not in props]
    if missing:
        raise ts.TrackStarError(f"{path} does not rank query {missing[0]!r} of the queries file: same files?")
    doc_ids = {d["id"] for d in docs}
    for ranked in (*props.values(), *opps.values()):
        for p in ranked:
            if not isinstance(p, dict) or p.get("id") not in doc_ids:
                raise ts.TrackStarError(f"{path} names document {p!r:.80}, which the corpus lacks: same files?")


# ----------------------------------------------------------------------------------------------
# Scoring: does the model know each answer, attribution per query, tail-patch per (method, query).


def model_answers(model, tokenizer, queries: list[dict], max_length: int) -> list[bool]:
    """Does greedy decoding from the prompt reproduce the target's tokens (the model "knows" it)?"""
    return ts.greedy_answers(model, tokenizer, queries, max_length)


def attribution(rankings: dict, queries: list[dict], facts_of: dict[str, list[str]], k: int,
                scored: list[bool]) -> dict[str, list[float | None]]:
    """Per-query MRR and recall@k against the documents' ground-truth facts; None where a query has none."""
    mrr: list[float | None] = []
    rec: list[float | None] = []
    for q, s in zip(queries, scored, strict=True):
        if not s:
            mrr.append(None)
            rec.append(None)
            continue
        retrieved = [facts_of[p["id"]] for p in rankings[q["id"]][:k]]
        mrr.append(reciprocal_rank(retrieved, q["fact"]))
        rec.append(recall_at(retrieved, q["fact"], k))
    return {"mrr": mrr, "recall": rec}


def influence(step: Step, corpus_tok: dict, rankings: dict, all_queries: list[dict], queries: list[dict],
              k: int) -> dict[str, dict[str, list[float]]]:
    """Tail-patch Δp and Δlog p for every (method, query) of `all_queries`: the mean over its top-k
    proponents, measured for the queries in `queries` (a sample, or all), NaN for the others."""
    if not queries:  # --no-tail-patch
        nan = [float("nan")] * len(all_queries)
        return {method: {"dp": list(nan), "dlogp": list(nan)} for method in rankings}
    base = target_logprob(step.model, step.tokenizer, queries, step.max_length)
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
        dp, dlp = tail_patch(step, corpus_tok[doc_id], [queries[i] for i in qs], base[qs])
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


def influence_together(step: Step, corpus_tok: dict, rankings: dict, all_queries: list[dict],
                       queries: list[dict], k: int) -> dict[str, dict[str, list[float]]]:
    """A second influence measure: one step on a method's top-k proponents together (one minibatch of all k,
    as a training batch of them would be), the change in the query's own target; NaN for queries outside
    `queries`. Where the one-document step asks which document moves the prediction most, this asks whether
    the retrieved set as a whole does."""
    base = target_logprob(step.model, step.tokenizer, queries, step.max_length)
    out = {}
    for method, ranks in tqdm(rankings.items(), desc="tail-patch (top-k together)", unit="method"):
        measured_here = {}
        for i, q in enumerate(queries):
            docs = [corpus_tok[p["id"]] for p in ranks[q["id"]][:k]]
            if docs:
                (dp, dlp), = tail_patch_lrs(step, docs, [q], base[[i]], [step.lr])
                measured_here[q["id"]] = (float(dp[0]), float(dlp[0]))
        nan = (float("nan"), float("nan"))
        pairs = [measured_here.get(q["id"], nan) for q in all_queries]
        out[method] = {"dp_joint": [a for a, _ in pairs], "dlogp_joint": [b for _, b in pairs]}
    return out


def calibration_sample(queries: list[dict], scored: list[bool], tail_qs: list[dict], n: int) -> list[dict]:
    """A seeded sample of n queries with ground truth that are not tail-patched: the lr rule's own queries."""
    tailed = {q["id"] for q in tail_qs}
    pool = [q for q, s in zip(queries, scored, strict=True) if s and q["id"] not in tailed]
    if len(pool) < max(n, MIN_QUERIES):
        raise ts.TrackStarError(f"--calibrate-lr needs {max(n, MIN_QUERIES)} queries with ground truth outside the "
                                f"tail-patch sample, there are {len(pool)}: lower --tail-queries or "
                                "--calibration-queries")
    return random.Random(2).sample(pool, n)


LR_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
LR_RULE = ("the smallest learning rate of the grid at which a step on the fact-stating documents raises p(target) "
           "on the calibration queries (seeded, disjoint from the tail-patched ones) with its 95% bootstrap CI above "
           "zero; if none does, the largest, and the probe is reported invalid")


def calibrate_lr_rule(step: Step, corpus_tok: dict, truth: dict[str, list[dict]], queries: list[dict], k: int,
                 grid: tuple[float, ...] = LR_GRID) -> dict:
    """The tail-patch learning rate by LR_RULE, fixed before any method's row is looked at: only the ground-truth
    row, only on `queries` (none of them tail-patched later). Each document's gradient is taken once and
    stepped at every lr of the grid."""
    base = target_logprob(step.model, step.tokenizer, queries, step.max_length)
    need: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        for p in truth[q["id"]][:k]:
            need.setdefault(p["id"], []).append(i)
    effect: dict[tuple[str, int], list[float]] = {}
    for doc_id in tqdm(sorted(need), desc="calibrate lr", unit="doc"):
        qs = need[doc_id]
        changes = tail_patch_lrs(step, [corpus_tok[doc_id]], [queries[i] for i in qs], base[qs], list(grid))
        for j, i in enumerate(qs):
            effect[(doc_id, i)] = [float(dp[j]) for dp, _ in changes]
    per_lr = []
    for g, lr in enumerate(grid):
        values = [float(np.mean([effect[(p["id"], i)][g] for p in truth[q["id"]][:k]])) if truth[q["id"]] else None
                  for i, q in enumerate(queries)]
        d = paired_difference(values, None, [True] * len(queries))
        per_lr.append({"lr": lr, **d, "state": claim_state(d["ci"], d["n"]) if d["n"] else NOT_ESTABLISHED})
    valid = [r for r in per_lr if r["state"] == HOLDS]
    chosen = valid[0] if valid else per_lr[-1]
    return {"rule": LR_RULE, "grid": list(grid), "queries": [q["id"] for q in queries], "per_lr": per_lr,
            "lr": chosen["lr"], "valid": bool(valid)}


# ----------------------------------------------------------------------------------------------
# Evidence. A difference between two rows is a finding only with its uncertainty: the mean paired difference
# over the same queries (and, across runs, the same projection seeds), with a seeded bootstrap 95% CI that
# resamples queries. A claim of the paper holds when its CI lies entirely on the claimed side, is contradicted
# when it lies entirely on the other side, and is not established otherwise, or when a split holds fewer than
# MIN_QUERIES measured queries.

BOOTSTRAP = 4000  # resamples of the queries
BOOTSTRAP_SEED = 0
LEVEL = 0.95
MIN_QUERIES = 10  # fewer measured queries in a split decide nothing

HOLDS, CONTRADICTED, NOT_ESTABLISHED = "holds", "contradicted", "not established"

# Row pairs (a, b): the differences a − b that the ablation chain and the claims compare.
CHAIN = ("dot", "cosine", "optcorr", "train", "trackstar")  # each row adds one component to the one before
PAIRS = (*zip(CHAIN[1:], CHAIN[:-1], strict=True), ("eval", "optcorr"), ("eval", "train"), ("trackstar", "optcorr"),
         ("trackstar", "cosine"), ("trackstar", "trak"), ("trackstar", "eval"), ("trackstar", "bm25"),
         ("trackstar", "dense"), ("truth", "trackstar"), ("truth", "bm25"))

# The paper's findings: (claim, row a, row b, metric); each claims a > b (b None: a > 0, the probe's validity).
CLAIMS = (
    ("Tail-patch is a valid probe: a step on the fact-stating documents raises p(target)", "truth", None, "dp"),
    ("Unit normalisation raises MRR (cosine over dot product)", "cosine", "dot", "mrr"),
    ("Unit normalisation raises tail-patch (cosine over dot product)", "cosine", "dot", "dp"),
    ("The optimizer correction raises MRR", "optcorr", "cosine", "mrr"),
    ("The optimizer correction raises tail-patch", "optcorr", "cosine", "dp"),
    ("R_train raises MRR over the correction alone", "train", "optcorr", "mrr"),
    ("R_train raises tail-patch over the correction alone", "train", "optcorr", "dp"),
    ("The task-specific mix (TrackStar) raises MRR over R_train", "trackstar", "train", "mrr"),
    ("The task-specific mix (TrackStar) raises tail-patch over R_train", "trackstar", "train", "dp"),
    ("TrackStar beats gradient cosine on MRR", "trackstar", "cosine", "mrr"),
    ("TrackStar beats gradient cosine on tail-patch", "trackstar", "cosine", "dp"),
    ("TrackStar beats TRAK-like on MRR", "trackstar", "trak", "mrr"),
    ("TrackStar beats TRAK-like on tail-patch", "trackstar", "trak", "dp"),
    ("BM25 beats TrackStar on MRR", "bm25", "trackstar", "mrr"),
    ("BM25 beats TrackStar on recall@10", "bm25", "trackstar", "recall"),
    ("TrackStar's proponents raise p(target) more than BM25's", "trackstar", "bm25", "dp"),
)


def bootstrap_ci(d: np.ndarray, n_boot: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED,
                 level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `d` (queries × seeds: each resample draws whole queries, so a
    query's seeds stay together and the CI reflects the queries' spread, not only the projection's)."""
    d = np.asarray(d, dtype=np.float64).reshape(len(d), -1)
    rng = np.random.default_rng(seed)
    means = d.mean(axis=1)[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def claim_state(ci: tuple[float, float], n: int) -> str:
    """Three states, decided by the CI of (claimed larger − claimed smaller), never by the means alone."""
    if n < MIN_QUERIES:
        return NOT_ESTABLISHED
    return HOLDS if ci[0] > 0 else CONTRADICTED if ci[1] < 0 else NOT_ESTABLISHED


def measured(values: list) -> np.ndarray:
    """Per-query values as floats (queries × seeds), "not measured" (None) as NaN."""
    return np.array([[np.nan if v is None else v for v in np.atleast_1d(x)] for x in values], dtype=np.float64)


def paired_difference(a: list, b: list | None, mask: list[bool]) -> dict:
    """Mean of a − b (b None: of a) over the masked queries measured in both, its bootstrap CI, and n."""
    x = measured(a)
    d = x - measured(b) if b is not None else x
    keep = np.array(mask, dtype=bool) & ~np.isnan(d).any(axis=1)
    d = d[keep]
    if len(d) == 0:
        return {"n": 0, "diff": None, "ci": None}
    ci = bootstrap_ci(d) if len(d) > 1 else (float(d.mean()), float(d.mean()))
    return {"n": int(len(d)), "diff": float(d.mean()), "ci": list(ci)}


def comparisons(per_query: dict, split_masks: list[tuple[str, list[bool]]]) -> list[dict]:
    """Every PAIRS difference whose rows were run, for each metric and split."""
    out = []
    for a, b in PAIRS:
        if a in per_query and b in per_query:
            for key in metrics_of(per_query):
                for title, mask in split_masks:
                    out.append({"a": a, "b": b, "metric": key, "split": title,
                                **paired_difference(per_query[a][key], per_query[b][key], mask)})
    return out


def claims(per_query: dict, split_masks: list[tuple[str, list[bool]]], attributed: bool) -> list[dict]:
    """The paper's claims that this run's rows can test, each in every split, with its state."""
    out = []
    twins = [(f"{text} (top-k together)", a, b, "dp_joint") for text, a, b, key in CLAIMS if key == "dp"]
    for text, a, b, key in (*CLAIMS, *(twins if "dp_joint" in metrics_of(per_query) else ())):
        if a not in per_query or (b is not None and b not in per_query) or (key in ("mrr", "recall") and
                                                                             not attributed):
            continue
        for title, mask in split_masks:
            d = paired_difference(per_query[a][key], per_query[b][key] if b else None, mask)
            out.append({"claim": text, "a": a, "b": b, "metric": key, "split": title, **d,
                        "state": claim_state(d["ci"], d["n"]) if d["n"] else NOT_ESTABLISHED})
    return out


def evidence(per_query: dict, model_correct: list[bool], attributed: bool) -> dict:
    """results.json's paired differences and claim states (per_query values: one per query, or a list per
    query with one value per seed)."""
    split_masks = splits(model_correct)
    return {"bootstrap": {"resamples": BOOTSTRAP, "seed": BOOTSTRAP_SEED, "level": LEVEL,
                          "min_queries": MIN_QUERIES, "unit": "query"},
            "comparisons": comparisons(per_query, split_masks),
            "claims": claims(per_query, split_masks, attributed)}


# ----------------------------------------------------------------------------------------------
# The paper authors' viewer (PAIR-code/pretraining-tda, demo/) reads one JSONL of retrievals per method:
# a record per query, the proponents' texts, ids and scores as parallel lists, and `proponent_correct`
# where there is ground truth, from which it computes recall@10, precision@10 and MRR (`mrr_first`).
# Opponents are left out: the viewer does not show them (they stay in proponents-<method>.jsonl).


def viewer_record(q: dict, proponents: list[dict], texts: dict[str, str], facts_of: dict[str, list[str]],
                  scored: bool) -> dict:
    """One query's record in the viewer's schema: `example_id` is the query id; `proponent_correct` (does each
    proponent state the query's fact) only for a query with ground truth; `fact` and `relation` when it has them."""
    record = {"example_id": q["id"], "inputs_plaintext": q["prompt"], "targets_plaintext": q["target"],
              "proponents": [texts[p["id"]] for p in proponents], "proponent_ids": [p["id"] for p in proponents],
              "proponent_scores": [float(p["score"]) for p in proponents]}
    if scored:
        record["proponent_correct"] = [q["fact"] in facts_of[p["id"]] for p in proponents]
    record.update({key: q[key] for key in ("fact", "relation") if q.get(key) is not None})
    return record


def export_viewer(out: Path, rankings: dict, queries: list[dict], docs: list[dict], scored: list[bool],
                  k: int) -> list[Path]:
    """out/<method>.jsonl for every retrieval method (not the ground-truth row), each query's top k: the
    proponents evaluate.py's MRR and recall@k were computed on."""
    out.mkdir(parents=True, exist_ok=True)
    texts = {d["id"]: d["text"] for d in docs}
    facts_of = {d["id"]: d.get("facts") or [] for d in docs}
    written = []
    for method, ranks in rankings.items():
        if method != "truth":
            ts.write_jsonl(out / f"{method}.jsonl", (viewer_record(q, ranks[q["id"]][:k], texts, facts_of, s)
                                                      for q, s in zip(queries, scored, strict=True)))
            written.append(out / f"{method}.jsonl")
    return written


def jsonable(x: Any) -> Any:
    """`x` with every NaN / inf replaced by None: results.json is strict JSON, "not measured" is null."""
    if isinstance(x, dict):
        return {key: jsonable(v) for key, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


@app.command()
def main(
    run: Path = typer.Option(..., help="Run directory holding proponents-<method>.jsonl."),
    model: str = typer.Option(..., help="The model directory (for tail-patch and the model's own answers)."),
    corpus: Path = typer.Option(..., help="Corpus JSONL (ground-truth `facts` optional)."),
    queries: Path = typer.Option(..., help="Queries JSONL (`fact` optional: without it no MRR / recall)."),
    methods: str = typer.Option("bm25,dense,dot,cosine,trak,optcorr,train,eval,trackstar", help="Comma-separated."),
    optimizer_state: str | None = typer.Option(None, help="V for the tail-patch step (default MODEL/optimizer.pt)."),
    no_correction: bool = typer.Option(False, help="Tail-patch with plain SGD steps."),
    lr: float | None = typer.Option(None, help="Tail-patch learning rate (default: the optimizer's final lr)."),
    eps: float | None = typer.Option(None, help="eps in sqrt(V + eps) (default as encode.py)."),
    k: int = typer.Option(10, help="Proponents per query for metrics and tail-patch."),
    max_queries: int = typer.Option(0, help="Evaluate a seeded sample of this many queries (0: all)."),
    tail_queries: int = typer.Option(0, help="Tail-patch a seeded sample of this many queries (0: all); "
                                     "MRR/recall still use every query. Costs a training step per document."),
    tail_patch_on: bool = typer.Option(True, "--tail-patch/--no-tail-patch", help="--no-tail-patch: attribution "
                                       "only (MRR, recall), no training steps; tail-patch values are null."),
    calibrate_lr: bool = typer.Option(False, "--calibrate-lr", help="Choose the tail-patch lr by a rule fixed in "
                                      f"advance (instead of --lr): {LR_RULE}. Grid: {', '.join(map(str, LR_GRID))}."),
    calibration_queries: int = typer.Option(20, help="Queries (with ground truth, outside the tail-patch sample) "
                                            "that --calibrate-lr uses."),
    together: bool = typer.Option(False, "--together", help="Also tail-patch each method's top-k proponents "
                                  "together (one step on all k): a second influence measure (dp_joint, dlogp_joint)."),
    export_viewer_dir: Path | None = typer.Option(None, "--export-viewer", help="Also write DIR/<method>.jsonl "
                                                  "in the schema of the paper authors' viewer (docs/files.md)."),
    device: str = typer.Option("auto"),
) -> None:
    if calibrate_lr and lr is not None:
        raise ts.TrackStarError("give --lr or --calibrate-lr, not both")
    if not tail_patch_on and (calibrate_lr or together or tail_queries):
        raise ts.TrackStarError("--no-tail-patch takes no --tail-queries, --calibrate-lr or --together")
    if max_queries < 0 or tail_queries < 0 or k < 1:
        raise ts.TrackStarError(f"--k must be >= 1 and --max-queries, --tail-queries >= 0 (got {k}, {max_queries}, "
                                f"{tail_queries})")
    named = [m for m in methods.split(",") if m.strip()]
    if not named:  # before anything is read or an earlier table replaced
        raise ts.TrackStarError(f"--methods {methods!r} names no method; give a comma-separated list such as "
                                "bm25,cosine,trackstar")
    ts.check_writable(run / "results.json", "--run")  # before minutes of tail-patch steps, not after
    ts.remove_stale_temporaries(run)
    if export_viewer_dir is not None:
        ts.check_writable(export_viewer_dir / "trackstar.jsonl", "--export-viewer")
    docs = ts.read_jsonl(corpus, "corpus")
    qs = ts.read_jsonl(queries, "queries")
    encoded = check_inputs(run, corpus, queries)
    device = ts.pick_device(device)
    n_all = len(qs)  # query.py ranked every query of the file
    if max_queries and max_queries < len(qs):
        qs = [qs[i] for i in sorted(random.Random(0).sample(range(len(qs)), max_queries))]  # in file order
    scored = scored_queries(docs, qs)
    method_list = [m for m in named if m != "truth"]
    if any(scored):  # the documents stating each fact: an upper reference for tail-patch
        method_list.append("truth")
    rankings, opponents = all_rankings(run, method_list, docs, qs, n_all, k)
    facts_of = {d["id"]: d.get("facts") or [] for d in docs}
    unstated = unstated_facts(qs, scored, facts_of)
    # with --calibrate-lr the step's lr is chosen below; the grid's first stands in until then
    step = load_step(model, optimizer_state, no_correction, LR_GRID[0] if calibrate_lr else lr, eps, device,
                     encoded.model if encoded else None)
    tokenized, _ = ts.tokenize_rows(step.tokenizer, docs, "corpus", step.max_length)
    corpus_tok = {d["id"]: t for d, t in zip(docs, tokenized, strict=True)}

    correct = model_answers(step.model, step.tokenizer, qs, step.max_length)
    per_query = {m: attribution(rankings[m], qs, facts_of, k, scored) for m in method_list}
    tail_qs = [qs[i] for i in sorted(random.Random(1).sample(range(len(qs)), tail_queries))] \
        if 0 < tail_queries < len(qs) else qs if tail_patch_on else []
    calibration = None
    if calibrate_lr:
        calib_qs = calibration_sample(qs, scored, tail_qs, calibration_queries)
        calibration = calibrate_lr_rule(step, corpus_tok, rankings["truth"], calib_qs, k)
        step = dataclasses.replace(step, lr=calibration["lr"])
        typer.echo(f"tail-patch lr {step.lr:g} by the calibration rule"
                   + ("" if calibration["valid"] else " (no lr of the grid makes the probe valid)"))
    infl = influence(step, corpus_tok, rankings, qs, tail_qs, k)
    if together:
        joint = influence_together(step, corpus_tok, rankings, qs, tail_qs, k)
        for m in method_list:
            infl[m].update(joint[m])
    docs_by_id = {d["id"]: d for d in docs}
    for m in method_list:
        per_query[m].update(infl[m])
        per_query[m]["categories"] = proponent_categories(rankings[m], qs, docs_by_id, k)
    results = jsonable({
        "settings": {"run": str(run), "model": model, "n_docs": len(docs), "n_queries": len(qs), "k": k,
                     "lr": step.lr, "v_source": step.source, "eps": step.eps, "methods": method_list,
                     "betas": list(step.betas) if step.v is not None else None,
                     "step": "lr·(1−β1)·g/sqrt(β2·v + (1−β2)·g² + eps)" if step.v is not None else "lr·g (SGD: no V)",
                     "tail_patch_queries": len(tail_qs), "attribution_queries": sum(scored),
                     "unstated_fact_queries": unstated,
                     "lr_source": "calibrated" if calibrate_lr else "given" if lr is not None else "optimizer state"},
        "queries": [q["id"] for q in qs], "model_correct": correct, "per_query": per_query,
        "summary": {m: {key: summarize(per_query[m][key], [True] * len(qs))[0] for key in metrics_of(per_query)}
                    for m in method_list},
        "calibration": calibration,
        "categories": category_summary({m: per_query[m]["categories"] for m in method_list}, scored, splits(correct)),
        **evidence(per_query, correct, any(scored)),
    })
    ts.write_json(run / "results.json", results)
    if export_viewer_dir is not None:
        written = export_viewer(export_viewer_dir, rankings, qs, docs, scored, k)
        typer.echo(f"wrote {len(written)} viewer files into {export_viewer_dir}")
    typer.echo(f"wrote {run / 'results.json'}; render it with: python report.py --run {run} --corpus {corpus} "
               f"--queries {queries}")


if __name__ == "__main__":
    ts.run_cli(app)
