"""Turn YAML files plus command-line overrides into one validated `Recipe`.

Precedence, lowest first: fragments named in `extends` (in order), the recipe file itself, then
`key.path=value` overrides. Every failure becomes a `UserError` naming the file or key path.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from peftkit.errors import UserError
from peftkit.recipe.keys import accepted_keys, canonical_keys, canonical_path, field_at, is_text, model_at, task_types
from peftkit.recipe.schema import ADAPTER_OPTION_METHODS, Recipe, aliases_of


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, compose, override and validate a recipe file.

    Overrides: a text field takes the raw text after `=`; other values are YAML; `null` returns a key to its
    default. A layer (later file or override) that sets `adapter.method` drops the earlier layers' options of
    other methods (e.g. `r` for `ia3`).
    """
    path = Path(path)
    merged = read_with_extends(path)
    overridden = []
    for override in overrides:
        key_path, raw_value = split_override(override)
        key_path = canonical_path(key_path, merged)
        field = field_at(key_path, merged)
        # `task.prompt=Translate to German: {en}` is text, not a YAML mapping.
        as_text = field is not None and is_text(field) and raw_value.strip() not in ("null", "~")
        value = raw_value if as_text else parse_value(override, raw_value)
        set_key_path(merged, key_path, value)
        overridden.append(key_path)
    if ["adapter", "method"] in overridden:
        _drop_options_of_other_methods(merged, {path[1] for path in overridden if path[0] == "adapter"})
    merged.setdefault("name", path.stem)
    return validate_recipe(merged)


def load_saved_recipe(path: Path) -> Recipe:
    """The resolved `recipe.yaml` of a run folder; a corrupt or hand-edited one is a `UserError` naming the file."""
    try:
        return validate_recipe(read_yaml_mapping(path, "saved recipe"))
    except UserError as error:
        message = str(error)
        raise UserError(message if str(path) in message else f"{path}: {message}") from None


def _drop_options_of_other_methods(merged: dict[str, Any], kept: set[str]) -> None:
    """A layer that switches adapter.method (a later file or an override) keeps only the earlier layers' adapter
    options that the new method reads, and the `kept` ones it sets itself."""
    adapter = merged.get("adapter")
    if not isinstance(adapter, dict):
        return
    for option, methods in ADAPTER_OPTION_METHODS.items():
        if adapter.get("method") not in methods and option not in kept:
            adapter.pop(option, None)


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


def safe_load_unique(text: str, name: str | None = None) -> Any:
    """Parse YAML text like `yaml.safe_load` (no Python object tags), refusing duplicate keys; error marks name
    `name` (the file) instead of "<unicode string>"."""
    loader = UniqueKeyLoader(text)  # a SafeLoader subclass
    if name:
        loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml_mapping(path: Path, what: str = "recipe file") -> dict[str, Any]:
    """A YAML file holding a mapping (or nothing); every problem is a `UserError` naming the file."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        content = safe_load_unique(path.read_text(encoding="utf-8"), name=str(path))
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise UserError(f"{path} must hold a mapping of keys at the top level, got {type(content).__name__}")
    return content


def read_with_extends(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe file merged over the fragments it `extends` (resolved as the loader does), before overrides and
    validation. `chain`: the files already being read, to report a cycle."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise UserError(f"`extends` forms a cycle: {cycle}")
    content = canonical_keys(read_yaml_mapping(path), str(path))
    extends = content.pop("extends", [])
    if isinstance(extends, str):
        extends = [extends]
    if not isinstance(extends, list) or not all(isinstance(item, str) for item in extends):
        raise UserError(f"{path}: `extends` must be a list of YAML file paths")
    merged: dict[str, Any] = {}
    for fragment in extends:
        fragment_path = _find_fragment(path.parent, fragment)
        merged = _merge_layer(merged, read_with_extends(fragment_path, (*chain, resolved)))
    return _merge_layer(merged, content)


def _merge_layer(merged: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    merged = deep_merge(merged, layer)
    adapter = layer.get("adapter")
    if isinstance(adapter, dict) and "method" in adapter:
        _drop_options_of_other_methods(merged, set(adapter))
    return merged


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
    key_path, raw_value = split_override(text)
    return key_path, parse_value(text, raw_value)


def split_override(text: str) -> tuple[list[str], str]:
    """`key.path=value` -> (key path, the raw text after the first `=`)."""
    key, sep, raw_value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override `{text}` must look like key.path=value (e.g. training.epochs=2)")
    key_path = key.strip().split(".")
    if any(not part for part in key_path):
        raise UserError(f"override `{text}` has an empty part in its key path")
    return key_path, raw_value


def parse_value(text: str, raw_value: str) -> Any:
    try:
        return safe_load_unique(raw_value) if raw_value.strip() else None
    except yaml.YAMLError:
        raise UserError(f"override `{text}`: value `{raw_value}` is not a valid YAML value") from None


def set_key_path(data: dict[str, Any], key_path: list[str], value: Any) -> None:
    """Set a key (Hugging Face / peft names accepted); None removes it, so that the default applies."""
    key_path = canonical_path(key_path, data)
    node = data
    for depth, part in enumerate(key_path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            prefix = ".".join(key_path[: depth + 1])
            raise UserError(f"override {'.'.join(key_path)}: `{prefix}` is a value, not a section")
        node = child
    if value is None:
        node.pop(key_path[-1], None)
    else:
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
        if index and loc[index - 1] == "task" and part in task_types():
            continue
        if isinstance(part, str) and ("[" in part or part.startswith("function-")):
            continue
        parts.append(str(part))
    return ".".join(parts)


def _did_you_mean(loc: tuple, data: dict[str, Any]) -> str:
    model = model_at(loc[:-1], data)
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), accepted_keys(model), n=1)
    alias_of = aliases_of(model).get(close[0]) if close else None
    hint = f"; did you mean `{close[0]}`" + (f" (= `{alias_of}`)" if alias_of else "") + "?" if close else ""
    return f"{hint}; allowed keys: {', '.join(model.model_fields)}"
