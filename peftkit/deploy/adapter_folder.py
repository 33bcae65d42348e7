"""Find an adapter on disk and what it was trained for: its folder, task, task info and base record.

Accepts a run folder (`<run>/adapter`), a peftkit adapter folder (with `peftkit_adapter.json`), or a plain peft
adapter folder trained elsewhere (task from its peft task type, no base record).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from peft import PeftConfig
from pydantic import ValidationError
from peft.utils import CONFIG_NAME
from transformers import PretrainedConfig

from peftkit.errors import UserError
from peftkit.models.fingerprint import architecture, fingerprint
from peftkit.recipe.schema import GenerationSection, QuantizationSection
from peftkit.tasks import TASKS, task_for_peft_type
from peftkit.run_folder import ADAPTER_DIR, ADAPTER_RECORD, read_task_info, safetensors_problem

log = logging.getLogger("peftkit")


@dataclass(frozen=True)
class AdapterSource:
    name: str
    path: Path  # the folder holding adapter_config.json
    task: str
    info: dict  # task info (e.g. label names) without the type
    base: dict | None  # the base record written at train time, None for adapters trained outside peftkit
    quantization: QuantizationSection = field(default_factory=QuantizationSection)  # of the base it was trained on
    generation: GenerationSection = field(default_factory=GenerationSection)  # how the run's evaluation decoded


def find_adapter(name: str, reference: str) -> AdapterSource:
    """Read an adapter's folder and records; every problem is a UserError naming the adapter and the path."""
    path = Path(reference).expanduser()
    if (path / ADAPTER_DIR / CONFIG_NAME).exists():
        path = path / ADAPTER_DIR
    if not (path / CONFIG_NAME).exists():
        raise UserError(
            f"adapter {name!r}: `{reference}` holds no adapter_config.json; give a peftkit run folder or a peft adapter folder"
        )
    for weights in sorted(path.glob("*.safetensors")):  # peft would fail deep inside safetensors instead
        problem = safetensors_problem(weights)
        if problem:
            raise UserError(f"adapter {name!r}: `{weights}` {problem}; restore the file or train again")
    record_file = path / ADAPTER_RECORD
    if record_file.exists():
        return _from_record(name, reference, path, record_file)
    try:
        peft_task_type = PeftConfig.from_pretrained(str(path)).task_type
    except Exception as exc:  # a broken adapter_config.json is the folder's problem, not the server's
        raise UserError(f"adapter {name!r}: the adapter_config.json of `{reference}` is not a peft config ({type(exc).__name__})") from None
    task_type = task_for_peft_type(peft_task_type)
    if task_type is None:
        raise UserError(
            f"adapter {name!r}: peft task type {peft_task_type!r} of `{reference}` has no deployable peftkit task "
            f"(deployable: {sorted({m.PEFT_TASK_TYPE for m in TASKS.values() if hasattr(m, 'infer')})})"
        )
    return AdapterSource(name, path, task_type, _run_task_info(path), None)


def _from_record(name: str, reference: str, path: Path, record_file: Path) -> AdapterSource:
    """An adapter described by its `peftkit_adapter.json`; a malformed record is a UserError naming the problem."""
    problem = f"adapter {name!r}: `{reference}`'s {ADAPTER_RECORD} is malformed"
    try:
        record = json.loads(record_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{problem}: not readable JSON ({type(exc).__name__})") from None
    task = record.get("task") if isinstance(record, dict) else None
    if not isinstance(task, dict) or task.get("type") not in TASKS:
        raise UserError(f"{problem}: `task.type` must be one of {sorted(TASKS)}")
    base = record.get("base")
    if base is not None and not (isinstance(base, dict) and {"name", "location", "fingerprint", "architecture"} <= set(base)):
        raise UserError(f"{problem}: `base` must hold name, location, fingerprint and architecture")
    sections = {}
    for key, section in (("quantization", QuantizationSection), ("generation", GenerationSection)):
        try:
            sections[key] = section.model_validate(record.get(key) or {})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise UserError(f"{problem}: {key}.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    task = dict(task)
    return AdapterSource(name, path, task.pop("type"), task, base, sections["quantization"], sections["generation"])


def _run_task_info(adapter_dir: Path) -> dict:
    """Task info of an adapter from a run folder made before adapter records existed (its `task.json`)."""
    return read_task_info(adapter_dir.parent) or {}


def check_base(adapter: AdapterSource, base_name: str, base_location: str, base_config: PretrainedConfig) -> None:
    """Refuse a base whose architecture differs from the one the adapter was trained on; warn on another name."""
    if adapter.base is None:
        return
    fields = architecture(base_config)
    if fingerprint(fields) != adapter.base["fingerprint"]:
        trained = adapter.base["architecture"]
        differences = [
            f"{key}: {trained.get(key)} vs {fields.get(key)}" for key in sorted({*trained, *fields})
            if trained.get(key) != fields.get(key)
        ]
        raise UserError(
            f"adapter {adapter.name!r} was trained on `{adapter.base['name']}` but the base is `{base_name}`, "
            f"whose architecture differs ({'; '.join(differences[:6])}); load it onto `{adapter.base['name']}`"
        )
    if not {base_name, base_location} & {adapter.base["name"], adapter.base["location"]}:
        log.warning(
            "adapter %r was trained on `%s`; attaching it to `%s`, which has the same architecture fingerprint",
            adapter.name, adapter.base["name"], base_name,
        )
