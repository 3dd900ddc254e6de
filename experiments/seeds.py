"""Seeds: how much of the ablation table is the random projection. The same world, model and queries encoded
with several projection seeds (P drawn anew each time), each run through index, query and evaluate; then one
table of mean ± s.d. over seeds per row, and the paper's claims decided over queries × seeds.

    make seeds [SEEDS="0 1 2"] [SEEDS_TAIL_QUERIES=40]      # each seed's run in RUN/seeds/pN, then this
    python -m experiments.seeds --run RUN --seed 0 --seed 1 --seed 2

Each run must share the model, the corpus, the queries, the tail-patch sample and learning rate, and differ in
the projection seed alone (read from each run's corpus encoding). The claims use evaluate.py's paired bootstrap
with each query's values over seeds kept together: a resample draws whole queries, so the interval reflects
the spread over queries and over draws of P. Writes RUN/seeds/seeds.json and seeds.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

import evaluate
import report
import trackstar as ts

app = typer.Typer(add_completion=False, rich_markup_mode=None)

SAME = ("model", "n_docs", "n_queries", "k", "lr", "tail_patch_queries", "v_source", "eps")  # every seed's run


def read_seed_run(run: Path) -> dict:
    """One seed's results.json and the projection seed its corpus was encoded with."""
    path = run / "results.json"
    if not path.exists():
        raise ts.TrackStarError(f"{path} is missing: run `make seeds`")
    return {"run": str(run), "seed": ts.read_meta(run / "corpus").seed,
            "results": json.loads(path.read_text(encoding="utf-8"))}


def check_comparable(points: list[dict]) -> None:
    """The runs differ in the projection seed and nothing else that the table depends on."""
    seeds = [p["seed"] for p in points]
    if len(set(seeds)) != len(seeds):
        raise ts.TrackStarError(f"the runs share a projection seed ({seeds}): each seed must be encoded once")
    first = points[0]["results"]
    for p in points[1:]:
        r = p["results"]
        for key in SAME:
            if r["settings"][key] != first["settings"][key]:
                raise ts.TrackStarError(f"{key} differs between {points[0]['run']} ({first['settings'][key]}) and "
                                        f"{p['run']} ({r['settings'][key]}): seeds compare one setting")
        if r["queries"] != first["queries"] or r["model_correct"] != first["model_correct"]:
            raise ts.TrackStarError(f"{p['run']} and {points[0]['run']} evaluated different queries or models")


def combined(points: list[dict]) -> dict:
    """per_query with one value per seed: per_query[method][metric][query] = [seed 0's, seed 1's, ...], for the
    methods every run has."""
    methods = [m for m in points[0]["results"]["settings"]["methods"]
               if all(m in p["results"]["per_query"] for p in points)]
    return {m: {key: [list(v) for v in zip(*(p["results"]["per_query"][m][key] for p in points), strict=True)]
                for key in evaluate.METRICS} for m in methods}


def seed_table(points: list[dict], methods: list[str]) -> list[dict]:
    """Per method and metric: each seed's mean over queries, and their mean and standard deviation over seeds."""
    rows = []
    everything = [True] * len(points[0]["results"]["queries"])
    for m in methods:
        row = {"method": m}
        for key in evaluate.METRICS:
            means = [evaluate.summarize(p["results"]["per_query"][m][key], everything)[0] for p in points]
            row[key] = {"per_seed": means, "mean": float(np.mean(means)),
                        "sd": float(np.std(means, ddof=1)) if len(means) > 1 else 0.0}
        rows.append(row)
    return rows


def table_markdown(out: dict) -> str:
    """The seeds table: each row's mean ± s.d. over seeds of its mean over queries."""
    s = out["settings"]
    head = ["method", "MRR", f"recall@{s['k']}", "tail-patch Δp (×1e-3)", "Δlog p"]
    scale = {"mrr": 1.0, "recall": 1.0, "dp": 1e3, "dlogp": 1.0}
    body = [[report.NAMES.get(r["method"], r["method"]),
             *(f"{r[key]['mean'] * scale[key]:.3f} ± {r[key]['sd'] * scale[key]:.3f}" for key in evaluate.METRICS)]
            for r in out["rows"]]
    return "\n".join([f"Projection seeds {s['seeds']}: {s['n_queries']} queries, tail-patch on "
                      f"{s['tail_patch_queries']}; mean ± s.d. over seeds of each seed's mean over queries.", "",
                      report.md_table(head, body)])


def markdown(out: dict) -> str:
    """The seeds table and the claims over queries × seeds."""
    chead, crows, _ = report.claim_rows(out)
    return "\n".join([table_markdown(out), "", "Claims over queries × seeds. " + report.evidence_intro(out),
                      "", report.md_table(chead, crows), ""])


@app.command(help=__doc__)
def main(
    run: Path = typer.Option(..., help="The run whose seeds/ holds each seed's run (p0, p1, ...)."),
    seed: list[int] = typer.Option(..., help="The projection seeds to gather (repeat the option)."),
) -> None:
    points = [read_seed_run(run / "seeds" / f"p{s}") for s in seed]
    check_comparable(points)
    per_query = combined(points)
    first = points[0]["results"]
    attributed = first["settings"].get("attribution_queries", 0) > 0
    out = {"settings": {**{key: first["settings"][key] for key in SAME}, "seeds": [p["seed"] for p in points],
                        "runs": [p["run"] for p in points], "methods": list(per_query)},
           "queries": first["queries"], "model_correct": first["model_correct"],
           "rows": seed_table(points, list(per_query)),
           **evaluate.evidence(per_query, first["model_correct"], attributed), "provenance": ts.provenance()}
    folder = run / "seeds"
    ts.write_json(folder / "seeds.json", evaluate.jsonable(out))
    md = markdown(out)
    with ts.atomic_path(folder / "seeds.md") as tmp:
        tmp.write_text(md, encoding="utf-8")
    print(md)
    print(f"wrote {folder}/seeds.json, seeds.md")


if __name__ == "__main__":
    ts.run_cli(app)
