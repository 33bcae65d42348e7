"""Text classification: single sentences or pairs, binary or multi-class, labels as strings or integers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from peftkit.data.sources import require_columns, split_origin
from peftkit.errors import UserError
from peftkit.evaluation.analysis import length_bucket_table, markdown_cell, word_count
from peftkit.evaluation.plots import plot_confusion_matrix
from peftkit.models.build import build_model
from peftkit.models.load import context_length
from peftkit.recipe.schema import Recipe

log = logging.getLogger("peftkit")

PEFT_TASK_TYPE = "SEQ_CLS"
DEFAULT_METRIC = "f1_macro"
LOSS_SUMS_OVER_ITEMS = False  # cross-entropy mean over the batch
HEAD_NAMES = ("classifier", "score", "classification_head")  # BERT-likes, decoders, T5/BART
AUTO_CLASS = AutoModelForSequenceClassification
INPUT_FIELDS = {"text": True, "text_pair": False}


def label_names(recipe: Recipe, train) -> list[str]:
    """Label names in id order: the recipe's list, else the sorted distinct training labels."""
    if recipe.task.labels:
        return list(recipe.task.labels)
    values = set(train[recipe.task.label_column])
    if all(isinstance(value, (int, np.integer)) for value in values):
        return [str(value) for value in sorted(values)]
    return sorted(str(value) for value in values)


def _label_ids(values: list[Any], names: list[str], split: str, source: str, label_column: str) -> list[int]:
    index = {name: i for i, name in enumerate(names)}
    ids, unknown = [], set()
    for value in values:
        key = str(value)
        if key not in index and isinstance(value, (int, np.integer)) and 0 <= value < len(names):
            key = names[value]  # integer labels index into explicit label names
        if key not in index:
            unknown.add(key)
        else:
            ids.append(index[key])
    if unknown:
        raise UserError(
            f"data.{split}: `{source}` column {label_column!r} has label(s) {sorted(unknown)[:10]} that do not occur "
            f"in the training labels {names}; fix the data or list every label in task.labels"
        )
    return ids


def prepare(recipe: Recipe, splits: dict, tokenizer, info: dict | None = None) -> tuple[dict, dict]:
    """Check columns and labels of every split, then tokenize. Returns (tokenized splits, task info).

    With `info` (a saved run's), its label names are used and splits without the label column are
    tokenized unlabelled, for prediction.
    """
    task = recipe.task
    inputs = [task.text_column] + ([task.text_pair_column] if task.text_pair_column else [])
    for split, dataset in splits.items():
        labelled = info is None or task.label_column in dataset.column_names
        columns = inputs + ([task.label_column] if labelled else [])
        require_columns(dataset, columns, split, split_origin(recipe.data, split), "task.text_column/task.label_column")
        splits[split] = _without_empty_texts(dataset, split, recipe)
    names = info["labels"] if info else label_names(recipe, splits["train"])
    if len(names) < 2:
        raise UserError(f"data.train: column {task.label_column!r} has only the label {names}; classification needs two or more")

    def tokenize(batch):
        pair = batch[task.text_pair_column] if task.text_pair_column else None
        return tokenizer(batch[task.text_column], pair, truncation=True, max_length=recipe.data.max_length)

    tokenized = {}
    for split, dataset in splits.items():
        encoded = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
        if task.label_column in dataset.column_names:
            ids = _label_ids(dataset[task.label_column], names, split, split_origin(recipe.data, split), task.label_column)
            encoded = encoded.add_column("labels", ids)
        tokenized[split] = encoded
    return tokenized, {"labels": names}


def _without_empty_texts(dataset, split: str, recipe: Recipe):
    """An empty (or non-text) input teaches nothing and predicts noise: an error naming the rows, or, with
    `data.skip_bad_rows`, the split without them and a counted warning."""
    column, origin = recipe.task.text_column, split_origin(recipe.data, split)
    empty = [i for i, text in enumerate(dataset[column]) if not isinstance(text, str) or not text.strip()]
    if not empty:
        return dataset
    rows = f"row(s) {[i + 1 for i in empty[:10]]}{' ...' if len(empty) > 10 else ''} ({len(empty)} of {len(dataset)})"
    if not recipe.data.skip_bad_rows or len(empty) == len(dataset):
        raise UserError(
            f"data.{split}: `{origin}` column {column!r} is empty at {rows}; fix those rows or set "
            "data.skip_bad_rows: true to skip them"
        )
    log.warning("data.%s: skipped %s of `%s` with an empty %r", split, rows, origin, column)
    empty_rows = set(empty)
    return dataset.select([i for i in range(len(dataset)) if i not in empty_rows])


def model_kwargs(info: dict) -> dict:
    names = info["labels"]
    return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def load_model(recipe: Recipe, info: dict):
    return build_model(recipe.model, recipe.quantization, AUTO_CLASS, model_kwargs=model_kwargs(info),
                       keep_unquantized=list(HEAD_NAMES))


def head_modules(model) -> list[str]:
    present = {name.split(".")[-1] for name, _ in model.named_modules()}
    return [name for name in HEAD_NAMES if name in present]


def collator(tokenizer, recipe: Recipe):
    return DataCollatorWithPadding(tokenizer)


def compute_metrics(info: dict):
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


def records_from_probabilities(probabilities: np.ndarray, tokenized, raw, recipe: Recipe, info: dict) -> list[dict]:
    """One record per example: inputs, predicted label and its probability, and the gold label when known."""
    names = info["labels"]
    gold_ids = tokenized["labels"] if "labels" in tokenized.column_names else [None] * len(tokenized)
    records = []
    for i, (gold, probs) in enumerate(zip(gold_ids, probabilities)):
        record = {"text": raw[i][recipe.task.text_column]}
        if recipe.task.text_pair_column:
            record["text_pair"] = raw[i][recipe.task.text_pair_column]
        predicted = int(probs.argmax())
        record.update(predicted=names[predicted], probability=round(float(probs[predicted]), 6))
        if gold is not None:
            record.update(gold=names[gold], gold_probability=round(float(probs[gold]), 6))
        records.append(record)
    return records


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def score(records: list[dict], info: dict) -> dict[str, Any]:
    names = info["labels"]
    gold = [r["gold"] for r in records]
    predicted = [r["predicted"] for r in records]
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, predicted, labels=names, average=None, zero_division=0
    )
    macro = precision_recall_fscore_support(gold, predicted, labels=names, average="macro", zero_division=0)
    return {
        "examples": len(records),
        "accuracy": float(accuracy_score(gold, predicted)),
        "precision_macro": float(macro[0]),
        "recall_macro": float(macro[1]),
        "f1_macro": float(macro[2]),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(names, precision, recall, f1, support)
        },
        "confusion_matrix": {"labels": names, "matrix": confusion_matrix(gold, predicted, labels=names).tolist()},
    }


def report(records: list[dict], metrics: dict, split: str, run_dir: Path, worst: int) -> str:
    """Markdown for one split: headline metrics, per-class table, confusion matrix picture, worst errors."""
    picture = Path("plots") / f"confusion_matrix_{split}.png"
    matrix = metrics["confusion_matrix"]
    plot_confusion_matrix(matrix["matrix"], matrix["labels"], run_dir / picture, title=f"Confusion matrix ({split})")
    lines = [
        f"| accuracy | precision (macro) | recall (macro) | F1 (macro) | examples |",
        "|---|---|---|---|---|",
        f"| {metrics['accuracy']:.4f} | {metrics['precision_macro']:.4f} | {metrics['recall_macro']:.4f} "
        f"| {metrics['f1_macro']:.4f} | {metrics['examples']} |",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for name, row in metrics["per_class"].items():
        lines.append(f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |")
    lines += ["", f"![confusion matrix]({picture.as_posix()})", "", "Accuracy by text length:", ""]
    lines += [length_bucket_table([_text_length(r) for r in records], [float(r["gold"] == r["predicted"]) for r in records], "accuracy"), ""]
    errors = sorted((r for r in records if r["gold"] != r["predicted"]), key=lambda r: r["gold_probability"])
    if errors and worst:
        lines += [f"Worst misclassified examples (lowest probability of the gold label), {min(worst, len(errors))} of {len(errors)}:", ""]
        lines += ["| text | gold | predicted | p(gold) |", "|---|---|---|---|"]
        for record in errors[:worst]:
            text = record["text"] + (f" ‖ {record['text_pair']}" if "text_pair" in record else "")
            lines.append(
                f"| {markdown_cell(text)} | {record['gold']} | {markdown_cell(record['predicted'])} "
                f"| {record['gold_probability']:.3f} |"
            )
    return "\n".join(lines)


def _text_length(record: dict) -> int:
    return word_count(record["text"]) + word_count(record.get("text_pair", ""))


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
        padding=True, truncation=True, max_length=context_length(model.config, tokenizer), return_tensors="pt",
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
