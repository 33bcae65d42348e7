"""Translation with an encoder-decoder model, scored by corpus BLEU and chrF (sacrebleu)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftkit.errors import UserError
from peftkit.evaluation.text_metrics import bleu_and_chrf, sentence_chrf
from peftkit.recipe.schema import Recipe
from peftkit.tasks.seq2seq import (  # the encoder-decoder half of the task contract, by name
    AUTO_CLASS, COMPLETES_PROMPTS, DEFAULT_METRIC, GENERATES, INPUT_FIELDS, LOSS_SUMS_OVER_ITEMS, PEFT_TASK_TYPE,
    WINDOWS_LONG_INPUTS, collator, compute_metrics, error_analysis, forward_logits, generate_records, head_modules,
    infer, inference_rows, load_model, model_kwargs, prepare,
)

SENTENCE_SCORE = "chrf"


def predict(trainer, tokenized, raw, recipe: Recipe, info: dict) -> list[dict]:
    return generate_records(trainer, tokenized, raw, recipe, lambda predicted, refs: {SENTENCE_SCORE: sentence_chrf(predicted, refs)})


def score(records: list[dict], info: dict) -> dict[str, Any]:
    scored = [r for r in records if "references" in r]
    if not scored:
        raise UserError("no row of this data has a reference translation to score against; use `peftkit predict`")
    corpus = bleu_and_chrf([r["predicted"] for r in scored], [r["references"] for r in scored])
    return {"examples": len(scored), **corpus}


def report(records: list[dict], metrics: dict, split: str, run_dir: Path, worst: int) -> str:
    lines = [
        "| BLEU | chrF | examples |",
        "|---|---|---|",
        f"| {metrics['bleu']:.2f} | {metrics['chrf']:.2f} | {metrics['examples']} |",
        "",
        error_analysis([r for r in records if "references" in r], SENTENCE_SCORE, worst),
    ]
    return "\n".join(lines)
