"""How closely a merged model follows the model it was merged from: what `peftkit merge` checks and its model card
reports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Comparison:
    """How closely one model's outputs follow another's on the same rows."""

    rows: int
    max_abs_diff: float
    agreement: float  # fraction of predictions (argmax of each output vector) that are equal


def compare_outputs(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> Comparison:
    diffs = [float((a.float() - b.float()).abs().max()) for a, b in zip(reference, candidate)]
    same = [(a.argmax(-1) == b.argmax(-1)).float().flatten() for a, b in zip(reference, candidate)]
    return Comparison(len(reference), max(diffs), float(torch.cat(same).mean()))


@dataclass
class MergeResult:
    out_dir: Path
    dtype: str
    onto: str
    verification: Comparison  # merged vs the adapter attached to the same base weights
    vs_trained: Comparison | None  # merged vs the adapter on the quantized base it was trained on
    tolerance: float
