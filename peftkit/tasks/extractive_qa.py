"""Extractive question answering (SQuAD v1/v2 style) with an encoder and a span head.

Long contexts are cut into windows of `data.max_length` tokens overlapping by `task.doc_stride`; each window
is a training feature. At prediction the best span over all windows of a question is mapped back to
context characters through the tokenizer's offset mapping.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForQuestionAnswering, DataCollatorWithPadding

from peftkit.data.sources import file_rows, require_columns, split_origin
from peftkit.errors import UserError
from peftkit.evaluation.analysis import length_bucket_table, lowest_scoring_table, word_count
from peftkit.evaluation.text_metrics import exact_match, token_f1
from peftkit.models.build import build_model
from peftkit.recipe.schema import DataSection, ExtractiveQATask, Recipe

log = logging.getLogger("peftkit")

PEFT_TASK_TYPE = "QUESTION_ANS"
# Span F1, decoded as the final evaluation decodes. Not the loss: on XQuAD the validation loss rose after epoch 2-3
# (overconfidence) while F1 kept improving, and the loss-best checkpoint lost 2-11 F1 points (docs/tasks.md).
DEFAULT_METRIC = "f1"
LOSS_SUMS_OVER_ITEMS = False  # mean of start and end cross-entropy over the batch
HEAD_NAMES = ("qa_outputs",)
N_BEST = 20
# Columns a feature carries for mapping predictions back to text and scoring them inside the Trainer's periodic
# evaluation (its context and gold answers as JSON); the collator drops them.
_FEATURE_METADATA = ("example_index", "offset_mapping", "context", "gold_answers")
# Recipe settings that windowing and span decoding need at inference; the task info carries them to deployment.
_DECODING_KEYS = ("doc_stride", "max_answer_tokens", "allow_unanswerable", "null_score_threshold")


def normalize_answers(value: Any, context: str) -> tuple[list[str], list[int | None]]:
    """Answer texts and character starts from any supported answers layout (None: start unknown)."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped[:1] in "[{":
            try:
                return normalize_answers(json.loads(stripped), context)
            except json.JSONDecodeError:
                pass
        return ([value], [None]) if stripped else ([], [])
    if value is None:
        return [], []
    if isinstance(value, dict):
        texts = value.get("text") or []
        texts = [texts] if isinstance(texts, str) else list(texts)
        starts = value.get("answer_start")
        starts = [starts] if isinstance(starts, int) else list(starts or [])
        return texts, [int(s) for s in starts] + [None] * (len(texts) - len(starts))
    if isinstance(value, list):
        texts, starts = [], []
        for item in value:
            item_texts, item_starts = normalize_answers(item, context)
            texts += item_texts
            starts += item_starts
        return texts, starts
    raise UserError(f"answers must be text, a list, or {{text, answer_start}}; got {type(value).__name__}")


def locate_answer(text: str, start: int | None, context: str) -> int | None:
    """The answer's character start in the context: the given one when it matches, else the nearest occurrence."""
    if start is not None and context[start : start + len(text)] == text:
        return start
    occurrences, position = [], context.find(text)
    while text and position != -1:
        occurrences.append(position)
        position = context.find(text, position + 1)
    if not occurrences:
        return None
    return min(occurrences, key=lambda found: abs(found - (start or 0)))


def _examples(dataset, task, data, split: str, source: str, labelled: bool) -> list[dict]:
    """Question, context and the first answer located in the context (the training target) of every row."""
    rows, not_found, unanswerable = [], 0, 0
    for index, row in enumerate(dataset):
        context, question = row[task.context_column], row[task.question_column]
        if not isinstance(context, str) or not context.strip() or not isinstance(question, str) or not question.strip():
            raise UserError(f"data.{split}: `{source}` row {file_rows(data, split, [index])[0]} has an empty question or context")
        example = {"question": question, "context": context, "answer_start": None, "trainable": True}
        if labelled:
            texts, starts = normalize_answers(row[task.answers_column], context)
            example["answers"] = texts  # every gold text, which evaluation scores against
            located = [locate_answer(text, start, context) for text, start in zip(texts, starts)]
            found = [(text, start) for text, start in zip(texts, located) if start is not None]
            if texts and not found:
                not_found += 1
                example["trainable"] = False  # no span to learn; still scored by text in evaluation
            elif found:
                example["answer_start"] = found[0][1]
                example["answer_text"] = found[0][0]
            else:
                unanswerable += 1
        rows.append(example)
    if not_found:
        log.warning(
            "data.%s: %d of %d answers do not occur in their context (`%s`); those questions are %s",
            split, not_found, len(rows), source, "left out of training" if split == "train" else "scored by text only",
        )
    if unanswerable and not task.allow_unanswerable:
        raise UserError(
            f"data.{split}: {unanswerable} of {len(rows)} questions in `{source}` have no answer (SQuAD v2 style); "
            "set task.allow_unanswerable: true to train on them, or remove them"
        )
    return rows


def prepare(recipe: Recipe, splits: dict, tokenizer, info: dict | None = None) -> tuple[dict, dict]:
    """Flatten answers, locate them in their contexts, and cut every example into overlapping windows."""
    task = recipe.task
    if not tokenizer.is_fast:
        raise UserError("model.name: extractive QA needs a fast tokenizer (offset mappings); this model has none")
    if task.doc_stride >= recipe.data.max_length // 2:
        raise UserError(
            f"task.doc_stride ({task.doc_stride}) must be well below half of data.max_length ({recipe.data.max_length})"
        )
    tokenized = {}
    for split, dataset in splits.items():
        source = split_origin(recipe.data, split)
        labelled = info is None or task.answers_column in dataset.column_names
        columns = [task.question_column, task.context_column] + ([task.answers_column] if labelled else [])
        require_columns(dataset, columns, split, source, "task.question_column/task.context_column/task.answers_column")
        examples = _examples(dataset, task, recipe.data, split, source, labelled)
        if labelled:
            _warn_long_answers(split, examples, tokenizer, task.max_answer_tokens)
        if split == "train":
            examples = [e for e in examples if e["trainable"]]
            if not examples:
                raise UserError(f"data.train: no answer in `{source}` occurs in its context; check the answers column")
        # Evaluation windows keep their example index and offsets so that predict() can map spans back to text,
        # and their context and gold answers so that periodic evaluation can score spans.
        tokenized[split] = _windows(examples, tokenizer, recipe, keep_metadata=split != "train")
        if split != "train" and labelled:
            indices = tokenized[split]["example_index"]
            tokenized[split] = tokenized[split].add_column("context", [examples[i]["context"] for i in indices])
            tokenized[split] = tokenized[split].add_column(
                "gold_answers", [json.dumps(examples[i]["answers"]) for i in indices]
            )
    return tokenized, decoding_settings(recipe)


def _warn_long_answers(split: str, examples: list[dict], tokenizer, max_tokens: int) -> None:
    """Predicted spans are capped at `task.max_answer_tokens`: a question whose every gold answer is longer can never
    be answered exactly, which the scores would show only as an unexplained loss."""
    groups = [[a for a in e["answers"] if a.strip()] for e in examples]
    groups = [group for group in groups if group]
    if not groups:
        return
    lengths = iter(len(ids) for ids in tokenizer([a for group in groups for a in group], add_special_tokens=False)["input_ids"])
    too_long = sum(min(next(lengths) for _ in group) > max_tokens for group in groups)
    if too_long:
        log.warning("data.%s: %d of %d questions have no gold answer within task.max_answer_tokens=%d tokens, so no "
                    "predicted span can match one whole; raise task.max_answer_tokens", split, too_long, len(groups), max_tokens)


def decoding_settings(recipe: Recipe) -> dict:
    """Window size, stride and span rules of a run: its task info, so that deployment decodes as evaluation did."""
    return {"max_length": recipe.data.max_length, **recipe.task.model_dump(include=set(_DECODING_KEYS))}


def _settings(info: dict) -> dict:
    """An adapter's decoding settings; schema defaults fill in what adapters trained elsewhere do not record."""
    defaults = {"max_length": DataSection.model_fields["max_length"].default}
    defaults.update({key: ExtractiveQATask.model_fields[key].default for key in _DECODING_KEYS})
    return {**defaults, **{key: info[key] for key in defaults if key in info}}


def _tokenize_windows(tokenizer, questions: list[str], contexts: list[str], max_length: int, stride: int):
    """Overlapping windows of each (question, context), and per window the context character span of every token.

    Offsets of question and special tokens are blanked ([-1, -1]) so that spans can only come from the context.
    """
    try:
        encoded = tokenizer(
            [question.lstrip() for question in questions], contexts, truncation="only_second", max_length=max_length,
            stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True,
        )
    except Exception as exc:  # the tokenizer refuses a question that leaves no room for the context
        raise UserError(f"a question does not fit a window of {max_length} tokens with its context: {str(exc)[:200]}") from None
    offsets = []
    for feature, mapping in enumerate(encoded["offset_mapping"]):
        sequence_ids = encoded.sequence_ids(feature)
        offsets.append([list(span) if sequence_ids[i] == 1 else [-1, -1] for i, span in enumerate(mapping)])
    return encoded, offsets


def _windows(examples: list[dict], tokenizer, recipe: Recipe, keep_metadata: bool):
    import datasets

    encoded, offsets = _tokenize_windows(
        tokenizer, [e["question"] for e in examples], [e["context"] for e in examples], recipe.data.max_length,
        recipe.task.doc_stride,
    )
    starts, ends = [], []
    for feature, example_index in enumerate(encoded["overflow_to_sample_mapping"]):
        start, end = _answer_tokens(examples[example_index], encoded["offset_mapping"][feature], encoded.sequence_ids(feature))
        starts.append(start)
        ends.append(end)
    columns = {name: encoded[name] for name in ("input_ids", "attention_mask", "token_type_ids") if name in encoded}
    columns.update(start_positions=starts, end_positions=ends)
    if keep_metadata:
        columns.update(example_index=list(encoded["overflow_to_sample_mapping"]), offset_mapping=offsets)
    return datasets.Dataset.from_dict(columns)


def _answer_tokens(example: dict, mapping, sequence_ids) -> tuple[int, int]:
    """Token start/end of the answer inside this window; (0, 0), the CLS token, when it is not inside."""
    if example["answer_start"] is None:
        return 0, 0
    answer_start = example["answer_start"]
    answer_end = answer_start + len(example["answer_text"])
    context_tokens = [i for i, sequence in enumerate(sequence_ids) if sequence == 1]
    first, last = context_tokens[0], context_tokens[-1]
    if mapping[first][0] > answer_start or mapping[last][1] < answer_end:
        return 0, 0
    start = first
    while start <= last and mapping[start][0] <= answer_start:
        start += 1
    end = last
    while end >= first and mapping[end][1] >= answer_end:
        end -= 1
    return start - 1, end + 1


def load_model(recipe: Recipe, info: dict):
    return build_model(recipe.model, recipe.quantization, AUTO_CLASS, keep_unquantized=list(HEAD_NAMES))


def head_modules(model) -> list[str]:
    present = {name.split(".")[-1] for name, _ in model.named_modules()}
    return [name for name in HEAD_NAMES if name in present]


def collator(tokenizer, recipe: Recipe):
    pad = DataCollatorWithPadding(tokenizer)

    def collate(features: list[dict]) -> dict:
        return pad([{k: v for k, v in f.items() if k not in _FEATURE_METADATA} for f in features])

    return collate


def compute_metrics(info: dict, validation):
    """Exact match and F1 of periodic evaluation, from the windows' own context and gold answers."""
    if validation is None or "gold_answers" not in validation.column_names:
        return None
    by_example = _features_by_example(validation["example_index"])
    context_column, gold_column = validation["context"], validation["gold_answers"]
    contexts = {example: context_column[features[0]] for example, features in by_example.items()}
    golds = {example: json.loads(gold_column[features[0]]) for example, features in by_example.items()}
    offsets, settings = validation["offset_mapping"], _settings(info)

    def compute(eval_prediction) -> dict[str, float]:
        start_logits, end_logits = eval_prediction.predictions[:2]
        matches, f1s = [], []
        for example, features in by_example.items():
            predicted = _answer(features, start_logits, end_logits, offsets, contexts[example], settings)["answer"]
            matches.append(exact_match(predicted, golds[example]))
            f1s.append(token_f1(predicted, golds[example]))
        return {"exact_match": float(np.mean(matches)), "f1": float(np.mean(f1s))}

    return compute


def _features_by_example(example_indices) -> dict[int, list[int]]:
    by_example: dict[int, list[int]] = {}
    for feature, example_index in enumerate(example_indices):
        by_example.setdefault(example_index, []).append(feature)
    return by_example


def predict(trainer, tokenized, raw, recipe: Recipe, info: dict) -> list[dict]:
    """Best span per question over all its windows (or "" when unanswerable wins), with EM/F1 when gold is known."""
    output = trainer.predict(tokenized)
    start_logits, end_logits = output.predictions[:2]
    by_example = _features_by_example(tokenized["example_index"])
    offsets = tokenized["offset_mapping"]
    task = recipe.task
    settings = decoding_settings(recipe)
    labelled = task.answers_column in raw.column_names
    records = []
    for example_index, row in enumerate(raw):
        context = row[task.context_column]
        features = by_example.get(example_index, [])
        predicted = _answer(features, start_logits, end_logits, offsets, context, settings)["answer"]
        record = {"id": row["id"]} if "id" in row else {}
        record.update(question=row[task.question_column], context=context, predicted=predicted)
        gold = normalize_answers(row[task.answers_column], context)[0] if labelled else []
        if gold or (labelled and task.allow_unanswerable):
            record.update(
                answers=gold, exact_match=exact_match(predicted, gold), f1=round(token_f1(predicted, gold), 4)
            )
        records.append(record)
    return records


def _answer(features, start_logits, end_logits, offsets, context: str, settings: dict) -> dict:
    """The best span over a question's windows as answer text, character start/end and score (start + end logit);
    empty (start/end None) when no span is valid, or when unanswerable questions are allowed and no-answer wins."""
    best, null_score = _best_span(features, start_logits, end_logits, offsets, settings["max_answer_tokens"])
    if best is None or (settings["allow_unanswerable"] and null_score > best[2] + settings["null_score_threshold"]):
        return {"answer": "", "start": None, "end": None, "score": round(null_score, 6) if features else None}
    start, end, score = best
    return {"answer": context[start:end], "start": start, "end": end, "score": round(score, 6)}


def _best_span(features, start_logits, end_logits, offsets, max_tokens: int):
    """((start char, end char, score) of the best valid span, or None; the lowest no-answer score over windows)."""
    best, null_score = None, float("inf")
    for feature in features:
        starts, ends, mapping = start_logits[feature], end_logits[feature], offsets[feature]
        null_score = min(null_score, float(starts[0] + ends[0]))
        top_starts = np.argsort(starts)[::-1][:N_BEST]
        top_ends = np.argsort(ends)[::-1][:N_BEST]
        for start in top_starts:
            for end in top_ends:
                if start >= len(mapping) or end >= len(mapping) or mapping[start][0] < 0 or mapping[end][0] < 0:
                    continue
                if end < start or end - start + 1 > max_tokens:
                    continue
                score = float(starts[start] + ends[end])
                if best is None or score > best[2]:
                    best = (mapping[start][0], mapping[end][1], score)
    return best, null_score


def score(records: list[dict], info: dict) -> dict[str, Any]:
    scored = [r for r in records if "f1" in r]
    if not scored:
        raise UserError("no question in this data has gold answers to score against; use `peftkit predict` instead")
    metrics = {
        "examples": len(scored),
        "exact_match": float(np.mean([r["exact_match"] for r in scored])),
        "f1": float(np.mean([r["f1"] for r in scored])),
    }
    answerable = [r for r in scored if any(a.strip() for a in r["answers"])]
    if len(answerable) < len(scored):  # SQuAD v2 reports both halves
        unanswerable = [r for r in scored if r not in answerable]
        metrics.update(
            has_answer_f1=float(np.mean([r["f1"] for r in answerable])) if answerable else None,
            no_answer_f1=float(np.mean([r["f1"] for r in unanswerable])),
            no_answer_examples=len(unanswerable),
        )
    return metrics


def report(records: list[dict], metrics: dict, split: str, run_dir: Path, worst: int) -> str:
    scored = [r for r in records if "f1" in r]
    lines = [
        "| exact match | F1 | examples |",
        "|---|---|---|",
        f"| {metrics['exact_match']:.2f} | {metrics['f1']:.2f} | {metrics['examples']} |",
        "",
    ]
    if "no_answer_f1" in metrics:
        has_answer = metrics["has_answer_f1"]
        lines += [
            f"Answerable questions F1 {has_answer:.2f}; unanswerable ({metrics['no_answer_examples']}) F1 "
            f"{metrics['no_answer_f1']:.2f}." if has_answer is not None else
            f"Unanswerable questions F1 {metrics['no_answer_f1']:.2f}.",
            "",
        ]
    lines += ["F1 by context length:", "", length_bucket_table([word_count(r["context"]) for r in scored], [r["f1"] for r in scored], "F1"), ""]
    lines.append(
        lowest_scoring_table(
            scored,
            {
                "question": lambda r: r["question"],
                "context": lambda r: r["context"],
                "reference": lambda r: r["answers"],
                "prediction": lambda r: r["predicted"],
                "F1": lambda r: r["f1"],
            },
            "f1",
            worst,
        )
    )
    return "\n".join(lines)


# --- inference for deployment (peftkit.deploy): windows of every row in one forward pass, spans per row ---

AUTO_CLASS = AutoModelForQuestionAnswering
INPUT_FIELDS = {"question": True, "context": True}
WINDOWS_LONG_INPUTS = True  # a context longer than the model's window is split, not refused
GENERATES = False
COMPLETES_PROMPTS = False


def model_kwargs(info: dict) -> dict:
    return {}


def inference_rows(recipe: Recipe, dataset) -> list[dict]:
    task = recipe.task
    return [{"question": row[task.question_column], "context": row[task.context_column]} for row in dataset]


def _window_logits(model, tokenizer, rows: list[dict], infos: list[dict], adapter_names: list[str] | None):
    """Per row: its windows' context offsets and start/end logits ([windows, tokens] each, padding cut off).

    Each row is windowed with its own adapter's settings; all windows run as one batch, each with its row's adapter.
    """
    windows, owners = [], []
    for i, (row, info) in enumerate(zip(rows, infos)):
        settings = _settings(info)
        encoded, offsets = _tokenize_windows(tokenizer, [row["question"]], [row["context"]], settings["max_length"], settings["doc_stride"])
        for feature, mapping in enumerate(offsets):
            windows.append({key: encoded[key][feature] for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded})
            owners.append((i, mapping))
    inputs = tokenizer.pad(windows, return_tensors="pt").to(model.device)
    names = {"adapter_names": [adapter_names[i] for i, _ in owners]} if adapter_names else {}
    with torch.inference_mode():
        output = model(**inputs, **names)
    per_row = [([], [], []) for _ in rows]
    for feature, (i, mapping) in enumerate(owners):
        offsets, starts, ends = per_row[i]
        offsets.append(mapping)
        starts.append(output.start_logits[feature, : len(mapping)].float().cpu())
        ends.append(output.end_logits[feature, : len(mapping)].float().cpu())
    return per_row


def forward_logits(model, tokenizer, rows: list[dict], adapter_names: list[str] | None = None,
                   infos: list[dict] | None = None) -> list[torch.Tensor]:
    """Start and end logits of every token of every window, one `[2, tokens]` tensor per row (argmax: best start/end)."""
    per_row = _window_logits(model, tokenizer, rows, infos or [{}] * len(rows), adapter_names)
    return [torch.stack([torch.cat(starts), torch.cat(ends)]) for _, starts, ends in per_row]


def infer(model, tokenizer, rows: list[dict], infos: list[dict], adapter_names: list[str] | None = None, **_generation) -> list[dict]:
    """The answer span of each row: text, character start/end in the context (end exclusive) and score."""
    answers = []
    for row, info, (offsets, starts, ends) in zip(rows, infos, _window_logits(model, tokenizer, rows, infos, adapter_names)):
        starts, ends = [s.numpy() for s in starts], [e.numpy() for e in ends]
        answers.append(_answer(range(len(offsets)), starts, ends, offsets, row["context"], _settings(info)))
    return answers
