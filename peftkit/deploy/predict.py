"""`peftkit predict` with several adapters: rows from a file, each row through its own adapter, answers to JSONL."""

from __future__ import annotations

from pathlib import Path

from peftkit.data.sources import data_source, load_source
from peftkit.deploy.attach import AttachedModel
from peftkit.errors import UserError
from peftkit.run_folder import write_jsonl


def predict_file(
    attached: AttachedModel, input_path: str, output_path: str, adapter_column: str | None = None,
    batch_size: int = 32, source_options: dict | None = None, **generation,
) -> int:
    """Write one JSON line per input row (the row plus the task's answer and the adapter used); returns the count.

    With `adapter_column`, each row names its adapter and rows for different adapters share mixed batches.
    """
    rows = list(load_source(data_source({"path": input_path, **(source_options or {})}), "--input"))
    if adapter_column is not None and rows and adapter_column not in rows[0]:
        raise UserError(f"--adapter-column: `{input_path}` has no column {adapter_column!r} (columns: {sorted(rows[0])})")
    adapters = [row[adapter_column] if adapter_column else attached.active for row in rows]
    inputs = [{k: v for k, v in row.items() if k != adapter_column} for row in rows]
    attached.resolve(len(inputs), adapters)
    attached.check_rows(inputs)
    records = []
    for start in range(0, len(inputs), batch_size):
        batch, names = inputs[start:start + batch_size], adapters[start:start + batch_size]
        for row, name, answer in zip(batch, names, attached.predict(batch, names, **generation)):
            records.append({**row, "adapter": name, **answer})
    write_jsonl(Path(output_path), records)
    return len(records)
