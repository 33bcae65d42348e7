"""Downstream tasks as plug-ins. The trainer never branches on task names; it calls a task module's functions.

A task module provides:
- `PEFT_TASK_TYPE`, `DEFAULT_METRIC` (validation metric that picks the best checkpoint)
- `LOSS_SUMS_OVER_ITEMS` (optional, default False): True only when the model's loss divides a sum by the Trainer's `num_items_in_batch`
  (token-level LM losses); a per-batch mean (classification, QA) must say False or ranks and accumulation
  steps would rescale it
- `prepare(recipe, splits, tokenizer) -> (tokenized splits, info)`: check columns/labels, tokenize
- `load_model(recipe, info)`: the base model with the task's head
- `head_modules(model) -> list[str]`: modules trained fully and saved with the adapter
- `collator(tokenizer)`, `compute_metrics(info)` (periodic evaluation inside the Trainer)
- `predict(trainer, tokenized, raw, recipe, info) -> records`, `score(records, info) -> metrics`
- `report(records, metrics, split, run_dir, worst) -> markdown`
"""

from __future__ import annotations

from types import ModuleType

from peftkit.tasks import classification

TASKS: dict[str, ModuleType] = {"classification": classification}


def get_task(task_type: str) -> ModuleType:
    return TASKS[task_type]
