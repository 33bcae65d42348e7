"""Text-comparison metrics: SQuAD exact match / token F1, BLEU and chrF (sacrebleu), ROUGE (rouge-score).

Scores are on a 0-100 scale, as the official scripts and papers report them. Every function takes
several references per example (the best-matching one counts for SQuAD and ROUGE, all count for BLEU/chrF).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache

import sacrebleu

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower case, drop punctuation and English articles, squeeze spaces."""
    text = "".join(character for character in text.lower() if character not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _gold_or_empty(golds: list[str]) -> list[str]:
    # SQuAD v2: a question whose gold answers all normalise to nothing is unanswerable; only "" matches it.
    kept = [gold for gold in golds if normalize_answer(gold)]
    return kept or [""]


def exact_match(prediction: str, golds: list[str]) -> float:
    return 100.0 * max(float(normalize_answer(prediction) == normalize_answer(g)) for g in _gold_or_empty(golds))


def token_f1(prediction: str, golds: list[str]) -> float:
    return 100.0 * max(_f1(normalize_answer(prediction).split(), normalize_answer(g).split()) for g in _gold_or_empty(golds))


def _f1(predicted: list[str], gold: list[str]) -> float:
    if not predicted or not gold:
        return float(predicted == gold)  # both empty is a correct "no answer"
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def _reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu wants one stream per reference position; examples with fewer references pad with None."""
    width = max(len(refs) for refs in references)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]


def bleu_and_chrf(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU (13a tokenisation) and chrF, sacrebleu's defaults, so numbers compare with papers."""
    streams = _reference_streams(references)
    return {
        "bleu": float(sacrebleu.corpus_bleu(predictions, streams).score),
        "chrf": float(sacrebleu.corpus_chrf(predictions, streams).score),
    }


def sentence_chrf(prediction: str, references: list[str]) -> float:
    return float(sacrebleu.sentence_chrf(prediction, references).score)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def _sentence_lines(text: str) -> str:
    # rougeLsum scores summary-level LCS over newline-separated sentences.
    return "\n".join(_SENTENCE_END.split(text.strip()))


def rouge(prediction: str, references: list[str]) -> dict[str, float]:
    """ROUGE F-measures of one prediction against its best-matching reference, per ROUGE type."""
    scores = _rouge_scorer().score_multi([_sentence_lines(r) for r in references], _sentence_lines(prediction))
    return {name: 100.0 * scores[name].fmeasure for name in ROUGE_TYPES}
