"""Causal LM instruction / chat SFT: chat-formatted examples, loss on assistant turns only, padding-free batches.

Decoders also learn the downstream tasks generatively: the response is a label string, an answer, a
translation or a summary, and `task.response_metric` scores the text generated for each held-out prompt.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

from peftkit.data import formats
from peftkit.data.chat import (
    IGNORE_INDEX,
    conversation,
    encode,
    encode_text,
    prompt_and_response,
    template_columns,
    use_chat_template,
)
from peftkit.data.sources import require_columns, split_origin
from peftkit.errors import UserError
from peftkit.evaluation import text_metrics
from peftkit.evaluation.analysis import markdown_cell
from peftkit.recipe.schema import Recipe
from peftkit.tasks import labelled_text
from peftkit.tasks.decoder import (  # noqa: F401  (the decoder half of this task's contract)
    AUTO_CLASS,
    COMPLETES_PROMPTS,
    GENERATES,
    INPUT_FIELDS,
    WINDOWS_LONG_INPUTS,
    forward_logits,
    generate,
    head_modules,
    infer,
    load_model,
    model_kwargs,
    prompt_from_messages,
)

log = logging.getLogger("peftkit")

PEFT_TASK_TYPE = "CAUSAL_LM"
DEFAULT_METRIC = "loss"
LOSS_SUMS_OVER_ITEMS = False  # the Trainer is not handed num_items_in_batch: the model averages over each batch's tokens

def detect_format(task, dataset, origin: str, split: str) -> str:
    """The split's row format: `task.format`, else detected from its columns (see `peftkit.data.formats`).

    Templates that differ from the defaults mean `template`; rows are then filled from the columns they name.
    """
    if task.messages_column:
        return "messages"
    if task.format != "auto":
        return task.format
    defaults = type(task).model_fields
    if task.prompt != defaults["prompt"].default or task.response != defaults["response"].default:
        return "template"
    return formats.detect(dataset.column_names, _known_formats(task), origin, f"data.{split}")


def _known_formats(task) -> dict[str, tuple[str, ...]]:
    """Chat formats in detection order, with the recipe's templates between prompt/completion and raw text."""
    known = dict(formats.CHAT_FORMATS)
    text = known.pop("text")
    return {**known, "template": tuple(template_columns(task.prompt) + template_columns(task.response)), "text": text}


def prepare(recipe: Recipe, splits: dict, tokenizer, info: dict | None = None) -> tuple[dict, dict]:
    """Detect each split's format, render conversations with the chat template and tokenize with response-only
    labels (raw text: every token), through `datasets.map` so a second run over the same data and tokenizer
    reads the tokenized rows from the datasets cache.

    `info` (a saved run's task info) fixes the label strings and the format instead of deriving them from
    `splits['train']`; its splits may then hold prompts only (no response columns, or chats without an assistant
    turn), which `predict` generates for without scoring.
    """
    task = recipe.task
    use_chat_template(tokenizer, task, recipe.model.name)
    split_formats = {}
    for split, dataset in splits.items():
        origin = split_origin(recipe.data, split)
        data_format = info.get("format", "template") if info else detect_format(task, dataset, origin, split)
        split_formats[split] = data_format
        if data_format == "template":
            prompt_columns = template_columns(task.prompt)
            response_columns = template_columns(task.response)
            prompts_only = info is not None and not set(response_columns) <= set(dataset.column_names)
            columns = prompt_columns + ([] if prompts_only else response_columns)
            require_columns(dataset, columns, split, origin, "task.prompt/task.response/task.messages_column")
        elif info is None:
            known = _known_formats(task) if not task.messages_column else {"messages": (task.messages_column,)}
            formats.check_rows(dataset, data_format, known, recipe.data, split)
    train_format = split_formats.get("train", next(iter(split_formats.values())))
    if len(set(split_formats.values())) > 1 and info is None:
        raise UserError(
            f"data: splits have different formats {split_formats}; give every split the same format (or convert "
            "the evaluation files to the training format)"
        )
    if train_format == "text" and task.response_metric != "none":
        raise UserError("task.response_metric: raw text (continued pre-training) has no responses to score; set it to none")
    names = None
    if task.response_metric == "classification":
        names = info["labels"] if info else _label_names(recipe, splits["train"], train_format)
        for split, dataset in splits.items():
            for row in dataset:
                response = prompt_and_response(conversation(row, task, names, train_format))[1]
                if response.strip():
                    _check_label(response, names, split, recipe)

    tokenized = {}
    for split, dataset in splits.items():
        origin = split_origin(recipe.data, split)
        encoded = dataset.map(
            _encode_rows, batched=True, remove_columns=dataset.column_names, num_proc=recipe.data.num_proc,
            fn_kwargs={"tokenizer": tokenizer, "task": task, "names": names, "data_format": train_format,
                       "max_length": recipe.data.max_length},
            desc=f"Tokenizing data.{split}",
        )
        counts = {status: 0 for status in ("ok", "cut", "empty", "truncated")}
        for status in encoded["status"]:
            counts[status] += 1
        if counts["empty"] and info is None:
            log.warning("data.%s: skipped %d of %d rows with an empty response (%s)", split, counts["empty"], len(dataset), origin)
        if counts["truncated"]:
            log.warning(
                "data.%s: skipped %d of %d rows whose response starts beyond data.max_length=%d tokens",
                split, counts["truncated"], len(dataset), recipe.data.max_length,
            )
        if counts["cut"]:
            log.warning(
                "data.%s: %d of %d rows have a response that runs past data.max_length=%d tokens and is cut (learned "
                "without its end, so the model does not learn to stop there); raise data.max_length to keep them whole",
                split, counts["cut"], len(dataset), recipe.data.max_length,
            )
        if not counts["ok"] + counts["cut"] and info is None:
            raise UserError(f"data.{split}: no row of `{origin}` has a non-empty response within data.max_length")
        kept = encoded.filter(lambda batch: [status in ("ok", "cut") for status in batch["status"]], batched=True,
                              desc=f"Keeping data.{split} rows with a response")
        tokenized[split] = kept.remove_columns("status")
    info: dict[str, Any] = {"response_metric": task.response_metric, "format": train_format}
    if names is not None:
        info["labels"] = names
    return tokenized, info



def _encode_rows(batch: dict, tokenizer, task, names, data_format: str, max_length: int) -> dict:
    """`datasets.map` body: a batch of rows -> examples with a status (`ok`; `cut`: kept, its response cut by
    max_length; or why the row is skipped); a raw text may give several examples."""
    out = {"input_ids": [], "labels": [], "status": []}
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    for row in rows:
        if data_format == "text":
            examples = encode_text(tokenizer, row["text"] or "", max_length)
            status = "ok" if examples else "empty"
        else:
            messages = conversation(row, task, names, data_format)
            example = encode(tokenizer, messages, max_length) if prompt_and_response(messages)[1].strip() else None
            examples = [example] if example else []
            if example:
                status = "cut" if example["cut"] else "ok"
            else:
                status = "truncated" if prompt_and_response(messages)[1].strip() else "empty"
        for example in examples or [{"input_ids": [], "labels": []}]:
            out["input_ids"].append(example["input_ids"])
            out["labels"].append(example["labels"])
            out["status"].append(status)
    return out


def _label_names(recipe: Recipe, train, data_format: str) -> list[str]:
    if recipe.task.labels:
        return list(recipe.task.labels)
    return sorted({prompt_and_response(conversation(row, recipe.task, None, data_format))[1] for row in train} - {""})


def _check_label(response: str, names: list[str], split: str, recipe: Recipe) -> None:
    if response not in names:
        raise UserError(
            f"data.{split}: response {response!r} of `{split_origin(recipe.data, split)}` is not one of the labels "
            f"{names}; fix the data or list every label in task.labels"
        )


# ---- training -------------------------------------------------------------------------------------------------


def collator(tokenizer, recipe: Recipe):
    """Packing: one row per batch with position_ids restarting per example, which transformers turns into a
    block-diagonal causal mask (no attention across examples, no pad tokens computed)."""
    if recipe.task.packing:
        return packed_batches
    tokenizer.padding_side = "right"  # positions then start at 0 for every example, as when packed
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)


_flatten = DataCollatorWithFlattening()


def packed_batches(features: list[dict]) -> dict:
    # transformers only derives the block-diagonal mask from position_ids when no KV cache is built, and models
    # build one by default (config.use_cache) even in training; without this, examples attend to each other.
    return {**_flatten(features), "use_cache": False}


def compute_metrics(info: dict, validation):
    return None  # periodic evaluation is the response loss; generation is scored once at the end


# ---- prediction and scoring --------------------------------------------------------------------------------


@torch.no_grad()
def response_losses(model, examples: list[dict]) -> list[tuple[float, int]]:
    """Summed negative log-likelihood and token count of each example's response tokens."""
    device = next(model.parameters()).device
    results = []
    for example in tqdm(examples, desc="scoring responses", unit="example", disable=not examples):
        input_ids = torch.tensor([example["input_ids"]], device=device)
        labels = torch.tensor([example["labels"]], device=device)
        # Prompt tuning and P-tuning prepend virtual tokens to the logits; the last positions are the input's.
        logits = model(input_ids=input_ids).logits[:, -input_ids.shape[1] : -1].float()
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        results.append((float(losses), int((targets != IGNORE_INDEX).sum())))
    return results


def predict(trainer, tokenized, raw, recipe: Recipe, info: dict) -> list[dict]:
    """One record per row: prompt and generated response; a row with a gold response adds it and its loss.

    Rows without a response (prompt-only inputs) are generated for and left unscored; rows whose response
    truncation removes entirely are skipped, as in training.
    """
    model, tokenizer = trainer.model, trainer.processing_class
    model.eval()
    names = info.get("labels")
    data_format = info.get("format", "template")
    if data_format == "text":
        return _text_records(model, tokenizer, raw, recipe)
    kept = []
    for row in raw:
        messages = conversation(row, recipe.task, names, data_format)
        prompt, gold = prompt_and_response(messages)
        if not gold.strip():
            kept.append((prompt, None, None))
            continue
        example = encode(tokenizer, messages, recipe.data.max_length)
        if example is not None:
            kept.append((prompt, gold, example))
    losses = iter(response_losses(model, [example for _, _, example in kept if example is not None]))
    batch_size = recipe.training.eval_batch_size or 2 * recipe.training.batch_size
    generated = generate(model, tokenizer, [prompt for prompt, _, _ in kept], recipe, batch_size)
    records = []
    for (prompt, gold, example), output in zip(kept, generated):
        record = {"prompt": prompt[-1]["content"] if prompt else "", "generated": output}
        if names is not None:
            record.update(text=record["prompt"], predicted=match_label(output, names))
        if example is not None:
            nll, tokens = next(losses)
            record.update(gold=gold, loss=round(nll / tokens, 6), tokens=tokens)
            if names is not None:
                record["gold_probability"] = math.exp(-nll)
        records.append(record)
    return records


def _text_records(model, tokenizer, raw, recipe: Recipe) -> list[dict]:
    """Raw text (continued pre-training) is scored by its loss on every token; nothing is generated."""
    pieces = [(row["text"], piece) for row in raw for piece in encode_text(tokenizer, row["text"] or "", recipe.data.max_length)]
    return [
        {"prompt": text[:200], "generated": "", "gold": "", "loss": round(nll / max(tokens, 1), 6), "tokens": tokens}
        for (text, _), (nll, tokens) in zip(pieces, response_losses(model, [piece for _, piece in pieces]))
    ]


def match_label(generated: str, names: list[str]) -> str:
    """The label the generation names: an exact (case-insensitive) match, else the longest label it starts with."""
    text = generated.strip().lower()
    for name in names:
        if text == name.lower():
            return name
    starts = [name for name in names if text.startswith(name.lower())]
    return max(starts, key=len) if starts else generated.strip()


def score(records: list[dict], info: dict) -> dict[str, Any]:
    records = _scored(records)
    tokens = sum(r["tokens"] for r in records)
    loss = sum(r["loss"] * r["tokens"] for r in records) / max(tokens, 1)
    metrics: dict[str, Any] = {"examples": len(records), "loss": loss, "perplexity": math.exp(min(loss, 50))}
    metric = info["response_metric"]
    if metric == "classification":
        metrics.update(labelled_text.score(records, info))
    elif metric == "qa":
        metrics["exact_match"] = _mean(text_metrics.exact_match(r["generated"], [r["gold"]]) for r in records)
        metrics["f1"] = _mean(text_metrics.token_f1(r["generated"], [r["gold"]]) for r in records)
    elif metric == "bleu":
        metrics.update(text_metrics.bleu_and_chrf([r["generated"] for r in records], [[r["gold"]] for r in records]))
    elif metric == "rouge":
        per_example = [text_metrics.rouge(r["generated"], [r["gold"]]) for r in records]
        metrics.update({name: _mean(scores[name] for scores in per_example) for name in text_metrics.ROUGE_TYPES})
    return metrics


def _scored(records: list[dict]) -> list[dict]:
    return [record for record in records if "gold" in record]  # prompt-only rows have nothing to score


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)


HEADLINE_METRICS = ("loss", "perplexity", "exact_match", "f1", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum")


def report(records: list[dict], metrics: dict, split: str, run_dir: Path, worst: int) -> str:
    """Headline metrics on generated text, then the examples whose gold response the model found least likely."""
    records = _scored(records)
    if "confusion_matrix" in metrics:
        lines = [f"Response loss {metrics['loss']:.4f} (perplexity {metrics['perplexity']:.2f}); labels generated:", ""]
        lines.append(labelled_text.report(records, metrics, split, run_dir, worst))
        return "\n".join(lines)
    shown = [name for name in HEADLINE_METRICS if name in metrics]
    lines = [
        "| " + " | ".join(shown) + " | examples |",
        "|" + "---|" * (len(shown) + 1),
        "| " + " | ".join(f"{metrics[name]:.4f}" for name in shown) + f" | {metrics['examples']} |",
        "",
    ]
    if worst and records:
        hardest = sorted(records, key=lambda r: -r["loss"])[:worst]
        lines += [f"Highest-loss responses, {len(hardest)} of {len(records)}:", ""]
        lines += ["| prompt | gold | generated | loss |", "|---|---|---|---|"]
        for record in hardest:
            lines.append(
                f"| {markdown_cell(record['prompt'])} | {markdown_cell(record['gold'])} "
                f"| {markdown_cell(record['generated'])} | {record['loss']:.3f} |"
            )
    return "\n".join(lines)


# --- inference for deployment: the shared decoder half (peftkit.tasks.decoder) plus this task's rows ---


def inference_rows(recipe: Recipe, dataset) -> list[dict]:
    """Each row's conversation as plain text (message contents, one per line): prompt and response, so that merge
    verification compares the logits on the response tokens the adapter learned."""
    names = recipe.task.labels
    data_format = detect_format(recipe.task, dataset, "merge verification data", "test")
    if data_format == "text":
        return [{"prompt": row["text"]} for row in dataset]
    return [{"prompt": "\n".join(m["content"] for m in conversation(row, recipe.task, names, data_format))} for row in dataset]
