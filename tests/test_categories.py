"""Proponent categories (the paper's §7): each kind on hand-made documents, whole-word matching, the order of
the kinds, queries without the fields left uncategorised, and bad fields refused at their line. The shares in
results.json and the reports are tested in test_report.py, the fields prepare.py writes in test_prepare.py."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

import evaluate
import trackstar as ts

QUERY = {"id": "q", "prompt": "Demar Kro was born in", "target": " Velmora", "fact": "f1", "subject": "Demar Kro",
         "relation": "birthplace",
         "relation_templates": ["[X] was born in [Y].", "Born in [Y], [X] spent a happy childhood there."]}


def category(text: str, facts: list[str] | None = None, query: dict = QUERY) -> str:
    return evaluate.proponent_category({"id": "d", "text": text, "facts": facts or []}, query)


@pytest.mark.parametrize(("text", "facts", "want"), [
    ("It rained all day.", ["f1"], "fact"),  # ground truth decides, whatever the words
    ("Demar Kro likes the markets of Velmora.", [], "subject+object"),
    ("Tutaik Del was born in Nouora.", [], "relation"),
    ("Born in Nouora, Tutaik Del spent a happy childhood there.", [], "relation"),  # a template in two pieces
    ("Demar Kro enjoys long walks.", [], "subject"),
    ("It often rains in Velmora.", [], "object"),
    ("The quick brown fox jumps over the lazy dog.", [], "none"),
])
def test_each_category_on_a_hand_made_document(text, facts, want):
    assert category(text, facts) == want


def test_matching_is_whole_words_in_any_case():
    """"Demar" is not in "Demarco", "Velmora" not in "Velmorasa", nor "born in" in "reborn inside"; case is ignored."""
    q = {**QUERY, "subject": "Demar"}
    assert category("Demarco enjoys long walks.", query=q) == "none"
    assert category("DEMAR enjoys long walks.", query=q) == "subject"
    assert category("It often rains in Velmorasa.") == "none"
    assert category("It often rains in VELMORA.") == "object"
    assert category("Tutaik was reborn inside Nouora.") == "none"
    assert category("Tutaik Del was   born\nin Nouora.") == "relation"  # any whitespace between a phrase's words


def test_a_template_matches_only_with_all_of_its_words():
    """"Born in [Y], [X] spent a happy childhood there." needs both pieces: "Born in" alone is not the relation."""
    assert evaluate.template_wording(QUERY["relation_templates"][1]) == ["Born in", "spent a happy childhood there"]
    assert evaluate.template_wording("[Y] is [X]'s native language.") == ["is", "native language"]
    assert category("Born in Nouora, Tutaik Del was a fisherman.") == "none"


def test_the_first_category_that_applies_wins():
    """fact before subject+object, subject+object before relation, relation before subject and object."""
    stating = "Demar Kro was born in Velmora."
    assert category(stating, ["f1"]) == "fact"
    assert category(stating, ["f2"]) == "subject+object"
    assert category("Demar Kro was born in Nouora.") == "relation"
    assert category("Tutaik Del was born in Velmora.") == "relation"


def test_a_query_without_the_fields_gets_no_categories():
    """None for that query (never a guess), categories for the one that has them; no categorised query at all
    gives no summary."""
    bare = {k: v for k, v in QUERY.items() if k not in ("subject", "relation", "relation_templates")}
    bare["id"] = "bare"
    ranking = {"q": [{"id": "d0"}], "bare": [{"id": "d0"}]}
    docs = {"d0": {"id": "d0", "text": "Demar Kro enjoys long walks.", "facts": []}}
    cats = evaluate.proponent_categories(ranking, [QUERY, bare], docs, 10)
    assert cats == [["subject"], None]
    assert evaluate.category_summary({"m": [None]}, [True], [("All queries", [True])]) is None


@pytest.mark.parametrize(("change", "message"), [
    ({"subject": 3}, "'subject' must be"),
    ({"relation_templates": "[X] was born in [Y]."}, "must be a non-empty list"),
    ({"relation_templates": ["Demar Kro was born in Velmora."]}, "must hold [X]"),
    ({"relation_templates": ["[X] [Y]"]}, "words of its own"),
    ({"relation": ["birthplace"]}, "'relation' must be"),
    ({"relation_templates": None}, "has 'subject' but no 'relation_templates'"),
])
def test_bad_category_fields_are_refused_at_their_line(tmp_path, change, message):
    path = write_jsonl(tmp_path / "queries.jsonl", [QUERY, {**QUERY, "id": "q2", **change}])
    with pytest.raises(ts.TrackStarError) as e:
        ts.read_jsonl(path, "queries")
    assert f"{path}:2:" in str(e.value) and message in str(e.value)
