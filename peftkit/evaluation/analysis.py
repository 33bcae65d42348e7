"""Error analysis shared by every task's report: scores by input length, and the lowest-scoring examples."""

from __future__ import annotations

from typing import Callable

import numpy as np

LENGTH_BUCKETS = 4


def word_count(text: str) -> int:
    return len(str(text).split())


def length_bucket_table(lengths: list[int], scores: list[float], score_name: str, unit: str = "words") -> str:
    """Markdown table of the mean score per input-length quartile (fewer buckets when lengths repeat)."""
    if not scores:
        return ""
    lengths_array, scores_array = np.asarray(lengths), np.asarray(scores, dtype=float)
    edges = np.unique(np.quantile(lengths_array, np.linspace(0, 1, LENGTH_BUCKETS + 1)).round().astype(int))
    lines = [f"| input length ({unit}) | examples | mean {score_name} |", "|---|---|---|"]
    low = int(lengths_array.min())
    for high in edges[1:] if len(edges) > 1 else edges:
        inside = (lengths_array >= low) & (lengths_array <= high)
        if inside.any():
            span = f"{low}" if low == high else f"{low}–{int(high)}"
            lines.append(f"| {span} | {int(inside.sum())} | {scores_array[inside].mean():.4f} |")
        low = int(high) + 1
    return "\n".join(lines)


def lowest_scoring_table(records: list[dict], columns: dict[str, Callable[[dict], object]], score_key: str, worst: int) -> str:
    """The `worst` records with the lowest `score_key`, one row each, cells from `columns` (header -> getter)."""
    if not worst or not records:
        return ""
    ranked = sorted(records, key=lambda record: record[score_key])[:worst]
    lines = [f"Lowest-scoring examples ({score_key}), {len(ranked)} of {len(records)}:", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for record in ranked:
        lines.append("| " + " | ".join(markdown_cell(getter(record)) for getter in columns.values()) + " |")
    return "\n".join(lines)


def markdown_cell(value: object, limit: int = 160) -> str:
    """One table cell: pipes escaped, newlines flattened, long text cut with an ellipsis."""
    if isinstance(value, float):
        return f"{value:.2f}"
    text = " / ".join(map(str, value)) if isinstance(value, list) else str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
