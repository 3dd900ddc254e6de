"""Compare two runs of the same queries row by row: does a setting (PARAMS=all, another V, bf16, another d)
change what each method retrieves and how much it moves the prediction?

    python -m experiments.compare RUN_A RUN_B [--out compare.json]

Both runs must have evaluated the same queries (evaluate.py's results.json in each). For every method the two
share, and every metric: the mean paired difference A − B over the queries measured in both, its seeded
bootstrap 95% CI and state (evaluate.py's rule: "A higher" holds when the CI lies above 0, "A lower" when it
lies below, otherwise not established); and the share of B's top-k proponents that A also retrieves (1: the
same lists). Prints a table; with --out, writes it as JSON for the docs.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

import evaluate
import report
import trackstar as ts

app = typer.Typer(add_completion=False, rich_markup_mode=None)


def read_run(run: Path) -> dict:
    path = run / "results.json"
    if not path.exists():
        raise ts.TrackStarError(f"{path} is missing: run evaluate.py on {run} first")
    return json.loads(path.read_text(encoding="utf-8"))


def top_ids(run: Path, method: str, k: int) -> dict[str, list[str]]:
    """query id -> the ids of a method's top-k proponents (the ground truth has no file: it is the same)."""
    path = run / f"proponents-{method}.jsonl"
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        return {row["query_id"]: [p["id"] for p in row["proponents"][:k]] for row in map(json.loads, f)}


def overlap(a: dict[str, list[str]], b: dict[str, list[str]]) -> float | None:
    """Mean share of B's top-k that A's top-k holds, over the queries both ranked."""
    shared = [q for q in b if q in a and b[q]]
    if not shared:
        return None
    return sum(len(set(a[q]) & set(b[q])) / len(b[q]) for q in shared) / len(shared)


def compare(run_a: Path, run_b: Path) -> dict:
    ra, rb = read_run(run_a), read_run(run_b)
    if ra["queries"] != rb["queries"]:
        raise ts.TrackStarError(f"{run_a} and {run_b} evaluated different queries: a paired comparison needs the same")
    k = min(ra["settings"]["k"], rb["settings"]["k"])
    everything = [True] * len(ra["queries"])
    rows = []
    for m in [m for m in ra["settings"]["methods"] if m in rb["per_query"]]:
        row = {"method": m, "overlap": overlap(top_ids(run_a, m, k), top_ids(run_b, m, k)) if m != "truth" else 1.0}
        for key in evaluate.metrics_of({m: ra["per_query"][m]}):
            if key in rb["per_query"][m]:
                d = evaluate.paired_difference(ra["per_query"][m][key], rb["per_query"][m][key], everything)
                row[key] = {**d, "state": evaluate.claim_state(d["ci"], d["n"]) if d["n"] else evaluate.NOT_ESTABLISHED}
        rows.append(row)
    return {"a": str(run_a), "b": str(run_b), "k": k, "queries": len(ra["queries"]), "rows": rows,
            "bootstrap": evaluate.evidence({}, [], False)["bootstrap"]}


def markdown(out: dict) -> str:
    keys = ("mrr", "recall", "dp")
    head = ["method", *(f"{key} A − B [95% CI]" for key in keys), f"top-{out['k']} overlap"]
    state = {evaluate.HOLDS: "A higher", evaluate.CONTRADICTED: "A lower", evaluate.NOT_ESTABLISHED: "not established"}
    body = [[report.NAMES.get(r["method"], r["method"]),
             *(f"{report.fmt_interval(key, r[key])} {state[r[key]['state']]}" if key in r and r[key]["n"] else "–"
               for key in keys),
             "–" if r["overlap"] is None else f"{r['overlap']:.3f}"] for r in out["rows"]]
    return f"A = {out['a']}, B = {out['b']}, {out['queries']} queries.\n\n" + report.md_table(head, body)


@app.command(help=__doc__)
def main(run_a: Path = typer.Argument(..., help="Run A"), run_b: Path = typer.Argument(..., help="Run B"),
         out: Path | None = typer.Option(None, help="Also write the comparison as JSON here.")) -> None:
    result = compare(run_a, run_b)
    if out is not None:
        ts.write_json(out, evaluate.jsonable(result))
    print(markdown(result))


if __name__ == "__main__":
    ts.run_cli(app)
