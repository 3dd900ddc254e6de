"""The model-size axis: attribution (MRR) and influence (tail-patch Δp) of BM25, gradient cosine, TrackStar and
the ground truth for fact-world models of three sizes, trained on the same corpus with the same schedule.

    make sizes [MODEL_SIZES="small default large"]    # each size: prepare → encode → ... → evaluate, then this
    python -m experiments.sizes --run RUN --size small --size default --size large

The paper's abstract: "with increasing model size and training tokens, influence more closely aligns with
attribution". Each size's run (RUN/sizes/SIZE) must share the corpus, the queries, the tail-patch sample and
learning rate; the table gives each size's means, the paired differences at each size, and the change from the
smallest model to the largest paired over the same queries. Writes RUN/sizes/sizes.json, sizes.md, sizes.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

import evaluate
import trackstar as ts
from experiments import trend

app = typer.Typer(add_completion=False, rich_markup_mode=None)


def read_size(run: Path, size: str) -> dict:
    """One size's results and its model's parameter count and training tokens (from its world.json)."""
    path = run / "sizes" / size / "results.json"
    if not path.exists():
        raise ts.TrackStarError(f"{path} is missing: run `make sizes`")
    results = json.loads(path.read_text(encoding="utf-8"))
    world = Path(results["settings"]["model"]).parent / "world.json"
    info = json.loads(world.read_text(encoding="utf-8"))
    if info["model"].get("size", "default") != size:
        raise ts.TrackStarError(f"{path} was evaluated with a {info['model'].get('size')} model ({world}), not {size}")
    params = info["model"]["parameters"]
    return {"run": str(path.parent), "step": params, "tokens": info["training"]["tokens"],
            "label": f"{size} ({params / 1e6:.2f}M)", "results": results}


@app.command(help=__doc__)
def main(
    run: Path = typer.Option(..., help="The run whose sizes/ holds each size's run."),
    size: list[str] = typer.Option(..., help="The model sizes, smallest first (repeat the option)."),
) -> None:
    points = [read_size(run, s) for s in size]
    trend.check_comparable(points)
    rows, changes = trend.summary(points), trend.across(points)
    out = run / "sizes"
    ts.write_json(out / "sizes.json", evaluate.jsonable({"rows": rows, "across": changes, "sizes": size,
                                                         "provenance": ts.provenance()}))
    md = trend.markdown(rows, "model") + "\n\n" + trend.across_markdown(changes, points[0]["label"],
                                                                         points[-1]["label"])
    lr = points[0]["results"]["settings"]["lr"]
    with ts.atomic_path(out / "sizes.md") as tmp:
        tmp.write_text(f"Model sizes ({len(rows)}; tail-patch at lr {lr:.3g} for all)\n\n{md}\n", encoding="utf-8")
    with ts.atomic_path(out / "sizes.png") as tmp:
        tmp.write_bytes(trend.figure(rows, [p["step"] for p in points], "model parameters", log=True))
    print(md)
    print(f"wrote {out}/sizes.md, sizes.json, sizes.png")


if __name__ == "__main__":
    ts.run_cli(app)
