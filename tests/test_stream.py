"""Streamed input: a corpus given as one JSONL, a .jsonl.gz, Parquet, a directory or a glob of shards is the same
corpus (the same records, ids and vectors), read one record at a time; a bad, changed or clashing shard is named."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import CORPUS, ROOT, refused, run, write_jsonl

import trackstar as ts

SIZES = (7, 11, 12)  # shard sizes: shard boundaries fall inside chunks of 4


def rows_of_corpus(n: int = sum(SIZES)) -> list[dict]:
    """Documents, every fifth without an id (its id is then its record number across all shards), some with facts."""
    rows = []
    for i in range(n):
        row = {"text": CORPUS[i % len(CORPUS)] + f" Number {i}."}
        if i % 5:
            row["id"] = f"d{i}"
        if i % 3 == 0:
            row["facts"] = [f"f{i}"]
        rows.append(row)
    return rows


def write(path: Path, rows: list[dict]) -> Path:
    """rows as path's suffix says: JSONL, gzipped JSONL, or Parquet in row groups of 5 (absent fields are nulls)."""
    if path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        keys = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist takes its columns from row 0
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path, row_group_size=5)
    elif path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    else:
        write_jsonl(path, rows)
    return path


def write_shards(folder: Path, rows: list[dict], suffixes: list[str]) -> Path:
    """rows split into len(SIZES) shards part-0, part-1, ... (sorted by name: record order), one suffix each."""
    folder.mkdir(parents=True)
    starts = np.cumsum((0, *SIZES))
    for k, suffix in enumerate(suffixes):
        write(folder / f"part-{k}{suffix}", rows[starts[k]:starts[k + 1]])
    return folder


FORMS = {  # name -> (tmp, rows) -> the --data argument
    "jsonl.gz": lambda t, rows: write(t / "corpus.jsonl.gz", rows),
    "parquet": lambda t, rows: write(t / "corpus.parquet", rows),
    "directory of jsonl": lambda t, rows: write_shards(t / "shards", rows, [".jsonl"] * 3),
    "directory of parquet": lambda t, rows: write_shards(t / "shards", rows, [".parquet"] * 3),
    "directory of jsonl, gz and parquet": lambda t, rows: write_shards(t / "shards", rows,
                                                                       [".jsonl", ".jsonl.gz", ".parquet"]),
    "glob of jsonl.gz": lambda t, rows: write_shards(t / "shards", rows, [".jsonl.gz"] * 3) / "part-*.jsonl.gz",
}


def plain(rows: list[dict]) -> list[dict]:
    """A row as the stages see it, without where it was read."""
    return [{k: v for k, v in r.items() if k != "_where" and v is not None} for r in rows]


def encode(data, out, model_dir, *extra, check=True):
    return run("encode.py", "corpus", "--model", model_dir, "--data", data, "--out", out, "--dim", 64,
               "--chunk-size", 4, "--no-correction", *extra, check=check)


def chunks_of(out: Path) -> dict[str, tuple[bytes, bytes]]:
    got = {}
    for f in sorted(out.glob("chunk-*.h5")):
        with h5py.File(f, "r") as h:
            got[f.name] = (h["ids"][:].tobytes(), h["vectors"][:].tobytes())
    return got


@pytest.fixture(scope="module")
def one_jsonl(model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The corpus as one JSONL, and its encoding: what every other form must equal."""
    tmp = tmp_path_factory.mktemp("one")
    data = write(tmp / "corpus.jsonl", rows_of_corpus())
    encode(data, tmp / "run", model_dir)
    return data, tmp / "run"


@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_reads_as_the_records_of_one_jsonl(form, tmp_path, monkeypatch):
    monkeypatch.setattr(ts, "PARQUET_BATCH", 3)  # batches that cut across Parquet's row groups of 5
    one = ts.read_jsonl(write(tmp_path / "one.jsonl", rows_of_corpus()), "corpus")
    got = ts.read_jsonl(FORMS[form](tmp_path, rows_of_corpus()), "corpus")
    assert plain(got) == plain(one)
    assert [r["id"] for r in got][:6] == ["0", "d1", "d2", "d3", "d4", "5"]  # no id: the record number
    if form.startswith(("directory", "glob")):  # record 7 opens the second shard: named by that shard
        assert got[7]["_where"].endswith(("part-1.jsonl:1", "part-1.jsonl.gz:1", "part-1.parquet:row 0"))
        assert got[10]["id"] == "10" and got[10]["_where"].endswith(("part-1.jsonl:4", "part-1.jsonl.gz:4",
                                                                      "part-1.parquet:row 3"))


@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_encodes_to_the_vectors_of_one_jsonl(form, one_jsonl, model_dir, tmp_path):
    _, want = one_jsonl
    out = tmp_path / "run"
    encode(FORMS[form](tmp_path, rows_of_corpus()), out, model_dir)
    assert chunks_of(out) == chunks_of(want) and len(chunks_of(want)) == 8
    meta, meta_one = (json.loads((d / "meta.json").read_text()) for d in (out, want))
    assert meta["n_examples"] == meta_one["n_examples"] == sum(SIZES)


def test_two_shard_processes_on_a_directory_equal_one_process_on_one_jsonl(one_jsonl, model_dir, tmp_path):
    _, want = one_jsonl
    data = FORMS["directory of jsonl, gz and parquet"](tmp_path, rows_of_corpus())
    for i in range(2):
        encode(data, tmp_path / "run", model_dir, "--shard", i, "--num-shards", 2)
    assert chunks_of(tmp_path / "run") == chunks_of(want)


def test_encoding_tokenizes_one_chunk_at_a_time_and_only_its_own_shards_chunks(model_dir, tmp_path, monkeypatch):
    """The corpus is never held: the first pass tokenizes chunk-sized windows of every record, the second only
    this shard's chunks (shard 1 of 2: chunks 1, 3, 5, 7)."""
    from typer.testing import CliRunner

    import encode as encode_cli

    data = FORMS["directory of jsonl, gz and parquet"](tmp_path, rows_of_corpus())
    tokenize, calls = ts.tokenize_rows, []
    monkeypatch.setattr(ts, "tokenize_rows", lambda tok, rows, *a: calls.append([r["id"] for r in rows])
                        or tokenize(tok, rows, *a))
    r = CliRunner().invoke(encode_cli.app, ["corpus", "--model", str(model_dir), "--data", str(data), "--out",
                                            str(tmp_path / "run"), "--dim", "64", "--chunk-size", "4",
                                            "--no-correction", "--shard", "1", "--num-shards", "2"])
    assert r.exit_code == 0, (r.output, r.exception)
    ids = [r["id"] for r in ts.read_jsonl(data, "corpus")]
    windows = [ids[i:i + 4] for i in range(0, len(ids), 4)]
    assert calls == windows + windows[1::2]


def test_a_bad_line_in_the_second_shard_is_named_by_that_shard_and_line(model_dir, tmp_path):
    data = FORMS["directory of jsonl"](tmp_path, rows_of_corpus())
    lines = (data / "part-1.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]
    (data / "part-1.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    refused(encode(data, out, model_dir, check=False), f"{data / 'part-1.jsonl'}:3", "not valid JSON")
    assert not out.exists()


def test_a_bad_row_of_a_parquet_shard_is_named_by_that_shard_and_row(tmp_path):
    rows = rows_of_corpus()
    rows[9]["text"] = " "  # part-1's row 2, counted from 0
    data = FORMS["directory of parquet"](tmp_path, rows)
    with pytest.raises(ts.TrackStarError, match=r"part-1\.parquet:row 2: document has empty"):
        ts.read_jsonl(data, "corpus")
    write(data / "part-1.parquet", rows_of_corpus()[7:18])
    (data / "part-2.parquet").write_bytes(b"PAR1 but not Parquet")
    with pytest.raises(ts.TrackStarError, match=r"part-2\.parquet: cannot be read as Parquet"):
        list(ts.iter_records(data, "corpus"))


def test_a_changed_shard_is_refused_on_resume_and_by_query(model_dir, tmp_path):
    import query

    data = FORMS["directory of jsonl"](tmp_path, rows_of_corpus())
    out = tmp_path / "run"
    encode(data, out, model_dir)
    meta = ts.read_meta(out)
    rows = rows_of_corpus()
    rows[20]["text"] += " Changed."
    write(data / "part-2.jsonl", rows[18:])
    refused(encode(data, out, model_dir, check=False), "'data_digest'", meta.data_digest, f"rm -r {out}")
    shutil.rmtree(out)  # what the refusal says to run: then the changed data encodes anew
    encode(data, out, model_dir)
    assert ts.read_meta(out).data_digest == ts.data_digest(data) != meta.data_digest
    with pytest.raises(ts.TrackStarError, match="has changed since it was encoded"):
        query.read_checked_jsonl(meta.data, "corpus", meta.data_digest)


def test_the_digest_of_a_directory_or_glob_follows_its_shards_not_their_place(tmp_path):
    a = FORMS["directory of jsonl"](tmp_path / "a", rows_of_corpus())
    digest = ts.data_digest(a)
    assert ts.data_digest(a / "part-*.jsonl") == digest  # the same files, named by a pattern
    os.rename(a, tmp_path / "moved")
    assert ts.data_digest(tmp_path / "moved") == digest  # names are relative: a moved corpus is the same corpus
    (tmp_path / "moved" / "_SUCCESS").write_text("")  # skipped, as Spark's and hidden files are
    (tmp_path / "moved" / ".part-0.jsonl.crc").write_text("x")
    assert ts.data_digest(tmp_path / "moved") == digest
    os.rename(tmp_path / "moved" / "part-2.jsonl", tmp_path / "moved" / "part-3.jsonl")
    assert ts.data_digest(tmp_path / "moved") != digest  # renamed (it could have changed the order)
    write(tmp_path / "moved" / "part-4.jsonl", [{"text": "One more document."}])
    assert ts.data_digest(tmp_path / "moved") != digest
    assert ts.data_digest(write(tmp_path / "one.jsonl", rows_of_corpus())) == ts.file_digest(tmp_path / "one.jsonl")


def test_duplicate_ids_across_shards_are_refused_naming_both_places(tmp_path):
    rows = rows_of_corpus()
    rows[15]["id"] = rows[2]["id"]  # part-1's line 9 repeats part-0's line 3
    data = FORMS["directory of jsonl, gz and parquet"](tmp_path, rows)
    with pytest.raises(ts.TrackStarError) as e:
        ts.read_jsonl(data, "corpus")
    assert str(e.value) == (f"{data / 'part-1.jsonl.gz'}:9: duplicate id 'd2' (first at {data / 'part-0.jsonl'}:3)")


def test_ids_that_share_a_hash_are_not_duplicates(tmp_path, monkeypatch):
    """Ids are compared through 8-byte hashes; two that share one are read again and compared themselves."""
    monkeypatch.setattr(ts, "_id_hash", lambda rid: 7)  # every id collides
    data = FORMS["directory of jsonl"](tmp_path, rows_of_corpus())
    assert len(ts.read_jsonl(data, "corpus")) == sum(SIZES)
    rows = rows_of_corpus()
    rows[25]["id"] = "d8"
    write(data / "part-2.jsonl", rows[18:])
    with pytest.raises(ts.TrackStarError, match=r"part-2\.jsonl:8: duplicate id 'd8' \(first at .*part-1\.jsonl:2\)"):
        ts.read_jsonl(data, "corpus")


@pytest.mark.parametrize("make_bad, words", [
    (lambda d: (d / "README.md").write_text("about"),
     ["README.md", "not a *.jsonl, *.jsonl.gz, *.parquet, *.arrow file"]),
    (lambda d: (d / "nested").mkdir(), ["nested", "glob pattern"]),
    (lambda d: [f.unlink() for f in d.iterdir()], ["the directory", "holds no"]),
])
def test_a_directory_refuses_what_is_not_a_shard(make_bad, words, tmp_path):
    data = FORMS["directory of jsonl"](tmp_path, rows_of_corpus())
    make_bad(data)
    with pytest.raises(ts.TrackStarError) as e:
        ts.read_jsonl(data, "corpus")
    assert all(w in str(e.value) for w in words), str(e.value)
    with pytest.raises(ts.TrackStarError, match="the pattern .* holds no"):
        ts.read_jsonl(tmp_path / "*.parquet", "corpus")


def test_make_reencodes_when_a_shard_of_a_corpus_directory_is_rewritten(tmp_path):
    """A directory's own time changes when a file comes or goes, not when one is rewritten: make must depend on
    the shards themselves (a glob pattern it expands)."""
    data = FORMS["directory of jsonl"](tmp_path, rows_of_corpus())
    done = tmp_path / "run" / "corpus.done"
    done.parent.mkdir()
    done.touch()
    for f in [*data.iterdir(), data, tmp_path]:
        os.utime(f, (1e9, 1e9))
    os.utime(done, (2e9, 2e9))

    def up_to_date(corpus: str) -> bool:
        r = subprocess.run(["make", "-C", str(ROOT), "-q", "-o", ".venv/.installed", f"RUN={done.parent}",
                            f"MODEL={tmp_path}", f"CORPUS={corpus}", str(done), f"PY={sys.executable}"],
                           capture_output=True, text=True)
        assert r.returncode in (0, 1), r.stderr
        return r.returncode == 0

    for corpus in (f"{data}/", f"{data}/part-*.jsonl"):
        assert up_to_date(corpus)
        os.utime(data / "part-1.jsonl", (3e9, 3e9))  # rewritten: the directory's own time stays
        assert not up_to_date(corpus), corpus
        os.utime(data / "part-1.jsonl", (1e9, 1e9))
