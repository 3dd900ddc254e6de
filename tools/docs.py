"""Render README's and docs/' result tables from the recorded result files (`make docs`).

    python -m tools.docs            # rewrite every marked block from docs/results/*.json
    python -m tools.docs --check    # exit 1, naming the block, if a file differs from what would be rendered

A block in a Markdown file is

    <!-- results: NAME VIEW -->
    ... (rendered: never edit by hand) ...
    <!-- /results -->

where NAME is a record in docs/results/NAME.json (written by tools/record.py with the command, commit, machine
and wall time that made it) and VIEW one of RENDERERS. Each block ends with a line naming the command, the
commit, the machine and the wall time, so a figure in the docs always says where it came from.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import evaluate
import report
from bench import breakdown, islands, peer, precision
from bench import encoding as bench_encode
from bench import gpu as bench_gpu
from experiments import compare, seeds, sweep, trend

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
PAGES = ("README.md", "docs/*.md")
BLOCK = re.compile(r"(<!-- results: (\S+) (\S+) -->\n)(.*?)(<!-- /results -->)", re.S)


def load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"{path.relative_to(ROOT)} is missing: record it with tools/record.py")
    return json.loads(path.read_text(encoding="utf-8"))


def duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s"


def provenance(rec: dict) -> str:
    """One line: what made the figures above it, where and how long it took."""
    m = rec["machine"]
    cpu = f"{m['cores']}-core {m['cpu']}{' (AVX-512)' if m.get('avx512') else ''}, {m['memory_gib']} GiB"
    commit = (rec["commit"] or "no commit")[:7] + ("+dirty" if (rec["commit"] or "").endswith("+dirty") else "")
    return (f"*`{rec['command']}` at commit `{commit}` on a {cpu}, {rec['date']}: {duration(rec['wall_seconds'])}, "
            f"peak memory {rec['peak_rss_mib'] / 1024:.1f} GiB.*")


def ablation(rec: dict, titles: tuple[str, ...] = ("All queries",)) -> str:
    """The ablation table (mean ± s.e. over queries) for the query splits named."""
    results = rec["results"]
    parts = []
    for title, mask in report.splits(results):
        if title in titles:
            if len(titles) > 1:
                parts += [f"**{title}** ({sum(mask)} queries)", ""]
            parts += [report.md_table(report.header(results), report.table_rows(results, mask)), ""]
    return "\n".join(parts).rstrip()


def by_split(rec: dict) -> str:
    """The table in one: MRR and tail-patch Δp per method on all queries, those the model answers and those it
    gets wrong, after the tail-patch lr's calibration (when the run calibrated one)."""
    results = rec["results"]
    parts = report.splits(results)
    names = ("all", "answered", "wrong")
    head = ["method", *(f"MRR {n} ({sum(m)})" for n, (_, m) in zip(names, parts, strict=True)),
            *(f"Δp ×1e-3 {n}" for n in names)]
    rows = []
    for method in results["settings"]["methods"]:
        cells = [report.NAMES.get(method, method)]
        for key, scale in (("mrr", 1.0), ("dp", 1e3)):
            for _, mask in parts:
                mean, se = evaluate.summarize(results["per_query"][method][key], mask)
                cells.append("–" if math.isnan(mean) else f"{mean * scale:.3f} ± {se * scale:.3f}")
        rows.append(cells)
    calibration = report.calibration_intro(results) + "\n\n" if results.get("calibration") else ""
    return calibration + report.md_table(head, rows)


def claims(rec: dict) -> str:
    head, rows, _ = report.claim_rows(rec["results"])
    return report.md_table(head, rows)


def verdicts(rec: dict) -> str:
    """The claims over all queries, grouped by their state: the prose-sized summary of the claims table."""
    measured = [c for c in rec["results"]["claims"] if c["split"] == "All queries" and c["n"]]
    lines = []
    for state, title in (("holds", "Hold"), ("contradicted", "Contradicted"), ("not established", "Not established")):
        named = [c["claim"] for c in measured if c["state"] == state]
        if named:
            lines.append(f"* **{title}** ({len(named)}): " + "; ".join(named) + ".")
    return "\n".join(lines)


def comparisons(rec: dict) -> str:
    head, rows = report.comparison_rows(rec["results"])
    return report.md_table(head, rows)


def seed_table(rec: dict) -> str:
    return seeds.markdown(rec["results"]).rstrip()


def points_table(rec: dict, axis: str) -> str:
    """The trend (axis "step") or the model sizes (axis "model"): each point's means and paired differences,
    then the change from the first point to the last."""
    rows, changes = rec["results"]["rows"], rec["results"]["across"]
    first = f"step {rows[0]['step']}" if axis == "step" else rows[0]["label"]
    last = "the final model" if axis == "step" else rows[-1]["label"]
    return trend.markdown(rows, axis) + "\n\n" + trend.across_markdown(changes, first, last)


def sign(d: dict) -> str:
    """Where a paired difference's 95% CI lies with respect to 0."""
    lo, hi = d["ci"]
    return "below 0" if hi < 0 else "above 0" if lo > 0 else "spans 0"


def interval(key: str, d: dict | None) -> str:
    return f"{report.fmt_interval(key, d)} ({sign(d)})" if d and d.get("n") else "–"


def sweep_diff(rec: dict, axis: str, x: str, row: str, against: str = "vs_reference") -> dict | None:
    """One point's paired Δp difference on one sweep axis (None where the axis was not swept)."""
    points = rec["results"]["axes"].get(axis, [])
    hit = [p for p in points if str(p["x"]) == x and p["row"] == row]
    return hit[0].get(against, {}).get("dp") if hit else None


def pair(rec: dict, a: str, b: str, metric: str) -> dict | None:
    hit = [c for c in rec["results"]["comparisons"]
           if (c["a"], c["b"], c["metric"], c["split"]) == (a, b, metric, "All queries")]
    return hit[0] if hit else None


def r_explanations(recs: list[dict]) -> str:
    """Each explanation of R lowering one-step influence, as the paired Δp differences that test it: the sweep of
    each projection seed (the first records) and the fact world's comparisons (the last record)."""
    *sweeps, world = recs
    rows: list[tuple[str, str, list[dict | None]]] = []

    def over_seeds(what: str, how: str, axis: str, x: str, row: str, against: str = "vs_reference") -> None:
        rows.append((what, how, [sweep_diff(r, axis, x, row, against) for r in sweeps]))

    fit = "R_eval fitted in-sample"
    over_seeds(fit, "TrackStar: R_eval held out − fitted on the scored queries", "reval", "other half", "TrackStar",
               "vs_in_sample")
    over_seeds(fit, "+ R_eval (λ = 1), held out − correction alone", "reval", "other half", "+ R_eval")
    for lam in ("auto", "1"):
        over_seeds("the λ rule", f"TrackStar at λ = {lam} − λ = 0", "lambda", lam, "TrackStar")
    for dim in ("256", "1024", "2048"):
        over_seeds("d", f"TrackStar − correction alone at d = {dim}", "d", dim, "TrackStar")
    for damping in ("1e-3", "auto", "1"):
        over_seeds("damping", f"+ R_train − correction alone at damping {damping}", "damping", damping, "+ R_train")
    for metric, probe in (("dp", "one document"), ("dp_joint", "top-k together")):
        for a, b, name in (("train", "optcorr", "+ R_train − correction alone"),
                           ("trackstar", "train", "TrackStar − + R_train")):
            rows.append(("the probe", f"{name}, {probe}", [pair(world, a, b, metric)] + [None] * (len(sweeps) - 1)))
    head = ["explanation", "paired tail-patch Δp difference"] + [f"P seed {i}" for i in range(len(sweeps))]
    return report.md_table(head, [[what, how] + [interval("dp", d) for d in diffs] for what, how, diffs in rows])


def sweep_tables(rec: dict) -> str:
    return sweep.markdown(rec["results"]).replace("# Sweep\n\n", "", 1).replace("\n## ", "\n#### ").rstrip()


def suite(rec: dict) -> str:
    """`make test`'s outcome: counts, wall time and workers."""
    r = rec["results"]
    c = r["counts"]
    rest = "".join(f", {c[k]} {k}" for k in ("failed", "error", "skipped") if c[k])
    return (f"`make test`: {c['passed']} passed{rest} in {duration(rec['wall_seconds'])} "
            f"on {r['workers']} pytest-xdist worker{'s' if r['workers'] != 1 else ''}.")


def mutants(rec: dict) -> str:
    """`make mutants`' outcome: how many were killed by a failing assertion, and any that were not."""
    r = rec["results"]
    text = f"`make mutants`: {len(r['killed'])} of {r['mutants']} mutants killed by a failing assertion"
    for state, label in (("crashed", "only crashed"), ("passed", "survived")):
        if r[state]:
            text += f"; {label}: {', '.join(r[state])}"
    return text + "."


RENDERERS: dict[str, Callable[[dict], str]] = {
    "table": ablation,
    "bysplit": by_split,
    "splits": lambda rec: ablation(rec, tuple(t for t, _ in evaluate.splits([]))),
    "claims": claims,
    "verdicts": verdicts,
    "comparisons": comparisons,
    "seeds": seed_table,
    "seedrows": lambda rec: seeds.table_markdown(rec["results"]),
    "trend": lambda rec: points_table(rec, "step"),
    "sizes": lambda rec: points_table(rec, "model"),
    "sweep": sweep_tables,
    "compare": lambda rec: compare.markdown(rec["results"]),
    "precision": lambda rec: precision.markdown(rec["results"]),
    "suite": suite,
    "mutants": mutants,
    "mfu": lambda rec: bench_encode.markdown(rec["results"]),
    "fill": lambda rec: "\n".join(bench_gpu.fill_table(rec["results"]["fill"])),
    "peer": lambda rec: peer.markdown(rec["results"]),
    "islands": lambda rec: islands.markdown(rec["results"]),
    "breakdown": lambda rec: breakdown.markdown(rec["results"]),
}


# Views over several records (NAME is their names joined by "+", in the order the view expects).
MULTI: dict[str, Callable[[list[dict]], str]] = {
    "explanations": r_explanations,
}


# An experiment not yet recorded says so in its block, rather than keeping figures from another commit.
NOT_RECORDED = ("*Not recorded at this commit: run the command above under `python -m tools.record {name} "
                "RESULTS -- COMMAND`, then `make docs`.*\n")


def render_block(name: str, view: str) -> str:
    if view not in RENDERERS and view not in MULTI:
        raise SystemExit(f"unknown view {view!r} for {name} (known: {', '.join([*RENDERERS, *MULTI])})")
    names = name.split("+")
    missing = [n for n in names if not (RESULTS / f"{n}.json").exists()]
    if missing:
        return NOT_RECORDED.format(name=missing[0])
    recs = [load(n) for n in names]
    body = MULTI[view](recs) if view in MULTI else RENDERERS[view](recs[0])
    return body + "\n\n" + "\n".join(dict.fromkeys(provenance(r) for r in recs)) + "\n"


def rendered(text: str) -> str:
    """`text` with every results block rendered anew."""
    return BLOCK.sub(lambda m: m.group(1) + render_block(m.group(2), m.group(3)) + m.group(5), text)


def pages() -> list[Path]:
    return sorted({p for pattern in PAGES for p in ROOT.glob(pattern)})


def stale() -> list[str]:
    """The pages whose blocks differ from what the recorded results render."""
    return [str(p.relative_to(ROOT)) for p in pages() if rendered(p.read_text(encoding="utf-8")) != p.read_text(
        encoding="utf-8")]


# Figures drawn from the same records (PNG bytes depend on matplotlib's version, so the drift test checks the
# tables, and `make docs` redraws these).
FIGURES: dict[str, tuple[str, Callable[[dict], bytes]]] = {
    "docs/figures/claims.png": ("factworld", lambda rec: report.forest_plot(rec["results"])),
    "docs/figures/trend.png": ("trend", lambda rec: trend.figure(rec["results"]["rows"])),
    "docs/figures/sizes.png": ("sizes", lambda rec: trend.figure(
        rec["results"]["rows"], [r["step"] for r in rec["results"]["rows"]], "model parameters", log=True)),
}


def draw_figures() -> None:
    for path, (name, draw) in FIGURES.items():
        if (RESULTS / f"{name}.json").exists():
            out = ROOT / path
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(draw(load(name)))
            print(f"drew {path}")


def main(argv: list[str]) -> None:
    if "--check" in argv:
        bad = stale()
        if bad:
            raise SystemExit(f"tables differ from docs/results/ in: {', '.join(bad)}; run `make docs`")
        return
    for p in pages():
        text = p.read_text(encoding="utf-8")
        new = rendered(text)
        if new != text:
            p.write_text(new, encoding="utf-8")
            print(f"rendered {p.relative_to(ROOT)}")
    draw_figures()


if __name__ == "__main__":
    main(sys.argv[1:])
