"""A screenshot of a run's TrackStar row in the paper authors' viewer (README's figure).

    python -m tools.viewer_screenshot --run runs/factworld-default-seed0 --viewer ../shared/data/pair_viewer \
        --out docs/figures/viewer.png

The run and a built viewer are served on 127.0.0.1 exactly as `make view` serves them (report.run_server), and
headless Chromium (Debian's `chromium`) renders index.html?jsonl_path=... of RUN/viewer/trackstar.jsonl.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import typer

import report
import trackstar as ts

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(run: Path = typer.Option(..., help="A run folder evaluated with --export-viewer (make all writes one)."),
         viewer: Path = typer.Option(..., help="The built viewer folder (index.html, bundle.js)."),
         out: Path = typer.Option(Path("docs/figures/viewer.png"), help="The PNG to write."),
         method: str = typer.Option("trackstar", help="Which exported row to show.")) -> None:
    if shutil.which("chromium") is None:
        raise ts.TrackStarError("needs Debian's chromium (apt-get install chromium)")
    if not (run / "viewer" / f"{method}.jsonl").exists():
        raise ts.TrackStarError(f"{run / 'viewer' / (method + '.jsonl')} is missing: evaluate with --export-viewer")
    server = report.run_server(run, 0, viewer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    url = f"{base}/pair_viewer/index.html?jsonl_path={base}/viewer/{method}.jsonl"
    try:
        with tempfile.TemporaryDirectory() as work:  # Chromium picks the format by the name's .png
            shot = Path(work) / "shot.png"
            subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                            "--disable-background-networking", "--hide-scrollbars", f"--user-data-dir={work}/profile",
                            "--virtual-time-budget=15000", "--window-size=1400,1000", f"--screenshot={shot}", url],
                           check=True, capture_output=True, timeout=180)
            with ts.atomic_path(out) as tmp:
                shutil.copyfile(shot, tmp)
    finally:
        server.shutdown()
        server.server_close()
    typer.echo(f"wrote {out} ({url})")


if __name__ == "__main__":
    ts.run_cli(app)
