"""Layers import downward only, and no module imports itself back through others (docs/architecture.md).

Parses the imports of every module of the package with `ast` (function-level and TYPE_CHECKING imports
included), so an upward import or a cycle fails here before review."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import peftkit

PACKAGE = Path(peftkit.__file__).parent
ARCHITECTURE_DOC = PACKAGE.parent / "docs" / "architecture.md"

# Bottom to top. A unit (a subpackage, or a top-level module) may import itself and any unit of a LOWER layer;
# units of the same layer do not import each other.
LAYERS = [
    ["errors", "console"],
    ["references", "recipe"],
    ["run_folder"],
    ["models", "data", "evaluation"],
    ["adapters", "tasks"],
    ["plan"],
    ["training", "deploy"],
    ["saved_run", "sweep"],
    ["cli"],
    ["__main__"],
]
LAYER_OF = {unit: index for index, layer in enumerate(LAYERS) for unit in layer}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def _imports() -> dict[str, set[str]]:
    """Module -> the peftkit modules it imports (a `from package import name` counts name when it is a module)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.startswith("peftkit")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("peftkit"):
                submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(modules)
                targets |= submodules or {node.module}
        graph[module] = targets - {module}
    return graph


def test_every_unit_has_a_layer():
    units = {_unit(module) for module in _imports()} - {"peftkit"}
    assert units == set(LAYER_OF), f"add {sorted(units - set(LAYER_OF))} to LAYERS (and docs/architecture.md)"


def test_layers_import_downward_only():
    upward = []
    for module, targets in _imports().items():
        if module == "peftkit":
            continue
        for target in targets:
            source_unit, target_unit = _unit(module), _unit(target)
            if target == "peftkit" or source_unit == target_unit:
                continue
            if LAYER_OF[target_unit] >= LAYER_OF[source_unit]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that do not go to a lower layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _imports()
    cycles, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_documented_layers_are_the_enforced_ones():
    section = ARCHITECTURE_DOC.read_text(encoding="utf-8").split("## Layers", 1)[1].split("\n## ", 1)[0]
    documented = [re.findall(r"`([a-z_]+)(?:/|\.py)?`", line.split(":", 1)[0])
                  for line in section.splitlines() if re.match(r"\d+\. ", line)]
    assert documented == LAYERS
