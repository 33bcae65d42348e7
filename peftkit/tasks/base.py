"""The task plug-in contract, declared: what a task module provides, as `typing.Protocol` classes.

A task is a plain module (no base class, no implementation inheritance): `peftkit.tasks` checks each registered
module against these Protocols when it is imported, and names the missing member. Shared code between tasks
lives in small common modules (`labelled_text`, `seq2seq`), never in a sibling task. docs/architecture.md shows how to
add a task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Generic, NamedTuple, Protocol, runtime_checkable


@dataclass
class FitResult:
    """What a fit step hands to evaluation: the object predictions come from, and facts for the report."""

    predictor: Any  # what the task's `predict` receives: the HF Trainer, or a task's own fitted object
    parameters: dict[str, int]
    train_metrics: dict[str, Any]
    best_checkpoint: str | None = None
    best_metric_name: str | None = None
    best_metric: float | None = None
    log_history: list[dict] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # further facts for metrics.json


@runtime_checkable
class TrainingTask(Protocol):
    """Every task: turn data into model inputs, and predictions into records, metrics and a report."""

    PEFT_TASK_TYPE: str  # peft's task type for the adapter (also maps adapters trained elsewhere to a task)
    DEFAULT_METRIC: str  # validation metric that picks the best checkpoint ("loss" when no metric is computed)

    def prepare(self, recipe, splits: dict, tokenizer, info: dict | None = None) -> tuple[dict, dict]:
        """Check columns/labels and tokenize; returns (tokenized splits, task info saved as task.json).

        Row i of an evaluation split's tokenized data (or its example, for tasks that window long inputs) is row i of
        the raw split. With `info` (a saved run's, for `peftkit eval/predict`) nothing is derived from training data
        and splits may lack the gold columns. Rows it may skip (`data.skip_bad_rows`) it drops from `splits[name]`
        too, so raw and tokenized rows stay aligned."""

    def predict(self, predictor, tokenized, raw, recipe, info: dict) -> list[dict]:
        """JSON-able records, one per raw row; generating tasks decode with `recipe.generation`."""

    def score(self, records: list[dict], info: dict) -> dict[str, Any]: ...

    def report(self, records: list[dict], metrics: dict, split: str, run_dir: Path, worst: int) -> str:
        """Markdown: metrics plus error analysis (`peftkit.evaluation.analysis`)."""


@runtime_checkable
class TrainerTask(TrainingTask, Protocol):
    """A task trained with the HF Trainer (every task but feature extraction)."""

    # True only when the model's loss divides a sum by the Trainer's `num_items_in_batch`; a per-batch mean must
    # say False, or process count and accumulation steps would rescale it.
    LOSS_SUMS_OVER_ITEMS: bool

    def load_model(self, recipe, info: dict): """The base model with the task's head."""

    def head_modules(self, model) -> list[str]: """Modules trained fully and saved with the adapter."""

    def collator(self, tokenizer, recipe) -> Callable: ...

    def compute_metrics(self, info: dict, validation) -> Callable | None:
        """Metrics of periodic evaluation inside the Trainer over `validation` (the tokenized validation split, or
        None); None reports the loss only."""


class TrainerSetup(NamedTuple):
    """The `transformers.Trainer` subclass a task trains with, its arguments class and the extra arguments it takes.
    `training.run` mixes peftkit's checkpoints, guards and SIGTERM save into the class."""

    trainer_class: type
    arguments_class: type
    arguments: dict


@runtime_checkable
class OwnTrainerTask(TrainerTask, Protocol):
    """A task trained with another Trainer subclass than transformers' own (TRL's preference trainers)."""

    def trainer_setup(self, recipe) -> TrainerSetup: ...

    def adopt_trainer(self, trainer, recipe) -> None: """Adjust the built trainer before training starts."""

    def before_save(self, trainer) -> None: """Adjust the model before its adapter is saved."""

    # Its own Trainer decides its forward passes, so `peftkit plan` asks the task what one step runs:
    def sequences_per_row(self, recipe) -> int:
        """Sequences one batch row puts through the trained model at once (a chosen + rejected pair: 2)."""

    def reference_passes(self, recipe) -> int:
        """No-grad forwards of a reference model per step, run while the policy's activations are held."""


@runtime_checkable
class SelfFittingTask(TrainingTask, Protocol):
    """A task that needs no gradient steps and brings its own fit step (feature extraction)."""

    def fit(self, recipe, task, info: dict, tokenized: dict, tokenizer, run_dir: Path, checkpoint, callbacks: list) -> FitResult:
        """Fit and save into the run folder's adapter folder."""

    def load_predictor(self, recipe, info: dict, run_dir: Path, tokenizer):
        """The fitted predictor back from a run folder (`peftkit eval/predict`)."""


@runtime_checkable
class DeploymentTask(Protocol):
    """A task whose adapters `peftkit merge`, multi-adapter inference and `peftkit serve` deploy.

    Optional: `info_from_config(config) -> info`, the task info of an adapter trained outside peftkit (no record),
    from the model config (classification: label names from `id2label`).
    """

    AUTO_CLASS: type  # transformers auto class of the base with the task's head (train, plan, merge, serve)
    INPUT_FIELDS: dict[str, bool]  # {field: required} of one inference row
    WINDOWS_LONG_INPUTS: bool  # inputs longer than the model's context are split into windows, not refused
    # `infer` generates text through `peftkit.tasks.generation` (the decode path evaluation uses too) and takes
    # `max_new_tokens` (one per row), `decoding` and `streamer`
    GENERATES: bool
    COMPLETES_PROMPTS: bool  # `infer` takes {"prompt": text} rows: served on /v1/completions and /v1/chat/completions

    def model_kwargs(self, info: dict) -> dict: """Keyword arguments of `AUTO_CLASS.from_pretrained` (labels, ...)."""

    def inference_rows(self, recipe, dataset) -> list[dict]: """A data split as inference rows (merge verification)."""

    def forward_logits(self, model, tokenizer, rows: list[dict], adapter_names: list[str] | None = None,
                       infos: list[dict] | None = None) -> list:
        """Raw outputs, one tensor per row, to compare models (argmax over the last dimension is a prediction)."""

    def infer(self, model, tokenizer, rows: list[dict], infos: list[dict], adapter_names: list[str] | None = None,
              **generation) -> list[dict]:
        """One answer dict per row; `infos[i]` is row i's adapter's task info, `adapter_names[i]` its peft name."""


def protocol_members(protocol: type) -> list[str]:
    """The names a Protocol declares (its own and its bases'), in declaration order."""
    names: list[str] = []
    for klass in reversed(protocol.__mro__):
        if klass in (object, Protocol, Generic) or not getattr(klass, "_is_protocol", False):
            continue
        for name in [*klass.__dict__.get("__annotations__", {}), *klass.__dict__]:
            if not name.startswith("_") and name not in names:
                names.append(name)
    return names


def missing_members(module: ModuleType, protocol: type) -> list[str]:
    return [name for name in protocol_members(protocol) if not hasattr(module, name)]


def fits_itself(task: ModuleType) -> bool:
    """Whether the task brings its own fit step instead of training with the HF Trainer."""
    return isinstance(task, SelfFittingTask)


def trains_with_own_trainer(task: ModuleType) -> bool:
    return isinstance(task, OwnTrainerTask)


def deploys(task: ModuleType) -> bool:
    return isinstance(task, DeploymentTask)


def check_task(name: str, module: ModuleType) -> None:
    """Refuse a task module that does not fulfil the contract, naming each missing member.

    Training is required (through the HF Trainer, or a task's own fit); deployment is optional as a whole, but a
    module that declares part of it must declare all of it.
    """
    problems = [f"{member} ({TrainingTask.__name__})" for member in missing_members(module, TrainingTask)]
    training = SelfFittingTask if hasattr(module, "fit") else OwnTrainerTask if hasattr(module, "trainer_setup") else TrainerTask
    problems += [f"{member} ({training.__name__})" for member in missing_members(module, training)]
    deployment = missing_members(module, DeploymentTask)
    if len(deployment) < len(protocol_members(DeploymentTask)):
        problems += [f"{member} ({DeploymentTask.__name__})" for member in deployment]
    if problems:
        raise TypeError(
            f"task {name!r} (module {module.__name__}) does not fulfil the task contract of peftkit/tasks/base.py; "
            f"missing: {', '.join(problems)}"
        )
