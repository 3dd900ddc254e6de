"""`report.py --serve` (`make view`): RUN's report.html and viewer exports, and a built viewer beside them, served
on 127.0.0.1 at the printed address with the CORS header the hosted viewer needs, nothing above them; Ctrl-C stops
it cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from conftest import ROOT


def fetch(url: str) -> tuple[int, bytes, str | None]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read(), r.headers.get("Access-Control-Allow-Origin")
    except urllib.error.HTTPError as e:
        return e.code, b"", None


@pytest.fixture()
def run_dir(tmp_path):
    """A rendered run: report.html and two viewer exports; a built viewer folder; a secret beside the run."""
    run = tmp_path / "run"
    (run / "viewer").mkdir(parents=True)
    (run / "report.html").write_text("<html>the report</html>")
    for m in ("bm25", "trackstar"):
        (run / "viewer" / f"{m}.jsonl").write_text(f'{{"example_id": "q0", "method": "{m}"}}\n')
    viewer = tmp_path / "pair_viewer"
    viewer.mkdir()
    (viewer / "index.html").write_text("<html>the viewer</html>")
    (tmp_path / "secret.txt").write_text("not for the browser")
    return run, viewer


def test_serve_prints_its_links_serves_the_run_and_the_viewer_and_stops_on_ctrl_c(run_dir):
    run, viewer = run_dir
    p = subprocess.Popen([sys.executable, str(ROOT / "report.py"), "--run", str(run), "--serve", "--viewer",
                          str(viewer)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"},
                         # a shell's background job inherits SIGINT ignored; a user's terminal delivers it
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = p.stdout.readline()
        base = re.search(r"at (http://127\.0\.0\.1:\d+) ", first).group(1)
        printed = [p.stdout.readline().strip() for _ in range(3)]
        assert printed[0] == f"report:  {base}/report.html"
        assert printed[1:] == [f"{m}:  {base}/pair_viewer/index.html?jsonl_path={base}/viewer/{m}.jsonl"
                               for m in ("bm25", "trackstar")]
        status, body, cors = fetch(f"{base}/report.html")
        assert (status, body, cors) == (200, b"<html>the report</html>", "*")
        assert fetch(f"{base}/viewer/trackstar.jsonl")[1] == b'{"example_id": "q0", "method": "trackstar"}\n'
        assert fetch(f"{base}/pair_viewer/index.html")[1] == b"<html>the viewer</html>"
        assert fetch(f"{base}/../secret.txt")[0] == 404 and fetch(f"{base}/pair_viewer/../../secret.txt")[0] == 404
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
        assert p.returncode == 0 and "stopped" in out and "Traceback" not in err, err[-2000:]
    finally:
        if p.poll() is None:
            p.kill()


def test_serve_without_a_report_is_refused_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "report.py"), "--run", str(tmp_path), "--serve"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "report.html is missing" in r.stderr and "Traceback" not in r.stderr
