"""Translate the recipe's training section into `transformers.TrainingArguments` (pure, no model needed)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainingArguments

from peftkit.recipe.schema import Recipe
from peftkit.run_folder import CHECKPOINTS


def resolve_precision(precision: str) -> str:
    """`auto` means bf16 where the GPU supports it, else fp32 (CPUs gain nothing from fp16/bf16 autocast)."""
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def build_training_args(recipe: Recipe, run_dir: Path, best_metric: str) -> TrainingArguments:
    training = recipe.training
    precision = resolve_precision(training.precision)
    evaluating = training.eval_strategy != "no"
    return TrainingArguments(
        output_dir=str(run_dir / CHECKPOINTS),
        num_train_epochs=training.epochs,
        max_steps=training.max_steps or -1,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.eval_batch_size or 2 * training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.scheduler,
        warmup_steps=training.warmup_ratio,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        optim=training.optimizer,
        seed=training.seed,
        data_seed=training.seed,
        activation_checkpointing=training.gradient_checkpointing,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        eval_strategy=training.eval_strategy,
        eval_steps=training.eval_steps,
        save_strategy=training.save_strategy,
        save_steps=training.save_steps,
        save_total_limit=training.keep_last,
        load_best_model_at_end=evaluating,
        metric_for_best_model=best_metric if evaluating else None,
        greater_is_better=not best_metric.endswith("loss") if evaluating else None,
        logging_strategy="steps",
        logging_steps=training.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss must be visible, not averaged away
        report_to=[],
        remove_unused_columns=False,
        disable_tqdm=False,
    )
