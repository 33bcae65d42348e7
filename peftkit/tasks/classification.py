"""Text classification: single sentences or pairs, binary or multi-class, labels as strings or integers."""

from __future__ import annotations


import numpy as np
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from peftkit.models.build import build_model, position_limit
from peftkit.models.load import context_length
from peftkit.recipe.schema import Recipe
from peftkit.tasks.labelled_text import prepare, records_from_probabilities, report, score  # noqa: F401  (the shared half of the contract)

PEFT_TASK_TYPE = "SEQ_CLS"
DEFAULT_METRIC = "f1_macro"
LOSS_SUMS_OVER_ITEMS = False  # cross-entropy mean over the batch
HEAD_NAMES = ("classifier", "score", "classification_head")  # BERT-likes, decoders, T5/BART
AUTO_CLASS = AutoModelForSequenceClassification
INPUT_FIELDS = {"text": True, "text_pair": False}
WINDOWS_LONG_INPUTS = False
GENERATES = False
COMPLETES_PROMPTS = False


def model_kwargs(info: dict) -> dict:
    names = info["labels"]
    return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def info_from_config(config) -> dict:
    """Task info of an adapter trained outside peftkit (no record): label names from the model config's id2label."""
    id2label = {int(i): name for i, name in (getattr(config, "id2label", None) or {}).items()}
    return {"labels": [id2label.get(i, f"LABEL_{i}") for i in range(max(id2label, default=1) + 1)]}


def load_model(recipe: Recipe, info: dict):
    return build_model(recipe.model, recipe.quantization, AUTO_CLASS, model_kwargs=model_kwargs(info),
                       keep_unquantized=list(HEAD_NAMES))


def head_modules(model) -> list[str]:
    present = {name.split(".")[-1] for name, _ in model.named_modules()}
    return [name for name in HEAD_NAMES if name in present]


def collator(tokenizer, recipe: Recipe):
    return DataCollatorWithPadding(tokenizer)


def compute_metrics(info: dict, validation):
    """Metrics for periodic evaluation inside the Trainer."""

    def compute(eval_prediction) -> dict[str, float]:
        logits = eval_prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        predicted = np.asarray(logits).argmax(-1)
        gold = np.asarray(eval_prediction.label_ids)
        _, _, f1, _ = precision_recall_fscore_support(gold, predicted, average="macro", zero_division=0)
        return {"accuracy": float(accuracy_score(gold, predicted)), "f1_macro": float(f1)}

    return compute


def predict(trainer, tokenized, raw, recipe: Recipe, info: dict) -> list[dict]:
    output = trainer.predict(tokenized)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    return records_from_probabilities(_softmax(np.asarray(logits, dtype=np.float64)), tokenized, raw, recipe, info)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def inference_rows(recipe: Recipe, dataset) -> list[dict]:
    """A data split as inference inputs (`INPUT_FIELDS`), e.g. to verify a merge on the run's own data."""
    task = recipe.task
    rows = []
    for row in dataset:
        rows.append({"text": row[task.text_column], **({"text_pair": row[task.text_pair_column]} if task.text_pair_column else {})})
    return rows


def forward_logits(model, tokenizer, rows: list[dict], adapter_names: list[str] | None = None,
                   infos: list[dict] | None = None) -> list[torch.Tensor]:
    """Class logits, one tensor per row; `adapter_names` picks a peft adapter per row (mixed batch)."""
    pairs = [row.get("text_pair") for row in rows]
    inputs = tokenizer(
        [row["text"] for row in rows], pairs if any(pair is not None for pair in pairs) else None,
        padding=True, truncation=True, max_length=position_limit(model) or context_length(model.config, tokenizer),
        return_tensors="pt",
    ).to(model.device)
    with torch.inference_mode():
        logits = model(**inputs, **({"adapter_names": adapter_names} if adapter_names else {})).logits
    return list(logits.float().cpu())


def infer(model, tokenizer, rows: list[dict], infos: list[dict], adapter_names: list[str] | None = None, **_generation) -> list[dict]:
    """Predicted label, its probability and every label's probability, decoded with each row's own label names."""
    answers = []
    for logits, info in zip(forward_logits(model, tokenizer, rows, adapter_names), infos):
        probabilities = torch.softmax(logits.double(), dim=-1).tolist()
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        answers.append({
            "label": info["labels"][best],
            "probability": round(probabilities[best], 6),
            "scores": {name: round(p, 6) for name, p in zip(info["labels"], probabilities)},
        })
    return answers
