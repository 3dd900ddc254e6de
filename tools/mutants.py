"""Mutation check of the test suite: apply one plausible bug at a time to a scratch copy of the project, run
the tests that should catch it, and report which bugs no test notices (survivors) and which only make the
tests crash without an assertion failing (not counted as caught).

    python -m tools.mutants [--only NAME ...] [--list]

Each mutant is a one-line change a careless refactor could make. Not run in CI (minutes per mutant);
`make mutants` runs them all. A survivor is a hole in the tests, or an equivalent mutant (a change
that cannot alter any result): the list says which ones we judge equivalent, and why.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.etree import ElementTree

import typer

import trackstar as ts

ROOT = Path(__file__).resolve().parents[1]
ENC, IDX, EVAL, CONV = "tests/test_encode.py", "tests/test_index_query.py", "tests/test_evaluate.py", \
    "tests/test_conventions.py"
DENSE = "tests/test_dense.py"
STREAM = "tests/test_stream.py"
HARD2 = "tests/test_hardening2.py"
DIST_SAME = "tests/test_distributed.py::test_torchrun_index_and_query_equal_one_process_bit_for_bit"
DIST_REFUSED = "tests/test_distributed.py::test_a_share_not_of_this_build_or_place_is_refused_naming_both"

# name -> (file, original text, mutated text, tests to run)
MUTANTS: dict[str, tuple[str, str, str, list[str]]] = {
    "loss in the model's dtype (bf16 logits)": (
        "trackstar.py", "logits = logits.to(LOSS_DTYPE).transpose(1, 2)", "logits = logits.transpose(1, 2)",
        ["tests/test_precision.py"]),
    "query loss includes the prompt": (
        "trackstar.py", "return p + t, [IGNORE] * len(p) + t", "return p + t, p + t", [CONV, ENC]),
    "Adam bias correction dropped": (
        "trackstar.py", "v = v / (1 - betas[1] ** step)", "v = v", [CONV, ENC]),
    "eps not squared": (
        "trackstar.py", 'default_eps = eps * eps if source == "adam" else 0.0',
        'default_eps = eps if source == "adam" else 0.0', [CONV, ENC]),
    "BM25 length normalisation changed": (
        "query.py", "self.norm = bm.k1 * (1 - bm.b + bm.b * doc_len / bm.avgdl)",
        "self.norm = bm.k1 * (1 - 0.5 + 0.5 * doc_len / bm.avgdl)", [CONV, IDX]),
    "left padding": (
        "trackstar.py", "ids[b, : len(x)] = torch.tensor(x)", "ids[b, T - len(x):] = torch.tensor(x)", [CONV, ENC]),
    "projection variance 1/d per side": (
        "trackstar.py", "/ math.sqrt(s)", "/ math.sqrt(s * s)", [ENC]),
    "correction multiplies instead of divides": (
        "trackstar.py", 's = (v + eps).rsqrt()', 's = (v + eps).sqrt()', [ENC]),
    "Ledoit–Wolf noise term uses n, not n²": (
        "index.py", "beta2 = (norm4 / n - frob2) / (n * d)", "beta2 = (norm4 / n - frob2) / d", [IDX]),
    "λ crossing uses the wrong spectrum": (
        "index.py", "a, b = float(e_train[k]), float(e_eval[k])", "a, b = float(e_eval[k]), float(e_train[k])", [IDX]),
    "R^(-1/2) on documents only": (
        "index.py", "query_transform = inverse if opts.trak else inv_sqrt",
        "query_transform = inverse if opts.trak else None", [IDX]),
    "top-k ties to the higher id": (
        "query.py", "return (_LOW - 1 - ids).add(order, alpha=_LOW)", "return ids.add(order, alpha=_LOW)", [IDX]),
    "unit norm skipped on queries": (
        "query.py", 'matrix, meta["unit_norm"])\n    return q * meta["scale"]',
        'matrix, False)\n    return q * meta["scale"]', [IDX]),
    "MRR counts ranks from 0": (
        "evaluate.py", "for rank, facts in enumerate(retrieved_facts, 1):",
        "for rank, facts in enumerate(retrieved_facts, 2):", [EVAL]),
    "tail-patch drops Adam's (1−β1)": (
        "evaluate.py", "g.mul_(1 - beta1).div_(denom)", "g.div_(denom)", [EVAL]),
    "tail-patch divides by the stale v": (
        "evaluate.py", "denom = g.mul(1 - beta2).mul_(g).add_(v[name] * beta2).add_(eps).sqrt_()",
        "denom = v[name].add(eps).sqrt()", [EVAL]),
    "tail-patch does not restore the weights": (
        "evaluate.py", "            params[n].data = w", "            pass", [EVAL]),
    "resume skips chunks without checking settings": (
        "encode.py", "        ts.check_same(ts.read_meta(out), run,",
        "        (lambda *a: None)(ts.read_meta(out), run,",
        ["tests/test_encode_cli.py"]),
    "prepare: facts stated once fewer": (
        "prepare.py", "remaining[i] -= 1", "remaining[i] -= 2",
        ["tests/test_prepare.py::test_each_fact_is_stated_in_exactly_its_drawn_number_of_documents"]),
    "dense: mean pooled over padding too": (
        "query.py", "ts.unit_normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))",
        "ts.unit_normalize(hidden.mean(1))", [DENSE]),
    "dense: model run without the attention mask": (
        "query.py", 'model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])',
        'model(input_ids=batch["input_ids"])', [DENSE]),
    "dense: queries embedded without their target": (
        "query.py", 'return q["prompt"] + ts.spaced_target(q["prompt"], q["target"])', 'return q["prompt"]', [DENSE]),
    "dense: index asked with another model": (
        "query.py", 'if dense.fingerprint != meta["model"]:', "if False:", [DENSE]),
    "dense: evaluate skips the dense index's corpus": (
        "evaluate.py", 'dense = run / "index-dense" / "index.h5"', 'dense = run / "no-such-index"', [DENSE]),
    "out-of-memory split keeps only the first half": (
        "trackstar.py", "return {k: torch.cat([a[k], b[k]]) for k in a}", "return a", [ENC]),
    "a resumed run re-chooses its token budget": (
        "encode.py", "token_budget = o.token_budget or recorded_budget(o.out) or auto_token_budget(model, device)",
        "token_budget = o.token_budget or auto_token_budget(model, device)",
        ["tests/test_encode_cli.py::test_token_budget_is_chosen_printed_recorded_and_kept_on_resume"]),
    "trend mixes learning rates": (
        "experiments/trend.py", 'SAME = ("lr", "n_docs", "tail_patch_queries", "k")',
        'SAME = ("n_docs", "tail_patch_queries", "k")', ["tests/test_trend.py"]),
    "categories match inside words": (
        "evaluate.py", r'rf"(?<!\w){words}(?!\w)"', 'rf"{words}"', ["tests/test_categories.py"]),
    "chunk dtype not compared between runs": (
        "trackstar.py", '"matmul_precision", "chunk_dtype", "tool"]', '"matmul_precision", "tool"]',
        ["tests/test_chunk_dtype.py"]),
    "scan blocks cross chunks": (
        "query.py", "return rows, [(lo, min(rows, hi - lo)) for first, hi in spans for lo in range(first, hi, rows)]",
        "return rows, [(lo, min(rows, spans[-1][1] - lo)) for lo in range(spans[0][0], spans[-1][1], rows)]",
        [DIST_SAME]),
    "torchrun merge keeps rank 0's keys only": (
        "query.py", "torch.cat(parts, dim=1)", "torch.cat(parts[:1], dim=1)", [DIST_SAME]),
    "a share of another index build is read": (
        "trackstar.py", 'if theirs.get("build") != build:', "if False:", [DIST_REFUSED]),
    "a directory's digest ignores its shards' contents": (
        "trackstar.py", 'h.update(f"{Path(os.path.relpath(f, root)).as_posix()}\\t{file_digest(f)}\\n".encode())',
        'h.update(f"{Path(os.path.relpath(f, root)).as_posix()}\\n".encode())', [STREAM]),
    "the tokenizer dropped from the fingerprint": (
        "trackstar.py", "        h.update(tokenizer_fingerprint(tokenizer).encode())", "        pass",
        [HARD2 + "::test_the_fingerprint_covers_the_tokenizer_not_only_the_weights"]),
    "an index file of another build is read": (
        "trackstar.py", "        if theirs != build:", "        if False:",
        [HARD2 + "::test_an_index_swapped_between_two_opens_is_refused_naming_both_builds"]),
    "proponents out of score order accepted": (
        "evaluate.py", "        if any(a < b for a, b in zip(scores, scores[1:], strict=False)):", "        if False:",
        [HARD2 + "::test_a_proponents_file_edited_by_hand_is_refused_at_its_line"]),
    "ids read without NFC": (
        "trackstar.py", 'return unicodedata.normalize("NFC", text)', "return text",
        [HARD2 + "::test_ids_and_facts_in_nfd_match_the_nfc_corpus"]),
    "an output may lie inside an input folder": (
        "trackstar.py", "        if real in mine.parents:\n", "        if False:\n",
        ["tests/test_hardening.py::test_bad_input_is_one_line_naming_the_culprit[encode into the model's folder]"]),
    "killed runs' temporaries kept": (
        "trackstar.py", "        if pid.isdigit() and not _alive(int(pid)):", "        if False:",
        ["tests/test_hardening.py::test_temporary_files_of_killed_runs_are_removed_and_a_live_runs_kept"]),
        "R's eigenvectors by divide and conquer (2·d² workspace)": (
        "index.py", 'driver="evr")', 'driver="evd")', [IDX]),
}


def scratch_copy() -> Path:
    """The project without its virtualenv and outputs (linked, not copied: it is read-only here)."""
    tmp = Path(tempfile.mkdtemp(prefix="mutant-"))
    shutil.copytree(ROOT, tmp / "repo", ignore=shutil.ignore_patterns(".venv", "runs", "data", ".git", "__pycache__"))
    (tmp / "repo" / ".venv").symlink_to(ROOT / ".venv")
    return tmp / "repo"


# A test kills a mutant when one of its assertions fails (pytest's own `fail`, and `raises` that saw nothing, count):
# a mutant that only makes the code crash (an import error, a NameError in a fixture) shows the tests run the line,
# not that they check what it computes.
ASSERTED = ("AssertionError", "Failed", "assert ")


def outcome(repo: Path, tests: list[str]) -> str:
    """"passed", "killed" (an assertion failed) or "crashed" (the tests failed, but none by an assertion)."""
    report = repo / "junit.xml"
    r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        *tests], cwd=repo, capture_output=True, encoding="utf-8")
    if r.returncode == 0:
        return "passed"
    failures = ElementTree.parse(report).getroot().iter("failure") if report.exists() else []
    return "killed" if any((f.get("message") or "").startswith(ASSERTED) for f in failures) else "crashed"


def tests_fail(repo: Path, tests: list[str]) -> bool:
    return outcome(repo, tests) != "passed"


def run_mutant(name: str) -> str:
    """What the tests do with the mutant applied: "killed", "crashed" or "passed" (it survives)."""
    file, old, new, tests = MUTANTS[name]
    repo = scratch_copy()
    try:
        path = repo / file
        text = path.read_text(encoding="utf-8")
        if text.count(old) != 1:
            raise SystemExit(f"mutant {name!r}: its original text is not found exactly once in {file}")
        path.write_text(text.replace(old, new), encoding="utf-8")
        return outcome(repo, tests)
    finally:
        shutil.rmtree(repo.parent, ignore_errors=True)


def main(only: list[str] = typer.Option(None, help="Run only these mutants (by name)."),
         list_: bool = typer.Option(False, "--list", help="List the mutants and exit.")) -> None:
    names = only or list(MUTANTS)
    if list_:
        print("\n".join(names))
        return
    # The same tests on an unchanged copy must pass, or every mutant would count as killed.
    baseline = sorted({test for name in names for test in MUTANTS[name][3]})
    repo = scratch_copy()
    try:
        if tests_fail(repo, baseline):
            raise SystemExit(f"the tests fail on an unchanged copy ({baseline}): fix them first")
    finally:
        shutil.rmtree(repo.parent, ignore_errors=True)
    found: dict[str, list[str]] = {"killed": [], "crashed": [], "passed": []}
    for name in names:
        t0 = time.time()
        state = run_mutant(name)
        print(f"{ {'killed': 'killed  ', 'crashed': 'CRASHED ', 'passed': 'SURVIVED'}[state]} "
              f"{time.time() - t0:5.0f} s  {name}", flush=True)
        found[state].append(name)
    (ROOT / "runs").mkdir(exist_ok=True)
    ts.write_json(ROOT / "runs" / "mutants.json", {"mutants": len(names), **found})  # for tools/record.py
    print(f"killed by an assertion {len(found['killed'])}/{len(names)}"
          + (f"; only crashed: {found['crashed']}" if found["crashed"] else "")
          + (f"; survivors: {found['passed']}" if found["passed"] else ""))
    raise SystemExit(1 if found["crashed"] or found["passed"] else 0)


if __name__ == "__main__":
    typer.run(main)
