"""Hugging Face `datasets` on disk as input: a save_to_disk folder (state.json, dataset_info.json, Arrow IPC stream
shards) or bare .arrow files are the same corpus as its JSONL and Parquet (the same records and vectors), read a
batch at a time; a bad Arrow file, a bad row, a folder holding other files and a missing shard are named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import refused
from test_stream import SIZES, chunks_of, encode, plain, rows_of_corpus, write

import trackstar as ts


def arrow_table(rows: list[dict]):
    import pyarrow as pa

    keys = ["id", "text", "facts"]  # every row has these columns: absent fields are nulls, as `datasets` stores them
    return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows],
                                schema=pa.schema([("id", pa.string()), ("text", pa.string()),
                                                  ("facts", pa.list_(pa.string()))]))


def write_arrow(path: Path, rows: list[dict], stream: bool = True, batch: int = 4) -> Path:
    """An Arrow IPC file: the stream format `datasets` writes (record batches of `batch` rows), or the file format."""
    import pyarrow as pa

    table = arrow_table(rows)
    writer = pa.ipc.new_stream if stream else pa.ipc.new_file
    with pa.OSFile(str(path), "wb") as sink, writer(sink, table.schema) as w:
        for b in table.to_batches(max_chunksize=batch):
            w.write_batch(b)
    return path


def save_to_disk(folder: Path, rows: list[dict]) -> Path:
    """What datasets.Dataset.save_to_disk(folder, num_shards=3) writes: data-0000k-of-00003.arrow shards,
    state.json listing them in order, dataset_info.json with the features."""
    folder.mkdir(parents=True)
    starts = np.cumsum((0, *SIZES))
    names = [f"data-{k:05d}-of-{len(SIZES):05d}.arrow" for k in range(len(SIZES))]
    for k, name in enumerate(names):
        write_arrow(folder / name, rows[starts[k]:starts[k + 1]])
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_fingerprint": "0123456789abcdef", "_format_columns": None,
                                                   "_format_kwargs": {}, "_format_type": None,
                                                   "_output_all_columns": False, "_split": None}))
    features = {"id": {"dtype": "string", "_type": "Value"}, "text": {"dtype": "string", "_type": "Value"},
                "facts": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"}}
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": features}))
    return folder


FORMS = {
    "save_to_disk folder": lambda t, rows: save_to_disk(t / "saved", rows),
    "bare .arrow (stream)": lambda t, rows: write_arrow(t / "corpus.arrow", rows),
    "bare .arrow (file format)": lambda t, rows: write_arrow(t / "corpus.arrow", rows, stream=False),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_arrow_forms_read_as_the_records_of_one_jsonl(form, tmp_path, monkeypatch):
    """Records, ids (a null id: the record number), facts and where each was read (file:row N across batches
    cut smaller than the file's record batches)."""
    monkeypatch.setattr(ts, "PARQUET_BATCH", 3)
    one = ts.read_jsonl(write(tmp_path / "one.jsonl", rows_of_corpus()), "corpus")
    got = ts.read_jsonl(FORMS[form](tmp_path, rows_of_corpus()), "corpus")
    assert plain(got) == plain(one)
    assert [r["id"] for r in got][:6] == ["0", "d1", "d2", "d3", "d4", "5"]
    if form == "save_to_disk folder":  # record 10 is row 3 of the second shard
        assert got[10]["_where"].endswith("data-00001-of-00003.arrow:row 3")
    else:
        assert got[10]["_where"].endswith("corpus.arrow:row 10")


def test_jsonl_parquet_and_a_saved_dataset_encode_to_bit_identical_vectors(model_dir, tmp_path):
    rows = rows_of_corpus()
    runs = {}
    for name, data in (("jsonl", write(tmp_path / "c.jsonl", rows)), ("parquet", write(tmp_path / "c.parquet", rows)),
                       ("arrow", save_to_disk(tmp_path / "saved", rows))):
        encode(data, tmp_path / name, model_dir)
        runs[name] = chunks_of(tmp_path / name)
    assert len(runs["jsonl"]) == 8 and runs["arrow"] == runs["jsonl"] == runs["parquet"]
    meta = json.loads((tmp_path / "arrow" / "meta.json").read_text())
    assert meta["n_examples"] == len(rows) and meta["data_digest"] == ts.data_digest(tmp_path / "saved")


def test_a_bad_arrow_file_is_refused_in_one_line_naming_it(model_dir, tmp_path):
    data = save_to_disk(tmp_path / "saved", rows_of_corpus())
    (data / "data-00001-of-00003.arrow").write_bytes(b"not an Arrow stream at all")
    r = encode(data, tmp_path / "run", model_dir, check=False)
    refused(r, "data-00001-of-00003.arrow: cannot be read as Arrow")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == r.stderr.strip().splitlines()[-1], r.stderr  # one line, the last
    assert "data-00001-of-00003.arrow" in errors[0] and not (tmp_path / "run" / "meta.json").exists()


def test_a_bad_row_is_named_by_its_arrow_shard_and_row(tmp_path):
    rows = rows_of_corpus()
    rows[7 + 2]["text"] = " "
    with pytest.raises(ts.TrackStarError, match=r"data-00001-of-00003\.arrow:row 2: document has empty"):
        ts.read_jsonl(save_to_disk(tmp_path / "saved", rows), "corpus")


def test_a_saved_dataset_with_other_files_or_a_missing_shard_or_splits_is_refused(tmp_path):
    data = save_to_disk(tmp_path / "saved", rows_of_corpus())
    digest = ts.data_digest(data)
    write(data / "extra.jsonl", rows_of_corpus()[:3])
    with pytest.raises(ts.TrackStarError, match=r"extra\.jsonl: in the saved dataset .* not one of the Arrow files"):
        ts.data_files(data)
    (data / "extra.jsonl").unlink()
    assert ts.data_digest(data) == digest
    write_arrow(data / "data-00002-of-00003.arrow", rows_of_corpus()[18:29])  # one record fewer: another corpus
    assert ts.data_digest(data) != digest
    (data / "data-00002-of-00003.arrow").unlink()
    with pytest.raises(ts.TrackStarError, match=r"data-00002-of-00003\.arrow: listed in .*state\.json, but missing"):
        ts.data_files(data)
    splits = tmp_path / "dict"
    save_to_disk(splits / "train", rows_of_corpus())
    (splits / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(ts.TrackStarError, match=r"saved DatasetDict \(splits train\): give one split's folder"):
        ts.data_files(splits)
