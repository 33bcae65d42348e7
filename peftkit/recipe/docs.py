"""Generate `docs/recipe.md` from the schema, so the reference cannot drift from the code.

Run `python -m peftkit.recipe.docs` to rewrite it; a test fails when the file is stale.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from peftkit.recipe.schema import Recipe, aliases_of

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "recipe.md"

HEADER = """# Recipe reference

Generated from `peftkit/recipe/schema.py` by `python -m peftkit.recipe.docs`; do not edit by hand.
Every key below can be set in the YAML file, in a fragment named by `extends:`, or on the command
line as `key.path=value`. `peftkit validate RECIPE` prints the fully resolved recipe.

Keys after a `/` are the same option under its Hugging Face / peft / axolotl name (`num_train_epochs`,
`lora_alpha`, `bnb_4bit_quant_type`, ...): either name works, the resolved recipe uses the first.
transformers' `load_in_4bit: true` / `load_in_8bit: true` under `quantization` mean `bits: 4` / `bits: 8`.
Options peftkit does not model go unchanged to the library through `training.trainer_args`
(`TrainingArguments`) and `adapter.peft_args` (the method's peft config), checked against its fields.

On the command line, a text key takes the raw text after `=` (`task.prompt=Translate to German: {en}`),
other values are YAML, and `key=null` returns a key to its default. A later file or override that sets
`adapter.method` drops the earlier layers' options of other methods (`adapter.method=ia3` on a LoRA recipe
needs no `adapter.r=null`).
"""


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(annotation))}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{value!r}`" if value is not None else "`None`"


def _sections(model: type[BaseModel], path: str) -> list[tuple[str, type[BaseModel]]]:
    """Depth-first list of (key path, section class), union members each listed under their tag."""
    found = [(path, model)]
    for name, field in model.model_fields.items():
        for member in _models_in(field.annotation):
            tag = member.model_fields.get("type")
            suffix = f" (type: {tag.default})" if tag is not None and len(_models_in(field.annotation)) > 1 else ""
            found += _sections(member, f"{path}.{name}{suffix}" if path else f"{name}{suffix}")
    return found


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def render() -> str:
    """One table per section class; a class used at several key paths (data.train/validation/test) once."""
    paths_of: dict[type[BaseModel], list[str]] = {}
    for path, model in _sections(Recipe, ""):
        paths_of.setdefault(model, []).append(path)
    lines = [HEADER]
    for model, paths in paths_of.items():
        title = " / ".join(f"`{path}`" for path in paths) if paths != [""] else "top level"
        lines += [f"## {title}", "", "| key | type | default | description |", "|---|---|---|---|"]
        aliases = aliases_of(model)
        for name, field in model.model_fields.items():
            description = (field.description or "").replace("|", "\\|")
            also = "".join(f" / `{alias}`" for alias, key in aliases.items() if key == name)
            lines.append(f"| `{name}`{also} | {_type_name(field.annotation)} | {_default(field)} | {description} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    DOC_PATH.write_text(render(), encoding="utf-8")
    print(f"wrote {DOC_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
