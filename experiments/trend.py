"""The training-tokens trend: attribution (MRR) and influence (tail-patch Δp) of BM25, gradient cosine
and TrackStar at each checkpoint of one training run, against the training tokens it had seen.

    make trend                          # every checkpoint: encode → index → query → evaluate, then this
    python -m experiments.trend --run RUN --model DIR

The paper's headline: with more training tokens, influence (what moves the prediction) aligns more
closely with attribution (what states the fact). `make trend` evaluates each MODEL/checkpoints/step-N
(and the final model) into RUN/trend/step-N (RUN/trend/final) with that checkpoint's own optimizer
state, every point's tail-patch on the same queries and with the same learning rate (the final one),
so that Δp compares models, not step sizes. This script only gathers and draws: RUN/trend/trend.json, trend.md and
trend.png. Each point is checked: its results must come from that checkpoint, over the same corpus,
queries, tail-patch sample and learning rate as the others.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

import evaluate
import report
import trackstar as ts

app = typer.Typer(add_completion=False, rich_markup_mode=None)

METHODS = ("bm25", "cosine", "trackstar")
# Tail-patch also for the documents that state the fact: how much the attributed text itself moves the
# prediction at each checkpoint, the yardstick for the retrieved rows.
INFLUENCE = (*METHODS, "truth")
SAME = ("lr", "n_docs", "tail_patch_queries", "k")  # settings every point must share


def checkpoints(model: Path) -> list[Path]:
    """The intermediate checkpoints, in training order, then the final model."""
    found = sorted((model / "checkpoints").glob("step-*"))
    if not found:
        raise ts.TrackStarError(f"{model}/checkpoints holds no step-* checkpoint: prepare.py factworld "
                                "--checkpoints N saves them")
    return [*found, model]


def read_point(model: Path, results_dir: Path) -> dict:
    """One checkpoint's tokens and results, refusing results that were not made with that checkpoint."""
    info_path, results_path = model / "checkpoint.json", results_dir / "results.json"
    for p in (info_path, results_path):
        if not p.exists():
            raise ts.TrackStarError(f"{p} is missing" + (": run `make trend`" if p == results_path else ""))
    info = json.loads(info_path.read_text(encoding="utf-8"))
    results = json.loads(results_path.read_text(encoding="utf-8"))
    used = Path(results["settings"]["model"]).resolve()
    if used != model.resolve():
        raise ts.TrackStarError(f"{results_path} was evaluated with the model {used}, not the checkpoint {model}")
    return {"model": str(model), "run": str(results_dir), "step": info["step"], "tokens": info["tokens"],
            "results": results}


def check_comparable(points: list[dict]) -> None:
    """Every point over the same queries and corpus, with the same tail-patch sample and learning rate."""
    first = points[0]
    for p in points:
        if "truth" not in p["results"]["per_query"]:
            raise ts.TrackStarError(f"{p['run']} has no ground truth (queries' `fact`, documents' `facts`): "
                                    "the trend plots MRR and the fact-stating documents' tail-patch")
    for p in points[1:]:
        for key in SAME:
            a, b = first["results"]["settings"][key], p["results"]["settings"][key]
            if a != b:
                raise ts.TrackStarError(f"{key} differs between {first['run']} ({a}) and {p['run']} ({b}): "
                                        "the trend compares checkpoints under one setting")
        if p["results"]["queries"] != first["results"]["queries"]:
            raise ts.TrackStarError(f"{p['run']} and {first['run']} evaluated different queries")


# The differences each point is read by, (a, b, metric): does TrackStar beat cosine, does a step on the documents
# that state the fact move the prediction more than a step on TrackStar's proponents (attribution vs influence).
POINT_DIFFERENCES = (("trackstar", "cosine", "mrr"), ("trackstar", "cosine", "dp"), ("truth", "trackstar", "dp"))


def summary(points: list[dict]) -> list[dict]:
    """Per point: tokens, accuracy on the queries, mean ± s.e. of MRR and Δp per method, and the paired
    differences of POINT_DIFFERENCES with their CIs."""
    rows = []
    for p in points:
        r = p["results"]
        everything = [True] * len(r["queries"])
        row = {"step": p["step"], "tokens": p["tokens"], "run": p["run"], "label": p.get("label", str(p["step"])),
               "accuracy": sum(r["model_correct"]) / len(r["model_correct"])}
        for m, key in [(m, "mrr") for m in METHODS] + [(m, "dp") for m in INFLUENCE]:
            row[f"{m}_{key}"], row[f"{m}_{key}_se"] = evaluate.summarize(r["per_query"][m][key], everything)
        row["differences"] = [{"a": a, "b": b, "metric": key, **evaluate.paired_difference(
            r["per_query"][a][key], r["per_query"][b][key], everything)} for a, b, key in POINT_DIFFERENCES]
        rows.append(row)
    return rows


def across(points: list[dict]) -> list[dict]:
    """How the last point differs from the first, paired over the same queries: TrackStar's MRR and Δp, and the
    ground truth's lead over TrackStar in Δp (does influence come to align with attribution?)."""
    first, last = points[0]["results"]["per_query"], points[-1]["results"]["per_query"]
    everything = [True] * len(points[0]["results"]["queries"])
    out = []
    for what, a, b in (("TrackStar MRR", "trackstar", None), ("TrackStar Δp", "trackstar", None),
                       ("ground truth − TrackStar Δp", "truth", "trackstar")):
        key = "mrr" if "MRR" in what else "dp"
        lead = [[x, y] for x, y in zip(last[a][key], first[a][key], strict=True)]
        if b is not None:  # (a − b) at the last point minus (a − b) at the first
            lead = [[x - y if None not in (x, y) else None, u - v if None not in (u, v) else None]
                    for x, y, u, v in zip(last[a][key], last[b][key], first[a][key], first[b][key], strict=True)]
        d = evaluate.paired_difference([x for x, _ in lead], [y for _, y in lead], everything)
        out.append({"what": what, "metric": key, **d,
                    "state": evaluate.claim_state(d["ci"], d["n"]) if d["n"] else evaluate.NOT_ESTABLISHED})
    return out


def markdown(rows: list[dict], axis: str = "step") -> str:
    head = [axis, "training tokens", "queries answered"] + [f"MRR {m}" for m in METHODS] + \
           [f"Δp ×1e-3 {m}" for m in INFLUENCE] + \
           [f"{a} − {b} {'MRR' if key == 'mrr' else 'Δp'}" for a, b, key in POINT_DIFFERENCES]
    body = [[r["label"], f"{r['tokens']:,}", f"{r['accuracy']:.2f}"]
            + [f"{r[f'{m}_mrr']:.3f} ± {r[f'{m}_mrr_se']:.3f}" for m in METHODS]
            + [f"{1e3 * r[f'{m}_dp']:.2f} ± {1e3 * r[f'{m}_dp_se']:.2f}" for m in INFLUENCE]
            + [report.fmt_interval(d["metric"], d) for d in r["differences"]] for r in rows]
    return report.md_table(head, body)


def across_markdown(changes: list[dict], first: str, last: str) -> str:
    rows = [[c["what"], report.fmt_interval(c["metric"], c), report.STATE_MARK[c["state"]], str(c["n"])]
            for c in changes]
    return (f"From {first} to {last}, paired over the same queries (95% bootstrap CI; holds: the CI lies above 0):\n\n"
            + report.md_table(["change", "last − first [95% CI]", "rise", "queries"], rows))


def figure(rows: list[dict], x: list[float] | None = None, xlabel: str = "training tokens", log: bool = False
           ) -> bytes:
    """MRR, tail-patch Δp and the fraction of queries answered, against training tokens (or `x`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tokens = x if x is not None else [r["tokens"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = ((axes[0], "mrr", "MRR (attribution)", 1, METHODS),
              (axes[1], "dp", "tail-patch Δp ×1e-3 (influence)", 1e3, INFLUENCE))
    for ax, key, title, scale, methods in panels:
        for m in methods:
            ax.errorbar(tokens, [scale * r[f"{m}_{key}"] for r in rows], [scale * r[f"{m}_{key}_se"] for r in rows],
                        marker="o", capsize=3, color=report.method_colour(m), label=report.NAMES.get(m, m))
        ax.set_title(title)
    axes[1].axhline(0, color="#888", lw=0.8)
    axes[2].plot(tokens, [r["accuracy"] for r in rows], marker="o", color="#555")
    axes[2].set_title("queries the model answers")
    for ax in axes:
        ax.set_xlabel(xlabel)
        if log:
            ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter())  # 250k, not 250000
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)  # the ground-truth row appears here only
    fig.tight_layout()
    png = report.figure_png(fig)
    plt.close(fig)
    return png


@app.command(help=__doc__)
def main(
    run: Path = typer.Option(..., help="The run whose trend/ holds each checkpoint's run (step-N, final)."),
    model: Path = typer.Option(..., help="The final model's directory (its checkpoints/ are evaluated)."),
) -> None:
    models = checkpoints(model)
    points = [read_point(m, run / "trend" / m.name) for m in models[:-1]] + [read_point(model, run / "trend" / "final")]
    check_comparable(points)
    rows, changes = summary(points), across(points)
    out = run / "trend"
    out.mkdir(parents=True, exist_ok=True)
    ts.write_json(out / "trend.json", evaluate.jsonable({"rows": rows, "across": changes,
                                                         "provenance": ts.provenance()}))
    md = markdown(rows) + "\n\n" + across_markdown(changes, f"step {rows[0]['step']}", "the final model")
    with ts.atomic_path(out / "trend.md") as tmp:
        tmp.write_text(f"Training-tokens trend ({len(rows)} checkpoints; tail-patch at lr "
                       f"{points[0]['results']['settings']['lr']:.3g} for all)\n\n{md}\n", encoding="utf-8")
    with ts.atomic_path(out / "trend.png") as tmp:
        tmp.write_bytes(figure(rows))
    print(md)
    print(f"wrote {out}/trend.md, trend.json, trend.png")


if __name__ == "__main__":
    ts.run_cli(app)
