"""Labelled text: columns, label ids, prediction records, scores and the report shared by the tasks that predict
one label per text (classification, feature extraction, and causal LM's label responses)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from peftkit.data.sources import file_rows, require_columns, split_origin
from peftkit.data.truncation import warn_cut
from peftkit.errors import UserError
from peftkit.evaluation.analysis import length_bucket_table, markdown_cell, word_count
from peftkit.evaluation.plots import plot_confusion_matrix
from peftkit.recipe.schema import Recipe
from peftkit.run_folder import PLOTS_DIR

log = logging.getLogger("peftkit")


def label_names(recipe: Recipe, train) -> list[str]:
    """Label names in id order: the recipe's list, else the names of a hub dataset's integer labels (a `ClassLabel`:
    glue/sst2's 0/1 are negative/positive), else the sorted distinct training labels."""
    import datasets

    if recipe.task.labels:
        return list(recipe.task.labels)
    feature = train.features.get(recipe.task.label_column) if train.features else None
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = {_whole(value) for value in train[recipe.task.label_column]}
    if all(isinstance(value, (int, np.integer)) for value in values):
        return [str(value) for value in sorted(values)]
    return sorted(str(value) for value in values)


def _whole(value: Any) -> Any:
    """A float label that is a whole number as the integer: a CSV column of integer labels with one empty field is
    read as floats (1.0), which would name the classes "0.0" and "1.0" and match no other file's "0" and "1"."""
    return int(value) if isinstance(value, (float, np.floating)) and float(value).is_integer() else value


def _label_ids(values: list[Any], names: list[str], split: str, source: str, label_column: str) -> list[int]:
    index = {name: i for i, name in enumerate(names)}
    ids, unknown = [], set()
    for value in map(_whole, values):
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
        labels = [task.label_column] if labelled else []
        if labelled:
            _refuse_unclassable_labels(dataset, split, recipe, task.label_column)
        splits[split] = _without_empty_values(dataset, split, recipe, inputs, labels)
    names = info["labels"] if info else label_names(recipe, splits["train"])
    if len(names) < 2:
        raise UserError(f"data.train: column {task.label_column!r} has only the label {names}; classification needs two or more")

    def tokenize(batch):
        pair = batch[task.text_pair_column] if task.text_pair_column else None
        return tokenizer(batch[task.text_column], pair, truncation=True, max_length=recipe.data.max_length)

    def whole(rows) -> list[list[int]]:
        pairs = list(rows[task.text_pair_column]) if task.text_pair_column else None
        return tokenizer(list(rows[task.text_column]), pairs)["input_ids"]

    tokenized = {}
    for split, dataset in splits.items():
        encoded = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names,
                              desc=f"Tokenizing data.{split}")
        warn_cut(split, "texts", encoded["input_ids"], "data.max_length", recipe.data.max_length,
                 lambda rows, dataset=dataset: whole(dataset.select(rows)))
        if task.label_column in dataset.column_names:
            ids = _label_ids(dataset[task.label_column], names, split, split_origin(recipe.data, split), task.label_column)
            encoded = encoded.add_column("labels", ids)
        tokenized[split] = encoded
    if info is None and "labels" in tokenized["train"].column_names:
        trained = set(tokenized["train"]["labels"])
        unused = [name for i, name in enumerate(names) if i not in trained]
        if unused:
            log.warning("task.labels: %s never occur in `%s`; the model cannot learn to predict them",
                        unused, split_origin(recipe.data, "train"))
    return tokenized, {"labels": names}


def _refuse_unclassable_labels(dataset, split: str, recipe: Recipe, column: str) -> None:
    """One class per row. A list or mapping (multi-label data such as go_emotions) cannot be one class and failed
    with a traceback; fractional numbers are a regression target (STS-B's 0-5 similarity), where every distinct value
    would silently have become a class of its own."""
    values = dataset[column]
    nested = [i for i, value in enumerate(values) if isinstance(value, (list, tuple, dict))]
    fractional = [i for i, value in enumerate(values)
                  if isinstance(value, (float, np.floating)) and not float(value).is_integer()]
    origin = split_origin(recipe.data, split)
    for rows, what, why in (
        (nested, "lists or mappings", "classification takes one label per row; keep one label per row, or learn the "
         "labels as text with task.type causal_lm"),
        (fractional, "fractional numbers", "a regression target, which classification would learn as one class per "
         "distinct value; bin the values into classes first"),
    ):
        if rows:
            raise UserError(
                f"data.{split}: `{origin}` column {column!r} holds {what} at row(s) {file_rows(recipe.data, split, rows[:10])}"
                f"{' ...' if len(rows) > 10 else ''} ({len(rows)} of {len(values)}; e.g. {values[rows[0]]!r:.60}): {why}"
            )


def _without_empty_values(dataset, split: str, recipe: Recipe, texts: list[str], labels: list[str]):
    """An empty (or non-text) input teaches nothing and predicts noise, and a row without a label (null, or a JSON
    line without the key, which loads as null) would become a class of its own named "None": an error naming the
    column and rows, or, with `data.skip_bad_rows`, the split without them and a counted warning."""
    origin = split_origin(recipe.data, split)
    empty = {column: [i for i, text in enumerate(dataset[column]) if not isinstance(text, str) or not text.strip()]
             for column in texts}
    empty |= {column: [i for i, label in enumerate(dataset[column])
                       if label is None or (isinstance(label, str) and not label.strip())] for column in labels}
    empty = {column: rows for column, rows in empty.items() if rows}
    if not empty:
        return dataset
    bad = sorted(set().union(*empty.values()))

    def what(column: str, rows: list[int]) -> str:
        other = next((value for value in dataset.select(rows[:50])[column] if value is not None and not isinstance(value, str)), None)
        return "is empty" if other is None or column in labels else f"is empty or not text (e.g. {other!r:.40})"

    where = "; ".join(
        f"column {column!r} {what(column, rows)} at row(s) {file_rows(recipe.data, split, rows[:10])}"
        f"{' ...' if len(rows) > 10 else ''} ({len(rows)} of {len(dataset)})" for column, rows in empty.items()
    )
    if not recipe.data.skip_bad_rows or len(bad) == len(dataset):
        raise UserError(f"data.{split}: `{origin}` {where}; fix those rows or set data.skip_bad_rows: true to skip them")
    log.warning("data.%s: skipped %d of %d rows of `%s`: %s", split, len(bad), len(dataset), origin, where)
    bad_rows = set(bad)
    return dataset.select([i for i in range(len(dataset)) if i not in bad_rows])


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
    picture = Path(PLOTS_DIR) / f"confusion_matrix_{split}.png"
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
