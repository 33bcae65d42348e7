"""`peftkit train`: one recipe, read top to bottom: check inputs -> model + adapter -> train -> evaluate -> write.

Everything that can be wrong with the user's input (model path, data files, columns, labels, a launcher that
contradicts the recipe) is checked before the run folder is created, so a bad recipe leaves nothing behind.

Launched on several processes (`torchrun` / `accelerate launch -m peftkit train`), every process runs this same
flow, so that collective calls (training steps, saves that gather ZeRO-3 shards, predict/evaluate) see all
ranks; only the main process writes result files.
"""

from __future__ import annotations

import functools
import logging
import os
import traceback
from pathlib import Path

import torch

from accelerate import PartialState
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

from peftkit.adapters import (
    adapter_callbacks,
    adapter_record,
    attach_adapter,
    check_adapter_fits_model,
    count_parameters,
    save_adapter,
)
from peftkit.console import attach_log_file
from peftkit.data.sources import data_digests, load_splits
from peftkit.training.distributed import (
    adopt_recipe_sharding,
    check_launcher_agrees,
    check_strategy_runs_here,
    launched_world_size,
    write_sharding_configs,
)
from peftkit.evaluation.model_card import adapter_card
from peftkit.evaluation.plots import plot_losses
from peftkit.evaluation.report import write_report
from peftkit.models.build import check_input_lengths
from peftkit.models.load import load_config, load_tokenizer
from peftkit.plan.preflight import warn_if_recipe_will_not_fit
from peftkit.recipe.resolved import resolve_gradient_checkpointing
from peftkit.recipe.schema import PROMPT_METHODS, Recipe
from peftkit.run_folder import (
    ADAPTER_DIR,
    LOG_FILE,
    ADAPTER_RECORD,
    DATA_FILE,
    LOG_HISTORY_FILE,
    LOSS_PLOT,
    MANIFEST_FILE,
    METRICS_FILE,
    MODEL_CARD,
    PLOTS_DIR,
    PREDICTIONS_FILE,
    RECIPE_FILE,
    TRAINER_ARGUMENTS,
    check_data_unchanged,
    check_run_folder,
    checkpoint_step,
    keep_replaced_recipe,
    last_complete_checkpoint,
    replaced_recipe_name,
    manifest,
    run_dir_for,
    recipe_as_yaml,
    run_folder,
    write_json,
    write_jsonl,
    write_task_info,
    write_text_atomic,
)
from peftkit.tasks import best_metric_name, get_task
from peftkit.training.arguments import build_training_args, training_setup
from peftkit.training.checkpoints import (
    CheckSavedWeights,
    check_saved_weights,
    usable_checkpoint,
)
from peftkit.errors import Preempted, UserError, first_line, out_of_space
from peftkit.tasks.base import FitResult, TrainerSetup, fits_itself, trains_with_own_trainer
from peftkit.training.tracking import final_metrics, open_trackers
from peftkit.tasks.lm_loss import check_kernel_available
from peftkit.training.trainer import PreemptionCallback, with_peftkit_training

log = logging.getLogger("peftkit")
SUPERVISED = TrainerSetup(Trainer, TrainingArguments, {})  # tasks trained with transformers' own Trainer


def train(recipe: Recipe, resume: bool = False, force_resume: bool = False, callbacks: list = ()) -> Path:
    """Run a recipe end to end and return the run folder. `callbacks` are extra `TrainerCallback`s (e.g. a
    sweep's pruner)."""
    task = get_task(recipe.task.type)
    resume = resume or recipe.training.resume
    world_size = launched_world_size()
    check_launcher_agrees(recipe, os.environ, world_size)
    check_strategy_runs_here(recipe, world_size)
    check_run_folder(recipe, resume, force_resume, resumable_when_finished=fits_itself(task))
    digests = data_digests(recipe.data)
    changed_data = check_data_unchanged(run_dir_for(recipe), digests, force_resume) if resume else []
    check_kernel_available(recipe.training.lm_loss)
    share_cpu_threads()
    adopt_recipe_sharding()
    best_metric = best_metric_name(recipe)
    # Built before the model is loaded: under ZeRO-3 this makes from_pretrained load partitioned weights.
    setup = task.trainer_setup(recipe) if trains_with_own_trainer(task) else SUPERVISED
    args = build_training_args(recipe, run_dir_for(recipe), best_metric, world_size, setup.arguments_class, **setup.arguments)
    state = PartialState()

    base_config = load_config(recipe.model)
    check_adapter_fits_model(recipe, base_config, task.PEFT_TASK_TYPE)
    warn_if_recipe_will_not_fit(recipe, base_config)
    tokenizer = load_tokenizer(recipe.model)
    raw_splits = load_splits(recipe.data)
    sources = {split: dataset.source_rows for split, dataset in raw_splits.items() if hasattr(dataset, "source_rows")}
    tokenized, info = task.prepare(recipe, raw_splits, tokenizer)

    with run_folder(recipe, resume, state.is_main_process) as run_dir, PreemptionCallback() as preemption:
        if state.is_main_process:
            attach_log_file(run_dir / LOG_FILE)
        state.wait_for_everyone()
        checkpoint = usable_checkpoint(run_dir) if resume else None
        if resume:
            log.info("resuming from %s", checkpoint or "the start (no complete checkpoint yet)")
        if state.is_main_process:
            if force_resume:
                kept = keep_replaced_recipe(run_dir, recipe, checkpoint_step(checkpoint))
                if kept:
                    log.warning("--force-resume with changed settings: the recipe that ran until here is kept as %s", kept)
            if changed_data:
                log.warning("--force-resume with changed data (%s): the run goes on with the new files", ", ".join(changed_data))
            write_text_atomic(run_dir / RECIPE_FILE, recipe_as_yaml(recipe))
            write_json(run_dir / DATA_FILE, digests)
            write_sharding_configs(run_dir, recipe, world_size, args.deepspeed)

        trackers = open_trackers(recipe, run_dir) if state.is_main_process else []
        set_seed(recipe.training.seed)
        # Tasks that need no gradient steps (feature extraction) bring their own fit step.
        fit = task.fit if fits_itself(task) else functools.partial(
            fit_with_trainer, args, preemption, best_metric, with_peftkit_training(setup.trainer_class)
        )
        tracking = [tracker.callback() for tracker in trackers]
        result = fit(recipe, task, info, tokenized, tokenizer, run_dir, checkpoint, [*tracking, *callbacks])
        if state.is_main_process:
            check_saved_weights(run_dir / ADAPTER_DIR)
            write_json(run_dir / ADAPTER_DIR / ADAPTER_RECORD, adapter_record(recipe, base_config, info))
        split_results = {
            split: _evaluate_split(result.predictor, task, recipe, info, tokenized[split], raw_splits[split])
            for split in recipe.evaluation.splits
            if split in tokenized
        }
        if state.is_main_process:
            summary = {
                "parameters": result.parameters,
                "setup": training_setup(recipe),
                "examples": {split: len(dataset) for split, dataset in raw_splits.items()},
                **({"sources": sources} if sources else {}),
                "train": result.train_metrics,
                "best_checkpoint": result.best_checkpoint,
                "best_metric_name": result.best_metric_name,
                "best_metric": result.best_metric,
                "world_size": world_size,
                **result.summary,
            }
            _write_results(run_dir, recipe, task, info, summary, split_results, result.log_history)
            write_text_atomic(run_dir / ADAPTER_DIR / MODEL_CARD, adapter_card(recipe, run_dir))
            results = final_metrics({split: metrics for split, (_, metrics) in split_results.items()})
            pictures = sorted((run_dir / PLOTS_DIR).glob("*.png"))
            for tracker in trackers:
                tracker.log_results(results, pictures, result.train_metrics.get("global_step", 0))
    state.wait_for_everyone()
    return run_dir


def share_cpu_threads() -> None:
    """On CPU, split the cores among the processes launched on this machine: torch's default (every core in
    every process) oversubscribes them, which ran 1.5x slower per step than one thread each (benchmarks/peers.py).
    An explicit OMP_NUM_THREADS wins."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_processes))


def check_checkpointing_support(model, recipe: Recipe) -> None:
    """Gradient checkpointing (asked for, or QLoRA's default) on a model class transformers implements it not for
    (ALBERT, MPNet, ...) fails inside the Trainer with a traceback; say so before training, with the fix."""
    if resolve_gradient_checkpointing(recipe) and not model.supports_gradient_checkpointing:
        why = "is set" if recipe.training.gradient_checkpointing else "is on by default for a quantized base"
        raise UserError(
            f"training.gradient_checkpointing {why}, but transformers has no gradient checkpointing for "
            f"{type(model).__name__} (`{recipe.model.name}`); set training.gradient_checkpointing: false"
        )


def fit_with_trainer(
    args, preemption: PreemptionCallback, best_metric: str, trainer_class: type, recipe: Recipe, task, info: dict,
    tokenized: dict, tokenizer, run_dir: Path, checkpoint, callbacks: list,
) -> FitResult:
    """Gradient training with `trainer_class` (the HF Trainer, or TRL's for preference tuning, with peftkit's behaviour
    mixed in): the task's model + adapter, periodic evaluation, best checkpoint."""
    model = task.load_model(recipe, info)
    check_checkpointing_support(model, recipe)
    bounds = {"data.max_length": recipe.data.max_length}
    if model.config.is_encoder_decoder and hasattr(recipe.task, "max_target_length"):  # generated targets
        bounds["task.max_target_length"] = recipe.task.max_target_length
    virtual = recipe.adapter.num_virtual_tokens if recipe.adapter.method in PROMPT_METHODS else 0
    check_input_lengths(recipe.model, model, tokenized, bounds, virtual)
    model = attach_adapter(model, recipe, task.PEFT_TASK_TYPE, task.head_modules(model))
    parameters = count_parameters(model)
    log.info(
        "trainable parameters: %s of %s (%.2f%%)",
        f"{parameters['trainable']:,}", f"{parameters['total']:,}",
        100 * parameters["trainable"] / parameters["total"],
    )
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized.get("validation"),
        data_collator=task.collator(tokenizer, recipe),
        processing_class=tokenizer,
        compute_metrics=task.compute_metrics(info, tokenized.get("validation")),
        callbacks=[*_callbacks(recipe), preemption, *callbacks, *adapter_callbacks(recipe)],
        on_nonfinite=recipe.training.on_nonfinite,
        abort_grad_norm=recipe.training.abort_grad_norm,
        loraplus_lr_ratio=recipe.adapter.loraplus_lr_ratio,
        # TRL's preference trainers compute their own losses from the logits.
        lm_loss="standard" if trains_with_own_trainer(task) else recipe.training.lm_loss,
    )
    # The Trainer rescales losses of models whose forward takes **kwargs as if they were sums over a global
    # item count (x processes, no division by accumulation steps); a per-batch mean loss must not be rescaled.
    trainer.model_accepts_loss_kwargs = trainer.model_accepts_loss_kwargs and task.LOSS_SUMS_OVER_ITEMS
    if trains_with_own_trainer(task):
        task.adopt_trainer(trainer, recipe)
    try:
        train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except Exception as exc:  # noqa: BLE001 - only a failure of the very first step is translated
        if trainer.state.global_step or checkpoint or isinstance(exc, (UserError, torch.OutOfMemoryError)) \
                or out_of_space(exc, run_dir):
            raise
        raise first_step_failure(recipe, model, exc) from exc
    if preemption.received:
        raise Preempted(
            f"SIGTERM received: saved {last_complete_checkpoint(run_dir)} at step {trainer.state.global_step}; "
            "continue with `peftkit train RECIPE --resume`"
        )
    if trains_with_own_trainer(task):
        task.before_save(trainer)
    save_adapter(trainer, run_dir / ADAPTER_DIR)  # every rank: ZeRO-3/FSDP gather the shards here
    if trainer.is_world_process_zero():
        # The Trainer pickles its arguments next to the weights; a deployable folder holds safetensors only.
        (run_dir / ADAPTER_DIR / TRAINER_ARGUMENTS).unlink(missing_ok=True)
    # The final evaluation scores each split with task.predict / task.score. The periodic metrics may be bound to
    # the validation split (extractive QA decodes spans from its windows): run on the test split's predictions they
    # would index the wrong windows, so the trainer predicts without them from here on.
    trainer.compute_metrics = None
    return FitResult(
        predictor=trainer,
        parameters=parameters,
        train_metrics={**train_output.metrics, "global_step": trainer.state.global_step},
        best_checkpoint=trainer.state.best_model_checkpoint,
        best_metric_name=best_metric,
        best_metric=trainer.state.best_metric,
        log_history=trainer.state.log_history,
        summary={"skipped_steps": trainer.skipped_steps, "fp16_overflow_steps": trainer.overflow_steps},
    )


class FirstStepFailed(UserError):
    """The first training step raised: this architecture x method x quantization does not run (see below)."""


def first_step_failure(recipe: Recipe, model, exc: Exception) -> FirstStepFailed:
    """A first training step that fails before any step was taken means that the model's code, peft or bitsandbytes
    cannot run this architecture x method x quantization (an unseen architecture reading `input_ids` that a prompt
    method replaces, a layer read by its dtype, ...): a refusal naming the combination and the place it failed,
    not a traceback (`-v` prints it). The run folder holds no checkpoint yet, so it is removed."""
    # the innermost frame above torch's own modules: the model's code, peft's or bitsandbytes' layer
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if not _short_path(frame.filename).startswith("torch/")]
    where = f" in {_short_path(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    config = getattr(model, "config", None)
    bits = recipe.quantization.bits
    method = recipe.adapter.method + (f" on {'an' if bits == 8 else 'a'} {bits}-bit base" if bits else "")
    return FirstStepFailed(
        f"adapter.method {method} cannot train `{recipe.model.name}` ({getattr(config, 'model_type', '?')}) for "
        f"task.type {recipe.task.type}: its first training step failed{where}: {type(exc).__name__}: {first_line(exc)}. "
        "Choose another adapter.method (lora runs on most models) or quantization, or another model "
        "(docs/support-matrix.md lists what each architecture supports); -v shows the traceback"
    )


def _short_path(filename: str) -> str:
    """`transformers/models/longformer/modeling_longformer.py` rather than the site-packages path."""
    parts = Path(filename).parts
    for package in ("transformers", "peft", "bitsandbytes", "trl", "torch", "peftkit", "accelerate"):
        if package in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(package):])
    return Path(filename).name


def _callbacks(recipe: Recipe) -> list:
    callbacks = [CheckSavedWeights()]
    if recipe.training.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.training.early_stopping_patience))
    return callbacks


def _evaluate_split(trainer, task, recipe: Recipe, info: dict, tokenized, raw) -> tuple[list[dict], dict]:
    records = task.predict(trainer, tokenized, raw, recipe, info)
    return records, task.score(records, info)


def _write_results(run_dir: Path, recipe: Recipe, task, info: dict, summary: dict, split_results: dict, log_history) -> None:
    write_task_info(run_dir, recipe.task.type, info)
    write_json(run_dir / METRICS_FILE, {**summary, **{split: metrics for split, (_, metrics) in split_results.items()}})
    write_jsonl(
        run_dir / PREDICTIONS_FILE,
        [{"split": split, **record} for split, (records, _) in split_results.items() for record in records],
    )
    write_json(run_dir / LOG_HISTORY_FILE, log_history)
    has_loss_plot = plot_losses(log_history, run_dir / LOSS_PLOT)
    sections = {
        split: task.report(records, metrics, split, run_dir, recipe.evaluation.worst_examples)
        for split, (records, metrics) in split_results.items()
    }
    write_report(run_dir, recipe, summary, sections, has_loss_plot)
    replaced = sorted(path.name for path in run_dir.glob(replaced_recipe_name("*")))
    facts = {"parameters": summary["parameters"], "setup": summary["setup"], **({"replaced_recipes": replaced} if replaced else {})}
    write_json(run_dir / MANIFEST_FILE, manifest(recipe, **facts))
