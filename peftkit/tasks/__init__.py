"""Downstream tasks as plug-ins. The trainer never branches on task names; it calls a task module's functions.

A task module provides, for training:
- `PEFT_TASK_TYPE`, `DEFAULT_METRIC` (validation metric that picks the best checkpoint)
- `LOSS_SUMS_OVER_ITEMS` (optional, default False): True only when the model's loss divides a sum by the Trainer's `num_items_in_batch`
  (token-level LM losses); a per-batch mean (classification, QA) must say False or ranks and accumulation
  steps would rescale it
- `prepare(recipe, splits, tokenizer, info=None) -> (tokenized splits, info)`: check columns/labels, tokenize.
  Row i of an evaluation split's tokenized data (or its example, for tasks that window long inputs) is row i
  of the raw split. With `info` (a saved run's task.json, for `peftkit eval/predict`) nothing is derived from
  training data and splits may lack the gold columns (then `predict` leaves gold and scores out). Rows it
  may skip (`data.skip_bad_rows`) it drops from `splits[name]` too, so raw and tokenized rows stay aligned.
- `load_model(recipe, info)`: the base model with the task's head
- `head_modules(model) -> list[str]`: modules trained fully and saved with the adapter
- `collator(tokenizer, recipe)`, `compute_metrics(info)` (periodic evaluation inside the Trainer)
- `compute_metrics` may return None: periodic evaluation then reports the loss only (DEFAULT_METRIC "loss")
- `predict(predictor, tokenized, raw, recipe, info) -> records` (JSON-able dicts; generating tasks decode with
  `recipe.generation` through `predictor.model`), `score(records, info) -> metrics`; `predictor` is what the
  fit step returned (the HF Trainer unless the task brings its own `fit`)
- `report(records, metrics, split, run_dir, worst) -> markdown`: metrics plus error analysis
  (`peftkit.evaluation.analysis`: score by input length, lowest-scoring examples)

Optionally `fit(recipe, task, info, tokenized, tokenizer, run_dir, checkpoint, callbacks) -> FitResult`
(`peftkit.training.result`) for tasks that do not train with the HF Trainer (feature extraction); such a task
needs no `load_model`/`head_modules`/`collator`/`compute_metrics`, and brings
`load_predictor(recipe, info, run_dir, tokenizer)`: the fitted predictor back from a run folder (`peftkit eval/predict`).

and, for deployment (`peftkit.deploy`: merge, multi-adapter inference, the HTTP server):
- `AUTO_CLASS`, `model_kwargs(info)`: how to load the base with the task's head (`load_model` uses both)
- `INPUT_FIELDS`: `{field: required}` of one inference input row, e.g. `{"text": True, "text_pair": False}`
- `WINDOWS_LONG_INPUTS` (optional, default False): True when inputs longer than the model's context are split into
  windows (extractive QA), so deployment does not refuse them
- `GENERATES` (optional, default False): True when `infer` generates text and takes `max_new_tokens` (one per row)
- `inference_rows(recipe, dataset) -> rows`: a data split as inference rows (merge verification)
- `forward_logits(model, tokenizer, rows, adapter_names, infos) -> [tensor per row]`: raw outputs to compare models
  (argmax over the last dimension is a prediction)
- `infer(model, tokenizer, rows, infos, adapter_names, **generation) -> [answer dict per row]`; `infos[i]` is the
  task info of row i's adapter and `adapter_names[i]` its peft adapter name (peft mixed-adapter batches)
"""

from __future__ import annotations

from types import ModuleType

from peftkit.tasks import causal_lm, classification, extractive_qa, features, summarization, translation

TASKS: dict[str, ModuleType] = {
    "classification": classification,
    "features": features,
    "causal_lm": causal_lm,
    "extractive_qa": extractive_qa,
    "translation": translation,
    "summarization": summarization,
}


def get_task(task_type: str) -> ModuleType:
    return TASKS[task_type]


def task_for_peft_type(peft_task_type: str | None) -> str | None:
    """The task that deploys adapters of a peft task type (for adapters trained outside peftkit); None when no
    task can serve it (peftkit's `features` task fits a classifier on frozen features and serves nothing)."""
    return next(
        (name for name, module in TASKS.items() if module.PEFT_TASK_TYPE == peft_task_type and hasattr(module, "infer")),
        None,
    )


def best_metric_name(recipe) -> str:
    """The validation metric that picks the best checkpoint: the recipe's choice, else the task's default."""
    return recipe.training.metric_for_best or get_task(recipe.task.type).DEFAULT_METRIC
