"""Sweep: how attribution (MRR, recall@10) and influence (tail-patch) move with the settings that the
paper fixes by fiat — the projection dimension d, the number of corpus vectors behind R_train, the
damping of R, and the mixing weight λ. The evidence for every default, as tables and figures.

    python -m experiments.sweep --run RUN --model DIR --corpus corpus.jsonl --queries queries.jsonl [--tail-queries 40]

Reads the encoded RUN/corpus and RUN/queries (encoded once, with --also-uncorrected) and writes
RUN/sweep/sweep.json, sweep.md and one figure per axis (sweep-<axis>.png). Nothing is re-encoded:

- d. The Kronecker projection of a module's gradient is P_outᵀ ∇W P_in, an s_out × s_in block, summed
  over modules. Keeping the top-left s_out' × s_in' corner of every stored vector is exactly the
  projection with the first s_out' columns of P_out and s_in' of P_in: a d' = s_out'·s_in' Gaussian
  projection of the same gradients (its scale differs by a constant, which unit norm and the relative
  damping remove). So each smaller d is read off the stored vectors.
- R_train sample size, damping, λ: the Hessian is refitted from the stored vectors with index.py's
  own functions (`second_moment_matrix`, `hessian_from_moments`).
- R_eval's sample (axis `reval`): the queries split in two seeded halves A and B; R_eval fitted on B itself
  (the pipeline's in-sample way: the queries it then scores), or on A alone (held out), both scored on B.

Every point keeps its per-query values, and is compared with its axis's reference (the optimizer-corrected
cosine row without R at the same d, or λ = 0 on the λ axis) by evaluate.py's paired bootstrap: a gain or a
loss is a finding only when its 95% CI excludes 0.

Scores are computed in float32 in memory (the pipeline's index stores float16: rankings can differ in
the last ties). Tail-patch uses evaluate.py's rule on a seeded sample of queries; the effect of a
step on one document is measured once for every sampled query and reused by every setting that
retrieves it.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import typer
from tqdm import tqdm

import evaluate
import index
import trackstar as ts

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of the sweep: which vectors, which R, and how it is estimated."""

    row: str  # the ablation row it belongs to (a label in the figures)
    dim: int
    hessian: str = "mixed"  # none | train | eval | mixed
    corrected: bool = True
    n_train: int = 0  # corpus vectors behind R_train (0: all)
    damping: str = "1e-3"
    lam: str = "auto"
    eval_fit: str = "all"  # which queries R_eval is fitted on: all, or (axis reval) "same half" / "other half"


def subgrid(x: np.ndarray, dim: int, new_dim: int) -> np.ndarray:
    """The d'-dimensional projection contained in d-dimensional Kronecker-projected vectors (see above)."""
    s_out, s_in = ts.factor_dims(dim)
    a, b = ts.factor_dims(new_dim)
    if a > s_out or b > s_in:
        raise ts.TrackStarError(f"d' = {new_dim} ({a} x {b}) is not contained in d = {dim} ({s_out} x {s_in})")
    return np.ascontiguousarray(x.reshape(len(x), s_out, s_in)[:, :a, :b].reshape(len(x), a * b))


def run_vectors(run: Path, dataset: str) -> np.ndarray:
    """All vectors of an encoded run, in input row order."""
    ids, x = ts.read_vectors(run, dataset)
    return x[np.argsort(ids, kind="stable")]


def halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two seeded, disjoint halves A and B of the queries (row numbers, sorted)."""
    perm = np.random.default_rng(seed + 2).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])


def transforms(s: Setting, X: np.ndarray, Q: np.ndarray, seed: int) -> tuple[np.ndarray | None, dict]:
    """R^(-1/2) for a setting (None: identity), and what was fitted (λ, shrinkage, n)."""
    if s.hessian == "none":
        return None, {}
    n = len(X) if s.n_train in (0, None) or s.n_train >= len(X) else s.n_train
    rows = np.sort(np.random.default_rng(seed).choice(len(X), size=n, replace=False))
    train = index.second_moment_matrix([X[rows]])
    a, b = halves(len(Q), seed)
    fit_rows = {"all": slice(None), "same half": b, "other half": a}[s.eval_fit]
    R_eval, n_eval, _ = index.second_moment_matrix([Q[fit_rows]])
    fit = index.hessian_from_moments(train, R_eval, n_eval, index.HessianOptions(s.hessian, s.lam, damping=s.damping))
    return fit.inverse_sqrt, {"lam": fit.lam, "shrinkage": fit.shrinkage, "n_train": n, "k": fit.k}


def top_k(X: np.ndarray, Q: np.ndarray, M: np.ndarray | None, k: int) -> np.ndarray:
    """(Q, k) corpus rows with the highest unit-normalised scores."""
    x, q = torch.from_numpy(X), torch.from_numpy(Q)
    if M is not None:
        m = torch.from_numpy(M.astype(np.float32))
        x, q = x @ m, q @ m
    scores = ts.unit_normalize(q) @ ts.unit_normalize(x).T
    return torch.topk(scores, k, dim=1).indices.numpy()


def measure(top: np.ndarray, queries: list[dict], facts_of: list[list[str]], sample: list[int],
            effect: Callable[[int], tuple[np.ndarray, np.ndarray]], scored: np.ndarray) -> dict:
    """MRR and recall@k over the `scored` queries (a boolean mask), tail-patch over the sampled ones among them:
    means (± s.e.) and the per-query values (None where a query is not measured), in query order."""
    per_query: dict[str, list] = {key: [None] * len(queries) for key in evaluate.METRICS}
    position = {j: si for si, j in enumerate(sample)}
    for j, q in enumerate(queries):
        if not scored[j]:
            continue
        retrieved = [facts_of[i] for i in top[j]]
        per_query["mrr"][j] = evaluate.reciprocal_rank(retrieved, q["fact"])
        per_query["recall"][j] = evaluate.recall_at(retrieved, q["fact"], top.shape[1])
        if j in position:
            effects = [effect(int(i)) for i in top[j]]
            per_query["dp"][j] = float(np.mean([e[0][position[j]] for e in effects]))
            per_query["dlogp"][j] = float(np.mean([e[1][position[j]] for e in effects]))
    means = {}
    for key, values in per_query.items():
        mean, se = evaluate.summarize(values, [True] * len(values))
        means[key], means[f"{key}_se"] = mean, se
    return {**means, "per_query": per_query}


def reference(axis: str, s: Setting) -> Setting:
    """What a point of `axis` is compared with: the corrected cosine without R at the same d (λ axis: λ = 0)."""
    if axis == "lambda":
        return dataclasses.replace(s, lam="0")
    return Setting("+ optimizer correction", s.dim, "none", eval_fit=s.eval_fit)


def differences(p: dict, ref: dict) -> dict:
    """A point's paired differences from its reference (MRR and tail-patch Δp), each with its state."""
    out = {}
    for key in ("mrr", "dp"):
        d = evaluate.paired_difference(p["per_query"][key], ref["per_query"][key], [True] * len(p["per_query"][key]))
        out[key] = {**d, "state": evaluate.claim_state(d["ci"], d["n"]) if d["n"] else evaluate.NOT_ESTABLISHED}
    return out


def axes(dim: int, n_docs: int, default_damping: str) -> dict[str, list[tuple[str, Setting]]]:
    """The four axes: (x value as text, setting) per point."""
    dims = [d for d in (dim // 8, dim // 4, dim // 2, dim) if d >= 16]
    out: dict[str, list[tuple[str, Setting]]] = {"d": []}
    for d in dims:
        out["d"] += [(str(d), Setting("gradient cosine", d, "none", corrected=False)),
                     (str(d), Setting("+ optimizer correction", d, "none")),
                     (str(d), Setting("+ R_train", d, "train", damping=default_damping)),
                     (str(d), Setting("TrackStar", d, "mixed", damping=default_damping))]
    sizes = sorted({n for n in (dim // 2, dim, 2 * dim, 4 * dim, 8 * dim, n_docs) if n <= n_docs})
    out["n_train"] = [(str(n), Setting(f"{row} (damping {damp})", dim, hess, n_train=n, damping=damp))
                      for n in sizes for row, hess in (("+ R_train", "train"), ("TrackStar", "mixed"))
                      for damp in ("1e-3", "auto")]
    out["damping"] = [(damp, Setting(row, dim, hess, damping=damp))
                      for damp in ("1e-4", "1e-3", "1e-2", "1e-1", "1", "auto")
                      for row, hess in (("+ R_train", "train"), ("TrackStar", "mixed"))]
    out["lambda"] = [(lam, Setting("TrackStar", dim, "mixed", lam=lam, damping=default_damping))
                     for lam in ("0", "0.5", "0.9", "0.99", "1", "auto")]
    out["reval"] = [(fit, Setting(row, dim, hess, damping=default_damping, eval_fit=fit))
                    for fit in ("same half", "other half")
                    for row, hess in (("+ R_eval", "eval"), ("TrackStar", "mixed"))]
    return out


def plot(path: Path, axis: str, points: list[dict]) -> None:
    """One figure per axis: MRR, recall@10 and tail-patch Δp (± s.e.) against the axis, a line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, panels = plt.subplots(1, 3, figsize=(14, 4))
    rows = list(dict.fromkeys(p["row"] for p in points))
    for row in rows:
        mine = [p for p in points if p["row"] == row and p["x"] != "auto"]
        auto = [p for p in points if p["row"] == row and p["x"] == "auto"]
        xs = [float(p["x"]) for p in mine]
        for ax, key in zip(panels, ("mrr", "recall", "dp"), strict=True):
            ys = [p[key] * (1e3 if key == "dp" else 1) for p in mine]
            err = [p["dp_se"] * 1e3 for p in mine] if key == "dp" else None
            line = ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=row)
            for p in auto:  # auto is a rule, not a value: its chosen λ, or a dashed level for damping
                y = p[key] * (1e3 if key == "dp" else 1)
                if axis == "lambda":
                    ax.plot([p["fitted"]["lam"]], [y], "*", ms=14, color=line[0].get_color(), label="λ auto")
                else:
                    ax.axhline(y, ls="--", color=line[0].get_color(), lw=1, label=f"{row}: auto")
    for ax, title in zip(panels, ("MRR", "recall@10", "tail-patch Δp (×1e-3)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel({"d": "projection dimension d", "n_train": "corpus vectors behind R_train",
                       "damping": "damping (relative to the mean eigenvalue)", "lambda": "λ"}[axis])
        if axis in ("d", "n_train", "damping"):
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    panels[0].legend(fontsize=7)
    fig.tight_layout()
    with ts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def markdown(results: dict) -> str:
    import report

    lines = ["# Sweep", "", f"{results['n_docs']} documents, {results['n_queries']} queries (MRR, recall@10), "
             f"tail-patch on a seeded {results['tail_queries']} of them; run d = {results['dim']}. The last two "
             "columns: the paired difference from the axis's reference (the corrected cosine without R at the same d; "
             "λ = 0 on the λ axis; the reval axis scores half B of the queries) with its 95% bootstrap CI.", ""]
    for axis, points in results["axes"].items():
        lines += [f"## {axis}", "", f"| {axis} | row | MRR | recall@10 | tail-patch Δp (×1e-3) | Δlog p | fitted | "
                  "MRR − reference | Δp − reference |", "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
        for p in points:
            fitted = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in p["fitted"].items())
            vs = p.get("vs_reference", {})
            diffs = [f"{report.fmt_interval(k, vs[k])} {report.STATE_MARK[vs[k]['state']]}" if k in vs else "–"
                     for k in ("mrr", "dp")]
            lines.append(f"| {p['x']} | {p['row']} | {p['mrr']:.3f} | {p['recall']:.3f} | "
                         f"{p['dp'] * 1e3:.2f} ± {p['dp_se'] * 1e3:.2f} | {p['dlogp']:.3f} ± {p['dlogp_se']:.3f} | "
                         f"{fitted} | {diffs[0]} | {diffs[1]} |")
        lines.append("")
        for p in points:
            if "vs_in_sample" in p:
                vs = p["vs_in_sample"]
                lines.append(f"- {p['row']}, R_eval held out − fitted on the scored queries themselves: MRR "
                             + "; Δp ".join(f"{report.fmt_interval(k, vs[k])} ({report.STATE_MARK[vs[k]['state']]})"
                                            for k in ("mrr", "dp")))
        lines.append("")
    return "\n".join(lines)


@app.command()
def main(
    run: Path = typer.Option(..., help="Run directory with corpus/ and queries/ encoded (--also-uncorrected)."),
    model: str = typer.Option(..., help="The model directory (for tail-patch)."),
    corpus: Path = typer.Option(..., help="Corpus JSONL (with `facts`)."),
    queries: Path = typer.Option(..., help="Queries JSONL (with `fact`)."),
    optimizer_state: str | None = typer.Option(None, help="V for the tail-patch step (default MODEL/optimizer.pt)."),
    lr: float | None = typer.Option(None, help="Tail-patch learning rate (default: the optimizer's final lr)."),
    damping: str = typer.Option("auto", help="Damping of the rows on the d and λ axes (index.py's --damping)."),
    tail_queries: int = typer.Option(40, help="Queries sampled (seeded) for tail-patch at every point."),
    k: int = typer.Option(10, help="Proponents per query."),
    seed: int = typer.Option(0, help="Seed of the R_train samples and the tail-patch query sample."),
    only: str = typer.Option("d,n_train,damping,lambda,reval", "--axes", help="The axes to sweep (comma-separated)."),
) -> None:
    damping = index.parse_damping(damping)
    meta = ts.read_meta(run / "corpus")
    docs, qs = ts.read_jsonl(corpus, "corpus"), ts.read_jsonl(queries, "queries")
    if any("fact" not in q for q in qs):
        raise ts.TrackStarError(f"{queries}: the sweep measures attribution, so every query needs a 'fact'")
    X_all = {c: run_vectors(run / "corpus", "vectors" if c else "vectors_uncorrected") for c in (True, False)}
    Q_all = {c: run_vectors(run / "queries", "vectors" if c else "vectors_uncorrected") for c in (True, False)}
    facts_of = [d.get("facts", []) for d in docs]

    step = evaluate.load_step(model, optimizer_state, False, lr, None)
    docs_tok, _ = ts.tokenize_rows(step.tokenizer, docs, "corpus", step.max_length)
    sample = sorted(random.Random(seed + 1).sample(range(len(qs)), min(tail_queries, len(qs))))
    tail_qs = [qs[j] for j in sample]
    base = evaluate.target_logprob(step.model, step.tokenizer, tail_qs, step.max_length)
    stepped: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # each document is stepped once, for every point

    def effect(doc: int) -> tuple[np.ndarray, np.ndarray]:
        """Δp, Δlog p of every sampled query after a step on `doc`."""
        if doc not in stepped:
            stepped[doc] = tuple(x.numpy() for x in evaluate.tail_patch(step, docs_tok[doc], tail_qs, base))
        return stepped[doc]

    results = {"dim": meta.dim, "n_docs": len(docs), "n_queries": len(qs), "tail_queries": len(sample),
               "lr": step.lr, "axes": {}}
    plan = {a: p for a, p in axes(meta.dim, len(docs), damping).items() if a in only.split(",")}
    total = sum(len(p) for p in plan.values())
    measured: dict[Setting, dict] = {}  # a setting measured once, whichever axes (and references) use it

    def point(s: Setting, x: str) -> dict:
        if s not in measured:
            X = subgrid(X_all[s.corrected], meta.dim, s.dim)
            Q = subgrid(Q_all[s.corrected], meta.dim, s.dim)
            M, fitted = transforms(s, X, Q, seed)
            scored = np.ones(len(qs), dtype=bool)
            if s.eval_fit != "all":  # the reval axis scores half B of the queries
                scored[:] = False
                scored[halves(len(qs), seed)[1]] = True
            measured[s] = {"row": s.row, "setting": dataclasses.asdict(s), "fitted": fitted,
                           **measure(top_k(X, Q, M, k), qs, facts_of, sample, effect, scored)}
        return {"x": x, **measured[s]}

    with tqdm(total=total, desc="sweep", unit="setting") as bar:
        for axis, points in plan.items():
            out = []
            for x, s in points:
                p = point(s, x)
                ref = reference(axis, s)
                if ref != s:
                    p["vs_reference"] = differences(p, point(ref, "reference"))
                if s.eval_fit == "other half":  # held out against in-sample, on the same half of the queries
                    p["vs_in_sample"] = differences(p, point(dataclasses.replace(s, eval_fit="same half"), x))
                out.append(p)
                bar.set_postfix(docs_stepped=len(stepped))
                bar.update()
            results["axes"][axis] = out
    with ts.atomic_directory(run / "sweep", tuple(f"sweep-{a}.png" for a in plan) + ("sweep.json", "sweep.md")) \
            as out_dir:  # all figures and tables, or the previous ones
        for axis, points in results["axes"].items():
            if axis != "reval":  # two categories, not a scale: its table says it all
                plot(out_dir / f"sweep-{axis}.png", axis, points)
        ts.write_json(out_dir / "sweep.json", evaluate.jsonable(results))
        (out_dir / "sweep.md").write_text(markdown(results), encoding="utf-8")
    typer.echo(f"wrote {run / 'sweep'}: {total} settings, {len(stepped)} documents stepped for tail-patch")


if __name__ == "__main__":
    ts.run_cli(app)
