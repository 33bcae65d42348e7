"""Key paths of the recipe schema: which section class validates a mapping, and the Hugging Face / peft names
(`num_train_epochs`, `lora_alpha`, `bnb_4bit_quant_type`, ...) accepted for its keys.

Aliases are declared on the schema fields (`validation_alias`); this module only reads them, so that files,
fragments and `key.path=value` overrides written with either name land on one key before they are merged.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel

from peftkit.errors import UserError
from peftkit.recipe.schema import Recipe, aliases_of


def accepted_keys(model: type[BaseModel]) -> list[str]:
    """Field names, then their aliases: every key a mapping validated by `model` may hold."""
    return [*model.model_fields, *aliases_of(model)]


def canonical_keys(
    data: dict[str, Any], where: str, model: type[BaseModel] = Recipe, prefix: str = ""
) -> dict[str, Any]:
    """`data` (a parsed recipe file) with every alias renamed to its key, section by section; a mapping that holds
    both names of one key is an error (`where` names the file)."""
    renamed: dict[str, Any] = {}
    aliases = aliases_of(model)
    for key, value in data.items():
        name = aliases.get(key, key)
        if name in renamed:
            raise UserError(f"{where}: {prefix}{key} and {prefix}{name} are one option under two names; keep one")
        field = model.model_fields.get(name)
        section = section_class(field.annotation, value) if field is not None else None
        if section is not None and isinstance(value, dict):
            value = canonical_keys(value, where, section, f"{prefix}{name}.")
        renamed[name] = value
    return renamed


def canonical_path(key_path: list[str], data: dict[str, Any]) -> list[str]:
    """An override's key path with aliases replaced by the keys they stand for (unknown parts are left as they are:
    validation names them)."""
    resolved: list[str] = []
    model: type[BaseModel] | None = Recipe
    node: Any = data
    for part in key_path:
        name = aliases_of(model).get(part, part) if model is not None else part
        resolved.append(name)
        field = model.model_fields.get(name) if model is not None else None
        node = node.get(name) if isinstance(node, dict) else None
        model = section_class(field.annotation, node) if field is not None else None
    return resolved


def field_at(key_path: list[str], data: dict[str, Any]):
    """The schema field a (canonical) key path sets, or None when the path names no field."""
    model = model_at(tuple(key_path[:-1]), data)
    return model.model_fields.get(key_path[-1]) if model is not None else None


def is_text(field) -> bool:
    """Fields whose value is free text (a str, optionally null): an override takes their raw text as written."""
    annotation = field.annotation
    if annotation is str:
        return True
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return union and set(typing.get_args(annotation)) == {str, type(None)}


def task_types() -> set[str]:
    task_union = Recipe.model_fields["task"].annotation
    return {member.model_fields["type"].default for member in getattr(task_union, "__args__", (task_union,))}


def model_at(loc: tuple, data: dict[str, Any]) -> type[BaseModel] | None:
    """The schema class that validates the mapping at `loc` (for listing its allowed keys)."""
    model: type[BaseModel] = Recipe
    node: Any = data
    for part in loc:
        if isinstance(part, str) and part in task_types():
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        node = node.get(part) if isinstance(node, dict) else None
        model = section_class(field.annotation, node)
        if model is None:
            return None
    return model


def section_class(annotation: Any, node: Any) -> type[BaseModel] | None:
    candidates = [annotation, *getattr(annotation, "__args__", ())]
    for inner in list(candidates):
        candidates.extend(getattr(inner, "__args__", ()))
    models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
    if len(models) > 1 and isinstance(node, dict):
        tagged = [m for m in models if m.model_fields.get("type") and m.model_fields["type"].default == node.get("type")]
        models = tagged or models
    return models[0] if models else None
