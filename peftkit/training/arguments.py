"""Translate the recipe's training and distributed sections into `transformers.TrainingArguments` (pure, no model).

Build them before loading the model: under ZeRO-3 the arguments register DeepSpeed's config, so that
`from_pretrained` loads the weights already partitioned across ranks (quantized ones included).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainingArguments

from peftkit.errors import UserError
from peftkit.recipe.resolved import resolve_gradient_checkpointing, resolve_precision
from peftkit.recipe.schema import Recipe
from peftkit.run_folder import CHECKPOINTS
from peftkit.training.distributed import build_deepspeed_config, build_fsdp_config, configure_cpu_deepspeed_processes


def training_setup(recipe: Recipe) -> dict:
    """What the run applied beyond the recipe's literal keys (recorded in metrics.json and manifest.json)."""
    return {
        "adapter_method": recipe.adapter.method,
        "quantization_bits": recipe.quantization.bits,
        "kbit_preparation": recipe.quantization.bits is not None and recipe.adapter.method != "none",
        "gradient_checkpointing": resolve_gradient_checkpointing(recipe),
        "precision": resolve_precision(recipe.training.precision),
    }


def build_training_args(
    recipe: Recipe, run_dir: Path, best_metric: str, world_size: int = 1,
    arguments_class: type[TrainingArguments] = TrainingArguments, **extra,
) -> TrainingArguments:
    """`world_size` is the number of launched processes; DeepSpeed's batch sizes are computed from it.
    `arguments_class` / `extra`: a subclass such as TRL's DPOConfig and its own options."""
    training = recipe.training
    deepspeed = build_deepspeed_config(recipe, world_size)
    on_cpu = not torch.cuda.is_available()
    several_cpu_ranks = deepspeed is not None and on_cpu and world_size > 1
    accelerator_config = configure_cpu_deepspeed_processes() if several_cpu_ranks else None
    fsdp_config = build_fsdp_config(recipe, world_size)
    precision = resolve_precision(training.precision)
    evaluating = training.eval_strategy != "no"
    arguments = dict(
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
        activation_checkpointing=resolve_gradient_checkpointing(recipe),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # DeepSpeed picks its own CPU accelerator; forcing use_cpu would skip its process-group setup.
        use_cpu=on_cpu and deepspeed is None,
        accelerator_config=accelerator_config,
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
        deepspeed=deepspeed,
        fsdp=fsdp_config is not None,
        fsdp_config=fsdp_config,
        **extra,
    )
    set_by_peftkit = sorted(set(training.trainer_args) & set(arguments))
    if set_by_peftkit:
        raise UserError(
            f"training.trainer_args: {set_by_peftkit} are set by peftkit (run folder, evaluation and checkpoint "
            "cadence, precision, sharding); remove them from trainer_args"
        )
    try:
        return arguments_class(**arguments, **training.trainer_args)
    except (TypeError, ValueError) as exc:
        raise UserError(f"training.trainer_args: transformers rejects {training.trainer_args}: {exc}") from None
