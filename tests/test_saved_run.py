"""`peftkit eval` / `peftkit predict` on a finished classification run (through the CLI entry point), and their errors.

The commands run in-process through `peftkit.cli.main` (a subprocess per command costs a minute of imports
on a busy machine); exit codes and messages are the same as from the console script.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import sentiment_rows, write_jsonl
from peftkit.cli import main

pytestmark = pytest.mark.slow


def test_eval_reproduces_the_run_scores_and_scores_other_data(trained_run, capfd):
    run_dir, files = trained_run
    folder = files["train"].parent
    trained = json.loads((run_dir / "metrics.json").read_text())["validation"]
    assert main(["eval", str(run_dir), "--split", "validation"]) == 0
    printed = capfd.readouterr().out
    evaluation = json.loads((run_dir / "evaluations" / "validation" / "metrics.json").read_text())
    assert evaluation["accuracy"] == pytest.approx(trained["accuracy"])
    assert evaluation["confusion_matrix"] == trained["confusion_matrix"]
    assert f'"accuracy": {evaluation["accuracy"]}' in printed

    other = write_jsonl(folder / "other.jsonl", sentiment_rows(10, seed=9))
    assert main(["eval", str(run_dir), "--data", str(other)]) == 0
    report = (run_dir / "evaluations" / "other" / "report.md").read_text()
    assert "| accuracy |" in report and "Accuracy by text length" in report
    assert len((run_dir / "evaluations" / "other" / "predictions.jsonl").read_text().splitlines()) == 10


def test_predict_writes_jsonl_for_unlabelled_inputs(trained_run, capfd):
    run_dir, files = trained_run
    folder = files["train"].parent
    rows = sentiment_rows(6, seed=4)
    inputs = write_jsonl(folder / "inputs.jsonl", [{"text": row["text"]} for row in rows])
    output = folder / "predictions.jsonl"
    assert main(["predict", str(run_dir), "--input", str(inputs), "--output", str(output)]) == 0
    printed = capfd.readouterr()
    assert "wrote 6 predictions" in printed.out
    assert "100%" in printed.err  # progress bar
    predictions = [json.loads(line) for line in output.read_text().splitlines()]
    assert [p["text"] for p in predictions] == [row["text"] for row in rows]
    assert {p["predicted"] for p in predictions} <= {"positive", "negative"}
    assert all(0.5 <= p["probability"] <= 1 and "gold" not in p for p in predictions)


def test_user_errors_exit_2_with_a_message(trained_run, tmp_path, capfd):
    run_dir, files = trained_run
    folder = files["train"].parent
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a finished run folder" in capfd.readouterr().err
    assert main(["eval", str(run_dir), "--split", "dev"]) == 2
    assert "no `dev` data" in capfd.readouterr().err
    wrong = write_jsonl(folder / "wrong.jsonl", [{"sentence": "good"}])
    assert main(["predict", str(run_dir), "--input", str(wrong), "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "no column 'text'" in capfd.readouterr().err


def test_eval_and_predict_read_data_like_a_recipe(trained_run, tmp_path, capfd):
    """--format, --rename, --rows (any data-source key of the recipe) apply to --data and --input."""
    run_dir, _ = trained_run
    rows = sentiment_rows(8, seed=5)
    lines = tmp_path / "sst-style.txt"
    lines.write_text("".join(f"{row['label']} {row['text']}\n" for row in rows))
    assert main(["eval", str(run_dir), "--data", str(lines), "--format", "label_text", "--rows", "2:7"]) == 0
    scored = (run_dir / "evaluations" / "sst-style" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in scored] == [row["text"] for row in rows[2:7]]
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"sentence": row["text"]} for row in rows])
    output = tmp_path / "out.jsonl"
    assert main(["predict", str(run_dir), "--input", str(renamed), "--output", str(output),
                 "--rename", "{sentence: text}", "--limit", "3"]) == 0
    assert len(output.read_text().splitlines()) == 3
    capfd.readouterr()
    assert main(["eval", str(run_dir), "--data", str(lines), "--rows", "x"]) == 2
    assert "--rows: String should match pattern" in capfd.readouterr().err


def test_a_file_the_run_read_keeps_its_options():
    from peftkit.saved_run import _with_test_source
    from peftkit.recipe.load import validate_recipe

    recipe = validate_recipe({
        "model": {"name": "m"}, "training": {"eval_strategy": "no"},
        "data": {"train": {"path": "d/train.txt", "format": "label_text", "encoding": "latin-1", "rows": "0:900",
                           "rename": {"text": "sentence"}}},
    })
    source = _with_test_source(recipe, "d/train.txt", None, {"rows": "900:"}).data.test
    assert (source.format, source.encoding, source.rename, source.rows) == ("label_text", "iso8859-1",
                                                                            {"text": "sentence"}, "900:")
    other = _with_test_source(recipe, "d/other.jsonl", None, {"limit": 5}).data.test
    assert (other.format, other.rename, other.limit) == ("auto", {}, 5)
