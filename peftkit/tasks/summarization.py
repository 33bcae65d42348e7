"""Summarization with an encoder-decoder model, scored by ROUGE-1/2/L/Lsum (rouge-score, stemmed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from peftkit.errors import UserError
from peftkit.evaluation.text_metrics import ROUGE_TYPES, rouge
from peftkit.recipe.schema import Recipe
from peftkit.tasks.seq2seq import (  # the encoder-decoder half of the task contract, by name
    AUTO_CLASS, COMPLETES_PROMPTS, DEFAULT_METRIC, GENERATES, INPUT_FIELDS, LOSS_SUMS_OVER_ITEMS, PEFT_TASK_TYPE,
    WINDOWS_LONG_INPUTS, collator, compute_metrics, error_analysis, forward_logits, generate_records, head_modules,
    infer, inference_rows, load_model, model_kwargs, prepare,
)

SENTENCE_SCORE = "rougeL"


def predict(trainer, tokenized, raw, recipe: Recipe, info: dict) -> list[dict]:
    return generate_records(trainer, tokenized, raw, recipe, rouge)


def score(records: list[dict], info: dict) -> dict[str, Any]:
    scored = [r for r in records if "references" in r]
    if not scored:
        raise UserError("no row of this data has a reference summary to score against; use `peftkit predict`")
    return {
        "examples": len(scored),
        **{name: float(np.mean([r[name] for r in scored])) for name in ROUGE_TYPES},
        "mean_prediction_words": float(np.mean([len(r["predicted"].split()) for r in scored])),
    }


def report(records: list[dict], metrics: dict, split: str, run_dir: Path, worst: int) -> str:
    lines = [
        "| ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | mean summary words | examples |",
        "|---|---|---|---|---|---|",
        "| " + " | ".join(f"{metrics[name]:.2f}" for name in ROUGE_TYPES)
        + f" | {metrics['mean_prediction_words']:.1f} | {metrics['examples']} |",
        "",
        error_analysis([r for r in records if "references" in r], SENTENCE_SCORE, worst),
    ]
    return "\n".join(lines)
