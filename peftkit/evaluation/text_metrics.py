"""Scores of generated text against references: SQuAD EM/F1, BLEU/chrF (sacrebleu), ROUGE (rouge-score).

All scores are percentages (0-100), as the papers report them.
"""

from __future__ import annotations

import collections
import re
import string


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(prediction: str, reference: str) -> float:
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
    if not predicted or not gold:
        return float(predicted == gold)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    count = max(len(predictions), 1)
    exact = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    f1 = sum(_token_f1(p, r) for p, r in zip(predictions, references))
    return {"exact_match": 100 * exact / count, "f1": 100 * f1 / count}


def translation_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    import sacrebleu

    return {
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
    }


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    names = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(names), use_stemmer=True)
    totals = dict.fromkeys(names, 0.0)
    for prediction, reference in zip(predictions, references):
        for name, value in scorer.score(reference, prediction).items():
            totals[name] += value.fmeasure
    return {name: 100 * total / max(len(predictions), 1) for name, total in totals.items()}
