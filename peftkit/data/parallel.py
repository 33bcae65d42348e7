"""Line-aligned language files (one sentence a line, optionally gzipped): the usual release format of
translation corpora such as Multi30k (`train.en.gz`, `train.fr.gz`)."""

from __future__ import annotations

import gzip
from pathlib import Path

from peftkit.errors import UserError


def language_file(prefix: str, language: str, key_path: str) -> Path:
    for candidate in (Path(f"{prefix}.{language}"), Path(f"{prefix}.{language}.gz")):
        if candidate.is_file():
            return candidate
    raise UserError(
        f"{key_path}.path: no file `{prefix}.{language}` or `{prefix}.{language}.gz` for language {language!r} "
        f"(data.*.languages); path is the shared prefix, e.g. `.../multi30k/train`"
    )


def read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding=encoding) as handle:
        return [line.rstrip("\r\n") for line in handle]


def read_parallel(prefix: str, languages: list[str], key_path: str, encoding: str = "utf-8") -> dict[str, list[str]]:
    """Columns named by language code; files of different lengths are not aligned and are refused."""
    columns = {language: read_lines(language_file(prefix, language, key_path), encoding) for language in languages}
    lengths = {language: len(lines) for language, lines in columns.items()}
    if len(set(lengths.values())) > 1:
        raise UserError(f"{key_path}: language files under `{prefix}` are not line-aligned (lines per language: {lengths})")
    return columns
