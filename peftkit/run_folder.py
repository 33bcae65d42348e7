"""The run folder: where it is, how it is created and cleaned up, and the files that describe a run."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import yaml

from peftkit.errors import UserError
from peftkit.recipe.load import read_yaml_mapping
from peftkit.recipe.schema import Recipe

CHECKPOINTS = "checkpoints"
ADAPTER_DIR = "adapter"  # the deployable result: PEFT adapter, full model, or a features classifier
RECIPE_FILE = "recipe.yaml"  # the resolved recipe the run trained with
MANIFEST = "manifest.json"  # written last: its presence means the run finished
LIBRARIES = ("peftkit", "torch", "transformers", "peft", "accelerate", "datasets", "trl", "bitsandbytes", "deepspeed")


def run_dir_for(recipe: Recipe) -> Path:
    return Path(recipe.output.dir or Path("runs") / recipe.name)


def check_run_folder(recipe: Recipe, resume: bool, force_resume: bool = False, resumable_when_finished: bool = False) -> None:
    """Refuse an output folder the run cannot use, before any model or data is loaded.

    A file in place of the folder; an occupied folder without --resume or output.overwrite; with --resume, a folder
    that is not a peftkit run, a finished run with no checkpoint to continue from (training again would overwrite
    its adapter, metrics and report; `resumable_when_finished` for tasks that refit from their own cache), and a
    recipe whose settings changed since the run started (see `check_resume_matches`).
    """
    run_dir = run_dir_for(recipe)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output.dir: `{run_dir}` is a file, not a folder; choose another output.dir")
    if not _holds_files(run_dir):
        return
    if not resume:
        if not recipe.output.overwrite:
            raise UserError(
                f"output.dir: run folder `{run_dir}` already exists; pass --resume to continue it, "
                "set output.overwrite=true to replace it, or choose another output.dir"
            )
        return
    if not (run_dir / RECIPE_FILE).is_file() and not (run_dir / CHECKPOINTS).is_dir():
        raise UserError(
            f"--resume: `{run_dir}` is not a peftkit run folder (no {RECIPE_FILE}, no {CHECKPOINTS}/); "
            "give the output.dir of an interrupted run, or another output.dir to start a new one"
        )
    from peftkit.training.checkpoints import complete_checkpoints

    if (run_dir / MANIFEST).is_file() and not complete_checkpoints(run_dir) and not resumable_when_finished:
        raise UserError(
            f"--resume: `{run_dir}` holds a finished run and no checkpoint to continue from; resuming would train "
            "from scratch over its adapter and results. Start a new run (another output.dir) or set output.overwrite"
        )
    check_resume_matches(run_dir, recipe, force_resume)


@contextlib.contextmanager
def run_folder(recipe: Recipe, resume: bool, is_main_process: bool = True) -> Iterator[Path]:
    """Create (or reuse, when resuming) the run folder; remove it again if the run fails before any checkpoint.

    `check_run_folder` has accepted the folder; every process checks it (the main process never deletes a folder
    another refused), so no process waits for a main process that stopped."""
    run_dir = run_dir_for(recipe)
    created = False
    if is_main_process:
        if not resume and _holds_files(run_dir):
            shutil.rmtree(run_dir)
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield run_dir
    except BaseException:
        if created and is_main_process and not list((run_dir / CHECKPOINTS).glob("checkpoint-*")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _holds_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder and rename, so readers never see half a file."""
    if path.is_dir():
        raise UserError(f"`{path}` is a folder; give a file path to write to")
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:  # a full disk or a kill leaves no temporary file behind
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, content: Any) -> None:
    write_text_atomic(path, json.dumps(content, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: Path, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def recipe_as_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def manifest(recipe: Recipe, **facts: Any) -> dict[str, Any]:
    return {
        "recipe": recipe.name,
        "seed": recipe.training.seed,
        "trust_remote_code": recipe.model.trust_remote_code,
        "command": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_revision": git_revision(),
        "libraries": library_versions(),
        **facts,
    }


# Keys a resumed run may change: they decide what is logged, reported or kept, never the trained weights.
# Any other change (model, task, data, adapter, quantization, training, distributed, generation) is refused
# unless --force-resume, which keeps the recipe that ran before as `recipe.until-step-N.yaml`.
RESUME_MAY_CHANGE = (
    "name", "output.dir", "output.overwrite", "output.tensorboard", "evaluation", "training.resume",
    "training.logging_steps", "training.eval_batch_size",
)


def changed_key_paths(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Key paths whose values differ between two plain recipe dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        paths = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            paths += changed_key_paths(old.get(key), new.get(key), path)
        return paths
    return [] if old == new else [prefix]


def resume_changes(run_dir: Path, recipe: Recipe) -> list[str]:
    """Key paths the recipe changed since the run in `run_dir` started, other than those in `RESUME_MAY_CHANGE`."""
    saved_file = run_dir / RECIPE_FILE
    if not saved_file.is_file():
        return []
    saved = read_yaml_mapping(saved_file, "saved recipe")
    changed = changed_key_paths(saved, recipe.model_dump(mode="json"))
    return [path for path in changed if not any(path == key or path.startswith(key + ".") for key in RESUME_MAY_CHANGE)]


def check_resume_matches(run_dir: Path, recipe: Recipe, force: bool) -> None:
    """Refuse to resume a run whose recipe changed since it started (the run record would describe settings that
    never ran) unless forced."""
    changed = resume_changes(run_dir, recipe)
    if changed and not force:
        raise UserError(
            f"cannot resume `{run_dir}`: the recipe changed since the run started ({', '.join(changed)}); "
            "restore those keys, start a new run (another output.dir), or pass --force-resume (the recipe that "
            "ran until the checkpoint is then kept as recipe.until-step-N.yaml)"
        )


def keep_replaced_recipe(run_dir: Path, recipe: Recipe, step: int) -> Path | None:
    """Forced resume with changed settings: keep the recipe that ran until `step` next to the new recipe.yaml."""
    changed = resume_changes(run_dir, recipe)
    if not changed:
        return None
    kept = run_dir / f"recipe.until-step-{step}.yaml"
    os.replace(run_dir / RECIPE_FILE, kept)
    return kept
