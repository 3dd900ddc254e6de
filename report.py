"""The report: results.md (the ablation table, the paper's claims decided by paired CIs, how each row was built) and
report.html, one self-contained page a person can browse offline — HTML tables, charts of every
metric with error bars, the R spectra, the sweep's figures, and each query's proponents with the words
that state its fact highlighted. evaluate.py computes the numbers; this file only presents them.

    python report.py --run RUN --corpus corpus.jsonl --queries queries.jsonl
    python report.py --run RUN --serve [--port 8000] [--viewer pretraining-tda/docs/demo]   # make view

Reads RUN/results.json (evaluate.py's) and the proponents files, never the model; rerun it after new
figures (a sweep) or a change to the report.
"""

from __future__ import annotations

import base64
import html
import http.server
import io
import itertools
import json
import math
import re
import textwrap
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import typer

import evaluate
import trackstar as ts
from evaluate import summarize

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__)

NAMES = {
    "bm25": "BM25 (lexical)",
    "dense": "Dense (text embeddings)",
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
# The tables, checklist and notes, as data first: results.md and report.html render the same rows.

METRICS = (("mrr", 1.0), ("recall", 1.0), ("dp", 1e3), ("dlogp", 1.0))  # evaluate.METRICS, each with its display scale
ATTRIBUTION = ("mrr", "recall")


def n_scored(results: dict) -> int:
    """How many queries carry ground truth (results.json files from before the key: count the MRRs)."""
    s = results["settings"]
    if "attribution_queries" in s:
        return s["attribution_queries"]
    return sum(v is not None for v in results["per_query"][s["methods"][0]]["mrr"])


def splits(results: dict) -> list[tuple[str, list[bool]]]:
    return evaluate.splits(results["model_correct"])


def header(results: dict) -> list[str]:
    k = results["settings"]["k"]
    return ["method", "MRR", f"recall@{k}", "tail-patch Δp (×1e-3)", "tail-patch Δlog p"]


def table_rows(results: dict, mask: list[bool]) -> list[list[str]]:
    """One row per method: name, then mean ± s.e. of each metric; "n/a" without ground truth, "–" if unmeasured."""
    attributed = n_scored(results) > 0
    rows = []
    for m in results["settings"]["methods"]:
        cells = [NAMES.get(m, m)]
        for key, scale in METRICS:
            mean, se = summarize(results["per_query"][m][key], mask)
            if key in ATTRIBUTION and not attributed:
                cells.append("n/a")
            else:
                cells.append("–" if math.isnan(mean) else f"{mean * scale:.3f} ± {se * scale:.3f}")
        rows.append(cells)
    return rows


def category_intro(results: dict) -> str:
    """What the proponent-category tables show (Markdown), or why there are none."""
    cat, n = results.get("categories"), len(results["queries"])
    if "categories" not in results:
        return "Not computed: this results.json predates proponent categories (rerun evaluate.py)."
    if cat is None:
        return ("Not computed: no query carries `subject` and `relation_templates` (prepare.py writes them; a "
                "query file of your own may add them, see docs/files.md).")
    out = (f"Share of each kind among the top {results['settings']['k']} proponents of each method, over the "
           f"{cat['queries']} queries that carry `subject` and `relation_templates`; the first kind that applies: "
           "**fact** (the document states the query's fact), **subject+object** (names both), **relation** "
           "(holds the words of one of the relation's templates), **subject** (the subject only), **object** "
           "(the object only), **none**. Whole words, any case, read off the text (no model).")
    if cat["queries"] < n:
        out += f" The other {n - cat['queries']} queries lack those fields and are left out."
    if cat["without_fact"]:
        out += (f" {cat['without_fact']} of the categorised queries have no ground truth: their proponents "
                "cannot be **fact**.")
    return out


def category_methods(results: dict) -> list[str]:
    """The methods with category shares, in the run's order (results.json stores its keys sorted)."""
    shares = next(iter(results["categories"]["shares"].values()))
    return [m for m in results["settings"]["methods"] if m in shares]


def category_tables(results: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per query split with categorised queries: each method's share of each kind."""
    cat = results.get("categories")
    if cat is None:
        return []
    out = []
    for title, _ in splits(results):
        if cat["split_queries"][title]:
            shares = cat["shares"][title]
            rows = [[NAMES.get(m, m), *("–" if shares[m] is None else f"{shares[m][c]:.3f}" for c in cat["order"])]
                    for m in category_methods(results)]
            out.append((f"{title} ({cat['split_queries'][title]} queries)", ["method", *cat["order"]], rows))
    return out


def intro(results: dict) -> list[str]:
    """The opening paragraphs (Markdown): what was run, and what the numbers mean."""
    s = results["settings"]
    known, n = results["model_correct"], len(results["model_correct"])
    scored = n_scored(results)
    out = [f"Model `{s['model']}`, {s['n_docs']} documents, {n} queries, top-k = {s['k']}; "
           f"tail-patch lr = {s['lr']:.3g}, V = {s['v_source']}, eps = {s['eps']:.3g}. "
           f"The model answers {sum(known)} of {n} queries correctly (greedy). "
           f"Tail-patch measured on {s['tail_patch_queries']} of the {n} queries."]
    if scored == 0:
        out.append("**No ground truth:** the inputs carry no ground truth (no query has a `fact`, or no document "
                   "lists `facts`), so MRR and recall are n/a and there is no ground-truth row. Tail-patch needs "
                   "none: it is the evidence here, with the proponents themselves.")
    elif scored < n:
        out.append(f"**Partial ground truth:** MRR and recall@{s['k']} are over the {scored} of {n} queries that "
                   "carry a `fact`; tail-patch is over all measured queries.")
    out.append("Mean ± standard error over queries. "
               + (f"MRR / recall@{s['k']}: does a retrieved document state the query's fact. " if scored else "")
               + "Tail-patch: change in p(target | prompt) after one training step on each proponent, "
               f"averaged over the top {s['k']}.")
    return out


STATE_MARK = {evaluate.HOLDS: "holds", evaluate.CONTRADICTED: "**contradicted**",
              evaluate.NOT_ESTABLISHED: "not established"}


def fmt_diff(key: str, x: float | None) -> str:
    """A difference in its metric's display units (tail-patch Δp in 1e-3), with its sign."""
    if x is None:
        return "–"
    return f"{x * 1e3:+.2f}e-3" if key.startswith("dp") else f"{x:+.3f}"


def fmt_interval(key: str, d: dict) -> str:
    """"diff [lo, hi]" of one paired difference (results.json's "comparisons" and "claims" entries)."""
    if not d["n"]:
        return "–"
    lo, hi = d["ci"]
    return f"{fmt_diff(key, d['diff'])} [{fmt_diff(key, lo)}, {fmt_diff(key, hi)}]"


def evidence_intro(results: dict) -> str:
    b = results.get("bootstrap")
    if b is None:
        return "Not computed: this results.json predates paired differences (rerun evaluate.py)."
    return (f"Each claim is a paired difference (claimed larger row − claimed smaller row) over the same queries, "
            f"with a {b['level']:.0%} bootstrap CI ({b['resamples']} resamples of the queries, seed {b['seed']}). "
            "**holds**: the CI lies entirely on the claimed side; **contradicted**: entirely on the other side; "
            f"**not established**: it contains 0, or the split has fewer than {b['min_queries']} measured queries. "
            "Means alone decide nothing. Tail-patch Δp in units of 1e-3.")


def claim_rows(results: dict) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, states of the all-queries column): one row per claim, one column per query split,
    each cell the difference, its CI, its state and how many queries it rests on."""
    titles = [t for t, _ in splits(results)]
    by_claim: dict[str, dict[str, dict]] = {}
    for c in results.get("claims", []):
        by_claim.setdefault(c["claim"], {})[c["split"]] = c
    head = ["claim", *[f"{t.lower()}" for t in titles]]
    rows, states = [], []
    for claim, cells in by_claim.items():
        row = [claim]
        for t in titles:
            c = cells[t]
            row.append(f"{fmt_interval(c['metric'], c)} {STATE_MARK[c['state']]} (n = {c['n']})" if c["n"]
                       else f"– {STATE_MARK[c['state']]} (n = 0)")
        rows.append(row)
        states.append(cells[titles[0]]["state"])
    return head, rows, states


def calibration_intro(results: dict) -> str:
    c = results["calibration"]
    verdict = (f"chosen: **{c['lr']:g}**" if c["valid"] else
               f"no lr of the grid makes the probe valid on them; the largest, {c['lr']:g}, is used")
    return (f"Chosen before any method's row is measured, by the rule: {c['rule']}. Calibration queries: "
            f"{len(c['queries'])}; {verdict}.")


def calibration_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[f"{r['lr']:g}", fmt_interval("dp", r), STATE_MARK[r["state"]], str(r["n"])]
            for r in results["calibration"]["per_lr"]]
    return ["lr", "ground truth Δp [95% CI]", "state", "queries"], rows


def comparison_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Every paired difference of the chain and the claims' rows over all queries: one row per pair."""
    k = results["settings"]["k"]
    present = {c["metric"] for c in results.get("comparisons", [])}
    keys = [key for key in (*evaluate.METRICS, *evaluate.TOGETHER) if key in present
            and (key not in ATTRIBUTION or n_scored(results))]
    labels = {"mrr": "MRR", "recall": f"recall@{k}", "dp": "Δp (1e-3)", "dlogp": "Δlog p",
              "dp_joint": "Δp top-k together (1e-3)", "dlogp_joint": "Δlog p top-k together"}
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for c in results.get("comparisons", []):
        if c["split"] == "All queries":
            cells.setdefault((c["a"], c["b"]), {})[c["metric"]] = fmt_interval(c["metric"], c)
    rows = [[f"{NAMES.get(a, a)} − {NAMES.get(b, b)}", *(v.get(key, "–") for key in keys)]
            for (a, b), v in cells.items()]
    return ["difference (all queries)", *(labels[key] for key in keys)], rows


def diagnostics(run: Path, methods: list[str]) -> list[str]:
    """How each gradient row was built (Markdown lines), and the one condition known to make R_train rows
    unreliable: fewer sampled training vectors than dimensions (a rank-deficient R_train, see docs/method.md)."""
    lines = []
    meta = ts.read_meta(run / "corpus") if (run / "corpus" / "meta.json").exists() else None
    if meta:
        lines.append(f"encoding: d = {meta.dim}, V = {meta.correction}, eps = {meta.eps:.3g}, "
                     f"gradient = {meta.gradient}, params = {meta.params}, model dtype {meta.dtype}")
    for m in methods:
        hessian = run / f"index-{m}" / "hessian.h5"
        if not hessian.exists():
            continue
        with h5py.File(hessian, "r") as f:
            a = ts.read_attrs(f)
        if a.get("hessian") in (None, "none"):
            continue
        line = (f"{NAMES.get(m, m)}: R = {a['hessian']}, λ = {a['lam']:.3g}, R_train from {a['n_train']} vectors, "
                f"R_eval from {a['n_eval']}, damping {a['damping']} (δ = {a['delta']:.3g}, "
                f"Ledoit–Wolf shrinkage of R_train {a.get('shrinkage', 0.0):.3g})")
        if meta and a["hessian"] in ("train", "mixed") and a["n_train"] < meta.dim:
            line += (f" — **R_train is rank-deficient ({a['n_train']} < d = {meta.dim}): "
                     "whitening by it is unreliable**")
        lines.append(line)
    dense = run / "index-dense" / "index.h5"
    if "dense" in methods and dense.exists():
        with h5py.File(dense, "r") as f:
            a = ts.read_attrs(f)["dense"]
        name = "all-MiniLM-L6-v2 (`minilm`)" if a["model_path"] == "minilm" else f"`{a['model_path']}`"
        lines.append(f"{NAMES['dense']}: {name}, fingerprint {a['model']}, d = {a['dim']}, {a['pooling']}, "
                     f"texts cut at {a['max_length']} tokens; queries embedded as prompt + target")
    return lines or [f"no encoding metadata or R matrices found under `{run}`"]


# ----------------------------------------------------------------------------------------------
# results.md


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def markdown(run: Path, results: dict) -> str:
    md = [f"# TrackStar evaluation: {results['settings']['run']}", ""]
    for para in intro(results):
        md += [para, ""]
    for title, mask in splits(results):
        md += [f"### {title} ({sum(mask)} queries)", "", md_table(header(results), table_rows(results, mask)), ""]
    md += ["## Proponent categories", "", category_intro(results), ""]
    for title, head, rows in category_tables(results):
        md += [f"### {title}", "", md_table(head, rows), ""]
    md += ["## The paper's claims, checked on this run", "", evidence_intro(results), ""]
    head, rows, _ = claim_rows(results)
    if rows:
        md += [md_table(head, rows), ""]
    head, rows = comparison_rows(results)
    if rows:
        md += ["### Paired differences between rows", "", md_table(head, rows), ""]
    if results.get("calibration"):
        md += ["## The tail-patch learning rate", "", calibration_intro(results), "",
               md_table(*calibration_rows(results)), ""]
    md += ["## How the rows were built", ""]
    md += [f"- {line}" for line in diagnostics(run, results["settings"]["methods"])] + [""]
    return "\n".join(md)


# ----------------------------------------------------------------------------------------------
# report.html: one self-contained page (no external files: figures are inlined PNGs) a person can
# browse offline: tables, charts, the R spectra, the sweep, and every query's proponents.

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0 auto;padding:1.5em 2em;max-width:1250px;
  color:#222}
h1{margin:.2em 0 .4em}h2{margin-top:1.8em;border-bottom:2px solid #e4e4e4;padding-bottom:.2em}
nav a{margin-right:1em}code{background:#f1f1f1;padding:0 .25em;border-radius:3px}
table{border-collapse:collapse;margin:.4em 0 1em}th,td{border:1px solid #d5d5d5;padding:3px 7px;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.results tr:nth-child(even) td,table.md tr:nth-child(even) td{background:#fafafa}
table.results tr.trackstar td{font-weight:600}
table.docs{width:100%;font-size:13px;table-layout:fixed}table.docs td:nth-child(3){overflow-wrap:anywhere}
table.results td:first-child{min-width:21em}table.results td.num{min-width:8em}
tr.hit td{background:#d9f5d9!important}td.cat{font-size:12px;white-space:nowrap}table.compact{font-size:12px}
mark{background:#ffe36e;padding:0 1px}mark.subj{background:#bfe0ff}
mark.part{background:none;border-bottom:2px dotted #5a9bd5}
.note{background:#fff4d6;border-left:4px solid #e0a800;padding:.5em 1em;margin:1em 0}
.ok{color:#127a12}.bad{color:#b01c1c}
table.claims tr.holds td:first-child{border-left:5px solid #127a12}
table.claims tr.contradicted td:first-child{border-left:5px solid #b01c1c}
table.claims tr.open td:first-child{border-left:5px solid #bbb}
img{max-width:100%;height:auto;border:1px solid #eee}figure{margin:1em 0}figcaption{font-weight:600}
details.q{margin:.5em 0;padding:.4em .8em;border:1px solid #bbb;border-radius:6px}
details.q[open]{background:#fcfcfc}summary{cursor:pointer}h4{margin:.9em 0 .2em}
"""


def inline(text: str) -> str:
    """Markdown's inline `code` and **bold** as HTML (the text escaped first)."""
    s = html.escape(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def html_table(head: list[str], rows: list[list[str]], cls: str = "", row_classes: list[str] | None = None) -> str:
    """A table; cells that read as numbers ("0.123 ± 0.004", "n/a") are right-aligned."""
    def cell(c: str) -> str:
        num = re.fullmatch(r"[-+−]?[\d.e+−-]+( ± [\d.e+−-]+)?|n/a|–", c.strip()) is not None
        return f"<td class='num'>{inline(c)}</td>" if num else f"<td>{inline(c)}</td>"

    out = [f"<table class='{cls}'>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{inline(h)}</th>" for h in head) + "</tr>")
    for i, r in enumerate(rows):
        rc = row_classes[i] if row_classes else ""
        out.append(f"<tr class='{rc}'>" + "".join(cell(c) for c in r) + "</tr>")
    return "".join(out) + "</table>"


def markdown_html(md: str) -> str:
    """Just enough Markdown for the sweep's notes: `#` headings, `|` tables, `-` lists, paragraphs."""
    def kind(line: str) -> str:
        s = line.strip()
        return ("blank" if not s else "heading" if s.startswith("#") else "table" if s.startswith("|")
                else "list" if s.startswith(("- ", "* ")) else "text")

    out = []
    for what, group in itertools.groupby(md.splitlines(), key=kind):
        lines = [ln.strip() for ln in group]
        if what == "heading":
            for ln in lines:
                level = min(len(ln) - len(ln.lstrip("#")) + 2, 6)  # inside the report's own h2 section
                out.append(f"<h{level}>{inline(ln.lstrip('#').strip())}</h{level}>")
        elif what == "table":
            rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
            if len(rows) > 1 and all(re.fullmatch(r":?-+:?", c) for c in rows[1]):
                out.append(html_table(rows[0], rows[2:], "md"))
            else:
                out.append(html_table([], rows, "md"))
        elif what == "list":
            out.append("<ul>" + "".join(f"<li>{inline(ln[2:])}</li>" for ln in lines) + "</ul>")
        elif what == "text":
            out.append(f"<p>{inline(' '.join(lines))}</p>")
    return "\n".join(out)


def img(png: bytes, alt: str) -> str:
    """An <img> carrying its PNG inline (a data URI): the page needs no file beside it."""
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" alt="{html.escape(alt)}">'


def figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def method_colour(m: str) -> str:
    return {"trackstar": "#dd6b20", "truth": "#9a9a9a", "bm25": "#4c9a5b", "dense": "#8fbf7f"}.get(m, "#4c72b0")


def results_chart(results: dict) -> bytes:
    """Bars of MRR, recall and tail-patch Δp per method (± s.e.): one row of panels per query split
    (splits with no queries left out), the attribution panels only when there is ground truth."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend needed

    methods = results["settings"]["methods"]
    metrics = [("dp", "tail-patch Δp (×1e-3)", 1e3)]
    if n_scored(results):
        metrics = [("mrr", "MRR", 1.0), ("recall", f"recall@{results['settings']['k']}", 1.0)] + metrics
    rows = [(title, mask) for title, mask in splits(results) if any(mask)]
    labels = [textwrap.fill(NAMES.get(m, m), 30) for m in methods]
    fig = Figure(figsize=(3.6 * len(metrics) + 2.6, len(rows) * (0.42 * len(methods) + 0.9)), layout="constrained")
    axes = fig.subplots(len(rows), len(metrics), squeeze=False, sharey=True)
    y = np.arange(len(methods))
    for (title, mask), ax_row in zip(rows, axes, strict=True):
        for (key, label, scale), ax in zip(metrics, ax_row, strict=True):
            stats = np.array([summarize(results["per_query"][m][key], mask) for m in methods]) * scale
            ax.barh(y, np.nan_to_num(stats[:, 0]), xerr=np.nan_to_num(stats[:, 1]), capsize=2,
                    color=[method_colour(m) for m in methods])
            ax.axvline(0, color="#333", lw=0.6)
            ax.set_title(f"{label} — {title.lower()} ({sum(mask)})", fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(axis="x", alpha=0.3)
        ax_row[0].set_yticks(y, labels=labels)
    axes[0][0].invert_yaxis()  # shared: the first method on top, as in the tables
    return figure_png(fig)


STATE_CLASS = {evaluate.HOLDS: "holds", evaluate.CONTRADICTED: "contradicted", evaluate.NOT_ESTABLISHED: "open"}
STATE_COLOURS = {evaluate.HOLDS: "#127a12", evaluate.CONTRADICTED: "#b01c1c", evaluate.NOT_ESTABLISHED: "#888888"}


def forest_plot(results: dict) -> bytes:
    """Each claim's paired difference (all queries) with its 95% CI, one panel per metric, coloured by state:
    a claim holds when its whole bar lies right of 0 (the claimed side)."""
    from matplotlib.figure import Figure

    rows = [c for c in results["claims"] if c["split"] == "All queries" and c["n"]]
    keys = [key for key in evaluate.METRICS if any(c["metric"] == key for c in rows)]
    tallest = max(sum(c["metric"] == key for c in rows) for key in keys)
    fig = Figure(figsize=(4.2 * len(keys) + 3.4, 0.34 * tallest + 1.2), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for key, ax in zip(keys, axes, strict=True):
        mine = [c for c in rows if c["metric"] == key]
        scale = 1e3 if key.startswith("dp") else 1.0
        y = np.arange(len(mine))
        for yi, c in zip(y, mine, strict=True):
            lo, hi = (v * scale for v in c["ci"])
            ax.plot([lo, hi], [yi, yi], color=STATE_COLOURS[c["state"]], lw=2.5)
            ax.plot([c["diff"] * scale], [yi], "o", color=STATE_COLOURS[c["state"]])
        ax.axvline(0, color="#333", lw=0.8)
        ax.set_yticks(y, labels=[textwrap.fill(c["claim"], 44) for c in mine], fontsize=7)
        ax.invert_yaxis()
        ax.set_title({"mrr": "MRR", "recall": "recall", "dp": "tail-patch Δp (×1e-3)",
                      "dp_joint": "top-k together Δp (×1e-3)"}.get(key, key), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    return figure_png(fig)


CATEGORY_COLOURS = {"fact": "#2e8b3e", "subject+object": "#4c72b0", "relation": "#dd8452", "subject": "#8fb3de",
                    "object": "#b39ddb", "none": "#cfcfcf"}


def category_chart(results: dict) -> bytes:
    """One stacked bar per method (its proponents' category shares), one panel per query split."""
    from matplotlib.figure import Figure

    cat = results["categories"]
    titles = [t for t, _ in splits(results) if cat["split_queries"][t]]
    methods = category_methods(results)
    fig = Figure(figsize=(4.2 * len(titles) + 2.6, 0.42 * len(methods) + 1.6), layout="constrained")
    axes = fig.subplots(1, len(titles), squeeze=False, sharey=True)[0]
    y = np.arange(len(methods))
    for title, ax in zip(titles, axes, strict=True):
        left = np.zeros(len(methods))
        for c in cat["order"]:
            share = np.array([(cat["shares"][title][m] or {}).get(c, 0.0) for m in methods])
            ax.barh(y, share, left=left, color=CATEGORY_COLOURS.get(c, "#777"), label=c)
            left += share
        ax.set_xlim(0, 1)
        ax.set_title(f"{title.lower()} ({cat['split_queries'][title]})", fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0].set_yticks(y, labels=[textwrap.fill(NAMES.get(m, m), 30) for m in methods])
    axes[0].invert_yaxis()  # shared: the first method on top, as in the tables
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure_png(fig)


def figures(paths: list[Path], captions: list[str]) -> str:
    return "".join(f"<figure><figcaption>{html.escape(c)}</figcaption>{img(p.read_bytes(), c)}</figure>"
                   for p, c in zip(paths, captions, strict=True))


def spectra_section(run: Path, methods: list[str]) -> str:
    """index.py's plot of each index's R spectrum, for the methods of this run first."""
    found = {p.parent.name.removeprefix("index-"): p for p in sorted(run.glob("index-*/spectrum.png"))}
    order = [m for m in methods if m in found] + [m for m in found if m not in methods]
    if not order:
        return ""
    return ("<h2 id='spectra'>Spectra of R</h2>"
            + figures([found[m] for m in order], [f"{NAMES.get(m, m)} ({m})" for m in order]))


def sweep_section(run: Path) -> str:
    """The sweep stage's notes (sweep.md) and figures, when it has run."""
    sweep = run / "sweep"
    if not sweep.is_dir():
        return ""
    parts = ["<h2 id='sweep'>Sweep</h2>"]
    if (sweep / "sweep.md").exists():
        parts.append(markdown_html((sweep / "sweep.md").read_text(encoding="utf-8")))
    pngs = sorted(sweep.glob("*.png"))
    parts.append(figures(pngs, [p.stem.replace("_", " ").replace("-", " ") for p in pngs]))
    return "".join(parts)


# Capitalised words that begin a prompt without naming its subject.
FUNCTION_WORDS = frozenset("A An The In On Of At By For From To With As Is Was Are Were It Its He She His Her "
                           "They Their This That These Those What Who Whom Whose Which Where When How".split())


def subject_terms(prompt: str, text: str) -> tuple[list[str], list[str]]:
    """The prompt's names found in a document: each run of capitalised multi-letter words ("Kroultrok
    Milpa") where the whole run appears, else (a weaker hint: names share words) those of its words that do."""
    def found(term: str) -> bool:
        return re.search(rf"(?<!\w){re.escape(term)}(?!\w)", text) is not None

    whole, parts = [], []
    for run in re.findall(r"[A-Z][\w'-]*\w(?:\s+[A-Z][\w'-]*\w)*", prompt):
        words = [w for w in run.split() if w not in FUNCTION_WORDS]
        name = " ".join(words)
        if name and found(name):
            whole.append(name)
        else:
            parts += [w for w in words if found(w)]
    return whole, parts


def highlight(text: str, query: dict) -> str:
    """`text` escaped, the query's target (any case) in <mark>, its subject in <mark class=subj> (a part of
    the subject's name in <mark class=part>)."""
    target = query["target"].strip()
    whole, parts = subject_terms(query["prompt"], text)
    alts = [f"(?P<t>(?i:{re.escape(target)}))"] if target else []
    for group, terms in (("subj", whole), ("part", parts)):
        if terms:  # longest first: "Kroultrok Milpa" before "Kroultrok"
            alts.append(f"(?P<{group}>" + "|".join(map(re.escape, sorted(set(terms), key=len, reverse=True))) + ")")
    if not alts:
        return html.escape(text)
    out, pos = [], 0
    for m in re.finditer(rf"(?<!\w)(?:{'|'.join(alts)})(?!\w)", text):
        cls = "" if m.lastgroup == "t" else f" class='{m.lastgroup}'"
        out += [html.escape(text[pos:m.start()]), f"<mark{cls}>{html.escape(m.group())}</mark>"]
        pos = m.end()
    return "".join(out) + html.escape(text[pos:])


def shorten(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n].rstrip() + "…"


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None or math.isnan(x) else format(x, spec)


def docs_table(docs: list[dict], query: dict, facts_of: dict, cls: str, n_chars: int,
               categories: list[str] | None = None) -> str:
    """Ranked documents, the query's target and subject marked, rows stating its fact green; with
    `categories`, each document's proponent category in a column of its own."""
    kind = categories is not None
    head = ("<colgroup><col style='width:2.5em'><col style='width:5.5em'><col style='width:9em'>"
            + ("<col style='width:8.5em'>" if kind else "") + "<col></colgroup>"
            "<tr><th>#</th><th>score</th><th>id</th>" + ("<th>category</th>" if kind else "") + "<th>text</th></tr>")
    rows = []
    for rank, p in enumerate(docs, 1):
        hit = query.get("fact") is not None and query["fact"] in facts_of.get(p["id"], [])
        cat = f"<td class='cat'>{html.escape(categories[rank - 1])}</td>" if kind else ""
        rows.append(f"<tr class='{'hit' if hit else ''}'><td class='num'>{rank}</td>"
                    f"<td class='num'>{p['score']:.4g}</td><td>{html.escape(p['id'])}</td>{cat}"
                    f"<td>{highlight(shorten(p['text'], n_chars), query)}</td></tr>")
    return f"<table class='docs {cls}'>{head}{''.join(rows)}</table>"


def opponent_method(methods: list[str]) -> str | None:
    """Whose opponents to show: TrackStar's, else the last gradient method's."""
    gradient = [m for m in methods if m not in ("bm25", "dense", "truth")]
    return "trackstar" if "trackstar" in gradient else (gradient[-1] if gradient else None)


def query_section(qi: int, q: dict, results: dict, rankings: dict, opponents: dict, facts_of: dict) -> str:
    """One query, folded: its prompt and target, then each method's proponents and one method's opponents."""
    e = html.escape
    methods, k = results["settings"]["methods"], results["settings"]["k"]
    ok = results["model_correct"][qi]
    fact = f" · fact <code>{e(q['fact'])}</code>" if q.get("fact") is not None else ""
    parts = [f"<details class='q'><summary><b>{e(q['id'])}</b>: {e(q['prompt'])} <mark>{e(q['target'])}</mark> "
             f"<span class='{'ok' if ok else 'bad'}'>{'model correct' if ok else 'model wrong'}</span>{fact}"
             "</summary>"]
    for m in methods:
        r = results["per_query"][m]
        parts.append(f"<h4>{e(NAMES.get(m, m))}: RR {fmt(r['mrr'][qi], '.3f')}, "
                     f"Δp {fmt(r['dp'][qi], '.2e')}, Δlog p {fmt(r['dlogp'][qi], '.3f')}</h4>")
        cats = r.get("categories")  # absent in a results.json from before categories
        parts.append(docs_table(rankings[m][q["id"]][:k], q, facts_of, "", 300, cats[qi] if cats else None))
    om = opponent_method(methods)
    if om and opponents[om].get(q["id"]):
        parts.append(f"<h4>Opponents of {e(NAMES.get(om, om))} (lowest scores)</h4>")
        parts.append(docs_table(opponents[om][q["id"]][:k], q, facts_of, "compact", 140))
    parts.append("</details>")
    return "".join(parts)


def html_report(run: Path, results: dict, queries: list[dict], rankings: dict, opponents: dict,
                facts_of: dict) -> str:
    e = html.escape
    methods = results["settings"]["methods"]
    head = header(results)
    sections = {"results": "Results", "findings": "Claims", "charts": "Charts", "categories": "Proponent categories",
                "built": "How rows were built"}
    spectra, sweep = spectra_section(run, methods), sweep_section(run)
    if spectra:
        sections["spectra"] = "Spectra of R"
    if sweep:
        sections["sweep"] = "Sweep"
    sections["queries"] = "Queries"
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>TrackStar report: "
             f"{e(results['settings']['run'])}</title><style>{CSS}</style></head><body>",
             f"<h1>TrackStar report: <code>{e(results['settings']['run'])}</code></h1><nav>",
             "".join(f"<a href='#{a}'>{t}</a>" for a, t in sections.items()), "</nav>"]
    for para in intro(results):
        parts.append(f"<p class='note'>{inline(para)}</p>" if para.startswith("**") else f"<p>{inline(para)}</p>")
    parts.append("<h2 id='results'>Results</h2>")
    for title, mask in splits(results):
        parts.append(f"<h3>{e(title)} ({sum(mask)} queries)</h3>")
        parts.append(html_table(head, table_rows(results, mask), "results",
                                ["trackstar" if m == "trackstar" else "" for m in methods]))
    parts.append("<h2 id='findings'>The paper's claims, checked on this run</h2>"
                 f"<p>{inline(evidence_intro(results))}</p>")
    chead, crows, states = claim_rows(results)
    if crows:
        parts.append(html_table(chead, crows, "results claims", [STATE_CLASS[st] for st in states]))
    if any(c["n"] and c["split"] == "All queries" for c in results.get("claims", [])):
        parts.append(img(forest_plot(results), "paired differences of each claim with their 95% CIs"))
    chead, crows = comparison_rows(results)
    if crows:
        parts.append("<h3>Paired differences between rows</h3>" + html_table(chead, crows, "results"))
    if results.get("calibration"):
        parts.append(f"<h3>The tail-patch learning rate</h3><p>{inline(calibration_intro(results))}</p>"
                     + html_table(*calibration_rows(results), "results"))
    parts.append("<h2 id='charts'>Charts</h2>"
                 + img(results_chart(results), "MRR, recall and tail-patch per method and query split"))
    parts.append(f"<h2 id='categories'>Proponent categories</h2><p>{inline(category_intro(results))}</p>")
    for title, chead, rows in category_tables(results):
        parts.append(f"<h3>{e(title)}</h3>" + html_table(chead, rows, "results"))
    if results.get("categories"):
        parts.append(img(category_chart(results), "proponent category shares per method and query split"))
    parts.append("<h2 id='built'>How the rows were built</h2><ul>")
    parts += [f"<li>{inline(line)}</li>" for line in diagnostics(run, methods)]
    parts += ["</ul>", spectra, sweep, "<h2 id='queries'>Queries</h2>",
              "<p>Each query lists every method's top proponents; <span style='background:#d9f5d9'>green</span> "
              "rows state the query's fact, <mark>target</mark>, <mark class='subj'>subject</mark> and "
              "<mark class='part'>part of the subject's name</mark> are marked. "
              "RR: reciprocal rank; Δp, Δlog p: tail-patch averaged over the shown proponents.</p>"]
    parts += [query_section(qi, q, results, rankings, opponents, facts_of) for qi, q in enumerate(queries)]
    parts.append("</body></html>")
    return "\n".join(parts)


def render(run: Path, results: dict, queries: list[dict], rankings: dict, opponents: dict, facts_of: dict) -> None:
    """Write RUN/results.md and RUN/report.html from results (as results.json holds them) and the rankings."""
    with ts.atomic_path(run / "results.md") as tmp:
        tmp.write_text(markdown(run, results), encoding="utf-8")
    with ts.atomic_path(run / "report.html") as tmp:
        tmp.write_text(html_report(run, results, queries, rankings, opponents, facts_of), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Looking at a run in a browser (`make view`): RUN served on 127.0.0.1 (report.html, and viewer/<method>.jsonl for
# the paper authors' viewer, with the CORS header a viewer on another origin needs), optionally a built copy of
# that viewer under /pair_viewer/, until Ctrl-C.

HOSTED_VIEWER = "https://pair-code.github.io/pretraining-tda/demo"


def run_server(run: Path, port: int = 0, viewer: Path | None = None) -> http.server.ThreadingHTTPServer:
    """A server (not yet started) of RUN at / and `viewer` (a built viewer folder) at /pair_viewer/, on 127.0.0.1
    only; port 0 picks a free one."""
    if not (run / "report.html").exists():
        raise ts.TrackStarError(f"{run / 'report.html'} is missing: render it first (make all, or report.py)")
    if viewer is not None and not (viewer / "index.html").exists():
        raise ts.TrackStarError(f"--viewer {viewer} holds no index.html: give the built viewer (docs/demo/ of a "
                                "pretraining-tda checkout)")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def translate_path(self, path: str) -> str:
            if viewer is not None and path.startswith("/pair_viewer/"):
                return self._under(viewer, path[len("/pair_viewer"):])
            return self._under(run, path)

        def _under(self, root: Path, path: str) -> str:
            """The file `path` names under `root` (SimpleHTTPRequestHandler's own cleaning: no way above it)."""
            self.directory = str(root)
            return super().translate_path(path)

        def end_headers(self) -> None:
            self.send_header("Access-Control-Allow-Origin", "*")  # the hosted viewer fetches from another origin
            super().end_headers()

        def log_message(self, *args) -> None:  # a browser's requests are no news
            pass

    return http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)


def links(run: Path, base: str, viewer: bool) -> list[str]:
    """What to open: the report, and each viewer export in the authors' viewer (local copy, or hosted)."""
    out = [f"report:  {base}/report.html"]
    app = f"{base}/pair_viewer/index.html" if viewer else HOSTED_VIEWER
    for f in sorted((run / "viewer").glob("*.jsonl")):
        out.append(f"{f.stem}:  {app}?jsonl_path={base}/viewer/{f.name}")
    return out


def serve(run: Path, port: int, viewer: Path | None) -> None:
    server = run_server(run, port, viewer)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    typer.echo(f"serving {run} at {base} (Ctrl-C stops)\n" + "\n".join(links(run, base, viewer is not None)))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped")
    finally:
        server.server_close()


@app.command()
def main(
    run: Path = typer.Option(..., help="Run directory holding results.json (evaluate.py's) and the proponents files."),
    corpus: Path | None = typer.Option(None, help="The corpus the run was evaluated on."),
    queries: Path | None = typer.Option(None, help="The queries the run was evaluated on."),
    serve_run: bool = typer.Option(False, "--serve", help="Serve RUN (report.html, viewer/*.jsonl) on 127.0.0.1 "
                                   "and print the links, until Ctrl-C; renders nothing."),
    port: int = typer.Option(0, help="--serve: the port (0: a free one)."),
    viewer: Path | None = typer.Option(None, help="--serve: a built copy of the paper authors' viewer (docs/demo/ "
                                       "of a pretraining-tda checkout), served at /pair_viewer/."),
) -> None:
    """Write RUN/results.md and RUN/report.html from RUN/results.json, without the model (or, --serve, show them)."""
    if serve_run:
        return serve(run, port, viewer)
    if corpus is None or queries is None:
        raise ts.TrackStarError("give --corpus and --queries (the files the run was evaluated on), or --serve")
    docs, qs = ts.read_jsonl(corpus, "corpus"), ts.read_jsonl(queries, "queries")
    evaluate.check_inputs(run, corpus, queries)
    path = run / "results.json"
    if not path.exists():
        raise ts.TrackStarError(f"{path} is missing: run evaluate.py first")
    results = json.loads(path.read_text(encoding="utf-8"))
    by_id = {q["id"]: q for q in qs}
    missing = [qid for qid in results["queries"] if qid not in by_id]
    if missing:
        raise ts.TrackStarError(f"{path} scores query {missing[0]!r}, which --queries lacks: pass the same file")
    chosen = [by_id[qid] for qid in results["queries"]]
    s = results["settings"]
    rankings, opponents = evaluate.all_rankings(run, s["methods"], docs, chosen, len(qs), s["k"])
    render(run, results, chosen, rankings, opponents, {d["id"]: d.get("facts") or [] for d in docs})
    typer.echo(f"wrote {run / 'results.md'}, {run / 'report.html'}")


if __name__ == "__main__":
    ts.run_cli(app)
