"""`peftkit sweep`: optuna trials as run folders, results table and plot, best recipe, pruning."""

from __future__ import annotations

import csv
import json

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
