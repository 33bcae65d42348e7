"""Chat formatting: a row -> chat messages (in the row's dataset format), messages -> text with the chat template,
and token labels that keep only the assistant turns (the response-only loss).

Shared by every decoder task (instruction SFT, preference tuning) so that a trained and a served model see the
same rendering. Row formats themselves (alpaca, ShareGPT, ...) are detected and converted in `data.formats`.
"""

from __future__ import annotations

import re
import string

from peftkit.data import formats
from peftkit.errors import UserError

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


def conversation(row: dict, task, label_names: list[str] | None = None, data_format: str = "template") -> list[dict]:
    """The chat messages of one row; the last message is the assistant response being learned/predicted.

    `data_format` is what `formats.detect_chat_format` found for the row's split; `template` fills the recipe's
    `task.prompt` / `task.response` templates.
    """
    if data_format != "template":
        messages = formats.row_messages(row, data_format, task.messages_column)
        if task.system_prompt and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": task.system_prompt}, *messages]
        return messages
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


# ---- rendering and response-only labels ----------------------------------------------------------------------


def use_chat_template(tokenizer, task, model_name: str) -> None:
    """Install the recipe's named chat template, or check the tokenizer brings one."""
    name = task.chat_template
    if name != "auto":
        tokenizer.chat_template = NAMED_TEMPLATES[name]
    elif not tokenizer.chat_template:
        raise UserError(
            f"task.chat_template: the tokenizer of `{model_name}` has no chat template; "
            f"set task.chat_template to one of {sorted(NAMED_TEMPLATES)}"
        )


def chat_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of every assistant turn (with its end-of-turn marker).

    Each assistant turn spans from the end of the conversation-so-far rendered with a generation prompt to the
    end of the conversation rendered through that turn; templates must render earlier turns unchanged.
    """
    text = chat_text(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = chat_text(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = chat_text(tokenizer, messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise UserError(
                "task.chat_template: the chat template renders earlier turns differently once later turns follow, "
                "so the response tokens cannot be located; use task.chat_template: chatml"
            )
        spans.append((len(before), len(through)))
    return text, spans


def encode(tokenizer, messages: list[dict], max_length: int) -> dict | None:
    """input_ids and labels (prompt tokens = -100), and `cut`: whether truncation cut off the end of the last
    response (it then trains without its end-of-turn marker); None when no response token survives truncation."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length)
    labels = [
        token if any(start <= begin < end for start, end in spans) and end_char > begin else IGNORE_INDEX
        for token, (begin, end_char) in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    last_end = len(text[: spans[-1][1]].rstrip())
    cut = len(encoded["input_ids"]) >= max_length and encoded["offset_mapping"][-1][1] < last_end
    return {"input_ids": list(encoded["input_ids"]), "labels": labels, "cut": cut}


def encode_text(tokenizer, text: str, max_length: int) -> list[dict[str, list[int]]]:
    """Raw text for continued pre-training: every token is a label; a long text becomes several max_length pieces
    (cut, not dropped), each ending where the next begins."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]  # documents stay separable when packed
    pieces = [ids[start : start + max_length] for start in range(0, len(ids), max_length)]
    return [{"input_ids": piece, "labels": list(piece)} for piece in pieces if len(piece) > 1]
