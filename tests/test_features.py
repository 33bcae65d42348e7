"""Feature extraction: frozen embeddings cached in the run folder + logistic regression, scored like classification."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from tests.conftest import classification_recipe, run_cli, write_jsonl, write_recipe
from peftkit.cli import main
from peftkit.errors import UserError
from peftkit.recipe.load import validate_recipe
from peftkit.tasks import features


def features_recipe(model_dir, files, run_dir, **sections):
    return classification_recipe(
        model_dir, files, run_dir, task={"type": "features"}, adapter={"method": "none"}, **sections
    )


def test_features_end_to_end_and_cached_rerun(tiny_bert_dir, sentiment_files, tmp_path, monkeypatch):
    from peftkit.training.run import train

    recipe = validate_recipe(features_recipe(tiny_bert_dir, sentiment_files, tmp_path / "run"))
    run_dir = train(recipe)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # The sentiment word decides the label; even a random encoder's mean-pooled states separate it.
    assert metrics["test"]["accuracy"] >= 0.7
    assert metrics["parameters"]["trainable"] == 32 + 1  # one weight per embedding dimension + bias (binary)
    assert metrics["parameters"]["total"] > metrics["parameters"]["trainable"]
    assert metrics["train"]["embeddings_reused"] is False
    assert len(list((run_dir / "features").glob("*.npy"))) == 3  # train, validation, test
    weights = load_file(str(run_dir / "adapter" / "classifier.safetensors"))
    assert weights["linear.weight"].shape == (1, 32)
    assert json.loads((run_dir / "adapter" / "classifier.json").read_text())["pooling"] == "mean"
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 80 and {"gold", "predicted", "probability"} <= set(records[0])
    assert "![confusion matrix](plots/confusion_matrix_test.png)" in (run_dir / "report.md").read_text()

    # A rerun refits from the cached embeddings: the model is never loaded, the scores are identical.
    monkeypatch.setattr(features, "build_model", lambda *a, **k: pytest.fail("model loaded despite cache"))
    train(recipe, resume=True)
    again = json.loads((run_dir / "metrics.json").read_text())
    assert again["train"]["embeddings_reused"] is True
    assert again["test"]["accuracy"] == metrics["test"]["accuracy"]
    assert again["test"]["f1_macro"] == metrics["test"]["f1_macro"]
    monkeypatch.undo()

    # `peftkit eval/predict` reload the saved classifier and re-embed with the frozen model (cache removed):
    # the same predictions and probabilities as the run's own.
    shutil.rmtree(run_dir / "features")
    test_records = [{k: v for k, v in r.items() if k != "split"} for r in records if r["split"] == "test"]
    assert main(["eval", str(run_dir), "--split", "test"]) == 0
    evaluation = run_dir / "evaluations" / "test"
    assert [json.loads(line) for line in (evaluation / "predictions.jsonl").read_text().splitlines()] == test_records
    assert json.loads((evaluation / "metrics.json").read_text())["accuracy"] == metrics["test"]["accuracy"]
    inputs = write_jsonl(tmp_path / "inputs.jsonl", [{"text": r["text"]} for r in test_records])
    assert main(["predict", str(run_dir), "--input", str(inputs), "--output", str(tmp_path / "out.jsonl")]) == 0
    predicted = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = [{k: r[k] for k in ("text", "predicted", "probability")} for r in test_records]
    assert predicted == expected


@pytest.mark.parametrize("classes", [2, 3])
def test_saved_classifier_gives_scikit_learns_probabilities(classes, tmp_path):
    """The safetensors weights reproduce the fitted pipeline's predict_proba, binary (one logit) and multinomial."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype(np.float32) * 3 + 1
    y = np.arange(60) % classes
    pipeline = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)
    weights = features._save_classifier(pipeline, "mean", {"labels": [str(i) for i in range(classes)]}, tmp_path)
    assert set(weights) == set(load_file(str(tmp_path / "classifier.safetensors")))
    reloaded = features.FittedClassifier(lambda _: x, load_file(str(tmp_path / "classifier.safetensors")), classes + 1)
    probabilities = reloaded.probabilities(None)
    # scikit-learn keeps float32 inputs in float32; the saved float64 weights agree to float32 precision
    np.testing.assert_allclose(probabilities[:, :classes], pipeline.predict_proba(x), atol=1e-6)
    assert (probabilities[:, classes] == 0).all()  # a label unseen in training


@pytest.mark.slow
def test_features_through_the_cli_on_a_decoder(tiny_llama_dir, sentiment_files, tmp_path):
    recipe = features_recipe(tiny_llama_dir, sentiment_files, tmp_path / "run", evaluation={"splits": ["test"]})
    result = run_cli("train", str(write_recipe(tmp_path / "features.yaml", recipe)))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "adapter" / "classifier.json").read_text())["pooling"] == "last"
    assert "accuracy" in json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]


def test_features_require_adapter_none(tiny_bert_dir, sentiment_files, tmp_path):
    recipe = classification_recipe(tiny_bert_dir, sentiment_files, tmp_path / "run", task={"type": "features"})
    with pytest.raises(UserError, match="set adapter.method: none"):
        validate_recipe(recipe)
    # With method none, a k-bit base is refused for features itself, not sent back to "use an adapter".
    recipe["adapter"], recipe["quantization"] = {"method": "none"}, {"bits": 4}
    with pytest.raises(UserError, match="task.type features embeds with the frozen base .* remove quantization.bits"):
        validate_recipe(recipe)


@pytest.mark.parametrize("pooling, expected", [("mean", [[2.0, 2.0], [5.0, 5.0]]), ("last", [[3.0, 3.0], [6.0, 6.0]]), ("cls", [[1.0, 1.0], [4.0, 4.0]])])
def test_pooling_ignores_padding_on_either_side(pooling, expected):
    right = torch.tensor([[[1.0, 1], [2, 2], [3, 3], [9, 9]], [[4, 4], [5, 5], [6, 6], [9, 9]]])
    right_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    left = torch.tensor([[[9.0, 9], [1, 1], [2, 2], [3, 3]], [[4, 4], [5, 5], [6, 6], [9, 9]]])
    left_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    assert features.pool(right, right_mask, pooling).tolist() == expected
    assert features.pool(left, left_mask, pooling).tolist() == expected
