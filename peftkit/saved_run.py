"""`peftkit eval` and `peftkit predict`: reload a finished run (its recipe, task info, tokenizer, base model and
adapter) and score it on any data, or write its predictions for unlabelled inputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from peftkit.console import attach_log_file
from peftkit.data.sources import data_source, load_source, load_split, load_splits
from peftkit.errors import UserError
from peftkit.models.load import load_tokenizer
from peftkit.recipe.schema import Recipe
from peftkit.run_folder import (
    ADAPTER_DIR,
    EVALUATIONS_DIR,
    LOG_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    RECIPE_FILE,
    REPORT_FILE,
    TASK_FILE,
    read_recipe,
    read_task_info,
    write_json,
    write_jsonl,
    write_text_atomic,
)
from peftkit.tasks import get_task
from peftkit.tasks.base import fits_itself
from peftkit.training.arguments import build_training_args
from peftkit.training.checkpoints import UnusableWeightsError, check_saved_weights
from peftkit.training.trainer import PeftkitTrainer

log = logging.getLogger("peftkit")


@dataclass
class SavedRun:
    run_dir: Path
    recipe: Recipe
    task: ModuleType
    info: dict
    tokenizer: object
    predictor: object  # what the task's `predict` takes: a prediction-only Trainer, or the task's own predictor

    def predict(self, split: str, dataset) -> list[dict]:
        splits = {split: dataset}  # prepare may drop bad rows from it (data.skip_bad_rows)
        tokenized, _ = self.task.prepare(self.recipe, splits, self.tokenizer, self.info)
        return self.task.predict(self.predictor, tokenized[split], splits[split], self.recipe, self.info)


def load_run(run_dir: str | Path) -> SavedRun:
    run_dir = Path(run_dir)
    for name in (RECIPE_FILE, TASK_FILE, ADAPTER_DIR):
        if not (run_dir / name).exists():
            raise UserError(f"`{run_dir}` is not a finished run folder: it has no {name} (train it with `peftkit train`)")
    attach_log_file(run_dir / LOG_FILE)
    recipe = read_recipe(run_dir)
    try:
        check_saved_weights(run_dir / ADAPTER_DIR)
    except UnusableWeightsError as error:  # peft would look for the weights on the hub instead
        raise UserError(f"`{run_dir}` has no usable trained weights: {error}") from None
    info = read_task_info(run_dir)
    task = get_task(recipe.task.type)
    tokenizer = load_tokenizer(recipe.model.model_copy(update={"name": str(run_dir / ADAPTER_DIR), "revision": None}))
    # Tasks with their own fit step (feature extraction) reload their own predictor.
    load_predictor = task.load_predictor if fits_itself(task) else _prediction_trainer
    return SavedRun(run_dir, recipe, task, info, tokenizer, load_predictor(recipe, info, run_dir, tokenizer))


def _prediction_trainer(recipe: Recipe, info: dict, run_dir: Path, tokenizer) -> PeftkitTrainer:
    """A prediction-only Trainer around the base model with the run's adapter (or its fully fine-tuned weights)."""
    task = get_task(recipe.task.type)
    saved = run_dir / ADAPTER_DIR
    if recipe.adapter.method == "none":  # the folder holds the whole fine-tuned model
        model = task.load_model(recipe.model_copy(update={"model": recipe.model.model_copy(update={"name": str(saved)})}), info)
    else:
        from peft import PeftModel

        # peft's AdaLoRA adds its orthogonal regularization to every loss, which needs the adapter loaded trainable.
        model = PeftModel.from_pretrained(task.load_model(recipe, info), str(saved),
                                          is_trainable=recipe.adapter.method == "adalora")
    # The recipe's batch size, precision and device, without its evaluation and checkpoint cadence.
    predicting = recipe.training.model_copy(update={"eval_strategy": "no", "save_strategy": "no"})
    return PeftkitTrainer(
        model=model,
        args=build_training_args(recipe.model_copy(update={"training": predicting}), run_dir, task.DEFAULT_METRIC),
        data_collator=task.collator(tokenizer, recipe),
        processing_class=tokenizer,
    )


def _with_test_source(recipe: Recipe, path: str, split: str | None, options: dict | None = None) -> Recipe:
    """The recipe with `path` as its test data, so that messages and loaders treat it like any split.

    A file the run itself read keeps that split's options (rename, format, languages, encoding, ...); `options`
    (the data-source keys given on the command line) go on top.
    """
    own = next((s for s in (recipe.data.train, recipe.data.validation, recipe.data.test) if s and s.path == path), None)
    fields = {**(own.model_dump(exclude={"rows", "limit"}) if own else {}), "path": path, **(options or {})}
    if split is not None:
        fields["split"] = split
    source = data_source(fields)
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"test": source})})


def evaluate_run(
    run_dir: str | Path, data: str | None = None, split: str | None = None, options: dict | None = None
) -> tuple[Path, dict]:
    """Score a saved run on its own split (default: test, else validation) or on `data`; returns (folder, metrics).

    `options` are data-source keys for `data` (format, rename, languages, rows, limit, encoding, ...).
    Results go to `<run>/evaluations/<name>/` (metrics, predictions and report, named as in a run folder).
    """
    run = load_run(run_dir)
    if options and data is None:
        raise UserError(f"data options {sorted(options)} apply to --data; pass --data PATH too")
    if data is not None:
        run.recipe = _with_test_source(run.recipe, data, split, options)
        key, name = "test", Path(data).stem + (f"-{split}" if split else "")
        dataset = load_source(run.recipe.data.test, "data.test")
    else:
        key = split or next((s for s in ("test", "validation") if _has_split(run.recipe, s)), None)
        if key is None or not _has_split(run.recipe, key):
            raise UserError(f"--split: the run's recipe has no `{key}` data; pass --data PATH or another --split")
        name = key
        own = getattr(run.recipe.data, key)
        dataset = load_split(own, f"data.{key}") if own else load_splits(run.recipe.data)[key]
    gold = _gold_column(run.recipe)
    if gold is not None and gold not in dataset.column_names:
        raise UserError(
            f"{data or f'data.{key}'}: has no column `{gold}` with the gold answers to score against (columns: "
            f"{', '.join(dataset.column_names)}); add it, or use `peftkit predict` for unlabelled rows"
        )
    records = run.predict(key, dataset)
    metrics = run.task.score(records, run.info)
    out = run.run_dir / EVALUATIONS_DIR / name
    write_json(out / METRICS_FILE, metrics)
    write_jsonl(out / PREDICTIONS_FILE, records)
    section = run.task.report(records, metrics, name, out, run.recipe.evaluation.worst_examples)
    header = f"# Evaluation of `{run.run_dir}` on {data or f'its {key} split'}\n\n- task: {run.recipe.task.type}\n"
    write_text_atomic(out / REPORT_FILE, f"{header}\n{section}\n")
    return out, metrics


def _gold_column(recipe: Recipe) -> str | None:
    """The column a task scores against (causal LM templates name theirs and score only rows that have them)."""
    task = recipe.task
    return next((getattr(task, key) for key in ("label_column", "answers_column", "target_column") if hasattr(task, key)), None)


def _has_split(recipe: Recipe, split: str) -> bool:
    if split == "validation" and recipe.data.validation_fraction:
        return True
    return getattr(recipe.data, split, None) is not None


def predict_file(run_dir: str | Path, input_path: str, output_path: str | Path, options: dict | None = None) -> int:
    """Write one JSON line of prediction per input row (gold and scores too when the input has them)."""
    run = load_run(run_dir)
    run.recipe = _with_test_source(run.recipe, input_path, None, options)
    dataset = load_source(run.recipe.data.test, "data.test")
    records = run.predict("test", dataset)
    write_jsonl(Path(output_path), records)
    return len(records)
