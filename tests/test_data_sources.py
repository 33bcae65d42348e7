"""Loading local files of every format, hub-style dataset folders, limits and renames."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from peftkit.data.sources import load_source, load_splits
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
    ],
)
def test_bad_files_name_the_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        load_source(DataSource(path=str(path)), "data.train")
    assert message in str(caught.value) and name in str(caught.value)
