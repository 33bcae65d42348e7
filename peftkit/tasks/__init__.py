"""Downstream tasks as plug-ins. The trainer never branches on task names; it calls a task module's functions.

A task module provides:
- `PEFT_TASK_TYPE`, `DEFAULT_METRIC` (validation metric that picks the best checkpoint)
- `prepare(recipe, splits, tokenizer) -> (tokenized splits, info)`: check columns/labels, tokenize
- `load_model(recipe, info)`: the base model with the task's head
- `head_modules(model) -> list[str]`: modules trained fully and saved with the adapter
- `collator(tokenizer, recipe)`, `compute_metrics(info)` (periodic evaluation inside the Trainer; may return None)
- `predict(predictor, tokenized, raw, recipe, info) -> records`, `score(records, info) -> metrics`;
  `predictor` is what the fit step returned (the HF Trainer unless the task brings its own `fit`)
- `report(records, metrics, split, run_dir, worst) -> markdown`

Optionally `fit(recipe, task, info, tokenized, tokenizer, run_dir, checkpoint, callbacks) -> FitResult`
(`peftkit.training.result`) for tasks that do not train with the HF Trainer (feature extraction); such a task
needs no `load_model`/`head_modules`/`collator`/`compute_metrics`.
"""

from __future__ import annotations

from types import ModuleType

from peftkit.tasks import causal_lm, classification, features

TASKS: dict[str, ModuleType] = {"classification": classification, "features": features, "causal_lm": causal_lm}


def get_task(task_type: str) -> ModuleType:
    return TASKS[task_type]
