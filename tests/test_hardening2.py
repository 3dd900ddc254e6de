"""Nothing silently wrong under concurrency, odd paths and hand-edited files: another tokenizer, an index rebuilt
while it is read, proponents files that do not say what made them, ids in two Unicode forms, links that name
a file twice, outputs over inputs, and every compatibility key guarded; terminals, locales, targets without their
space, moved runs and paths make cannot name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import h5py
import pytest
from conftest import refused, run, write_jsonl

import trackstar as ts


def encode(kind, model_dir, data, out, *extra, check=True):
    return run("encode.py", kind, "--model", model_dir, "--data", data, "--out", out, "--dim", 64,
               "--chunk-size", 8, *extra, check=check)


def model_with_other_tokenizer(model_dir: Path, tmp: Path) -> Path:
    """The same weights and config with a tokenizer.json whose vocabulary has two ids swapped: as many
    tokens, other ids for the same text."""
    other = tmp / "other-tokenizer"
    shutil.copytree(model_dir, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    return other


# 1. The tokenizer is part of the model's identity.


def test_the_fingerprint_covers_the_tokenizer_not_only_the_weights(model_dir, tmp_path):
    other = model_with_other_tokenizer(model_dir, tmp_path)
    mine, tok = ts.load_model(str(model_dir))
    theirs, other_tok = ts.load_model(str(other))
    assert ts.fingerprint(mine) == ts.fingerprint(theirs), "the weights are the same"
    assert len(tok) == len(other_tok) and tok.get_vocab() != other_tok.get_vocab()
    assert mine.trackstar_fingerprint != theirs.trackstar_fingerprint
    tok("Rome is in Italy.", truncation=True, max_length=3)  # call state is not identity
    assert ts.fingerprint(mine, tok) == mine.trackstar_fingerprint


def test_queries_encoded_with_another_tokenizer_are_refused_by_index_and_query(model_dir, corpus_file,
                                                                               queries_file, tmp_path):
    other = model_with_other_tokenizer(model_dir, tmp_path)
    corpus, queries, index = tmp_path / "corpus", tmp_path / "queries", tmp_path / "index"
    encode("corpus", model_dir, corpus_file, corpus)
    encode("queries", other, queries_file, queries)
    fps = [json.loads((d / "meta.json").read_text())["model"] for d in (corpus, queries)]
    assert fps[0] != fps[1]
    r = run("index.py", "--corpus", corpus, "--queries", queries, "--out", index, "--hessian", "none", check=False)
    refused(r, "'model'", *fps)
    assert not index.exists()
    run("index.py", "--corpus", corpus, "--out", index, "--hessian", "none")
    r = run("query.py", "--index", index, "--queries", queries, "--out", tmp_path / "p.jsonl", check=False)
    refused(r, "'model'", *fps)
    assert not (tmp_path / "p.jsonl").exists()


# 2. A reader sees one build: an index rebuilt between two of its opens is refused.


def build_of(index: Path) -> str:
    with h5py.File(index / "index.h5", "r") as f:
        return ts.read_attrs(f)["build"]


@pytest.fixture()
def two_builds(model_dir, corpus_file, queries_file, tmp_path) -> tuple[Path, Path, Path]:
    """(index, another build of an index over the same corpus, the queries run)."""
    corpus, queries = tmp_path / "corpus", tmp_path / "queries"
    encode("corpus", model_dir, corpus_file, corpus)
    encode("queries", model_dir, queries_file, queries)
    run("index.py", "--corpus", corpus, "--queries", queries, "--out", tmp_path / "index", "--hessian", "none")
    run("index.py", "--corpus", corpus, "--queries", queries, "--out", tmp_path / "rebuilt", "--hessian", "train",
        "--damping", "0.5")
    return tmp_path / "index", tmp_path / "rebuilt", queries


@pytest.mark.parametrize("after", ["read_index_meta", "transformed_queries"])
def test_an_index_swapped_between_two_opens_is_refused_naming_both_builds(two_builds, tmp_path, monkeypatch,
                                                                         after):
    """The rebuild lands after the settings were read (before the query transform is) or after the queries were
    transformed (before the rows are scanned): either way no answer mixes two builds."""
    import query

    index, rebuilt, queries = two_builds
    builds = [build_of(d) for d in (index, rebuilt)]
    assert builds[0] != builds[1]
    original = getattr(query, after)

    def then_swap(*args, **kwargs):
        got = original(*args, **kwargs)
        os.replace(index, tmp_path / "old")
        os.replace(rebuilt, index)
        return got

    monkeypatch.setattr(query, after, then_swap)
    out = tmp_path / "p.jsonl"
    with pytest.raises(ts.TrackStarError, match="another index build") as e:
        query.query_runs(index, [(queries, out)], 3, 0, "cpu")
    assert builds[0] in str(e.value) and builds[1] in str(e.value)
    assert not out.exists()


# 3. A proponents file says what made it, and evaluate checks it.


def bm25_proponents(corpus_file, queries_file, tmp_path, k: int = 3) -> Path:
    run_dir = tmp_path / "run"
    run("query.py", "--method", "bm25", "--corpus", corpus_file, "--queries", queries_file,
        "--out", run_dir / "proponents-bm25.jsonl", "--k", k)
    return run_dir


def evaluate_bm25(run_dir, model_dir, corpus_file, queries_file, *extra):
    return run("evaluate.py", "--run", run_dir, "--model", model_dir, "--corpus", corpus_file, "--queries",
               queries_file, "--methods", "bm25", "--no-tail-patch", *extra, check=False)


def test_proponents_lines_record_method_k_and_queries(corpus_file, queries_file, tmp_path):
    path = bm25_proponents(corpus_file, queries_file, tmp_path) / "proponents-bm25.jsonl"
    made = [json.loads(line)["made_by"] for line in path.read_text().splitlines()]
    assert made[0] == made[1] and made[0]["kind"] == "proponents" and made[0]["method"] == "bm25"
    assert made[0]["k"] == 3 and made[0]["queries_digest"] == ts.data_digest(queries_file)


def _edit(path: Path, edit) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    edit(rows)
    write_jsonl(path, rows)


EDITS = {
    # name: (edit of the rows, words the refusal must hold)
    "ascending proponents": (lambda rows: rows[0]["proponents"][0].update(score=-1.0), ["descending", ":1"]),
    "a query ranked twice": (lambda rows: rows.append(rows[0]), ["'q0'", "second time", ":3"]),
    "one document repeated": (lambda rows: rows[1].update(proponents=[rows[1]["proponents"][0]] * 3),
                              ["more than once", ":2"]),
    "two outputs in one file": (lambda rows: rows[1]["made_by"].update(k=5), ["two outputs", ":2"]),
    "no record of what made it": (lambda rows: [r.pop("made_by") for r in rows], ["made_by", ":1"]),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_a_proponents_file_edited_by_hand_is_refused_at_its_line(case, model_dir, corpus_file, queries_file,
                                                                tmp_path):
    run_dir = bm25_proponents(corpus_file, queries_file, tmp_path)
    edit, words = EDITS[case]
    _edit(run_dir / "proponents-bm25.jsonl", edit)
    refused(evaluate_bm25(run_dir, model_dir, corpus_file, queries_file, "--k", 3), "proponents-bm25.jsonl", *words)
    assert not (run_dir / "results.json").exists()


def test_evaluate_refuses_a_k_larger_than_the_files(model_dir, corpus_file, queries_file, tmp_path):
    run_dir = bm25_proponents(corpus_file, queries_file, tmp_path, k=1)
    refused(evaluate_bm25(run_dir, model_dir, corpus_file, queries_file, "--k", 10), "--k 1", "--k 10")
    assert evaluate_bm25(run_dir, model_dir, corpus_file, queries_file, "--k", 1).returncode == 0


# 4. Ids and fact ids are read in one Unicode form (NFC); a fact no document states is reported.


def test_ids_and_facts_in_nfd_match_the_nfc_corpus(model_dir, tmp_path):
    nfc, nfd = "f-caf\u00e9", "f-cafe\u0301"
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [
        {"id": "d\u00e9", "text": "The capital of France is Paris.", "facts": [nfc]},
        {"id": "d1", "text": "Rome is the capital of Italy.", "facts": ["f-rome"]}])
    queries = write_jsonl(tmp_path / "queries.jsonl", [
        {"id": "q0", "prompt": "The capital of France is", "target": " Paris", "fact": nfd}])
    assert ts.read_jsonl(queries, "queries")[0]["fact"] == nfc
    assert ts.read_jsonl(write_jsonl(tmp_path / "c2.jsonl", [{"id": "de\u0301", "text": "x y z"}]),
                         "corpus")[0]["id"] == "d\u00e9"
    run_dir = bm25_proponents(corpus, queries, tmp_path, k=2)
    r = evaluate_bm25(run_dir, model_dir, corpus, queries, "--k", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["per_query"]["bm25"]["mrr"] == [1.0] and results["settings"]["unstated_fact_queries"] == []


def test_a_query_whose_fact_no_document_states_is_counted_and_said(model_dir, corpus_file, tmp_path):
    rows = [{"id": f"d{i}", "text": t, "facts": [f"f{i}"]} for i, t in enumerate(["Paris is in France.",
                                                                                 "Rome is in Italy."])]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", rows)
    queries = write_jsonl(tmp_path / "queries.jsonl", [
        {"id": "q0", "prompt": "Paris is in", "target": " France", "fact": "f0"},
        {"id": "q1", "prompt": "Rome is in", "target": " Italy", "fact": "f-nowhere"}])
    run_dir = bm25_proponents(corpus, queries, tmp_path, k=2)
    r = evaluate_bm25(run_dir, model_dir, corpus, queries, "--k", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 of 2 queries" in r.stderr and "'f-nowhere'" in r.stderr
    assert json.loads((run_dir / "results.json").read_text())["settings"]["unstated_fact_queries"] == ["q1"]


# 7. Every compatibility key and every chunk key is guarded: two artifacts differing only in it are refused,
# naming the key and both values.

OTHER = {"tool": "trackstar 0.0.0", "kind": "queries", "loss": "target tokens", "data_digest": "other-digest",
         "n_examples": 999, "chunk_size": 7, "n_chunks": 9, "token_budget": 1, "datasets": ["vectors", "extra"],
         "model": "fingerprint-B", "dtype": "bfloat16", "max_length": 32, "truncated": 5, "dim": 64, "seed": 7,
         "factors": [8, 4], "modules": "3 matrices/xyz", "params": "all", "gradient": "factored",
         "matmul_precision": "high", "chunk_dtype": "bfloat16", "correction": "none", "v_digest": "v-2",
         "eps": 1e-3, "lr": 0.1, "factor_v": True}


def test_the_key_lists_hold_every_setting_that_changes_a_vector():
    """A key dropped from a list would drop its test too: the lists are pinned here."""
    assert set(ts.COMPATIBLE_KEYS) == {"model", "dtype", "dim", "seed", "factors", "modules", "params", "correction",
                                       "v_digest", "eps", "matmul_precision", "chunk_dtype", "tool"}
    assert set(ts.CHUNK_KEYS) == set(OTHER)


@pytest.mark.parametrize("key", ts.COMPATIBLE_KEYS)
def test_a_corpus_and_queries_differing_only_in_a_compatibility_key_are_refused(key, tmp_path):
    import numpy as np
    from test_index_query import META, fabricate_run

    import index as index_cli

    corpus = fabricate_run(tmp_path / "corpus", "corpus", {"vectors": np.ones((5, 32))})
    width = OTHER["dim"] if key == "dim" else 32
    queries = fabricate_run(tmp_path / "queries", "queries", {"vectors": np.ones((3, width))}, **{key: OTHER[key]})
    with pytest.raises(ts.TrackStarError) as e:
        index_cli.read_runs(corpus, queries, False)
    for word in (repr(key), repr(META[key]), repr(OTHER[key])):
        assert word in str(e.value), (word, str(e.value))


@pytest.mark.parametrize("key", ts.CHUNK_KEYS)
def test_a_chunk_differing_from_its_run_only_in_a_chunk_key_is_refused(key, tmp_path):
    import numpy as np
    from test_index_query import fabricate_run

    run_dir = fabricate_run(tmp_path / "corpus", "corpus", {"vectors": np.ones((5, 32))})
    chunk = run_dir / ts.chunk_name(0)
    with h5py.File(chunk, "r+") as f:
        mine = ts.read_attrs(f)[key]
        f.attrs[key] = json.dumps(OTHER[key])
    assert mine != OTHER[key]
    with pytest.raises(ts.TrackStarError) as e:
        ts.chunk_files(run_dir)
    for word in (repr(key), repr(mine), repr(OTHER[key]), chunk.name):
        assert word in str(e.value), (word, str(e.value))


# 5. A file is read once, whatever the links that name it.


def test_a_glob_through_symlinked_folders_reads_each_file_once(tmp_path):
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    write_jsonl(data / "a" / "part.jsonl", [{"id": f"d{i}", "text": f"document {i}"} for i in range(3)])
    (data / "b").symlink_to(data / "a")  # the same folder twice
    (data / "c.jsonl").symlink_to(data / "a" / "part.jsonl")
    files = ts.data_files(f"{data}/**/*.jsonl")
    assert len(files) == 1 and files[0] == data / "a" / "part.jsonl"
    assert [r["id"] for r in ts.read_jsonl(f"{data}/**/*.jsonl", "corpus")] == ["d0", "d1", "d2"]


# 9. An option the method does not read is refused, not ignored: the answer would be to another question.


@pytest.mark.parametrize("method, option", [("bm25", "--dense-model"), ("bm25", "--index"), ("bm25", "--prompt"),
                                            ("bm25", "--target"), ("trackstar", "--dense-model")])
def test_an_option_the_method_does_not_read_is_refused_naming_both(method, option, corpus_file, queries_file,
                                                                   tmp_path):
    value = {"--corpus": corpus_file, "--index": tmp_path, "--prompt": "The capital of France is",
             "--target": " Paris", "--dense-model": "minilm"}[option]
    needed = {"trackstar": ["--index", tmp_path], "bm25": ["--corpus", corpus_file]}[method]
    if option in needed:
        needed = []
    out = tmp_path / "p.jsonl"
    r = run("query.py", "--method", method, *needed, "--queries", queries_file, "--out", out, option, value,
            check=False)
    refused(r, option, f"--method {method}")
    assert not out.exists()


# 12. A --methods that names no method is refused before an earlier table is replaced.


def test_methods_naming_nothing_is_refused_and_the_earlier_results_kept(model_dir, corpus_file, queries_file,
                                                                        tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    earlier = {name: f"earlier {name}" for name in ("results.json", "results.md")}
    for name, text in earlier.items():
        (run_dir / name).write_text(text)
    r = run("evaluate.py", "--run", run_dir, "--model", model_dir, "--corpus", corpus_file, "--queries",
            queries_file, "--methods", ",", "--no-tail-patch", "--device", "cpu", check=False)
    refused(r, "--methods ','", "names no method")
    assert {name: (run_dir / name).read_text() for name in earlier} == earlier


# A printed table escapes terminal control characters in ids and texts; the files keep them as written.


def test_an_adhoc_table_escapes_control_characters_that_the_proponents_file_keeps(model_dir, queries_file,
                                                                                  tmp_path):
    doc_id, text = "d\r\x1b[31mred", "The capital of France is Paris.\x07\x1b[2J\x9b"
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": doc_id, "text": text},
                                                     {"id": "d1", "text": "Rome is the capital of Italy."}])
    encode("corpus", model_dir, corpus, tmp_path / "corpus-run")
    run("index.py", "--corpus", tmp_path / "corpus-run", "--out", tmp_path / "index", "--hessian", "none")
    shown = run("query.py", "--index", tmp_path / "index", "--prompt", "The capital of France is", "--target",
                " Paris", "--k", 2, "--device", "cpu").stdout
    assert not set(shown) & {"\r", "\x1b", "\x07", "\x9b"}, repr(shown)
    assert "d\\r\\x1b[31mred" in shown and "Paris.\\x07\\x1b[2J\\x9b" in shown
    out = tmp_path / "p.jsonl"
    run("query.py", "--method", "bm25", "--corpus", corpus, "--queries", queries_file, "--out", out, "--k", 2)
    kept = {p["id"]: p["text"] for line in out.read_text(encoding="utf-8").splitlines()
            for p in json.loads(line)["proponents"]}
    assert kept[doc_id] == text


# A target is the words after its prompt, for every method alike: one without its leading space is read with it,
# and said once on stderr.


def test_a_target_lacking_its_leading_space_is_read_with_it_by_every_method_and_said(model_dir, corpus_file,
                                                                                     tmp_path):
    import numpy as np

    import query

    prompt = "The capital of France is"
    spaced, bare = (write_jsonl(tmp_path / f"{name}.jsonl", [{"id": "q0", "prompt": prompt, "target": target}])
                    for name, target in (("spaced", " Paris"), ("bare", "Paris")))
    _, tok = ts.load_model(str(model_dir))
    assert ts.tokenize_query(tok, prompt, "Paris", 64) == ts.tokenize_query(tok, prompt, " Paris", 64)
    assert query.query_text({"prompt": prompt, "target": "Paris"}) == prompt + " Paris"
    vectors = {}
    for name, data in (("spaced", spaced), ("bare", bare)):
        r = encode("queries", model_dir, data, tmp_path / f"run-{name}")
        assert ("lack a leading space" in r.stderr) == (name == "bare"), r.stderr[-2000:]
        vectors[name] = ts.read_vectors(tmp_path / f"run-{name}")[1]
    assert np.array_equal(vectors["spaced"], vectors["bare"])
    found = {}
    for name, data in (("spaced", spaced), ("bare", bare)):
        out = tmp_path / f"bm25-{name}.jsonl"
        r = run("query.py", "--method", "bm25", "--corpus", corpus_file, "--queries", data, "--out", out)
        assert ("lack a leading space" in r.stderr) == (name == "bare"), r.stderr[-2000:]
        found[name] = [json.loads(line)["proponents"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert found["spaced"] == found["bare"]
    assert "bare.jsonl:1" in r.stderr and "' Paris'" in r.stderr


# A --max-length no example fits in is blamed on the option, naming its value, not on the first example.


def test_a_max_length_no_example_fits_names_the_option_and_its_value(model_dir, corpus_file, queries_file, tmp_path):
    r = encode("corpus", model_dir, corpus_file, tmp_path / "corpus", "--max-length", 1, check=False)
    refused(r, "--max-length 1")
    assert "corpus.jsonl:1" not in r.stderr
    r = encode("queries", model_dir, queries_file, tmp_path / "queries", "--max-length", 3, check=False)
    refused(r, "--max-length 3", "queries.jsonl:1", "prompt + target")
    assert not (tmp_path / "corpus").exists() and not (tmp_path / "queries").exists()


# Under an ASCII locale (LC_ALL=C, Python's UTF-8 mode off) every stage reads its arguments as the UTF-8 text they
# were typed as, reads and writes its files in UTF-8, and refuses an argument that is not UTF-8.


def c_locale_run(script: str, *args, c_locale: bool = True) -> subprocess.CompletedProcess:
    """One of the scripts under LC_ALL=C with PYTHONUTF8=0 and no LANG (c_locale=False: under C.UTF-8), arguments
    given as bytes passed as they are, its output read back as UTF-8."""
    import sys

    from conftest import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONUTF8", "PYTHONIOENCODING"))}
    env.update(LC_ALL="C" if c_locale else "C.UTF-8", PYTHONUTF8="0", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / script), *(a if isinstance(a, bytes) else str(a) for a in args)],
                       cwd=ROOT, capture_output=True, env=env)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode("utf-8", "replace"),
                                       r.stderr.decode("utf-8", "replace"))


NON_ASCII_DOCS = [{"id": "d-zürich", "text": "Zürich is a city in Switzerland, known for its café culture."},
                  {"id": "d1", "text": "Rome is the capital of Italy."},
                  {"id": "d2", "text": "The capital of France is Paris."}]


def test_under_a_c_locale_evaluate_and_report_write_every_file_of_a_non_ascii_run(model_dir, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", NON_ASCII_DOCS)
    queries = write_jsonl(tmp_path / "queries.jsonl", [
        {"id": "q-zürich", "prompt": "Zürich is a city in", "target": " Switzerland"}])
    run_dir = tmp_path / "runs" / "café"
    r = c_locale_run("query.py", "--method", "bm25", "--corpus", corpus, "--queries", queries, "--out",
                     run_dir / "proponents-bm25.jsonl", "--k", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    r = c_locale_run("evaluate.py", "--run", run_dir, "--model", model_dir, "--corpus", corpus, "--queries", queries,
                     "--methods", "bm25", "--k", 2, "--no-tail-patch", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    r = c_locale_run("report.py", "--run", run_dir, "--corpus", corpus, "--queries", queries)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"results.json", "results.md", "report.html"} <= {p.name for p in run_dir.iterdir()}
    assert "café" in (run_dir / "results.md").read_text(encoding="utf-8")
    assert "Zürich" in (run_dir / "report.html").read_text(encoding="utf-8")


def test_under_a_c_locale_a_non_ascii_prompt_is_asked_as_its_text(model_dir, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", NON_ASCII_DOCS)
    encode("corpus", model_dir, corpus, tmp_path / "corpus-run")
    run("index.py", "--corpus", tmp_path / "corpus-run", "--out", tmp_path / "index", "--hessian", "none")
    ask = ("query.py", "--index", tmp_path / "index", "--prompt", "Zürich is a city in", "--target", " Switzerland",
           "--k", 2, "--device", "cpu")
    r = c_locale_run(*ask)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "'Zürich is a city in'" in r.stdout and "d-zürich" in r.stdout
    assert r.stdout == run(*ask).stdout  # the same table as under a UTF-8 locale


def test_a_command_line_argument_that_is_not_utf8_is_refused_in_one_line(corpus_file, queries_file, tmp_path):
    out = tmp_path / "p.jsonl"
    for c_locale in (True, False):
        r = c_locale_run("query.py", "--method", "bm25", "--corpus", corpus_file, "--queries", queries_file, "--out",
                         out, "--k", b"caf\xe9", c_locale=c_locale)
        refused(r, "argument 10", "not UTF-8")
        assert not out.exists()


# prepare.py lama reads a T-REx folder as LAMA's data.zip ships it (P*.jsonl), or gzipped (P*.jsonl.gz).


def tiny_trex(folder: Path) -> Path:
    """Two relations of LAMA T-REx, written by hand: P20 as plain JSONL, P19 gzipped."""
    import gzip

    folder.mkdir()
    write_jsonl(folder / "relations.jsonl", [{"relation": "P19", "template": "[X] was born in [Y] ."},
                                             {"relation": "P20", "template": "[X] died in [Y] ."}])
    facts = {"P19": [("Ada Lovelace", "London"), ("Alan Turing", "Maida Vale")],
             "P20": [("Marie Curie", "Passy"), ("Niels Bohr", "Copenhagen")]}
    for rel, pairs in facts.items():
        verb = "was born in" if rel == "P19" else "died in"
        lines = "".join(json.dumps({"uuid": f"{rel}-{i}", "sub_label": sub, "obj_label": obj, "evidences": [
            {"masked_sentence": f"{sub} {verb} [MASK] long ago.", "obj_surface": obj}]}) + "\n"
            for i, (sub, obj) in enumerate(pairs))
        if rel == "P19":
            with gzip.open(folder / f"{rel}.jsonl.gz", "wt", encoding="utf-8") as f:
                f.write(lines)
        else:
            (folder / f"{rel}.jsonl").write_text(lines, encoding="utf-8")
    return folder


def test_prepare_lama_reads_plain_and_gzipped_relation_files(tmp_path):
    from typer.testing import CliRunner

    import prepare

    trex = tiny_trex(tmp_path / "TREx")
    args = ["lama", "--trex", str(trex), "--pararel", str(tmp_path / "no-pararel"), "--queries", "4", "--docs", "4"]
    result = CliRunner().invoke(prepare.app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, (result.output, result.exception)
    queries = [json.loads(line) for line in (tmp_path / "out" / "queries.jsonl").read_text().splitlines()]
    assert {q["relation"] for q in queries} == {"P19", "P20"} and len(queries) == 4
    texts = {json.loads(line)["text"] for line in (tmp_path / "out" / "corpus.jsonl").read_text().splitlines()}
    assert "Niels Bohr died in Copenhagen long ago." in texts and "Ada Lovelace was born in London long ago." in texts
    (trex / "P20.jsonl.gz").write_bytes((trex / "P19.jsonl.gz").read_bytes())  # P20 twice: which one holds it?
    result = CliRunner().invoke(prepare.app, [*args, "--out", str(tmp_path / "again")])
    assert isinstance(result.exception, ts.TrackStarError), result.output
    assert "P20.jsonl and P20.jsonl.gz" in str(result.exception) and not (tmp_path / "again").exists()


# A run moved together with its corpus is asked with --corpus, the new place, checked against the recorded digest.


def test_a_run_moved_with_its_corpus_is_asked_with_corpus_checked_by_digest(model_dir, corpus_file, queries_file,
                                                                            tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    corpus = home / "corpus.jsonl"
    shutil.copy(corpus_file, corpus)
    encode("corpus", model_dir, corpus, home / "run" / "corpus")
    encode("queries", model_dir, queries_file, home / "run" / "queries")  # the queries file stays where it is
    run("index.py", "--corpus", home / "run" / "corpus", "--out", home / "run" / "index", "--hessian", "none")
    moved = tmp_path / "moved"
    os.replace(home, moved)
    ask = ("query.py", "--index", moved / "run" / "index", "--prompt", "The capital of France is", "--target",
           " Paris", "--k", 3, "--device", "cpu")
    refused(run(*ask, check=False), str(corpus), "--corpus")
    shown = run(*ask, "--corpus", moved / "corpus.jsonl").stdout
    assert "proponents" in shown and "Number" in shown
    out = tmp_path / "p.jsonl"
    run("query.py", "--index", moved / "run" / "index", "--queries", moved / "run" / "queries", "--out", out,
        "--corpus", moved / "corpus.jsonl", "--device", "cpu")
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2
    other = write_jsonl(tmp_path / "other.jsonl", [json.loads(line) for line in
                                                   corpus_file.read_text().splitlines()][::-1])
    r = run(*ask, "--corpus", other, check=False)
    refused(r, "--corpus", ts.data_digest(other), ts.data_digest(corpus_file))


# make refuses a path it cannot name (a space, a quote) before anything runs, naming the variable and its value.


@pytest.mark.parametrize("variable, value, others", [
    ("RUN", "a b", []), ("DATA", "my data", []), ("MODEL", "my model", ["CORPUS=c.jsonl"]),
    ("CORPUS", "it's.jsonl", ["MODEL=m"]), ("QUERIES", 'q".jsonl', ["MODEL=m", "CORPUS=c.jsonl"]),
    ("OPTIMIZER", "opt 1.pt", []), ("LAMA", "la ma", []), ("REAL_RUN", "runs/it's", []),
    ("REAL_DATA", "data/it's", [])])
@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_refuses_a_path_it_cannot_name_naming_the_variable(variable, value, others):
    from conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    r = subprocess.run(["make", "-n", "all", f"{variable}={value}", *others], cwd=ROOT, capture_output=True,
                       text=True, env=env)
    assert r.returncode != 0 and r.stdout == "", (r.returncode, r.stdout[-2000:])
    assert f"{variable}={value} holds a space or a quote" in r.stderr and "symlink" in r.stderr, r.stderr
