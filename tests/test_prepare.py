"""prepare.py: the synthetic fact world (deterministic, skewed, mixed into a majority of generic text, with a
trained model and its optimizer state) and the LAMA T-REx converter (every query has evidence, no [MASK],
prompts follow the template)."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import evaluate
import prepare
import trackstar as ts

ROOT = Path(__file__).resolve().parents[1]
TREX = ROOT.parent / "shared" / "data" / "lama_trex"
PARAREL = ROOT.parent / "shared" / "data" / "pararel_patterns"
needs_lama = pytest.mark.skipif(not (TREX / "P20.jsonl.gz").exists() or not PARAREL.is_dir(),
                                reason="no LAMA T-REx or ParaRel patterns in ../shared/data")


def run(*args) -> str:
    result = CliRunner().invoke(prepare.app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def run_fails(*args) -> str:
    """The one-line error prepare.py gives (the shared TrackStarError, as every stage's)."""
    result = CliRunner().invoke(prepare.app, [str(a) for a in args])
    assert result.exit_code != 0, result.output
    if isinstance(result.exception, ts.TrackStarError):
        return str(result.exception)
    return result.output


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def fact_frequencies(corpus: list[dict]) -> Counter:
    return Counter(f for doc in corpus for f in doc["facts"])


def shakespeare() -> str:
    """The shipped generic text, whitespace-normalised (a passage joins its lines with spaces)."""
    return " ".join((ROOT / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8").split())


def is_generic(doc: dict, passages: set[str]) -> bool:
    return doc["text"] in passages


# -----------------------------------------------------------------------------
# fact world: the corpus


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[str, Path]:
    """Corpus-only worlds: tiny seed 0 twice, tiny seed 1, default seed 0."""
    d = tmp_path_factory.mktemp("worlds")
    for name, size, seed in [("a", "tiny", 0), ("b", "tiny", 0), ("c", "tiny", 1), ("default", "default", 0)]:
        run("factworld", "--out", d / name, "--size", size, "--seed", seed, "--no-train")
    return {name: d / name for name in ("a", "b", "c", "default")}


def test_world_is_deterministic_for_a_seed_and_differs_across_seeds(worlds):
    for name in ("corpus.jsonl", "queries.jsonl"):
        assert (worlds["a"] / name).read_bytes() == (worlds["b"] / name).read_bytes(), name
    assert (worlds["a"] / "corpus.jsonl").read_bytes() != (worlds["c"] / "corpus.jsonl").read_bytes()


def test_each_fact_is_stated_in_exactly_its_drawn_number_of_documents(monkeypatch):
    """The frequency a fact is drawn with is the number of distinct documents that state it (the skew the
    accuracy-by-bucket table and the query buckets rely on), companions included."""
    drawn = {}

    def counts(rng, n):
        drawn["counts"] = [1 + (i * 7) % 5 for i in range(n)]  # 1..5, known in advance
        return drawn["counts"]

    monkeypatch.setattr(prepare, "fact_counts", counts)
    facts, corpus, _ = prepare.build_world(0, prepare.SIZES["tiny"])
    stated = Counter(fid for doc in corpus for fid in set(doc["facts"]))
    assert [stated[f.id] for f in facts] == drawn["counts"]


@pytest.mark.parametrize("world", ["a", "default"])
def test_every_query_fact_is_stated_and_frequencies_are_skewed(worlds, world):
    corpus = read_jsonl(worlds[world] / "corpus.jsonl")
    queries = read_jsonl(worlds[world] / "queries.jsonl")
    freq = fact_frequencies(corpus)
    assert all(freq[q["fact"]] >= 1 for q in queries)
    assert max(freq.values()) >= 5 * min(freq.values())
    assert sum(c == 1 for c in freq.values()) > sum(c >= 8 for c in freq.values()) > 0, "Zipf-like: many rare"
    assert {prepare.bucket_of(freq[q["fact"]]) for q in queries} == {"1", "2-3", "4-7", "8+"}
    assert any(not doc["facts"] for doc in corpus), "some documents state no fact"
    assert len({doc["id"] for doc in corpus}) == len(corpus)


def test_documents_state_their_facts_and_queries_are_well_formed(worlds):
    corpus = read_jsonl(worlds["default"] / "corpus.jsonl")
    queries = read_jsonl(worlds["default"] / "queries.jsonl")
    passages = set(prepare.passages(prepare.SHAKESPEARE.read_text(encoding="utf-8")))
    world = [doc for doc in corpus if not is_generic(doc, passages)]  # the fact world's own documents
    assert 2000 <= len(world) <= 3500 and 150 <= len(queries) <= 250
    facts = {f.id: f for f in prepare.build_world(0, prepare.SIZES["default"])[0]}
    for doc in world:
        assert 1 <= doc["text"].count(".") <= 4
        for fid in doc["facts"]:  # the subject and object are both named in the document
            assert facts[fid].subject in doc["text"] and facts[fid].object in doc["text"]
    for q in queries:
        assert q["target"].startswith(" ") and not q["prompt"].endswith(" ")
        assert q["prompt"] + q["target"] == "".join(facts[q["fact"]].query())


def test_world_sizes_match_their_budgets(worlds):
    assert 1500 <= len(read_jsonl(worlds["a"] / "corpus.jsonl")) <= 2500
    assert 25 <= len(read_jsonl(worlds["a"] / "queries.jsonl")) <= 35
    info = json.loads((worlds["default"] / "world.json").read_text())
    assert info["seed"] == 0 and info["size"] == "default" and info["relations"] == len(prepare.RELATIONS)
    # R_train is fitted from the corpus's gradients: many more of them than the projection dimension d = 2048
    assert info["documents"] >= 8 * 2048


@pytest.mark.parametrize("world", ["a", "default"])
def test_world_mixes_in_a_majority_of_generic_shakespeare(worlds, world):
    corpus = read_jsonl(worlds[world] / "corpus.jsonl")
    info = json.loads((worlds[world] / "world.json").read_text())
    passages = set(prepare.passages(prepare.SHAKESPEARE.read_text(encoding="utf-8")))
    generic = [doc for doc in corpus if is_generic(doc, passages)]
    assert len(generic) == info["generic_documents"] == prepare.SIZES[info["size"]].generic
    assert info["generic_documents"] + info["fact_documents"] + info["filler_documents"] == len(corpus)
    assert info["fact_documents"] == sum(bool(doc["facts"]) for doc in corpus)
    assert len(generic) > len(corpus) / 2 and all(not doc["facts"] for doc in generic)
    assert all(len(doc["text"]) <= prepare.PASSAGE_CHARS for doc in generic)  # within MAX_POSITIONS tokens
    ids = [doc["id"] for doc in corpus]
    assert ids == [f"doc-{i:05d}" for i in range(len(corpus))]
    kinds = [is_generic(doc, passages) for doc in corpus]
    assert sum(kinds[: len(kinds) // 2]) > len(generic) / 3, "generic text is shuffled in, not appended"
    if world == "a":  # each passage is Shakespeare's own text (the default world's is too slow to scan)
        text = shakespeare()
        assert all(doc["text"] in text for doc in generic)


def test_generic_passages_are_whole_lines_of_one_speech():
    text = "A:\nOne line.\nTwo  lines here.\n\nB:\nThree.\n\nA:\nOne line.\n"
    assert prepare.passages(text, max_chars=20) == ["A: One line.", "Two lines here.", "B: Three."]


def test_an_epoch_shows_each_document_its_number_of_repeats():
    import numpy as np

    lengths, repeats = [5, 9, 2, 7, 3, 8], [1, 3, 1, 2, 1, 1]
    batches = prepare.length_grouped_batches(lengths, repeats, 4, np.random.default_rng(0))
    epoch = [next(batches) for _ in range(-(-sum(repeats) // 4))]  # one group: ceil(9 / 4) batches
    assert Counter(i for b in epoch for i in b) == dict(enumerate(repeats))


# -----------------------------------------------------------------------------
# fact world: tokenizer, model, optimizer state


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny worlds with the same seed and a short training run (30 steps): `a` saves the default
    intermediate checkpoints, `b` none."""
    d = tmp_path_factory.mktemp("trained")
    run("factworld", "--out", d / "a", "--size", "tiny", "--seed", 0, "--steps", 30)
    run("factworld", "--out", d / "b", "--size", "tiny", "--seed", 0, "--steps", 30, "--checkpoints", 0)
    return d / "a", d / "b"


def test_checkpoints_carry_their_optimizer_state_and_tokens_and_leave_the_final_model_alone(trained):
    """`make trend` needs each checkpoint as a model directory with its own AdamW state and how many
    training tokens it had seen; saving them must not change the final model (the test above compares
    a world saved with checkpoints to one without, bit for bit)."""
    from transformers import AutoModelForCausalLM

    a, b = trained
    ckpts = sorted((a / "model" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-000008", "step-000015", "step-000022"]
    assert not (b / "model" / "checkpoints").exists()
    seen = [json.loads((c / "checkpoint.json").read_text()) for c in [*ckpts, a / "model"]]
    assert [s["step"] for s in seen] == [8, 15, 22, 30]
    assert all(x["tokens"] < y["tokens"] for x, y in zip(seen, seen[1:], strict=False))
    assert json.loads((a / "world.json").read_text())["training"]["tokens"] == seen[-1]["tokens"]
    first = AutoModelForCausalLM.from_pretrained(ckpts[0]).state_dict()
    final = AutoModelForCausalLM.from_pretrained(a / "model").state_dict()
    assert not all(torch.equal(first[k], final[k]) for k in final), "a checkpoint is the model part-way"
    opt = torch.load(ckpts[0] / "optimizer.pt", weights_only=True)
    assert opt["param_groups"][0]["lr"] == seen[0]["lr"] > seen[-1]["lr"]


def test_short_training_is_deterministic(trained):
    from transformers import AutoModelForCausalLM

    a, b = trained
    for name in ("corpus.jsonl", "queries.jsonl", "model/tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    sa = AutoModelForCausalLM.from_pretrained(a / "model").state_dict()
    sb = AutoModelForCausalLM.from_pretrained(b / "model").state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = (torch.load(x / "model" / "optimizer.pt", weights_only=True) for x in trained)
    assert all(torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"]) for i in oa["state"])


def test_optimizer_state_is_indexed_like_named_parameters_with_final_lr(trained):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trained[0] / "model")
    opt = torch.load(trained[0] / "model" / "optimizer.pt", weights_only=True)
    named = list(model.named_parameters())
    assert len(opt["param_groups"]) == 1 and opt["param_groups"][0]["params"] == list(range(len(named)))
    for i, (name, p) in enumerate(named):
        v = opt["state"][i]["exp_avg_sq"]
        assert v.shape == p.shape, name
        assert (v >= 0).all() and v.sum() > 0, name
    peak = prepare.TrainSettings(steps=1, batch=1).peak_lr
    final = opt["param_groups"][0]["lr"]
    assert final < peak and final == pytest.approx(0.1 * peak)
    info = json.loads((trained[0] / "world.json").read_text())
    assert info["training"]["final_lr"] == final and info["training"]["steps"] == 30


def test_model_and_tokenizer_load_offline_and_split_at_the_target(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(trained[0] / "model")
    tok = AutoTokenizer.from_pretrained(trained[0] / "model")
    assert model.config.model_type == "llama" and not model.config.tie_word_embeddings
    assert 1000 <= len(tok) <= 2000 and tok.pad_token_id is not None and tok.bos_token_id is not None
    for q in read_jsonl(trained[0] / "queries.jsonl"):
        whole = tok(q["prompt"] + q["target"]).input_ids
        assert tok(q["prompt"]).input_ids + tok(q["target"], add_special_tokens=False).input_ids == whole
        assert whole[0] == tok.bos_token_id and tok.eos_token_id not in whole


# -----------------------------------------------------------------------------
# outputs are whole or absent; bad inputs say where


def test_out_replaces_an_earlier_output_but_not_a_foreign_directory(tmp_path):
    """An earlier output is replaced whole, with the permissions of a directory made by the user (not a
    private temporary one's); a directory prepare.py did not write, or one where a user added a file, is kept."""
    import os

    run("factworld", "--out", tmp_path / "w", "--size", "tiny", "--no-train")
    run("factworld", "--out", tmp_path / "w", "--size", "tiny", "--seed", 1, "--no-train")
    assert json.loads((tmp_path / "w" / "world.json").read_text())["seed"] == 1
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "w").stat().st_mode & 0o777 == 0o777 & ~umask
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert "this toolkit did not write" in run_fails("factworld", "--out", tmp_path / "mine", "--no-train")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "w" / "notes.txt").write_text("keep me too")
    assert "notes.txt" in run_fails("factworld", "--out", tmp_path / "w", "--no-train")
    assert (tmp_path / "w" / "notes.txt").read_text() == "keep me too"
    # no staging directory left behind; the writer lock's small file stays beside the output (ts.writer_lock)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".w.lock", "mine", "w"]


def test_bad_size_is_refused(tmp_path):
    assert "--size" in run_fails("factworld", "--out", tmp_path / "w", "--size", "huge")
    assert not (tmp_path / "w").exists()


@needs_lama
def test_lama_bad_json_line_names_file_and_line_and_writes_nothing(tmp_path):
    trex = tmp_path / "trex"
    trex.mkdir()
    (trex / "relations.jsonl").write_bytes((TREX / "relations.jsonl").read_bytes())
    with gzip.open(TREX / "P20.jsonl.gz", "rt") as f:
        good = f.readline()
    with gzip.open(trex / "P20.jsonl.gz", "wt") as f:
        f.write(good + '{"uuid": "x", oops\n')
    out = run_fails("lama", "--trex", trex, "--out", tmp_path / "out", "--relations", "P20")
    assert "P20.jsonl.gz:2" in out and "not valid JSON" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "trex"]  # the writer lock's file only


@needs_lama
def test_lama_unknown_relation_is_refused(tmp_path):
    assert "P9999" in run_fails("lama", "--out", tmp_path / "out", "--relations", "P20,P9999")


# -----------------------------------------------------------------------------
# LAMA T-REx converter


def lama_records(relations: list[str]) -> dict[str, dict]:
    records = {}
    for rel in relations:
        with gzip.open(TREX / f"{rel}.jsonl.gz", "rt") as f:
            records.update((r["uuid"], r) for r in map(json.loads, f))
    return records


def instantiations(rel: str, sub: str, obj: str) -> set[str]:
    """The relation's LAMA template and ParaRel patterns with [X], [Y] filled in, final period dropped."""
    lines = [json.loads(x)["template"] for x in (TREX / "relations.jsonl").read_text().splitlines()
             if json.loads(x)["relation"] == rel]
    lines += [json.loads(x)["pattern"] for x in (PARAREL / f"{rel}.jsonl").read_text().splitlines()]
    return {t.rstrip(" .").replace("[X]", sub).replace("[Y]", obj) for t in lines}


@pytest.fixture(scope="module")
def lama_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lama") / "lama"
    # P413's LAMA template has [Y] mid-sentence: its prompt must come from ParaRel
    run("lama", "--out", out, "--relations", "P20,P413", "--queries", 10, "--docs", 100, "--seed", 0)
    return out


@needs_lama
def test_lama_queries_have_evidence_documents_and_no_mask(lama_out):
    corpus = read_jsonl(lama_out / "corpus.jsonl")
    queries = read_jsonl(lama_out / "queries.jsonl")
    assert len(queries) == 10 and len(corpus) == 100
    freq = fact_frequencies(corpus)
    assert all(freq[q["fact"]] >= 1 for q in queries)
    assert all("[MASK]" not in doc["text"] and doc["text"].strip() for doc in corpus)
    assert len({doc["id"] for doc in corpus}) == len({doc["text"] for doc in corpus}) == len(corpus)
    assert all(doc["id"].split("-")[0] in {"P20", "P413"} for doc in corpus)


@needs_lama
def test_lama_prompt_plus_target_follows_the_relation_template(lama_out):
    records = lama_records(["P20", "P413"])
    for q in read_jsonl(lama_out / "queries.jsonl"):
        r = records[q["fact"]]
        assert q["target"] == " " + r["obj_label"] and not q["prompt"].endswith(" ")
        assert q["prompt"] + q["target"] in instantiations(r["predicate_id"], r["sub_label"], r["obj_label"])
    templates = json.loads((lama_out / "lama.json").read_text())["templates"]
    assert templates == {"P20": "[X] died in", "P413": "[X] plays in the position of"}


@needs_lama
def test_lama_documents_are_the_unmasked_evidence_they_list(lama_out):
    records = lama_records(["P20", "P413"])
    for doc in read_jsonl(lama_out / "corpus.jsonl"):
        for uuid in doc["facts"]:
            unmasked = {" ".join(e["masked_sentence"].replace("[MASK]", e["obj_surface"]).split())
                        for e in records[uuid]["evidences"]}
            assert doc["text"] in unmasked


@needs_lama
def test_lama_is_deterministic_for_a_seed(lama_out, tmp_path):
    run("lama", "--out", tmp_path / "same", "--relations", "P20,P413", "--queries", 10, "--docs", 100)
    run("lama", "--out", tmp_path / "other", "--relations", "P20,P413", "--queries", 10, "--docs", 100,
        "--seed", 1)
    for name in ("corpus.jsonl", "queries.jsonl"):
        assert (lama_out / name).read_bytes() == (tmp_path / "same" / name).read_bytes()
    assert (lama_out / "queries.jsonl").read_bytes() != (tmp_path / "other" / "queries.jsonl").read_bytes()


# -----------------------------------------------------------------------------
# the fields of evaluate.py's proponent categories


def test_fact_world_queries_carry_the_fields_the_corpus_states_facts_with(worlds):
    """Each query names its subject and relation, and its templates are the wordings the corpus states facts
    in: every document stating the query's fact is "fact", and without its ground truth "subject+object",
    with one of the query's templates present in full."""
    queries = ts.read_jsonl(worlds["a"] / "queries.jsonl", "queries")  # the fields pass validation
    corpus = ts.read_jsonl(worlds["a"] / "corpus.jsonl", "corpus")
    for q in queries:
        assert q["prompt"].startswith(q["subject"]) or f" {q['subject']} " in f" {q['prompt']} "
        assert q["relation"] == q["fact"].split("-")[0] and len(q["relation_templates"]) >= 3
        filled = {t.replace("[X]", q["subject"]).replace("[Y]", q["target"].strip()).rstrip(".")
                  for t in q["relation_templates"]}
        assert q["prompt"] + q["target"] in filled
        stating = [d for d in corpus if q["fact"] in d["facts"]]
        assert stating
        for d in stating:
            assert evaluate.proponent_category(d, q) == "fact"
            assert evaluate.proponent_category({**d, "facts": []}, q) == "subject+object"
            assert any(all(evaluate.mentions(d["text"], w) for w in evaluate.template_wording(t))
                       for t in q["relation_templates"])


@needs_lama
def test_lama_queries_carry_subject_relation_and_every_template(lama_out):
    """subject = the fact's sub_label, relation = its predicate, templates = LAMA's and all of ParaRel's."""
    records = lama_records(["P20", "P413"])
    lama_template = {json.loads(x)["relation"]: json.loads(x)["template"]
                     for x in (TREX / "relations.jsonl").read_text().splitlines()}
    for q in ts.read_jsonl(lama_out / "queries.jsonl", "queries"):
        r = records[q["fact"]]
        assert q["subject"] == r["sub_label"] and q["relation"] == r["predicate_id"]
        patterns = [json.loads(x)["pattern"] for x in (PARAREL / f"{q['relation']}.jsonl").read_text().splitlines()]
        assert q["relation_templates"] == list(dict.fromkeys([lama_template[q["relation"]], *patterns]))
