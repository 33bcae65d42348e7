"""`peftkit sweep`: optuna trials as run folders, results table and plot, best recipe, pruning."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
import pytest
import yaml

from tests.conftest import classification_recipe, run_cli_in_process, write_recipe
from peftkit.errors import UserError
from peftkit.recipe.load import load_recipe
from peftkit.sweep import PruningCallback, load_space, sweep


@pytest.mark.slow
def test_sweep_three_trials(tiny_bert_dir, sentiment_files, tmp_path):
    recipe = classification_recipe(tiny_bert_dir, sentiment_files, tmp_path / "sweep", training={
        "max_steps": 10, "eval_strategy": "steps", "eval_steps": 5, "save_strategy": "steps", "save_steps": 5})
    space = {
        "params": {"training.learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}, "adapter.r": {"choices": [2, 4]}},
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    sweep_dir = sweep(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "space.yaml", trials=3)
    assert sweep_dir == tmp_path / "sweep"
    rows = list(csv.DictReader(open(sweep_dir / "results.csv")))
    assert [row["trial"] for row in rows] == ["0", "1", "2"]
    assert {row["state"] for row in rows} <= {"complete", "pruned"} and rows[0]["state"] == "complete"
    for row in rows:
        assert 1e-3 <= float(row["training.learning_rate"]) <= 1e-2 and row["adapter.r"] in ("2", "4")
        if row["state"] == "complete":
            metrics = json.loads((sweep_dir / f"trial-{int(row['trial']):03d}" / "metrics.json").read_text())
            assert float(row["f1_macro"]) == pytest.approx(metrics["validation"]["f1_macro"])
            trial_recipe = yaml.safe_load((sweep_dir / f"trial-{int(row['trial']):03d}" / "recipe.yaml").read_text())
            assert trial_recipe["adapter"]["r"] == int(row["adapter.r"])
    complete = [row for row in rows if row["state"] == "complete"]
    top = max(float(row["f1_macro"]) for row in complete)
    best_recipe = load_recipe(sweep_dir / "best_recipe.yaml")
    assert any(  # ties are possible on this easy task; the best recipe is one of the top trials
        best_recipe.adapter.r == int(row["adapter.r"])
        and best_recipe.training.learning_rate == pytest.approx(float(row["training.learning_rate"]))
        for row in complete if float(row["f1_macro"]) == top
    )
    assert (sweep_dir / "results.png").stat().st_size > 1000
    assert "| trial | adapter.r | training.learning_rate | f1_macro | state |" in (sweep_dir / "results.md").read_text()


class _Trial:
    def __init__(self, prune: bool):
        self.prune, self.reported = prune, []

    def report(self, value, step):
        self.reported.append((value, step))

    def should_prune(self):
        return self.prune


def test_pruning_callback_reports_and_prunes():
    class State:
        global_step = 7

    keep = _Trial(prune=False)
    PruningCallback(keep, "f1_macro").on_evaluate(None, State(), None, metrics={"eval_f1_macro": 0.6, "eval_loss": 1.0})
    assert keep.reported == [(0.6, 7)]
    with pytest.raises(optuna.TrialPruned):
        PruningCallback(_Trial(prune=True), "f1_macro").on_evaluate(None, State(), None, metrics={"eval_f1_macro": 0.1})


def test_bad_space_and_bad_key_paths(tiny_bert_dir, sentiment_files, tmp_path):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"params": {"training.learning_rate": {"low": 1e-2, "high": 1e-3}}}))
    with pytest.raises(UserError, match="low.* must be below .*high"):
        load_space(tmp_path / "space.yaml")
    recipe = classification_recipe(tiny_bert_dir, sentiment_files, tmp_path / "sweep")
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"params": {"training.learr": {"choices": [1]}}}))
    result = run_cli_in_process("sweep", str(write_recipe(tmp_path / "r.yaml", recipe)), "--space", str(tmp_path / "space.yaml"), "--trials", "1")
    assert result.returncode == 2 and "training.learr" in result.stderr and "unknown key" in result.stderr


def test_grid_sweep_runs_every_combination_once_and_keeps_results_of_a_stopped_sweep(
    tiny_bert_dir, sentiment_files, tmp_path, monkeypatch
):
    """`sampler: grid` tries each combination of the choices exactly once (--trials only caps it), and the results
    table is rewritten after every trial, so a sweep stopped part-way keeps what its finished trials measured."""
    import peftkit.training.run

    seen, stop_after = [], [None]

    def fake_train(recipe, callbacks=()):  # scores a trial by its values: the sweep's bookkeeping is under test
        seen.append((recipe.training.learning_rate, recipe.adapter.r))
        if len(seen) == stop_after[0]:
            raise KeyboardInterrupt
        run_dir = Path(recipe.output.dir)
        run_dir.mkdir(parents=True)
        accuracy = recipe.training.learning_rate * 100 + recipe.adapter.r / 100
        (run_dir / "metrics.json").write_text(json.dumps({"validation": {"accuracy": accuracy}}))

    monkeypatch.setattr(peftkit.training.run, "train", fake_train)
    recipe = write_recipe(tmp_path / "r.yaml", classification_recipe(tiny_bert_dir, sentiment_files, tmp_path / "sweep"))
    space = {"metric": "accuracy", "sampler": "grid", "pruning": False,
             "params": {"training.learning_rate": {"choices": [1e-3, 2e-3]}, "adapter.r": {"choices": [2, 4]}}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))

    sweep_dir = sweep(recipe, tmp_path / "space.yaml", trials=10)
    assert sorted(seen) == [(1e-3, 2), (1e-3, 4), (2e-3, 2), (2e-3, 4)]
    rows = list(csv.DictReader(open(sweep_dir / "results.csv")))
    assert [row["state"] for row in rows] == ["complete"] * 4
    best_recipe = load_recipe(sweep_dir / "best_recipe.yaml")
    assert (best_recipe.training.learning_rate, best_recipe.adapter.r) == (2e-3, 4)

    seen.clear()
    stop_after[0] = 3
    with pytest.raises(KeyboardInterrupt):
        sweep(recipe, tmp_path / "space.yaml", 10, [f"output.dir={tmp_path / 'stopped'}"])
    rows = list(csv.DictReader(open(tmp_path / "stopped" / "results.csv")))
    assert [row["state"] for row in rows] == ["complete", "complete", "failed"]
    best = max(rows[:2], key=lambda row: float(row["accuracy"]))
    assert f"Best: trial {best['trial']}, accuracy = {float(best['accuracy']):.4f}" in (tmp_path / "stopped" / "results.md").read_text()
    assert load_recipe(tmp_path / "stopped" / "best_recipe.yaml").adapter.r == int(best["adapter.r"])


def test_grid_sampler_needs_choices(tmp_path):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(
        {"sampler": "grid", "params": {"training.learning_rate": {"low": 1e-4, "high": 1e-3}}}))
    with pytest.raises(UserError, match="grid.*training.learning_rate has a range"):
        load_space(tmp_path / "space.yaml")
