"""The task plug-in contract (`peftkit/tasks/base.py`): one test parametrised over every registered task, plus the
registration check itself. No model is built: these are checks of declarations and signatures."""

from __future__ import annotations

import ast
import inspect
import types
import typing

import pytest
import transformers
from peft import TaskType

from peftkit.recipe.schema import Recipe
from peftkit.tasks import TASKS, auto_class_for_peft_type, task_for_peft_type
from peftkit.tasks.base import (
    DeploymentTask,
    OwnTrainerTask,
    SelfFittingTask,
    TrainerTask,
    TrainingTask,
    check_task,
    deploys,
    fits_itself,
    protocol_members,
    trains_with_own_trainer,
)


def _positional_parameters(function) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(function).parameters.values() if p.kind in kinds and p.name != "self"]


def _check_against(module, protocol) -> None:
    hints = typing.get_type_hints(protocol, localns=vars(typing))
    for name in protocol_members(protocol):
        value = getattr(module, name)
        declared = getattr(protocol, name, None)
        if callable(declared):
            assert callable(value), f"{module.__name__}.{name} must be a function"
            # Callers pass the contract's arguments positionally (names are the module's own: `trainer` for
            # `predictor`); the module's function must accept exactly that many without more required ones.
            try:
                inspect.signature(value).bind(*_positional_parameters(declared))
            except TypeError as error:
                pytest.fail(f"{module.__name__}.{name}{inspect.signature(value)} cannot be called as the contract's "
                            f"{name}{inspect.signature(declared)}: {error}")
        else:
            expected = typing.get_origin(hints[name]) or hints[name]
            assert isinstance(value, expected), f"{module.__name__}.{name} = {value!r} is not a {hints[name]}"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_fulfils_the_contract(name):
    module = TASKS[name]
    assert isinstance(module, TrainingTask)
    assert fits_itself(module) or isinstance(module, TrainerTask), name
    _check_against(module, SelfFittingTask if fits_itself(module) else OwnTrainerTask if trains_with_own_trainer(module)
                   else TrainerTask)
    assert module.PEFT_TASK_TYPE in {t.value for t in TaskType}
    if deploys(module):
        _check_against(module, DeploymentTask)
        assert module.AUTO_CLASS.__module__.startswith("transformers.models.auto"), module.AUTO_CLASS
        assert module.INPUT_FIELDS and any(module.INPUT_FIELDS.values()), "an inference row needs a required field"
        assert not module.COMPLETES_PROMPTS or (module.GENERATES and set(module.INPUT_FIELDS) == {"prompt"})
        # adapters trained elsewhere with this peft task type deploy through this task (or an equivalent one)
        assert TASKS[task_for_peft_type(module.PEFT_TASK_TYPE)].AUTO_CLASS is module.AUTO_CLASS
        assert auto_class_for_peft_type(module.PEFT_TASK_TYPE, default=object) is module.AUTO_CLASS
    else:
        assert task_for_peft_type(module.PEFT_TASK_TYPE) is None, "a peft type must not map to a task that cannot deploy"
    # A task module shares code through common modules, never by importing a sibling task.
    siblings = {other.__name__ for other in TASKS.values()} - {module.__name__}
    tree = ast.parse(inspect.getsource(module))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert not imported & siblings, f"{name} imports sibling task(s) {sorted(imported & siblings)}"


def test_registry_matches_the_recipe_schema():
    """Every task type the schema accepts has a module, and every module is reachable from a recipe."""
    task_union = Recipe.model_fields["task"].annotation
    members = typing.get_args(typing.get_args(task_union)[0]) or typing.get_args(task_union)
    schema_types = {member.model_fields["type"].default for member in members}
    assert schema_types == set(TASKS)


def _module_without(name: str, source, *missing: str):
    module = types.ModuleType(f"fake_{name}")
    vars(module).update({k: v for k, v in vars(source).items() if k not in missing})
    return module


def test_registration_names_the_missing_member():
    with pytest.raises(TypeError, match=r"'broken'.*missing: score \(TrainingTask\)"):
        check_task("broken", _module_without("broken", TASKS["classification"], "score"))
    with pytest.raises(TypeError, match=r"LOSS_SUMS_OVER_ITEMS \(TrainerTask\)"):
        check_task("broken", _module_without("broken", TASKS["extractive_qa"], "LOSS_SUMS_OVER_ITEMS"))
    with pytest.raises(TypeError, match=r"load_predictor \(SelfFittingTask\)"):
        check_task("broken", _module_without("broken", TASKS["features"], "load_predictor"))
    # Deployment is optional as a whole, but half of it is an error.
    check_task("no_deploy", _module_without("no_deploy", TASKS["classification"], *protocol_members(DeploymentTask)))
    with pytest.raises(TypeError, match=r"infer \(DeploymentTask\)"):
        check_task("broken", _module_without("broken", TASKS["classification"], "infer"))


def test_auto_classes_are_transformers_classes():
    assert auto_class_for_peft_type("SEQ_CLS", default=object) is transformers.AutoModelForSequenceClassification
    assert auto_class_for_peft_type("TOKEN_CLS", default=transformers.AutoModel) is transformers.AutoModel
