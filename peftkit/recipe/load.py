"""Turn YAML files plus command-line overrides into one validated `Recipe`.

Precedence, lowest first: fragments named in `extends` (in order), the recipe file itself, then
`key.path=value` overrides. Every failure becomes a `UserError` naming the file or key path.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from peftkit.errors import UserError
from peftkit.recipe.schema import Recipe


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, compose, override and validate a recipe file."""
    path = Path(path)
    merged = _read_with_extends(path, chain=())
    for override in overrides:
        key_path, value = parse_override(override)
        set_key_path(merged, key_path, value)
    merged.setdefault("name", path.stem)
    return validate_recipe(merged)


def load_saved_recipe(path: Path) -> Recipe:
    """The resolved `recipe.yaml` of a run folder; a corrupt or hand-edited one is a `UserError` naming the file."""
    try:
        return validate_recipe(read_yaml_mapping(path, "saved recipe"))
    except UserError as error:
        message = str(error)
        raise UserError(message if str(path) in message else f"{path}: {message}") from None


def validate_recipe(data: dict[str, Any]) -> Recipe:
    """Validate a plain dict, turning pydantic's errors into one readable `UserError`."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, data)) from None


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load` that refuses a key given twice in one mapping: YAML would keep the last value silently,
    so a section written twice (or a key repeated inside one) would drop settings the user wrote."""


def _construct_unique_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: construct_mapping below reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"found the key `{key}` twice; keep one", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def safe_load_unique(text: str) -> Any:
    """Parse YAML text like `yaml.safe_load` (no Python object tags), refusing duplicate keys."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_mapping(path: Path, what: str = "recipe file") -> dict[str, Any]:
    """A YAML file holding a mapping (or nothing); every problem is a `UserError` naming the file."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        content = safe_load_unique(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise UserError(f"{path} must hold a mapping of keys at the top level, got {type(content).__name__}")
    return content


def _read_with_extends(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise UserError(f"`extends` forms a cycle: {cycle}")
    content = read_yaml_mapping(path)
    extends = content.pop("extends", [])
    if isinstance(extends, str):
        extends = [extends]
    if not isinstance(extends, list) or not all(isinstance(item, str) for item in extends):
        raise UserError(f"{path}: `extends` must be a list of YAML file paths")
    merged: dict[str, Any] = {}
    for fragment in extends:
        fragment_path = _find_fragment(path.parent, fragment)
        merged = deep_merge(merged, _read_with_extends(fragment_path, (*chain, resolved)))
    return deep_merge(merged, content)


def _find_fragment(base_dir: Path, name: str) -> Path:
    """Fragments resolve relative to the including file, then to its `fragments/` folder."""
    for candidate in (base_dir / name, base_dir / "fragments" / name):
        if candidate.is_file():
            return candidate
    raise UserError(f"fragment `{name}` in `extends` not found next to {base_dir} or in {base_dir / 'fragments'}")


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; any other value in `update` replaces the one in `base`."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.learning_rate=1e-4` -> (["training", "learning_rate"], 1e-4); values are YAML scalars/lists."""
    key, sep, raw_value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override `{text}` must look like key.path=value (e.g. training.epochs=2)")
    key_path = key.strip().split(".")
    if any(not part for part in key_path):
        raise UserError(f"override `{text}` has an empty part in its key path")
    try:
        value = safe_load_unique(raw_value) if raw_value.strip() else None
    except yaml.YAMLError:
        raise UserError(f"override `{text}`: value `{raw_value}` is not a valid YAML value") from None
    return key_path, value


def set_key_path(data: dict[str, Any], key_path: list[str], value: Any) -> None:
    node = data
    for depth, part in enumerate(key_path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            prefix = ".".join(key_path[: depth + 1])
            raise UserError(f"override {'.'.join(key_path)}: `{prefix}` is a value, not a section")
        node = child
    node[key_path[-1]] = value


def format_validation_error(exc: ValidationError, data: dict[str, Any]) -> str:
    lines = ["the recipe is invalid:"]
    for error in exc.errors():
        location = _readable_location(error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key" + _did_you_mean(error["loc"], data)
        elif error["type"] == "missing":
            message = "required key is missing"
        elif error["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        lines.append(f"  {location or '<recipe>'}: {message}")
    return "\n".join(lines)


def _readable_location(loc: tuple) -> str:
    """Drop what pydantic inserts for unions (`task.classification.x` -> `task.x`, `list[str]`)."""
    parts = []
    for index, part in enumerate(loc):
        if index and loc[index - 1] == "task" and part in _task_types():
            continue
        if isinstance(part, str) and ("[" in part or part.startswith("function-")):
            continue
        parts.append(str(part))
    return ".".join(parts)


def _task_types() -> set[str]:
    task_union = Recipe.model_fields["task"].annotation
    return {member.model_fields["type"].default for member in getattr(task_union, "__args__", (task_union,))}


def _did_you_mean(loc: tuple, data: dict[str, Any]) -> str:
    model = _model_at(loc[:-1], data)
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return f"{hint}; allowed keys: {', '.join(model.model_fields)}"


def _model_at(loc: tuple, data: dict[str, Any]) -> type[BaseModel] | None:
    """The schema class that validates the mapping at `loc` (for listing its allowed keys)."""
    model: type[BaseModel] = Recipe
    node: Any = data
    for part in loc:
        if isinstance(part, str) and part in _task_types():
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        node = node.get(part) if isinstance(node, dict) else None
        model = _section_class(field.annotation, node)
        if model is None:
            return None
    return model


def _section_class(annotation: Any, node: Any) -> type[BaseModel] | None:
    candidates = [annotation, *getattr(annotation, "__args__", ())]
    for inner in list(candidates):
        candidates.extend(getattr(inner, "__args__", ()))
    models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
    if len(models) > 1 and isinstance(node, dict):
        tagged = [m for m in models if m.model_fields.get("type") and m.model_fields["type"].default == node.get("type")]
        models = tagged or models
    return models[0] if models else None
