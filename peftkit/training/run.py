"""`peftkit train`: one recipe, read top to bottom: check inputs -> model + adapter -> train -> evaluate -> write.

Everything that can be wrong with the user's input (model path, data files, columns, labels) is checked
before the run folder is created, so a bad recipe leaves nothing behind.
"""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate import PartialState
from transformers import EarlyStoppingCallback, set_seed
from transformers.integrations import TensorBoardCallback

from peftkit.adapters import ADAPTER_RECORD, adapter_record, attach_adapter, count_parameters
from peftkit.data.sources import load_splits
from peftkit.evaluation.plots import plot_losses
from peftkit.evaluation.report import write_report
from peftkit.models.load import load_config, load_tokenizer
from peftkit.plan.preflight import warn_if_recipe_will_not_fit
from peftkit.recipe.schema import Recipe
from peftkit.run_folder import (
    check_resume_matches,
    manifest,
    recipe_as_yaml,
    run_folder,
    write_json,
    write_jsonl,
    write_text_atomic,
)
from peftkit.tasks import get_task
from peftkit.training.arguments import build_training_args
from peftkit.training.checkpoints import last_complete_checkpoint
from peftkit.errors import Preempted
from peftkit.training.trainer import GradientGuardCallback, PeftkitTrainer, PreemptionCallback

log = logging.getLogger("peftkit")

ADAPTER_DIR = "adapter"


def train(recipe: Recipe, resume: bool = False, force_resume: bool = False) -> Path:
    """Run a recipe end to end and return the run folder."""
    state = PartialState()
    task = get_task(recipe.task.type)
    resume = resume or recipe.training.resume

    base_config = load_config(recipe.model)
    warn_if_recipe_will_not_fit(recipe)
    tokenizer = load_tokenizer(recipe.model)
    raw_splits = load_splits(recipe.data)
    tokenized, info = task.prepare(recipe, raw_splits, tokenizer)

    with run_folder(recipe, resume, state.is_main_process) as run_dir, PreemptionCallback() as preemption:
        checkpoint = last_complete_checkpoint(run_dir) if resume else None
        if resume:
            check_resume_matches(run_dir, recipe, force_resume)
            log.info("resuming from %s", checkpoint or "the start (no complete checkpoint yet)")
        if state.is_main_process:
            write_text_atomic(run_dir / "recipe.yaml", recipe_as_yaml(recipe))

        set_seed(recipe.training.seed)
        model = task.load_model(recipe, info)
        model = attach_adapter(model, recipe, task.PEFT_TASK_TYPE, task.head_modules(model))
        parameters = count_parameters(model)
        log.info(
            "trainable parameters: %s of %s (%.2f%%)",
            f"{parameters['trainable']:,}", f"{parameters['total']:,}",
            100 * parameters["trainable"] / parameters["total"],
        )

        best_metric = recipe.training.metric_for_best or task.DEFAULT_METRIC
        trainer = PeftkitTrainer(
            model=model,
            args=build_training_args(recipe, run_dir, best_metric),
            train_dataset=tokenized["train"],
            eval_dataset=tokenized.get("validation"),
            data_collator=task.collator(tokenizer),
            processing_class=tokenizer,
            compute_metrics=task.compute_metrics(info),
            callbacks=[*_callbacks(recipe, run_dir), preemption],
            on_nonfinite=recipe.training.on_nonfinite,
            abort_grad_norm=recipe.training.abort_grad_norm,
        )
        trainer.add_callback(GradientGuardCallback(trainer))
        train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if preemption.received:
            raise Preempted(
                f"SIGTERM received: saved {last_complete_checkpoint(run_dir)} at step {trainer.state.global_step}; "
                "continue with `peftkit train RECIPE --resume`"
            )

        trainer.save_model(str(run_dir / ADAPTER_DIR))
        if state.is_main_process:
            # The Trainer pickles its arguments next to the weights; a deployable folder holds safetensors only.
            (run_dir / ADAPTER_DIR / "training_args.bin").unlink(missing_ok=True)
            write_json(run_dir / ADAPTER_DIR / ADAPTER_RECORD, adapter_record(recipe, base_config, info))
        split_results = {
            split: _evaluate_split(trainer, task, recipe, info, tokenized[split], raw_splits[split])
            for split in recipe.evaluation.splits
            if split in tokenized
        }
        if state.is_main_process:
            summary = {
                "parameters": parameters,
                "examples": {split: len(dataset) for split, dataset in raw_splits.items()},
                "train": {**train_output.metrics, "global_step": trainer.state.global_step},
                "best_checkpoint": trainer.state.best_model_checkpoint,
                "best_metric_name": best_metric,
                "best_metric": trainer.state.best_metric,
                "skipped_steps": trainer.skipped_steps,
            }
            _write_results(run_dir, recipe, task, info, summary, split_results, trainer.state.log_history)
    state.wait_for_everyone()
    return run_dir


def _callbacks(recipe: Recipe, run_dir: Path) -> list:
    callbacks = []
    if recipe.output.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(run_dir / "tensorboard"))))
    if recipe.training.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.training.early_stopping_patience))
    return callbacks


def _evaluate_split(trainer, task, recipe: Recipe, info: dict, tokenized, raw) -> tuple[list[dict], dict]:
    records = task.predict(trainer, tokenized, raw, recipe, info)
    return records, task.score(records, info)


def _write_results(run_dir: Path, recipe: Recipe, task, info: dict, summary: dict, split_results: dict, log_history) -> None:
    write_json(run_dir / "task.json", {"type": recipe.task.type, **info})
    write_json(run_dir / "metrics.json", {**summary, **{split: metrics for split, (_, metrics) in split_results.items()}})
    write_jsonl(
        run_dir / "predictions.jsonl",
        [{"split": split, **record} for split, (records, _) in split_results.items() for record in records],
    )
    write_json(run_dir / "log_history.json", log_history)
    has_loss_plot = plot_losses(log_history, run_dir / "plots" / "loss.png")
    sections = {
        split: task.report(records, metrics, split, run_dir, recipe.evaluation.worst_examples)
        for split, (records, metrics) in split_results.items()
    }
    write_report(run_dir, recipe, summary, sections, has_loss_plot)
    write_json(run_dir / "manifest.json", manifest(recipe, parameters=summary["parameters"]))
