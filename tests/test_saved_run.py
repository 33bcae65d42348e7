"""`peftkit eval` / `peftkit predict` on a finished classification run (through the CLI), and their errors."""

from __future__ import annotations

import json

import pytest

from conftest import classification_recipe, run_cli, sentiment_rows, write_jsonl, write_recipe


@pytest.fixture(scope="module")
def finished_run(tiny_bert_dir, tmp_path_factory):
    from peftkit.recipe.load import validate_recipe
    from peftkit.training.run import train

    folder = tmp_path_factory.mktemp("saved-run")
    files = {
        "train": write_jsonl(folder / "train.jsonl", sentiment_rows(64, seed=1)),
        "validation": write_jsonl(folder / "validation.jsonl", sentiment_rows(24, seed=2)),
    }
    recipe = classification_recipe(tiny_bert_dir, files, folder / "run", training={"epochs": 2})
    return train(validate_recipe(recipe)), folder


def test_eval_reproduces_the_run_scores_and_scores_other_data(finished_run):
    run_dir, folder = finished_run
    trained = json.loads((run_dir / "metrics.json").read_text())["validation"]
    result = run_cli("eval", str(run_dir), "--split", "validation")
    assert result.returncode == 0, result.stderr
    evaluation = json.loads((run_dir / "evaluations" / "validation" / "metrics.json").read_text())
    assert evaluation["accuracy"] == pytest.approx(trained["accuracy"])
    assert evaluation["confusion_matrix"] == trained["confusion_matrix"]
    assert f'"accuracy": {evaluation["accuracy"]}' in result.stdout

    other = write_jsonl(folder / "other.jsonl", sentiment_rows(10, seed=9))
    result = run_cli("eval", str(run_dir), "--data", str(other))
    assert result.returncode == 0, result.stderr
    report = (run_dir / "evaluations" / "other" / "report.md").read_text()
    assert "| accuracy |" in report and "Accuracy by text length" in report
    assert len((run_dir / "evaluations" / "other" / "predictions.jsonl").read_text().splitlines()) == 10


def test_predict_writes_jsonl_for_unlabelled_inputs(finished_run):
    run_dir, folder = finished_run
    rows = sentiment_rows(6, seed=4)
    inputs = write_jsonl(folder / "inputs.jsonl", [{"text": row["text"]} for row in rows])
    output = folder / "predictions.jsonl"
    result = run_cli("predict", str(run_dir), "--input", str(inputs), "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert "wrote 6 predictions" in result.stdout
    assert "100%" in result.stderr  # progress bar
    predictions = [json.loads(line) for line in output.read_text().splitlines()]
    assert [p["text"] for p in predictions] == [row["text"] for row in rows]
    assert {p["predicted"] for p in predictions} <= {"positive", "negative"}
    assert all(0.5 <= p["probability"] <= 1 and "gold" not in p for p in predictions)


def test_user_errors_exit_2_without_traceback(finished_run, tmp_path):
    run_dir, folder = finished_run
    result = run_cli("eval", str(tmp_path))
    assert result.returncode == 2 and "not a finished run folder" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("eval", str(run_dir), "--split", "test")
    assert result.returncode == 2 and "no `test` data" in result.stderr
    wrong = write_jsonl(folder / "wrong.jsonl", [{"sentence": "good"}])
    result = run_cli("predict", str(run_dir), "--input", str(wrong), "--output", str(tmp_path / "x.jsonl"))
    assert result.returncode == 2 and "no column 'text'" in result.stderr
