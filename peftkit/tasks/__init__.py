"""Downstream tasks as plug-ins. The trainer never branches on task names; it calls a task module's functions.

A task module provides, for training:
- `PEFT_TASK_TYPE`, `DEFAULT_METRIC` (validation metric that picks the best checkpoint)
- `prepare(recipe, splits, tokenizer) -> (tokenized splits, info)`: check columns/labels, tokenize
- `load_model(recipe, info)`: the base model with the task's head
- `head_modules(model) -> list[str]`: modules trained fully and saved with the adapter
- `collator(tokenizer)`, `compute_metrics(info)` (periodic evaluation inside the Trainer)
- `predict(trainer, tokenized, raw, recipe, info) -> records`, `score(records, info) -> metrics`
- `report(records, metrics, split, run_dir, worst) -> markdown`

and, for deployment (`peftkit.deploy`: merge, multi-adapter inference, the HTTP server):
- `AUTO_CLASS`, `model_kwargs(info)`: how to load the base with the task's head (`load_model` uses both)
- `INPUT_FIELDS`: `{field: required}` of one inference input row, e.g. `{"text": True, "text_pair": False}`
- `inference_rows(recipe, dataset) -> rows`: a data split as inference rows (merge verification)
- `forward_logits(model, tokenizer, rows, adapter_names) -> [tensor per row]`: raw outputs to compare models
- `infer(model, tokenizer, rows, infos, adapter_names, **generation) -> [answer dict per row]`; `infos[i]` is the
  task info of row i's adapter and `adapter_names[i]` its peft adapter name (peft mixed-adapter batches)

`causal_lm` has only the deployment half (decoder models trained by other tasks deploy through it).
"""

from __future__ import annotations

from types import ModuleType

from peftkit.tasks import causal_lm, classification

TASKS: dict[str, ModuleType] = {"classification": classification, "causal_lm": causal_lm}


def get_task(task_type: str) -> ModuleType:
    return TASKS[task_type]


def task_for_peft_type(peft_task_type: str | None) -> str | None:
    """The task that deploys adapters of a peft task type (for adapters trained outside peftkit)."""
    return next((name for name, module in TASKS.items() if module.PEFT_TASK_TYPE == peft_task_type), None)
