"""Downstream tasks as plug-ins. The trainer never branches on task names; it calls a task module's functions.

The contract a task module fulfils is declared in `peftkit.tasks.base` (Protocols `TrainerTask` or
`SelfFittingTask` for training, `DeploymentTask` for merge/inference/serving); every module registered here is
checked against it on import. Adding a task: its module, one line in `TASKS`, its schema in
`peftkit.recipe.schema`'s task union, its tests (docs/architecture.md).
"""

from __future__ import annotations

from types import ModuleType

from peftkit.tasks import causal_lm, classification, extractive_qa, features, preference, summarization, translation
from peftkit.tasks.base import check_task, deploys

TASKS: dict[str, ModuleType] = {
    "classification": classification,
    "features": features,
    "causal_lm": causal_lm,
    "extractive_qa": extractive_qa,
    "translation": translation,
    "summarization": summarization,
    "preference": preference,
}
for _name, _module in TASKS.items():
    check_task(_name, _module)


def get_task(task_type: str) -> ModuleType:
    return TASKS[task_type]


def task_for_peft_type(peft_task_type: str | None) -> str | None:
    """The task that deploys adapters of a peft task type (for adapters trained outside peftkit); None when no
    task can serve it (peftkit's `features` task fits a classifier on frozen features and serves nothing)."""
    return next(
        (name for name, module in TASKS.items() if module.PEFT_TASK_TYPE == peft_task_type and deploys(module)), None
    )


def auto_class_for_peft_type(peft_task_type: str, default: type) -> type:
    """The model class (with its head) that the task deploying `peft_task_type` builds; `default` for other types."""
    name = task_for_peft_type(peft_task_type)
    return TASKS[name].AUTO_CLASS if name else default


def best_metric_name(recipe) -> str:
    """The validation metric that picks the best checkpoint: the recipe's choice, else the task's default."""
    return recipe.training.metric_for_best or get_task(recipe.task.type).DEFAULT_METRIC
