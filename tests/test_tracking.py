"""Experiment trackers for real: a local MLflow file store, W&B offline, TensorBoard event files — each gets the
training curve, the final test metrics and the report's plots."""

from __future__ import annotations

import json

import pytest

from tests.conftest import train_tiny_run

pytestmark = pytest.mark.slow


def test_every_tracker_receives_curves_final_metrics_and_plots(tiny_bert_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    for name in ("MLFLOW_TRACKING_URI", "WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = train_tiny_run(tiny_bert_dir, tmp_path / "tracked", training={"report_to": ["tensorboard", "mlflow", "wandb"]},
                             output={"tensorboard": True})
    accuracy = json.loads((run_dir / "metrics.json").read_text())["test"]["accuracy"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient((run_dir / "mlruns").resolve().as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("peftkit").experiment_id])
    assert run.data.metrics["test_accuracy"] == pytest.approx(accuracy)
    assert "loss" in run.data.metrics  # the Trainer's curve went to the same run
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} >= {"report/confusion_matrix_test.png"}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert events.Scalars("final/test/accuracy")[-1].value == pytest.approx(accuracy)
    assert "report/confusion_matrix_test" in events.Tags()["images"]

    [records] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")  # what `wandb sync` uploads later
    logged = records.read_bytes()
    assert b"test/accuracy" in logged and b"report/confusion_matrix_test" in logged and b"train/loss" in logged
