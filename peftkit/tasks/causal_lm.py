"""Causal LM instruction / chat SFT: chat-formatted examples, loss on assistant turns only, padding-free batches.

Decoders also learn the downstream tasks generatively: the response is a label string, an answer, a
translation or a summary, and `task.response_metric` scores the text generated for each held-out prompt.
"""

from __future__ import annotations

import logging
import math
import re
import string
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, DataCollatorWithFlattening

from peftkit.data.sources import require_columns, split_origin
from peftkit.errors import UserError
from peftkit.evaluation import text_metrics
from peftkit.evaluation.analysis import markdown_cell
from peftkit.models.build import build_model
from peftkit.recipe.schema import Recipe
from peftkit.tasks import generation, labelled_text
from peftkit.tasks.generation import Decoding

log = logging.getLogger("peftkit")

PEFT_TASK_TYPE = "CAUSAL_LM"
DEFAULT_METRIC = "loss"
LOSS_SUMS_OVER_ITEMS = False  # the Trainer is not handed num_items_in_batch: the model averages over each batch's tokens
IGNORE_INDEX = -100

NAMED_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "plain": (
        "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\n' }}"
        "{% else %}{{ message['content'] + '\n' }}{% endif %}{% endfor %}"
    ),
}


# ---- turning rows into conversations -------------------------------------------------------------------------


def template_columns(template: str) -> list[str]:
    """Top-level columns a `{column}` / `{column[0][key]}` template reads."""
    fields = [field for _, field, _, _ in string.Formatter().parse(template) if field]
    return list(dict.fromkeys(re.split(r"[.\[]", field)[0] for field in fields))


def _render(template: str, row: dict, key: str) -> str:
    try:
        return template.format_map({k: "" if v is None else v for k, v in row.items()}).strip()
    except (KeyError, IndexError, TypeError) as exc:
        raise UserError(f"{key}: template {template!r} cannot be filled from a row with columns {list(row)}: {exc!r}") from None


def conversation(row: dict, recipe: Recipe, label_names: list[str] | None = None) -> list[dict]:
    """The chat messages of one row; the last message is the assistant response being learned/predicted."""
    task = recipe.task
    if task.messages_column:
        messages = row[task.messages_column]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages):
            raise UserError(
                f"task.messages_column: column {task.messages_column!r} must hold lists of {{role, content}} messages"
            )
        return [{"role": m["role"], "content": m["content"] or ""} for m in messages]
    messages = [{"role": "system", "content": task.system_prompt}] if task.system_prompt else []
    messages.append({"role": "user", "content": _render(task.prompt, row, "task.prompt")})
    if any(column not in row for column in template_columns(task.response)):
        return messages  # a prompt-only row (prediction input): nothing to learn or score
    response = _render(task.response, row, "task.response")
    if label_names and response.isdigit() and int(response) < len(label_names):
        response = label_names[int(response)]  # integer class ids index into the label strings
    return messages + [{"role": "assistant", "content": response}]


def prompt_and_response(messages: list[dict]) -> tuple[list[dict], str]:
    """Split off the final assistant turn: what generation is asked for, and the gold answer."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return messages, ""
    return messages[:last], messages[last]["content"]


# ---- tokenization with response-only labels --------------------------------------------------------------------


def use_chat_template(tokenizer, recipe: Recipe) -> None:
    """Install the recipe's named chat template, or check the tokenizer brings one."""
    name = recipe.task.chat_template
    if name != "auto":
        tokenizer.chat_template = NAMED_TEMPLATES[name]
    elif not tokenizer.chat_template:
        raise UserError(
            f"task.chat_template: the tokenizer of `{recipe.model.name}` has no chat template; "
            f"set task.chat_template to one of {sorted(NAMED_TEMPLATES)}"
        )


def _chat_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of every assistant turn (with its end-of-turn marker).

    Each assistant turn spans from the end of the conversation-so-far rendered with a generation prompt to the
    end of the conversation rendered through that turn; templates must render earlier turns unchanged.
    """
    text = _chat_text(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _chat_text(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _chat_text(tokenizer, messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise UserError(
                "task.chat_template: the chat template renders earlier turns differently once later turns follow, "
                "so the response tokens cannot be located; use task.chat_template: chatml"
            )
        spans.append((len(before), len(through)))
    return text, spans


def encode(tokenizer, messages: list[dict], max_length: int) -> dict[str, list[int]] | None:
    """input_ids and labels (prompt tokens = -100); None when no response token survives truncation."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length)
    labels = [
        token if any(start <= begin < end for start, end in spans) and end_char > begin else IGNORE_INDEX
        for token, (begin, end_char) in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": list(encoded["input_ids"]), "labels": labels}


def prepare(recipe: Recipe, splits: dict, tokenizer, info: dict | None = None) -> tuple[dict, dict]:
    """Check columns, render conversations with the chat template and tokenize with response-only labels.

    `info` (a saved run's task info) fixes the label strings instead of deriving them from `splits['train']`;
    its splits may then hold prompts only (no response columns, or chats without an assistant turn), which
    `predict` generates for without scoring.
    """
    import datasets

    task = recipe.task
    use_chat_template(tokenizer, recipe)
    prompt_columns = [task.messages_column] if task.messages_column else template_columns(task.prompt)
    response_columns = [] if task.messages_column else template_columns(task.response)
    for split, dataset in splits.items():
        prompts_only = info is not None and not set(response_columns) <= set(dataset.column_names)
        columns = prompt_columns + ([] if prompts_only else response_columns)
        require_columns(dataset, columns, split, split_origin(recipe.data, split), "task.prompt/task.response/task.messages_column")
    names = None
    if task.response_metric == "classification":
        names = info["labels"] if info else _label_names(recipe, splits["train"])

    tokenized = {}
    for split, dataset in splits.items():
        rows, empty, truncated = {"input_ids": [], "labels": []}, 0, 0
        for row in dataset:
            messages = conversation(row, recipe, names)
            if not prompt_and_response(messages)[1].strip():
                empty += 1
                continue
            if names is not None:
                _check_label(prompt_and_response(messages)[1], names, split, recipe)
            example = encode(tokenizer, messages, recipe.data.max_length)
            if example is None:
                truncated += 1
                continue
            rows["input_ids"].append(example["input_ids"])
            rows["labels"].append(example["labels"])
        origin = split_origin(recipe.data, split)
        if empty and info is None:
            log.warning("data.%s: skipped %d of %d rows with an empty response (%s)", split, empty, len(dataset), origin)
        if truncated:
            log.warning(
                "data.%s: skipped %d of %d rows whose response starts beyond data.max_length=%d tokens",
                split, truncated, len(dataset), recipe.data.max_length,
            )
        if not rows["input_ids"] and info is None:
            raise UserError(f"data.{split}: no row of `{origin}` has a non-empty response within data.max_length")
        tokenized[split] = datasets.Dataset.from_dict(rows)
    info: dict[str, Any] = {"response_metric": task.response_metric}
    if names is not None:
        info["labels"] = names
    return tokenized, info


def _label_names(recipe: Recipe, train) -> list[str]:
    if recipe.task.labels:
        return list(recipe.task.labels)
    return sorted({prompt_and_response(conversation(row, recipe))[1] for row in train} - {""})


def _check_label(response: str, names: list[str], split: str, recipe: Recipe) -> None:
    if response not in names:
        raise UserError(
            f"data.{split}: response {response!r} of `{split_origin(recipe.data, split)}` is not one of the labels "
            f"{names}; fix the data or list every label in task.labels"
        )


# ---- training -------------------------------------------------------------------------------------------------


def load_model(recipe: Recipe, info: dict):
    return build_model(recipe.model, recipe.quantization, AutoModelForCausalLM, keep_unquantized=["lm_head"])


def head_modules(model) -> list[str]:
    return []  # the LM head is the pretrained one; adapters on the body are enough


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


def compute_metrics(info: dict):
    return None  # periodic evaluation is the response loss; generation is scored once at the end


# ---- prediction and scoring --------------------------------------------------------------------------------


@torch.no_grad()
def response_losses(model, examples: list[dict]) -> list[tuple[float, int]]:
    """Summed negative log-likelihood and token count of each example's response tokens."""
    device = next(model.parameters()).device
    results = []
    for example in examples:
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


def generate(model, tokenizer, prompts: list[list[dict]], recipe: Recipe, batch_size: int) -> list[str]:
    """Continuations of each chat prompt with the recipe's decoding settings (left-padded batches)."""
    decoding = Decoding.from_settings(recipe.generation)
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(prompts), batch_size):
        texts = [_chat_text(tokenizer, messages, add_generation_prompt=True) for messages in prompts[start : start + batch_size]]
        batch = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt").to(device)
        answers = generation.generate(model, tokenizer, batch, batch["input_ids"].shape[1], recipe.generation.max_new_tokens, decoding)
        outputs += [answer["text"].strip() for answer in answers]
    return outputs


def predict(trainer, tokenized, raw, recipe: Recipe, info: dict) -> list[dict]:
    """One record per row: prompt and generated response; a row with a gold response adds it and its loss.

    Rows without a response (prompt-only inputs) are generated for and left unscored; rows whose response
    truncation removes entirely are skipped, as in training.
    """
    model, tokenizer = trainer.model, trainer.processing_class
    model.eval()
    names = info.get("labels")
    kept = []
    for row in raw:
        messages = conversation(row, recipe, names)
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


# --- inference for deployment (peftkit.deploy): attach adapters, generate, compare logits ---

AUTO_CLASS = AutoModelForCausalLM
GENERATES = True
INPUT_FIELDS = {"prompt": True}
WINDOWS_LONG_INPUTS = False
COMPLETES_PROMPTS = True  # rows are {"prompt": text}: the server's completions and chat endpoints


def model_kwargs(info: dict) -> dict:
    return {}


def inference_rows(recipe: Recipe, dataset) -> list[dict]:
    """Each row's conversation as plain text (message contents, one per line): prompt and response, so that merge
    verification compares the logits on the response tokens the adapter learned."""
    names = recipe.task.labels
    return [{"prompt": "\n".join(m["content"] for m in conversation(row, recipe, names))} for row in dataset]


def forward_logits(model, tokenizer, rows: list[dict], adapter_names: list[str] | None = None,
                   infos: list[dict] | None = None) -> list[torch.Tensor]:
    """Next-token logits at every prompt position, one `[tokens, vocab]` tensor per row.

    Right padding keeps each row's positions identical to running it alone.
    """
    inputs = tokenizer([row["prompt"] for row in rows], padding=True, padding_side="right", return_tensors="pt").to(model.device)
    with torch.inference_mode():
        logits = model(**inputs, **({"adapter_names": adapter_names} if adapter_names else {})).logits
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    return [row_logits[:length].float().cpu() for row_logits, length in zip(logits, lengths)]


def infer(
    model, tokenizer, rows: list[dict], infos: list[dict], adapter_names: list[str] | None = None,
    max_new_tokens: list[int] | int = generation.DEFAULT_MAX_NEW_TOKENS, decoding: Decoding = Decoding(), streamer=None,
) -> list[dict]:
    """Continuation of each prompt (`peftkit.tasks.generation`); `max_new_tokens` may differ per row."""
    inputs = tokenizer([row["prompt"] for row in rows], padding=True, padding_side="left", return_tensors="pt").to(model.device)
    return generation.generate(
        model, tokenizer, inputs, inputs["input_ids"].shape[1], max_new_tokens, decoding, adapter_names, streamer
    )


def prompt_from_messages(tokenizer, messages: list[dict]) -> str:
    """Chat messages as one prompt: the tokenizer's chat template when it has one, else `role: content` lines."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{message['role']}: {message['content']}\n" for message in messages) + "assistant:"


