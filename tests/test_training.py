"""End to end: a LoRA classification run learns, writes a complete run folder, reloads in plain peft, resumes exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from peftkit.recipe.load import validate_recipe
from peftkit.training.run import train
from tests.conftest import classification_recipe


def test_accuracy_rises_well_above_chance(trained_run):
    run_dir, _ = trained_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.85, metrics["test"]
    assert metrics["validation"]["f1_macro"] >= 0.85
    assert set(metrics["test"]["per_class"]) == {"negative", "positive"}
    matrix = metrics["test"]["confusion_matrix"]
    assert matrix["labels"] == ["negative", "positive"] and sum(map(sum, matrix["matrix"])) == 40
    assert 0 < metrics["parameters"]["trainable"] < metrics["parameters"]["total"]


def test_run_folder_is_complete(trained_run):
    run_dir, _ = trained_run
    for name in ["recipe.yaml", "metrics.json", "predictions.jsonl", "report.md", "manifest.json", "task.json",
                 "plots/loss.png", "plots/confusion_matrix_test.png", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "adapter/tokenizer.json"]:
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.rglob("adapter/*.bin")), "only safetensors in the deployable adapter"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["libraries"]["peft"] and manifest["trust_remote_code"] is False
    report = (run_dir / "report.md").read_text()
    assert "| class | precision | recall | F1 | support |" in report and "confusion_matrix_test.png" in report
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert {p["split"] for p in predictions} == {"validation", "test"}
    assert {"text", "gold", "predicted", "probability"} <= set(predictions[0])
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "classifier" in config["modules_to_save"]


def test_adapter_reloads_in_plain_peft_with_identical_outputs(trained_run, tiny_bert_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir, files = trained_run
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    test_rows = [p for p in predictions if p["split"] == "test"]
    batch = tokenizer([p["text"] for p in test_rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        probabilities = model(**batch).logits.softmax(-1).numpy()
    id2label = json.loads((run_dir / "task.json").read_text())["labels"]
    assert [id2label[i] for i in probabilities.argmax(-1)] == [p["predicted"] for p in test_rows]
    np.testing.assert_allclose(probabilities.max(-1), [p["probability"] for p in test_rows], atol=1e-5)


def _resume_recipe(tiny_bert_dir, files, run_dir):
    return validate_recipe(classification_recipe(
        tiny_bert_dir, {"train": files["train"]}, run_dir,
        training={"max_steps": 12, "eval_strategy": "no", "save_strategy": "steps", "save_steps": 4, "keep_last": 5},
        adapter={"dropout": 0.1},  # dropout makes the RNG state part of what must be restored
        evaluation={"splits": []},
    ))


def test_resume_matches_uninterrupted_run(tiny_bert_dir, sentiment_files, tmp_path):
    uninterrupted = train(_resume_recipe(tiny_bert_dir, sentiment_files, tmp_path / "full"))
    # An interrupted run: what was on disk after the checkpoint at step 8 (later files never written).
    interrupted = tmp_path / "resumed"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copytree(uninterrupted / "checkpoints" / "checkpoint-8", interrupted / "checkpoints" / "checkpoint-8")
    resumed = train(_resume_recipe(tiny_bert_dir, sentiment_files, interrupted), resume=True)
    expected = load_file(uninterrupted / "adapter" / "adapter_model.safetensors")
    actual = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=0)
    log = json.loads((resumed / "log_history.json").read_text())
    assert log[-1]["step"] == 12
    # and the checkpoint at step 8 really differs from the end: resuming did train
    at_eight = load_file(interrupted / "checkpoints" / "checkpoint-8" / "adapter_model.safetensors")
    assert any(not torch.equal(at_eight[k], actual[k]) for k in at_eight)


def test_gradient_accumulation_matches_one_larger_batch(tiny_llama_dir, sentiment_files, tmp_path):
    """4 x 2 accumulated equals 8 at once: the Trainer must not treat the classification loss (a batch mean) as a
    sum over a global item count (it would skip the division by accumulation steps; on N ranks multiply by N)."""

    def losses(name, batch_size, accumulation):
        recipe = validate_recipe(classification_recipe(
            tiny_llama_dir, {"train": sentiment_files["train"]}, tmp_path / name,
            training={"max_steps": 3, "batch_size": batch_size, "gradient_accumulation": accumulation,
                      "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no", "warmup_ratio": 0.0},
            evaluation={"splits": []},
        ))
        history = json.loads((train(recipe) / "log_history.json").read_text())
        return [entry[key] for entry in history if "loss" in entry for key in ("loss", "grad_norm")]

    accumulated, whole = losses("accumulated", 4, 2), losses("whole", 8, 1)
    assert len(whole) == 2 * 3
    assert accumulated == pytest.approx(whole, rel=1e-4)


def test_length_grouped_batches_keep_predictions_on_their_rows(tiny_bert_dir, tmp_path):
    """trainer_args train_sampling_strategy: group_by_length must not reorder evaluation (transformers groups
    evaluation batches by length too): the final validation score equals the Trainer's own evaluation of it."""
    import random

    from tests.conftest import sentiment_rows, write_jsonl

    rng = random.Random(0)

    def varied(count, seed):
        return [{**row, "text": " ".join(["the"] * rng.randrange(0, 12)) + " " + row["text"]}
                for row in sentiment_rows(count, seed)]

    files = {"train": write_jsonl(tmp_path / "train.jsonl", varied(96, 1)),
             "validation": write_jsonl(tmp_path / "validation.jsonl", varied(48, 2))}
    recipe = classification_recipe(tiny_bert_dir, files, tmp_path / "run",
                                   training={"trainer_args": {"train_sampling_strategy": "group_by_length"}},
                                   evaluation={"splits": ["validation"]})
    metrics = json.loads((train(validate_recipe(recipe)) / "metrics.json").read_text())
    name = metrics["best_metric_name"].removeprefix("eval_")
    assert metrics["validation"]["accuracy"] > 0.65  # learned, so a reordering would show
    assert metrics["validation"][name] == pytest.approx(metrics["best_metric"])
