"""The run folder: where it is, how it is created and cleaned up, and the files that describe a run.

This module owns every file name of the run folder (docs/run-folder.md describes each); other modules use the
names and readers here instead of spelling a file name.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import yaml

from peftkit.errors import UserError
from peftkit.recipe.load import load_saved_recipe, read_yaml_mapping
from peftkit.recipe.schema import Recipe

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last: a checkpoint folder holding it is complete
ADAPTER_DIR = "adapter"  # the deployable result: PEFT adapter, full model, or a features classifier
ADAPTER_RECORD = "peftkit_adapter.json"  # in ADAPTER_DIR: task info, base fingerprint and quantization
CLASSIFIER_WEIGHTS = "classifier.safetensors"  # in ADAPTER_DIR of a features run
CLASSIFIER_RECORD = "classifier.json"  # in ADAPTER_DIR of a features run: pooling and labels
TRAINER_ARGUMENTS = "training_args.bin"  # the pickle the HF Trainer saves next to weights (deleted from ADAPTER_DIR)
RECIPE_FILE = "recipe.yaml"  # the validated recipe, defaults filled in
TASK_FILE = "task.json"  # the task type and what `prepare` derived from the training data (labels, ...)
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
LOG_HISTORY_FILE = "log_history.json"
MANIFEST_FILE = "manifest.json"
DATA_FILE = "data.json"  # SHA-256 of each local data file the run reads, written when it starts; checked on resume
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"  # pictures the report links to (relative paths)
LOSS_PLOT = f"{PLOTS_DIR}/loss.png"
TENSORBOARD_DIR = "tensorboard"
DEEPSPEED_FILE = "deepspeed.json"
FSDP_FILE = "fsdp.json"
FEATURES_DIR = "features"  # cached embeddings of a features run
EVALUATIONS_DIR = "evaluations"  # `peftkit eval` results, one folder per evaluated data
MODEL_CARD = "README.md"  # in ADAPTER_DIR (and a merged model's folder): the Hugging Face model card
MLFLOW_DIR = "mlruns"  # MLflow file store when $MLFLOW_TRACKING_URI is unset (training.report_to: mlflow)
LOG_FILE = "peftkit.log"  # what the libraries underneath logged (the console shows peftkit's own messages)
LIBRARIES = ("peftkit", "torch", "transformers", "peft", "accelerate", "datasets", "trl", "bitsandbytes", "deepspeed")


def run_dir_for(recipe: Recipe) -> Path:
    return Path(recipe.output.dir or Path("runs") / recipe.name)


def checkpoint_step(checkpoint: Path | None) -> int:
    """The global step a `checkpoint-N` folder was saved at (0 for none: the start)."""
    return int(checkpoint.name.rsplit("-", 1)[-1]) if checkpoint else 0


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest step first."""
    folder = run_dir / CHECKPOINTS
    found = [
        path for path in folder.glob("checkpoint-*")
        if path.name.rsplit("-", 1)[-1].isdigit() and (path / TRAINER_STATE).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = complete_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


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
        if not any((run_dir / marker).exists() for marker in (RECIPE_FILE, CHECKPOINTS, MANIFEST_FILE, LOG_FILE)):
            raise UserError(
                f"output.dir: `{run_dir}` holds files but is not a peftkit run folder (no {RECIPE_FILE}); "
                "output.overwrite replaces only run folders, it would delete everything in this one. Choose another output.dir"
            )
        check_replaceable(run_dir, "output.dir", recipe_inputs(recipe))
        return
    if not (run_dir / RECIPE_FILE).is_file() and not (run_dir / CHECKPOINTS).is_dir():
        raise UserError(
            f"--resume: `{run_dir}` is not a peftkit run folder (no {RECIPE_FILE}, no {CHECKPOINTS}/); "
            "give the output.dir of an interrupted run, or another output.dir to start a new one"
        )
    if (run_dir / MANIFEST_FILE).is_file() and not complete_checkpoints(run_dir) and not resumable_when_finished:
        raise UserError(
            f"--resume: `{run_dir}` holds a finished run and no checkpoint to continue from; resuming would train "
            "from scratch over its adapter and results. Start a new run (another output.dir) or set output.overwrite"
        )
    check_resume_matches(run_dir, recipe, force_resume)


def recipe_inputs(recipe: Recipe) -> dict[str, str]:
    """What a run reads from the file system, by recipe key: the base model and every data source."""
    return {"model.name": recipe.model.name,
            **{f"{key}.path": source.path for key, source in recipe.data.sources_by_key().items()}}


def check_replaceable(folder: Path, key: str, reads: dict[str, str]) -> None:
    """Refuse to delete `folder` (to replace it) when a path the command reads is the folder, lies inside it, or holds
    it: the run being merged, a data file, the base model. Replacing it would delete the user's files, and the
    command's own input with them.

    A path counts when it exists, or when files start with it (line-aligned language files `<path>.<lang>`), so that
    hub ids and `package:` names are never taken for folders."""
    target = folder.resolve()
    for what, location in reads.items():
        path = Path(location).expanduser()
        if not (path.exists() or path.parent.is_dir() and any(path.parent.glob(f"{glob.escape(path.name)}.*"))):
            continue
        path = path.resolve()
        if path == target or target in path.parents:
            relation = "is" if path == target else "holds"
        elif path in target.parents:
            relation = "lies inside"
        else:
            continue
        raise UserError(
            f"{key}: `{folder}` {relation} {what} `{location}`, which this command reads; replacing the folder would "
            f"delete it. Choose another {key}"
        )


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


def read_recipe(run_dir: Path) -> Recipe:
    """The run's saved recipe, validated against today's schema."""
    path = run_dir / RECIPE_FILE
    if not path.exists():
        raise UserError(f"RUN_DIR: `{run_dir}` has no {RECIPE_FILE}; give a run folder written by `peftkit train`")
    return load_saved_recipe(path)


def write_task_info(run_dir: Path, task_type: str, info: dict) -> None:
    write_json(run_dir / TASK_FILE, {"type": task_type, **info})


def read_task_info(run_dir: Path) -> dict | None:
    """What `prepare` derived from the training data, without the task type; None when the file is absent."""
    path = run_dir / TASK_FILE
    if not path.exists():
        return None
    info = json.loads(path.read_text(encoding="utf-8"))
    info.pop("type", None)
    return info


def read_metrics(run_dir: Path) -> dict:
    """The run's metrics.json, or {} when the run wrote none."""
    path = run_dir / METRICS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


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
    "training.logging_steps", "training.eval_batch_size", "training.report_to",
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


def check_data_unchanged(run_dir: Path, digests: dict[str, str], force: bool) -> list[str]:
    """The data files whose content changed since the run in `run_dir` started (refused unless forced; a run from
    before this record has none)."""
    saved_file = run_dir / DATA_FILE
    if not saved_file.is_file():
        return []
    saved = json.loads(saved_file.read_text(encoding="utf-8"))
    changed = sorted(key for key in set(saved) | set(digests) if saved.get(key) != digests.get(key))
    if changed and not force:
        raise UserError(
            f"cannot resume `{run_dir}`: the data changed since the run started ({', '.join(changed)}: other file "
            "content); the resumed run would skip the batches it had read of the old data and train on the rest of "
            "the new. Restore the files, start a new run (another output.dir), or pass --force-resume"
        )
    return changed


def replaced_recipe_name(step: int | str) -> str:
    """The recipe a forced resume replaced, named by the step it ran until (`*`: a glob of them)."""
    return f"recipe.until-step-{step}.yaml"


def keep_replaced_recipe(run_dir: Path, recipe: Recipe, step: int) -> Path | None:
    """Forced resume with changed settings: keep the recipe that ran until `step` next to the new recipe.yaml."""
    changed = resume_changes(run_dir, recipe)
    if not changed:
        return None
    kept = run_dir / replaced_recipe_name(step)
    os.replace(run_dir / RECIPE_FILE, kept)
    return kept


def safetensors_problem(file: Path) -> str | None:
    """Why a safetensors file cannot be read whole (cut short by a full disk, a killed save or an interrupted
    copy; a corrupt header), or None. Cheap: the file must be as long as its header says."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return "is truncated (no header)"
        header_length = struct.unpack("<Q", prefix)[0]
        if header_length > size - 8:
            return "is truncated (header cut off)"
        try:
            header = json.loads(handle.read(header_length))
        except ValueError:
            return "has a corrupt header"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if size != 8 + header_length + end:
        return f"is {size} bytes but its header describes {8 + header_length + end} (truncated?)"
    return None
