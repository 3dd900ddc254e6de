"""Record an experiment for the docs: run its command, time it, and keep what it produced with its provenance.

    python -m tools.record NAME RESULTS -- COMMAND ...
    python -m tools.record factworld runs/factworld-default-seed0/results.json -- make all

Runs COMMAND from the repository root, then writes docs/results/NAME.json: the command, the commit, the
machine (CPU model, cores, memory, whether it has AVX-512), the wall time and the peak memory of the command's
largest process, the date, and RESULTS (the JSON file the command wrote, per-query values rounded to 6
significant digits, proponent categories left out). `make docs` renders every table of README.md and docs/
from these files, so a figure there is regenerated, never retyped.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import typer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"

app = typer.Typer(add_completion=False, rich_markup_mode=None)


def machine() -> dict:
    """What the figures were measured on."""
    cpu, flags, mem_kib = platform.processor() or platform.machine(), "", 0
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8")
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags"))
        mem_kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines()
                           if line.startswith("MemTotal")))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kib / 2**20), "avx512": "avx512f" in flags,
            "arch": platform.machine(), "os": platform.system()}


def commit() -> str | None:
    """The checkout's commit, "+dirty" when tracked files differ from it; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, encoding="utf-8", check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, encoding="utf-8", check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def rounded(x: Any) -> Any:
    """Floats to 6 significant digits (enough for every printed digit, a third of the bytes)."""
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v) for v in x]
    return x


def kept(results: dict) -> dict:
    """What the docs need of a results file: everything but each proponent's category (the shares stay)."""
    out = dict(results)
    if isinstance(out.get("per_query"), dict):
        out["per_query"] = {m: {k: v for k, v in pq.items() if k != "categories"} for m, pq in out["per_query"].items()}
    return rounded(out)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def main(ctx: typer.Context, name: str = typer.Argument(..., help="docs/results/NAME.json"),
         results: Path = typer.Argument(..., help="The JSON file the command writes (relative to the root).")) -> None:
    command = [a for a in ctx.args if a != "--"]
    if not command:
        raise SystemExit("give the command after --")
    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    code = subprocess.run(command, cwd=ROOT).returncode
    wall = time.perf_counter() - t0
    if code:
        raise SystemExit(f"{' '.join(command)} failed (exit {code}); nothing recorded")
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # kB on Linux
    record = {"name": name, "command": " ".join(command), "commit": commit(), "machine": machine(),
              "python": sys.version.split()[0], "date": started, "wall_seconds": round(wall, 1),
              "peak_rss_mib": round(peak_mib), "results_file": str(results),
              "results": kept(json.loads((ROOT / results).read_text(encoding="utf-8")))}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)
    print(f"recorded {path.relative_to(ROOT)}: {record['command']} in {wall / 60:.1f} min")


if __name__ == "__main__":
    app()
