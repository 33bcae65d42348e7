"""Load each data source of a recipe (local files or hub datasets) into a `datasets.Dataset`."""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import tempfile
import random
from pathlib import Path

import datasets
from pydantic import ValidationError

from peftkit.data.parallel import language_file, read_parallel
from peftkit.data.squad import read_nested_squad
from peftkit.errors import UserError, first_line
from peftkit.recipe.schema import SPLITS, DataSection, DataSource
from peftkit.references import looks_like_local_path, resolve_reference

ROW_COLUMN, FILE_COLUMN = "__peftkit_file_row__", "__peftkit_file__"  # only in `load_split(..., numbered=True)`
# Far beyond any model's context (about 500k tokens), yet a tokenizer reads all of it before truncating: a
# 50 MB cell took 6.4 GB of memory and almost 5 minutes in SmolLM2's fast tokenizer here.
MAX_CELL_CHARS = 2_000_000
_EXTENSION_FORMATS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
PAIRS_COLUMN = "translation"  # WMT / OPUS on the hub: one `{language: sentence}` mapping per row


def load_splits(data: DataSection) -> dict[str, datasets.Dataset]:
    """Every split the recipe defines, with `validation_fraction` carved off train when asked."""
    splits = {name: load_split(getattr(data, name), f"data.{name}") for name in SPLITS if getattr(data, name)}
    if data.carves_validation:
        splits["train"], splits["validation"] = _carve_validation(splits["train"], data)
    return splits


def _carve_validation(train: datasets.Dataset, data: DataSection) -> tuple[datasets.Dataset, datasets.Dataset]:
    try:
        parts = train.train_test_split(test_size=data.validation_fraction, seed=first_source(data.train).seed)
    except ValueError:  # one side would be empty
        raise UserError(
            f"data.validation_fraction: {data.validation_fraction} of the {len(train)} training rows leaves no row for "
            "training or for validation; give more rows, another fraction, or a data.validation file"
        ) from None
    return parts["train"], parts["test"]


def data_source(fields: dict) -> DataSource:
    """A data source given outside a recipe (`eval --data`, `predict --input` and their `--rename`, `--format`, ...
    flags), validated like a recipe's, with each problem named by its flag."""
    try:
        return DataSource.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'-'.join(str(part).replace('_', '-') for part in error['loc']) or 'data'}: "
            f"{error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors()
        )
        raise UserError(f"data options for `{fields.get('path')}`: {problems}") from None


def first_source(spec: DataSource | list[DataSource]) -> DataSource:
    return spec[0] if isinstance(spec, list) else spec


def load_split(spec: DataSource | list[DataSource], key_path: str, numbered: bool = False) -> datasets.Dataset:
    """One source, or several mixed: each weighted (repeated / sampled with its seed), concatenated, shuffled with
    the first source's seed. A mixed split carries `source_rows` (path, weight, rows) for the run's metrics."""
    if isinstance(spec, DataSource):
        return load_source(spec, key_path, numbered)
    parts = [_weighted(load_source(source, f"{key_path}[{i}]", numbered), source, f"{key_path}[{i}]")
             for i, source in enumerate(spec)]
    columns = parts[0].column_names
    for i, part in enumerate(parts[1:], start=1):
        if sorted(part.column_names) != sorted(columns):
            raise UserError(
                f"{key_path}[{i}]: `{spec[i].path}` has columns {part.column_names} but `{spec[0].path}` has {columns}; "
                f"the sources of one split need the same columns (rename them with {key_path}[{i}].rename)"
            )
    try:
        mixed = datasets.concatenate_datasets([part.select_columns(columns).cast(parts[0].features) for part in parts])
    except (ValueError, TypeError) as exc:
        raise UserError(f"{key_path}: the sources' columns hold different types ({first_line(exc)}); "
                        "write each column as one type in every file") from None
    mixed = mixed.shuffle(seed=spec[0].seed)
    mixed.source_rows = [{"path": source.path, "weight": source.weight or 1.0, "rows": len(part)}
                         for source, part in zip(spec, parts)]
    return mixed


def _weighted(dataset: datasets.Dataset, source: DataSource, key_path: str) -> datasets.Dataset:
    if source.weight is None or source.weight == 1:
        return dataset
    whole, fraction = int(source.weight), source.weight - int(source.weight)
    sampled = random.Random(source.seed).sample(range(len(dataset)), round(fraction * len(dataset)))
    indices = [*range(len(dataset))] * whole + sorted(sampled)
    if not indices:
        raise UserError(f"{key_path}.weight: {source.weight} x {len(dataset)} rows of `{source.path}` selects no row; "
                        "raise the weight or remove the source")
    return dataset.select(indices)


def load_source(source: DataSource, key_path: str, numbered: bool = False) -> datasets.Dataset:
    location = resolve_reference(source.path, f"{key_path}.path")
    data_format = "parallel" if source.languages else _detect_format(source, location, key_path)
    # Ignored on a file, which would be read whole as if it were that split. A split named like the section itself is
    # the hub default (a local recipe extending a hub one inherits `split: train` on data.train) and changes nothing.
    section = key_path.removeprefix("data.").split("[")[0]  # `data.train[1]` -> train; `--input` stays
    unused = {key: value for key, value in (("split", source.split), ("subset", source.subset))
              if value is not None and not (key == "split" and value == section)}
    if data_format != "hub" and unused:
        raise UserError(
            f"{key_path}.{next(iter(unused))}: `{next(iter(unused.values()))}` names part of a hub dataset, but "
            f"`{location}` is a local file, which has none; leave it out (take part of a file with rows or limit)"
        )
    datasets.disable_progress_bars()
    try:
        if data_format == "hub":
            dataset = datasets.load_dataset(location, source.subset, split=source.split or key_path.split(".")[-1])
        elif data_format == "parallel":
            dataset = datasets.Dataset.from_dict(read_parallel(location, source.languages, key_path, source.encoding))
        elif data_format == "label_text":
            dataset = datasets.Dataset.from_dict(read_label_text(location, source.encoding))
        else:
            dataset = _load_file(location, data_format, source.encoding)
        if data_format not in ("hub", "parallel"):
            _refuse_huge_cells(dataset, location)
    except UserError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable files and unknown hub names
        what = "hub dataset" if data_format == "hub" else f"{data_format} file"
        detail = _locate_file_problem(location, data_format, source.encoding) or first_line(exc)
        raise UserError(f"{key_path}.path: could not read {what} `{location}`: {detail}") from None
    finally:
        datasets.enable_progress_bars()
    dataset = _language_columns(_rename(dataset, source, key_path))
    if len(dataset) == 0:
        raise UserError(f"{key_path}: `{location}` holds no rows; point it at a file with data")
    if numbered:
        dataset = dataset.add_column(ROW_COLUMN, range(1, len(dataset) + 1)).add_column(FILE_COLUMN, [source.path] * len(dataset))
    if source.rows:
        start, _, end = source.rows.partition(":")
        selected = range(len(dataset))[slice(int(start) if start else None, int(end) if end else None)]
        if not selected:
            raise UserError(f"{key_path}.rows: `{source.rows}` selects none of the {len(dataset)} rows of `{location}`")
        dataset = dataset.select(selected)
    if source.limit is not None and source.limit < len(dataset):
        dataset = dataset.shuffle(seed=source.seed).select(range(source.limit))
    return dataset


def _language_columns(dataset: datasets.Dataset) -> datasets.Dataset:
    """Each language of a `translation: {de: ..., en: ...}` column as a column of its own, as line-aligned language
    files are read: the WMT and OPUS datasets on the hub (and JSON files written like them) hold their pairs so,
    and `task.source_column: en` / `target_column: de` then read them. Languages that already name a column are
    left alone."""
    feature = dataset.features.get(PAIRS_COLUMN)
    languages = list(feature) if isinstance(feature, dict) else getattr(feature, "languages", None)
    new = [language for language in languages or () if language not in dataset.column_names]
    if not new:
        return dataset
    return dataset.map(
        lambda batch: {language: [pair and pair.get(language) for pair in batch[PAIRS_COLUMN]] for language in new},
        batched=True,
    )


def _detect_format(source: DataSource, location: str, key_path: str) -> str:
    if source.format == "auto" and Path(location).is_dir():
        # datasets would read whatever files the folder holds, without saying which; a dataset repository
        # folder (files named by split) is read only when asked for with format: hub.
        found = sorted(p.name for p in Path(location).iterdir() if p.suffix.lower() in _EXTENSION_FORMATS)[:5]
        raise UserError(
            f"{key_path}.path: `{location}` is a folder; name one data file"
            + (f" (it holds {', '.join(found)})" if found else "")
            + f", or set {key_path}.format: hub to read it as a dataset repository whose files are named by split"
        )
    if source.format != "auto":
        if source.format != "hub" and not Path(location).is_file():
            raise UserError(f"{key_path}.path: file `{location}` does not exist")
        return source.format
    path = Path(location)
    if path.is_file():
        data_format = _EXTENSION_FORMATS.get(path.suffix.lower())
        if data_format is None:
            allowed = ", ".join(_EXTENSION_FORMATS)
            raise UserError(
                f"{key_path}.path: cannot tell the format of `{location}` from its extension; use one of "
                f"{allowed} or set {key_path}.format (e.g. `label_text` for lines of `<label> <text>`)"
            )
        return data_format
    if looks_like_local_path(source.path):
        raise UserError(f"{key_path}.path: file `{location}` does not exist (paths are relative to {Path.cwd()})")
    return "hub"


def _require_decodable(location: str, encoding: str) -> None:
    """Loaders silently mangle text in another encoding; check it first, in chunks, and name the line."""
    decoder = codecs.getincrementaldecoder(encoding)()
    lines_before = 0
    with open(location, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)  # the final call catches a character cut off at the end
            except UnicodeDecodeError as exc:
                line = lines_before + chunk[: exc.start].count(b"\n") + 1
                hint = "set the source's `encoding` (e.g. latin-1) or re-save the file as UTF-8"
                raise UserError(f"`{location}` line {line} is not {encoding.upper()} text; {hint}") from None
            if not chunk:
                break
            lines_before += chunk.count(b"\n")


def read_label_text(location: str, encoding: str) -> dict[str, list]:
    """`<label> <text>` lines (SST, SentEval, TREC releases) -> columns `label`, `text`; integer labels stay integers
    so that `task.labels` names index them, and a line without text is an error naming it."""
    _require_decodable(location, encoding)
    labels, texts = [], []
    with open(location, encoding=encoding) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            if len(parts) < 2:
                raise UserError(
                    f"`{location}` line {number} has a label but no text; format label_text expects `<label> <text>` "
                    "on every line"
                )
            labels.append(parts[0])
            texts.append(parts[1].rstrip("\r\n"))
    if labels and all(label.lstrip("-").isdigit() for label in labels):
        labels = [int(label) for label in labels]
    return {"label": labels, "text": texts}


def _require_even_rows(location: str, data_format: str) -> None:
    """The CSV loader pads a short row with missing values without a word; a ragged row is a broken file."""
    tsv = data_format == "tsv"
    limit = csv.field_size_limit(MAX_CELL_CHARS + 1)  # the huge-cell check reports longer cells by row and column
    try:
        with open(location, encoding="utf-8", newline="") as handle:
            rows = csv.reader(handle, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
            header = next(rows, [])
            for row in rows:
                if row and len(row) != len(header):
                    raise UserError(
                        f"`{location}` line {rows.line_num} has {len(row)} fields but the header has {len(header)}; "
                        f"fix that row{'' if tsv else ' (quote fields that contain commas)'}"
                    )
    except csv.Error as exc:
        raise UserError(f"`{location}` line {rows.line_num}: {exc}") from None
    finally:
        csv.field_size_limit(limit)


def _is_blank(location: str) -> bool:
    """Nothing but whitespace; read in chunks up to the first other byte (the first chunk, for any real file)."""
    with open(location, "rb") as handle:
        while chunk := handle.read(1 << 20):
            if chunk.strip():
                return False
    return True


def _load_file(location: str, data_format: str, encoding: str) -> datasets.Dataset:
    if data_format != "parquet" and _is_blank(location):
        return datasets.Dataset.from_dict({})  # the loaders fail obscurely ("StopIteration"); the caller names it
    if data_format == "parquet" or encoding == "utf-8":
        if data_format != "parquet":
            _require_decodable(location, encoding)
        return _load_utf8_file(location, data_format)
    # The loaders read UTF-8 only: decode a file in another encoding once into a UTF-8 copy (the loaded rows live in
    # the datasets cache, so the copy is not needed afterwards).
    _require_decodable(location, encoding)
    with tempfile.TemporaryDirectory(prefix="peftkit-utf8-") as folder:
        copy = Path(folder) / Path(location).name
        copy.write_text(Path(location).read_text(encoding=encoding), encoding="utf-8")
        return _load_utf8_file(str(copy), data_format)


def _load_utf8_file(location: str, data_format: str) -> datasets.Dataset:
    if data_format in ("csv", "tsv"):
        _require_even_rows(location, data_format)
    if data_format == "json":
        squad_rows = read_nested_squad(location)
        if squad_rows is not None:
            return datasets.Dataset.from_list(squad_rows)
    if data_format in ("json", "jsonl"):
        dataset = datasets.load_dataset("json", data_files=location, split="train")
        mixed = [path for name, feature in dataset.features.items() for path in _json_paths(feature, (name,))]
        if mixed:
            _refuse_mixed_types(location, data_format, mixed)
        return dataset
    # pandas reads the texts NA, N/A, null, None, nan (and more) as missing values: a label `NA` or an answer `None`
    # would become null. Only an empty field is missing.
    as_text = {"keep_default_na": False, "na_values": [""]}
    if data_format == "csv":
        return datasets.load_dataset("csv", data_files=location, split="train", **as_text)
    if data_format == "tsv":
        # TSV corpora (GLUE among them) use quote characters as plain text.
        return datasets.load_dataset("csv", data_files=location, split="train", sep="\t", quoting=csv.QUOTE_NONE, **as_text)
    return datasets.load_dataset("parquet", data_files=location, split="train")


_JSON_TYPES = {str: "string", int: "number", float: "number", bool: "boolean", list: "list", dict: "object"}


def _json_paths(feature, path: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Where `datasets` fell back to its JSON type, at any depth: a column, or a field inside lists and objects
    (`("messages", "[]", "content")`)."""
    if isinstance(feature, datasets.Json):
        return [path]
    if isinstance(feature, dict):
        return [found for name, inner in feature.items() for found in _json_paths(inner, (*path, name))]
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        return _json_paths(feature.feature, (*path, "[]"))
    return []


def _values_at(value, path: tuple[str, ...]):
    if not path:
        yield value
    elif path[0] == "[]":
        for item in value if isinstance(value, list) else []:
            yield from _values_at(item, path[1:])
    elif isinstance(value, dict) and value.get(path[0]) is not None:
        yield from _values_at(value[path[0]], path[1:])


def _refuse_mixed_types(location: str, data_format: str, paths: list[tuple[str, ...]]) -> None:
    """`datasets` keeps a column (or a field inside one) whose rows differ in type as JSON and decodes the string "1"
    back to the number 1; a label column like that would silently merge or split classes, a chat message "0" would
    train as the number 0. Name the rows of each type instead."""
    columns = [".".join(path).replace(".[]", "[]") for path in paths]
    if data_format == "jsonl":
        with open(location, encoding="utf-8") as handle:
            rows = [(number, json.loads(line)) for number, line in enumerate(handle, start=1) if line.strip()]
        where = "line"
    else:
        parsed = json.loads(Path(location).read_text(encoding="utf-8"))
        rows = list(enumerate(parsed, start=1)) if isinstance(parsed, list) else []
        where = "row"
    if not rows:  # a JSON object of columns: no rows to name
        raise UserError(f"`{location}` column(s) {columns} mix value types; write every value of a column as one type")
    for column, path in zip(columns, paths):
        seen: dict[str, list[tuple[int, object]]] = {}
        for number, row in rows:
            for value in _values_at(row, path):
                if value is not None:
                    found = seen.setdefault(_JSON_TYPES.get(type(value), type(value).__name__), [])
                    if not found or found[-1][0] != number:
                        found.append((number, value))
        if len(seen) > 1:
            examples = "; ".join(
                f"{kind} at {where}s {[n for n, _ in found[:3]]}" + (f" (e.g. {found[0][1]!r})" if kind != "object" else "")
                for kind, found in seen.items()
            )
            example = "all as text" if "[]" in column else "all labels as strings or all as integers"
            raise UserError(
                f"`{location}` column {column!r} mixes value types: {examples}; write every value of the column "
                f"as one type (e.g. {example})"
            )
    # Types mixed deeper than the rows above show (inside a list of a row): still JSON-typed, still decoded.
    raise UserError(f"`{location}` column(s) {columns} mix value types inside their values; write every value as one type")


def _refuse_huge_cells(dataset: datasets.Dataset, location: str) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    for name in dataset.column_names:
        column = dataset.data.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        lengths = pc.utf8_length(column)
        longest = pc.max(lengths).as_py() or 0
        if longest > MAX_CELL_CHARS:
            row = pc.index(lengths, longest).as_py() + 1
            raise UserError(
                f"`{location}` row {row} has a {name!r} of {longest:,} characters (limit {MAX_CELL_CHARS:,}): far "
                f"beyond any model's context, and tokenizing it alone needs gigabytes; shorten or remove that row"
            )


def _rename(dataset: datasets.Dataset, source: DataSource, key_path: str) -> datasets.Dataset:
    missing = [old for old in source.rename if old not in dataset.column_names]
    if missing:
        raise UserError(
            f"{key_path}.rename: column(s) {missing} not in `{source.path}`; its columns are {dataset.column_names}"
        )
    return dataset.rename_columns(source.rename) if source.rename else dataset


def require_columns(dataset: datasets.Dataset, columns: list[str], split: str, source_path: str, hint_key: str) -> None:
    """Fail with the file, the missing column and the columns present, before any tokenization."""
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise UserError(
            f"data.{split}: `{source_path}` has no column {missing[0]!r} (columns: {dataset.column_names}); "
            f"set {hint_key} or rename the column with data.{split}.rename"
        )


def _locate_file_problem(location: str, data_format: str, encoding: str) -> str | None:
    """Name the line that breaks a text file, which the loaders' own errors often do not."""
    if data_format in ("hub", "parquet", "parallel"):
        return None
    text = Path(location).read_text(encoding=encoding)
    if data_format == "jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"line {number} is not valid JSON ({exc.msg}, column {exc.colno})"
            if not isinstance(row, dict):
                return f"line {number} is a JSON {type(row).__name__}, not an object of columns"
    return None


def data_digests(data: DataSection) -> dict[str, str]:
    """The SHA-256 of every local data file a recipe reads, by key path (`data.train.path`, with `.<lang>` for
    line-aligned files). A resumed run compares them: the Trainer would otherwise skip the batches it had consumed
    of the edited data and go on, matching neither the interrupted run nor a new one. Hub datasets are left out."""
    digests = {}
    for key, source in data.sources_by_key().items():
        location = resolve_reference(source.path, f"{key}.path")
        files = ({f".{language}": language_file(location, language, key) for language in source.languages}
                 if source.languages else {"": Path(location)})
        for suffix, file in files.items():
            if file.is_file():
                digests[f"{key}.path{suffix}"] = _sha256(file)
    return digests


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def in_file_order(data: DataSection, split: str) -> bool:
    """Whether a loaded split's rows are its one file's rows in order: not when `rows`/`limit` selected some,
    sources were mixed, or `validation_fraction` carved it (train and the carved validation)."""
    source = getattr(data, split)
    if source is None or isinstance(source, list):  # mixed (even one weighted source): concatenated and shuffled
        return False
    return not (source.rows or source.limit is not None or split == "train" and data.carves_validation)


def file_rows(data: DataSection, split: str, positions: list[int]) -> list[int | str]:
    """The rows of their files (1-based) that rows of a loaded split (0-based positions) came from, for messages; a
    split of several sources gives `file:row`. A split that is not its file in order is loaded again with each row
    numbered (only on the error paths that call this)."""
    if in_file_order(data, split):
        return [position + 1 for position in positions]
    if data.carves_validation and split in ("train", "validation"):
        train, validation = _carve_validation(load_split(data.train, "data.train", numbered=True), data)
        rows = {"train": train, "validation": validation}[split].select(positions)
        split = "train"  # the carved rows are rows of train's sources
    else:
        rows = load_split(getattr(data, split), f"data.{split}", numbered=True).select(positions)
    if isinstance(getattr(data, split), list):
        return [f"{path}:{row}" for path, row in zip(rows[FILE_COLUMN], rows[ROW_COLUMN])]
    return list(rows[ROW_COLUMN])


def split_origin(data: DataSection, split: str) -> str:
    """The file or hub name a split came from, for error messages (a carved-off validation names train's)."""
    source = getattr(data, split)
    if source is None:
        return f"{split_origin(data, 'train')} (validation_fraction)"
    return " + ".join(part.path for part in source) if isinstance(source, list) else source.path
