"""Loading local files of every format, hub-style dataset folders, limits and renames; bad files, fuzzed."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.conftest import classification_recipe, sentiment_rows, write_jsonl
from peftkit.data.sources import MAX_CELL_CHARS, load_source, load_splits
from peftkit.errors import UserError
from peftkit.recipe.schema import DataSection, DataSource

ROWS = [{"text": f"row {i} with a \"quote\"", "label": i % 3} for i in range(10)]


@pytest.fixture
def files(tmp_path):
    frame = pd.DataFrame(ROWS)
    paths = {
        "json": tmp_path / "d.json", "jsonl": tmp_path / "d.jsonl", "csv": tmp_path / "d.csv",
        "tsv": tmp_path / "d.tsv", "parquet": tmp_path / "d.parquet",
    }
    paths["json"].write_text(json.dumps(ROWS))
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    frame.to_csv(paths["csv"], index=False)
    paths["tsv"].write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in ROWS))
    frame.to_parquet(paths["parquet"])
    return paths


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "tsv", "parquet"])
def test_every_local_format_loads_the_same_rows(files, kind):
    dataset = load_source(DataSource(path=str(files[kind])), "data.train")
    assert dataset["text"] == [r["text"] for r in ROWS]
    assert [int(x) for x in dataset["label"]] == [r["label"] for r in ROWS]


def test_limit_is_a_seeded_sample_and_rename_applies(files):
    first = load_source(DataSource(path=str(files["jsonl"]), limit=4, seed=3, rename={"text": "sentence"}), "data.train")
    second = load_source(DataSource(path=str(files["jsonl"]), limit=4, seed=3, rename={"text": "sentence"}), "data.train")
    assert len(first) == 4 and first["sentence"] == second["sentence"]
    assert set(first["sentence"]) <= {r["text"] for r in ROWS}


def test_hub_loader_reads_a_dataset_folder_by_split(tmp_path):
    """The hub code path (`datasets.load_dataset(name, split=...)`) exercised on a local dataset repo folder."""
    repo = tmp_path / "my_dataset"
    (repo / "data").mkdir(parents=True)
    pd.DataFrame(ROWS[:6]).to_parquet(repo / "data" / "train-00000-of-00001.parquet")
    pd.DataFrame(ROWS[6:]).to_parquet(repo / "data" / "validation-00000-of-00001.parquet")
    section = DataSection(
        train=DataSource(path=str(repo), format="hub"), validation=DataSource(path=str(repo), format="hub")
    )
    splits = load_splits(section)
    assert len(splits["train"]) == 6 and len(splits["validation"]) == 4


def test_translation_pairs_of_wmt_and_opus_datasets_become_language_columns(tmp_path):
    """Hub WMT/OPUS datasets (a `Translation` feature) and JSON written like them hold `translation: {de, en}` per
    row; each language becomes a column, so `task.source_column: en` reads them (before: "has no column en")."""
    from datasets import Dataset, Features, Translation

    pairs = [{"en": "a cat", "de": "eine Katze"}, {"en": "a dog", "de": "ein Hund"}, {"en": "a bird", "de": None}]
    repo = tmp_path / "wmt"
    (repo / "data").mkdir(parents=True)
    Dataset.from_dict({"translation": pairs}, features=Features({"translation": Translation(languages=["de", "en"])})
                      ).to_parquet(repo / "data" / "train-00000-of-00001.parquet")
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", [{"translation": pair, "id": i} for i, pair in enumerate(pairs)])
    for source in (DataSource(path=str(repo), format="hub", split="train"), DataSource(path=str(jsonl))):
        dataset = load_source(source, "data.train")
        assert dataset["en"] == ["a cat", "a dog", "a bird"] and dataset["de"] == ["eine Katze", "ein Hund", None]
        assert dataset["translation"][0] == pairs[0]  # kept as it was
    # a column already named like a language is left alone
    renamed = load_source(DataSource(path=str(jsonl), rename={"id": "en"}), "data.train")
    assert renamed["en"] == [0, 1, 2] and renamed["de"] == ["eine Katze", "ein Hund", None]


def test_validation_fraction_carves_a_disjoint_split(files):
    splits = load_splits(DataSection(train=DataSource(path=str(files["jsonl"])), validation_fraction=0.3))
    assert len(splits["train"]) == 7 and len(splits["validation"]) == 3
    assert not set(splits["train"]["text"]) & set(splits["validation"]["text"])


@pytest.mark.parametrize(
    "source, message",
    [
        (DataSource(path="missing/file.jsonl"), "does not exist"),
        (DataSource(path="data.xlsx"), "does not exist"),
        (DataSource(path="./nowhere", format="csv"), "does not exist"),
    ],
)
def test_missing_files_are_user_errors(source, message):
    with pytest.raises(UserError, match=message):
        load_source(source, "data.train")


def test_unknown_extension_and_bad_rename(tmp_path, files):
    odd = tmp_path / "data.xyz"
    odd.write_text("x")
    with pytest.raises(UserError, match="set data.train.format"):
        load_source(DataSource(path=str(odd)), "data.train")
    with pytest.raises(UserError, match=r"data.train.rename: column\(s\) \['nope'\]"):
        load_source(DataSource(path=str(files["jsonl"]), rename={"nope": "x"}), "data.train")


def test_broken_json_lines_name_the_file(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok", "label": 1}\n{"text": broken\n')
    with pytest.raises(UserError, match="broken.jsonl"):
        load_source(DataSource(path=str(broken)), "data.train")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("broken.jsonl", b'{"text": "ok", "label": 1}\n{"text": "fine", "label": 0}\n{"text": broken\n', "line 3 is not valid JSON"),
        ("list.jsonl", b'{"text": "ok", "label": 1}\n[1, 2]\n', "line 2 is a JSON list"),
        ("latin1.jsonl", '{"text": "ok", "label": 1}\n{"text": "caf\u00e9", "label": 0}\n'.encode("latin-1"), "line 2 is not UTF-8"),
        ("ragged.csv", b"text,label\nok,1\ntoo,many,fields\n", "line 3 has 3 fields but the header has 2"),
        ("ragged.tsv", b"text\tlabel\nok\t1\nshort\n", "line 3 has 1 fields but the header has 2"),
        # datasets would keep such a column as JSON and turn the string "1" into the number 1
        ("mixed.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": "1"}\n{"text": "c", "label": 0}\n',
         "column 'label' mixes value types: number at lines [1, 3] (e.g. 1); string at lines [2] (e.g. '1')"),
        ("mixed.json", b'[{"text": "a", "label": "pos"}, {"text": "b", "label": 2}]',
         "column 'label' mixes value types: string at rows [1] (e.g. 'pos'); number at rows [2] (e.g. 2)"),
        ("mixed_inside.jsonl", b'{"text": "a", "label": 1, "tags": [1, "x"]}\n{"text": "b", "label": 0, "tags": [2]}\n',
         "column 'tags[]' mixes value types: number at lines [1, 2] (e.g. 1); string at lines [1] (e.g. 'x')"),
        ("empty.jsonl", b"", "holds no rows"),  # was "could not read ...: StopIteration"
        ("blank.csv", b"\n \n", "holds no rows"),
        ("huge.jsonl", b'{"text": "ok"}\n{"text": "' + b"x" * (MAX_CELL_CHARS + 1) + b'"}\n',
         f"row 2 has a 'text' of {MAX_CELL_CHARS + 1:,} characters"),
    ],
)
def test_bad_files_name_the_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        load_source(DataSource(path=str(path)), "data.train")
    assert message in str(caught.value) and name in str(caught.value)


@pytest.mark.parametrize("rows, fraction", [(1, 0.15), (20, 0.999)])
def test_a_validation_fraction_that_leaves_a_side_empty_is_refused(tmp_path, rows, fraction):
    """Was datasets' ValueError with a traceback."""
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "ok", "label": 1}] * rows)
    with pytest.raises(UserError, match=rf"data.validation_fraction: {fraction} of the {rows} training rows leaves no row"):
        load_splits(DataSection(train=DataSource(path=str(path)), validation_fraction=fraction))


@pytest.mark.parametrize("key", ["split", "subset"])
def test_hub_only_keys_on_a_local_file_are_refused(tmp_path, key):
    """`peftkit eval RUN --data file.jsonl --split test` scored the whole file as if it were a split of it."""
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "ok", "label": 1}])
    with pytest.raises(UserError, match=rf"data.test.{key}: `x` names part of a hub dataset, but `.*rows.jsonl` is a local file"):
        load_source(DataSource(path=str(path), **{key: "x"}), "data.test")
    # the hub default, inherited by a local recipe that extends a hub one (recipes/local/qa_xquad.yaml), changes nothing
    assert len(load_source(DataSource(path=str(path), split="train"), "data.train[0]")) == 1


def test_empty_texts_and_labels_are_an_error_naming_rows_or_skipped_and_counted(tiny_bert_dir, tmp_path, caplog):
    """A row without a label (null, or a JSON line without the key) once trained a third class named "None"."""
    from transformers import AutoTokenizer

    from peftkit.recipe.load import validate_recipe
    from peftkit.tasks import classification

    rows = sentiment_rows(10, seed=1)
    rows[2]["text"], rows[5]["text"] = "  ", None
    rows[7]["label"] = None
    del rows[8]["label"]
    files = {"train": write_jsonl(tmp_path / "train.jsonl", rows)}
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    recipe = classification_recipe(tiny_bert_dir, files, tmp_path / "run", training={"eval_strategy": "no", "save_strategy": "no"})
    with pytest.raises(UserError, match=r"data.train: `.*train.jsonl` column 'text' is empty at row\(s\) \[3, 6\] \(2 of 10\); "
                       r"column 'label' is empty at row\(s\) \[8, 9\] \(2 of 10\); .*data.skip_bad_rows: true"):
        classification.prepare(validate_recipe(recipe), load_splits(validate_recipe(recipe).data), tokenizer)

    skipping = validate_recipe({**recipe, "data": {**recipe["data"], "skip_bad_rows": True}})
    splits = load_splits(skipping.data)
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        tokenized, info = classification.prepare(skipping, splits, tokenizer)
    assert "data.train: skipped 4 of 10 rows of" in caplog.text and "row(s) [8, 9]" in caplog.text
    kept = [row for i, row in enumerate(rows) if i not in (2, 5, 7, 8)]
    assert splits["train"]["text"] == [row["text"] for row in kept]  # raw rows stay aligned with tokenized ones
    assert [info["labels"][i] for i in tokenized["train"]["labels"]] == [row["label"] for row in kept]
    assert info["labels"] == ["negative", "positive"]


def test_csv_texts_that_pandas_takes_for_missing_stay_text_and_whole_float_labels_are_integers(tiny_bert_dir, tmp_path):
    """pandas read the texts NA, null, None as missing values (a class `NA` became a row without a label), and a column
    of integer labels with one empty field as floats (classes "0.0" and "1.0", matching no other file's "0" and "1")."""
    from transformers import AutoTokenizer

    from peftkit.recipe.load import validate_recipe
    from peftkit.tasks import classification

    words = tmp_path / "words.tsv"
    words.write_text("text\tlabel\ngood\tpos\nNA\tneg\nnull\tNA\nNone\tpos\n")
    assert load_source(DataSource(path=str(words)), "data.train")[:] == {
        "text": ["good", "NA", "null", "None"], "label": ["pos", "neg", "NA", "pos"]}

    numbers = tmp_path / "numbers.csv"
    numbers.write_text("text,label\n" + "".join(f"{r['text']},{int(r['label'] == 'positive')}\n" for r in sentiment_rows(8, seed=1)) + "blank,\n")
    recipe = validate_recipe(classification_recipe(tiny_bert_dir, {"train": numbers}, tmp_path / "run", data={"skip_bad_rows": True},
                                                   training={"eval_strategy": "no", "save_strategy": "no"}))
    _, info = classification.prepare(recipe, load_splits(recipe.data), AutoTokenizer.from_pretrained(tiny_bert_dir))
    assert info["labels"] == ["0", "1"]


@pytest.mark.parametrize("labels,message", [
    ([["joy", "love"], ["anger"]], r"holds lists or mappings at row\(s\) \[1, 2, 3, 4\] \(4 of 4; e.g. \['joy', 'love'\]\): "
                                   r"classification takes one label per row"),  # multi-label: a traceback before
    ([{"id": 1}, {"id": 2}], r"holds lists or mappings at row\(s\) \[1, 2, 3, 4\]"),
    ([0.5, 3.0], r"holds fractional numbers at row\(s\) \[1, 3\] \(2 of 4; e.g. 0.5\): a regression target"),  # silently classes
])
def test_labels_that_are_not_one_class_per_row_are_refused(labels, message, tiny_bert_dir, tmp_path):
    from transformers import AutoTokenizer

    from peftkit.recipe.load import validate_recipe
    from peftkit.tasks import classification

    train = write_jsonl(tmp_path / "train.jsonl", [{"text": text, "label": label} for text in ("good", "bad") for label in labels])
    recipe = validate_recipe(classification_recipe(tiny_bert_dir, {"train": train}, tmp_path / "run",
                                                   training={"eval_strategy": "no", "save_strategy": "no"}))
    with pytest.raises(UserError, match=r"data.train: `.*train.jsonl` column 'label' " + message):
        classification.prepare(recipe, load_splits(recipe.data), AutoTokenizer.from_pretrained(tiny_bert_dir))


def test_hub_integer_labels_are_named_by_their_class_label(tiny_bert_dir, tmp_path):
    """glue/sst2, imdb, ag_news...: labels are integers with names in a `ClassLabel` feature; the classes are named
    by it (they were "0" and "1", in id2label, predictions and reports) and other splits' integers index into it."""
    from datasets import ClassLabel, Dataset, Features, Value
    from transformers import AutoTokenizer

    from peftkit.recipe.load import validate_recipe
    from peftkit.tasks import classification

    features = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    rows = sentiment_rows(8, seed=1)
    repo = tmp_path / "hub"
    (repo / "data").mkdir(parents=True)
    for split, part in (("train", rows[:6]), ("validation", rows[6:])):
        Dataset.from_dict({"text": [r["text"] for r in part], "label": [int(r["label"] == "positive") for r in part]},
                          features=features).to_parquet(repo / "data" / f"{split}-00000-of-00001.parquet")
    recipe = validate_recipe(classification_recipe(
        tiny_bert_dir, {}, tmp_path / "run", data={"train": {"path": str(repo), "format": "hub"},
                                                     "validation": {"path": str(repo), "format": "hub"}}))
    tokenized, info = classification.prepare(recipe, load_splits(recipe.data), AutoTokenizer.from_pretrained(tiny_bert_dir))
    assert info["labels"] == ["negative", "positive"]
    for split, part in (("train", rows[:6]), ("validation", rows[6:])):
        assert [info["labels"][i] for i in tokenized[split]["labels"]] == [r["label"] for r in part]


@pytest.mark.parametrize("data", [{"validation_fraction": 0.25}, {"train": {"limit": 15}}, {"train": {"rows": "4:"}}])
def test_messages_name_the_row_of_the_file_when_the_split_is_reordered(data, tiny_bert_dir, tmp_path):
    """Rows were counted in the split as loaded: after validation_fraction, limit or rows, `row 3` was another line."""
    from transformers import AutoTokenizer

    from peftkit.recipe.load import deep_merge, validate_recipe
    from peftkit.tasks import classification

    rows = sentiment_rows(20, seed=1)
    rows[12]["text"] = " "
    files = {"train": write_jsonl(tmp_path / "train.jsonl", rows)}
    recipe = classification_recipe(tiny_bert_dir, files, tmp_path / "run", training={"eval_strategy": "no", "save_strategy": "no"})
    recipe = validate_recipe({**recipe, "data": deep_merge(recipe["data"], data)})
    splits = load_splits(recipe.data)
    assert any(split[recipe.task.text_column].count(" ") for split in splits.values())  # the bad row was selected
    with pytest.raises(UserError, match=r"train.jsonl.* column 'text' is empty at row\(s\) \[13\] \(1 of"):
        classification.prepare(recipe, splits, AutoTokenizer.from_pretrained(tiny_bert_dir))


def test_texts_cut_by_max_length_are_counted_with_their_pairs(tiny_bert_dir, tmp_path, caplog):
    from transformers import AutoTokenizer

    from peftkit.recipe.load import validate_recipe
    from peftkit.tasks import classification

    rows = [{"text": "good", "pair": "movie", "label": "positive"}, {"text": "bad", "pair": "bad bad bad", "label": "negative"}]
    files = {"train": write_jsonl(tmp_path / "train.jsonl", rows)}
    recipe = validate_recipe(classification_recipe(tiny_bert_dir, files, tmp_path / "run", task={"text_pair_column": "pair"},
                                                   data={"max_length": 3}, training={"eval_strategy": "no", "save_strategy": "no"}))
    with caplog.at_level(logging.WARNING, logger="peftkit"):  # the tiny word-level tokenizer adds no special tokens
        tokenized, _ = classification.prepare(recipe, load_splits(recipe.data), AutoTokenizer.from_pretrained(tiny_bert_dir))
    assert [len(ids) for ids in tokenized["train"]["input_ids"]] == [2, 3]  # bad + bad bad bad: 4 words, cut
    assert "data.train: 1 of 2 texts are longer than data.max_length=3 tokens and are cut" in caplog.text


def test_listed_labels_without_training_rows_are_named(tiny_bert_dir, tmp_path, caplog):
    from transformers import AutoTokenizer

    from peftkit.recipe.load import validate_recipe
    from peftkit.tasks import classification

    files = {"train": write_jsonl(tmp_path / "train.jsonl", sentiment_rows(10, seed=1))}
    recipe = validate_recipe(classification_recipe(tiny_bert_dir, files, tmp_path / "run", task={"labels": ["negative", "neutral", "positive"]},
                                                   training={"eval_strategy": "no", "save_strategy": "no"}))
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        _, info = classification.prepare(recipe, load_splits(recipe.data), AutoTokenizer.from_pretrained(tiny_bert_dir))
    assert info["labels"] == ["negative", "neutral", "positive"]
    assert "task.labels: ['neutral'] never occur in" in caplog.text and "['negative'" not in caplog.text


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=8))
JSON_ROWS = st.lists(st.dictionaries(st.sampled_from(["text", "label"]), JSON_SCALARS, max_size=2), min_size=1, max_size=5)


@settings(max_examples=40, deadline=None)
@given(st.one_of(JSON_ROWS.map(lambda rows: "".join(json.dumps(r) + "\n" for r in rows).encode()),
                 st.binary(max_size=60)))
@example(content=b"\xc2")  # a multi-byte character cut off at the end of the file (found by hypothesis)
def test_arbitrary_json_lines_load_or_raise_the_user_error(content):
    """Any bytes in a .jsonl file: rows of one type per column, or a UserError naming the file; never a crash."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.jsonl"
        path.write_bytes(content)
        try:
            dataset = load_source(DataSource(path=str(path)), "data.train")
        except UserError as error:
            assert "fuzz.jsonl" in str(error)
        else:
            for name, feature in dataset.features.items():
                assert type(feature).__name__ != "Json", f"column {name!r} kept mixed types"


def test_label_text_lines_and_other_encodings(tmp_path):
    """`<label> <text>` lines (SST/SentEval/TREC) become label/text columns; integer labels stay integers (they index
    task.labels); a latin-1 file reads with `encoding` and is an error naming the line without it."""
    sst = tmp_path / "stsa.binary.train"
    sst.write_bytes("1 a caf\xe9 , funny film\n\n0 dull .\r\n".encode("latin-1"))
    with pytest.raises(UserError, match="line 1 is not UTF-8 text; set the source's `encoding`"):
        load_source(DataSource(path=str(sst), format="label_text"), "data.train")
    rows = list(load_source(DataSource(path=str(sst), format="label_text", encoding="latin-1"), "data.train"))
    assert rows == [{"label": 1, "text": "a café , funny film"}, {"label": 0, "text": "dull ."}]
    trec = tmp_path / "trec.txt"
    trec.write_text("DESC:manner How did serfdom develop ?\nENTY:cremat What films featured Dracula ?\n")
    assert load_source(DataSource(path=str(trec), format="label_text"), "data.train")["label"] == ["DESC:manner", "ENTY:cremat"]
    trec.write_text("DESC:manner How ?\nHUM:ind\n")
    with pytest.raises(UserError, match="line 2 has a label but no text"):
        load_source(DataSource(path=str(trec), format="label_text"), "data.train")
    with pytest.raises(UserError, match="set data.train.format \\(e.g. `label_text`"):
        load_source(DataSource(path=str(trec)), "data.train")
    latin_csv = tmp_path / "latin.csv"
    latin_csv.write_bytes("text,label\nna\xefve,1\n".encode("cp1252"))
    assert load_source(DataSource(path=str(latin_csv), encoding="cp1252"), "data.train")[0] == {"text": "naïve", "label": 1}
    with pytest.raises(ValueError, match="unknown text encoding `latin-9x`"):
        DataSource(path="x.csv", encoding="latin-9x")
