"""`peftkit sweep`: optuna searches recipe keys; every trial is a normal run folder.

The search space is its own small YAML file whose keys are recipe key paths:

    metric: f1_macro            # validation metric to optimize; unset: the recipe's metric_for_best / task default
    direction: maximize         # unset: minimize metrics ending in loss/perplexity, maximize the rest
    params:
      training.learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}
      adapter.r: {choices: [4, 8, 16]}
      training.epochs: {low: 1, high: 3, step: 1}

Intermediate validation metrics are reported to optuna at every evaluation, and its median pruner stops
trials that fall behind. `sampler: grid` (all parameters given as `choices`) runs every combination once
instead of TPE's proposals. Results, rewritten after every trial: `results.csv`, `results.md`, `results.png`,
`best_recipe.yaml`.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from transformers import TrainerCallback

from peftkit.errors import UserError
from peftkit.recipe.load import load_recipe, read_yaml_mapping, set_key_path, validate_recipe
from peftkit.recipe.schema import Recipe
from peftkit.run_folder import read_metrics, recipe_as_yaml, run_dir_for, write_text_atomic
from peftkit.tasks import best_metric_name

log = logging.getLogger("peftkit")


class Parameter(BaseModel):
    """One searched recipe key: a numeric range (`low`/`high`, optional `log`/`step`) or a list of `choices`."""

    model_config = ConfigDict(extra="forbid")
    low: float | None = Field(None, description="Smallest value (numeric ranges).")
    high: float | None = Field(None, description="Largest value (numeric ranges).")
    log: bool = Field(False, description="Sample on a log scale.")
    step: float | None = Field(None, gt=0, description="Grid step; an integer step with integer bounds samples integers.")
    choices: list[Any] | None = Field(None, description="Values to choose from (any YAML scalars).")

    @model_validator(mode="after")
    def _range_or_choices(self) -> Parameter:
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("give either `choices` or both `low` and `high`")
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ValueError("`low` must be below `high`")
        return self

    def is_integer(self) -> bool:
        return all(float(v).is_integer() for v in (self.low, self.high, self.step or 1))


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: str | None = Field(None, description="Validation metric to optimize.")
    direction: Literal["maximize", "minimize"] | None = Field(None, description="Optimization direction.")
    params: dict[str, Parameter] = Field(min_length=1, description="Recipe key path -> its search range.")
    pruning: bool = Field(True, description="Stop trials whose intermediate metric is worse than the median so far.")
    sampler: Literal["tpe", "grid"] = Field(
        "tpe", description="`tpe`: optuna's TPE proposes values; `grid`: every combination of the `choices` once "
        "(in a seeded random order; --trials caps the count), for small sweeps that must cover each setting.",
    )
    seed: int = Field(0, description="Seed of the sampler.")

    @model_validator(mode="after")
    def _grid_needs_choices(self) -> SearchSpace:
        ranges = [key for key, parameter in self.params.items() if parameter.choices is None]
        if self.sampler == "grid" and ranges:
            raise ValueError(f"sampler `grid` needs `choices` for every parameter; {', '.join(ranges)} has a range")
        return self

    def make_sampler(self):
        import optuna

        if self.sampler == "grid":
            return optuna.samplers.GridSampler({key: p.choices for key, p in self.params.items()}, seed=self.seed)
        return optuna.samplers.TPESampler(seed=self.seed)


def load_space(path: Path) -> SearchSpace:
    try:
        return SearchSpace.model_validate(read_yaml_mapping(path, "--space file"))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UserError(f"--space {path}: {problems}") from None


def suggest(trial, key: str, parameter: Parameter) -> Any:
    if parameter.choices is not None:
        return trial.suggest_categorical(key, parameter.choices)
    if parameter.is_integer():
        return trial.suggest_int(key, int(parameter.low), int(parameter.high), step=int(parameter.step or 1), log=parameter.log)
    return trial.suggest_float(key, parameter.low, parameter.high, step=parameter.step, log=parameter.log)


def trial_recipe(base: Recipe, values: dict[str, Any], run_dir: Path) -> Recipe:
    """The base recipe with the trial's values at their key paths, in its own run folder."""
    data = base.model_dump(mode="json")
    for key, value in values.items():
        set_key_path(data, key.split("."), value)
    set_key_path(data, ["output", "dir"], str(run_dir))
    return validate_recipe(data)


class PruningCallback(TrainerCallback):
    """Report each evaluation's metric to optuna and stop the trial when the pruner says so."""

    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        import optuna

        value = (metrics or {}).get(f"eval_{self.metric}")
        if value is None:
            return
        self.trial.report(float(value), step=state.global_step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.metric}={value:.4f} at step {state.global_step}")


def objective_metric(recipe: Recipe, space: SearchSpace) -> tuple[str, str]:
    metric = space.metric or best_metric_name(recipe)
    direction = space.direction or ("minimize" if metric.endswith(("loss", "perplexity")) else "maximize")
    return metric, direction


def sweep(recipe_path: Path, space_path: Path, trials: int, overrides: list[str] = ()) -> Path:
    """Run `trials` trials; return the sweep folder holding the results table and the best recipe."""
    import optuna

    from peftkit.training.run import train

    base = load_recipe(recipe_path, overrides)
    space = load_space(space_path)
    for key in space.params:
        trial_recipe(base, {key: _example_value(space.params[key])}, Path("probe"))  # bad key paths fail now
    metric, direction = objective_metric(base, space)
    sweep_dir = run_dir_for(base)
    if sweep_dir.exists() and any(sweep_dir.iterdir()) and not base.output.overwrite:
        raise UserError(f"output.dir: sweep folder `{sweep_dir}` already exists; set output.overwrite=true or another output.dir")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction=direction,
        sampler=space.make_sampler(),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0, n_min_trials=1),
    )
    rows: list[dict] = []

    def objective(trial) -> float:
        values = {key: suggest(trial, key, parameter) for key, parameter in space.params.items()}
        run_dir = sweep_dir / f"trial-{trial.number:03d}"
        row = {"trial": trial.number, **values, metric: None, "state": "failed", "run_dir": str(run_dir)}
        rows.append(row)
        log.info("trial %d: %s", trial.number, values)
        recipe = trial_recipe(base, values, run_dir)
        try:
            train(recipe, callbacks=[PruningCallback(trial, metric)] if space.pruning else [])
            value = _final_metric(run_dir, metric)
            row.update({metric: value, "state": "complete"})
            return value
        except optuna.TrialPruned:
            row["state"] = "pruned"
            raise
        finally:  # after every trial, so that a sweep stopped part-way still has the table of its finished trials
            write_results(sweep_dir, rows, metric, direction, base, list(space.params))

    study.optimize(objective, n_trials=trials, catch=(UserError,))
    return sweep_dir


def _example_value(parameter: Parameter) -> Any:
    if parameter.choices is not None:
        return parameter.choices[0]
    return int(parameter.low) if parameter.is_integer() else parameter.low


def _final_metric(run_dir: Path, metric: str) -> float:
    """The trial's validation score from its final evaluation (the best checkpoint's, when one was kept)."""
    metrics = read_metrics(run_dir)
    value = metrics.get("validation", {}).get(metric)
    if value is None and metrics.get("best_metric_name") == metric:
        value = metrics.get("best_metric")
    if value is None:
        raise UserError(
            f"sweep metric {metric!r} is not among the validation metrics {sorted(metrics.get('validation', {}))}; "
            "set `metric` in the space file and give the recipe validation data"
        )
    return float(value)


def write_results(sweep_dir: Path, rows: list[dict], metric: str, direction: str, base: Recipe, keys: list[str]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in columns if c != "run_dir"]
    lines = [f"# Sweep of `{base.name}`: {direction} validation `{metric}`", ""]
    lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(_format(row.get(c)) for c in shown) + " |")
    complete = [row for row in rows if row["state"] == "complete"]
    if complete:
        pick = max if direction == "maximize" else min
        best = pick(complete, key=lambda row: row[metric])  # the first of tied trials, as optuna's best_trial
        lines += ["", f"Best: trial {best['trial']}, {metric} = {best[metric]:.4f}, recipe `best_recipe.yaml`.", "",
                  "![sweep](results.png)"]
        best_recipe = trial_recipe(base, {key: best[key] for key in keys}, run_dir_for(base) / "best")
        write_text_atomic(sweep_dir / "best_recipe.yaml", recipe_as_yaml(best_recipe.model_copy(update={"name": f"{base.name}-best"})))
        _plot(rows, metric, direction, sweep_dir / "results.png")
    write_text_atomic(sweep_dir / "results.md", "\n".join(lines) + "\n")


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _plot(rows: list[dict], metric: str, direction: str, path: Path) -> None:
    from peftkit.evaluation.plots import plt, save_figure

    figure, axes = plt.subplots(figsize=(6, 4))
    done = [(row["trial"], row[metric]) for row in rows if row["state"] == "complete"]
    pruned = [row["trial"] for row in rows if row["state"] == "pruned"]
    axes.plot(*zip(*done), "o", label="complete")
    best, running = [], -math.inf if direction == "maximize" else math.inf
    for _, value in done:
        running = max(running, value) if direction == "maximize" else min(running, value)
        best.append(running)
    axes.plot([t for t, _ in done], best, "-", label="best so far")
    for trial in pruned:
        axes.axvline(trial, color="grey", linestyle=":", alpha=0.6)
    axes.set_xlabel("trial (dotted: pruned)")
    axes.set_ylabel(f"validation {metric}")
    axes.legend()
    axes.grid(alpha=0.3)
    save_figure(figure, path)
