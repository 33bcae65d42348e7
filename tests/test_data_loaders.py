"""Loaders this part adds to data sources: nested SQuAD JSON, line-aligned language files, row ranges."""

from __future__ import annotations

import gzip
import json

import pytest

from tests.conftest import SHARED_DATA
from peftkit.data.sources import load_source
from peftkit.errors import UserError
from peftkit.recipe.schema import DataSource

SQUAD = {
    "version": "2.0",
    "data": [
        {
            "title": "First",
            "paragraphs": [
                {
                    "context": "Paris is the capital of France.",
                    "qas": [
                        {"id": "a", "question": "Capital of France?", "answers": [{"text": "Paris", "answer_start": 0}]},
                        {"id": "b", "question": "Capital of Mars?", "answers": [], "is_impossible": True},
                    ],
                }
            ],
        },
        {"title": "Second", "paragraphs": [{"context": "x y", "qas": [{"id": "c", "question": "q?", "answers": [
            {"text": "y", "answer_start": 2}, {"text": "x y", "answer_start": 0}]}]}]},
    ],
}


def test_nested_squad_json_is_flattened(tmp_path):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(SQUAD))
    rows = list(load_source(DataSource(path=str(path)), "data.train"))
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert [r["article"] for r in rows] == [0, 0, 1]
    assert rows[0]["answers"] == {"text": ["Paris"], "answer_start": [0]}
    assert rows[1]["answers"] == {"text": [], "answer_start": []} and rows[1]["is_impossible"] is True
    assert rows[2]["answers"]["text"] == ["y", "x y"] and rows[2]["title"] == "Second"


def test_plain_json_and_json_lines_under_json_name_still_load(tmp_path):
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"text": "a", "label": 1}, {"text": "b", "label": 0}]))
    assert len(load_source(DataSource(path=str(records)), "data.train")) == 2
    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n')
    assert load_source(DataSource(path=str(lines)), "data.train")["text"] == ["a", "b", "c"]


def test_rows_selects_a_range_before_limit(tmp_path):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(SQUAD))
    assert load_source(DataSource(path=str(path), rows="2:"), "data.validation")["id"] == ["c"]
    assert load_source(DataSource(path=str(path), rows=":2"), "data.train")["id"] == ["a", "b"]
    with pytest.raises(UserError, match="data.test.rows"):
        load_source(DataSource(path=str(path), rows="5:9"), "data.test")


def test_rows_must_look_like_a_slice():
    with pytest.raises(ValueError, match="rows"):
        DataSource(path="x.json", rows="first ten")


def _write_lines(path, lines, gz):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))


def test_language_files_become_columns(tmp_path):
    _write_lines(tmp_path / "train.en.gz", ["a dog", "two cats"], gz=True)
    _write_lines(tmp_path / "train.fr", ["un chien", "deux chats"], gz=False)
    dataset = load_source(DataSource(path=str(tmp_path / "train"), languages=["en", "fr"]), "data.train")
    assert dataset.column_names == ["en", "fr"]
    assert list(dataset) == [{"en": "a dog", "fr": "un chien"}, {"en": "two cats", "fr": "deux chats"}]


def test_language_files_must_exist_and_align(tmp_path):
    _write_lines(tmp_path / "train.en", ["a", "b"], gz=False)
    with pytest.raises(UserError, match=r"train\.de"):
        load_source(DataSource(path=str(tmp_path / "train"), languages=["en", "de"]), "data.train")
    _write_lines(tmp_path / "train.de", ["a"], gz=False)
    with pytest.raises(UserError, match="not line-aligned"):
        load_source(DataSource(path=str(tmp_path / "train"), languages=["en", "de"]), "data.train")


def test_languages_cannot_take_a_format():
    with pytest.raises(ValueError, match="languages"):
        DataSource(path="train", languages=["en", "fr"], format="csv")


@pytest.mark.skipif(not (SHARED_DATA / "translation" / "multi30k").is_dir(), reason="shared data absent")
def test_multi30k_validation_pairs_load():
    source = DataSource(path=str(SHARED_DATA / "translation" / "multi30k" / "val"), languages=["en", "fr"])
    dataset = load_source(source, "data.validation")
    assert len(dataset) == 1014
    assert all(row["en"].strip() and row["fr"].strip() for row in dataset)


@pytest.mark.skipif(not (SHARED_DATA / "qa" / "xquad_en").is_dir(), reason="shared data absent")
def test_xquad_flattens_to_all_questions():
    dataset = load_source(DataSource(path=str(SHARED_DATA / "qa" / "xquad_en" / "train.json")), "data.train")
    assert len(dataset) == 1013
    assert sorted(set(dataset["article"])) == list(range(40))
