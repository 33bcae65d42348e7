"""The dataset formats practitioners already have, recognised by their columns and turned into chat messages.

Instruction / chat data (one split = one format):
- `messages`: OpenAI `[{role, content}, ...]`
- `sharegpt`: `conversations` of `{from, value}` with human/gpt/system roles
- `alpaca`: `instruction`, optional `input`, `output`
- `prompt_completion`: `prompt`, `completion` (strings, or message lists as TRL's conversational form)
- `text`: raw text for continued pre-training (loss on every token)
- `template`: the recipe's `task.prompt` / `task.response` templates over any columns

Preference data:
- `explicit`: `prompt`, `chosen`, `rejected` (strings or message lists)
- `implicit`: `chosen`, `rejected` holding whole dialogues that share every turn but the last (Anthropic HH-RLHF
  text with `\\n\\nHuman:` / `\\n\\nAssistant:` markers, or message lists); the shared turns are the prompt
- `unpaired`: `prompt`, `completion`, `label` (true = desirable), KTO's form

TRL's helpers do the conversions they cover (`maybe_convert_to_chatml` for ShareGPT keys, `extract_prompt` for
the shared prefix of message lists); what is added here is detection and row-level errors that name the fix.
"""

from __future__ import annotations

import re

from trl.data_utils import extract_prompt, maybe_convert_to_chatml

from peftkit.data.sources import file_rows, split_origin
from peftkit.errors import UserError
from peftkit.recipe.schema import DataSection

# Identifying columns, in detection order (more specific first).
CHAT_FORMATS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
PREFERENCE_FORMATS: dict[str, tuple[str, ...]] = {
    "explicit": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "implicit": ("chosen", "rejected"),
}
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def detect(column_names: list[str], known: dict[str, tuple[str, ...]], origin: str, key: str) -> str:
    """The first known format whose identifying columns are all present; else an error listing what was found."""
    for name, columns in known.items():
        if set(columns) <= set(column_names):
            return name
    accepted = "; ".join(f"{name}: {', '.join(columns)}" for name, columns in known.items())
    raise UserError(
        f"{key}: cannot tell the data format of `{origin}` from its columns {column_names}. Accepted formats and "
        f"their columns: {accepted}. Rename columns with data.<split>.rename, or set the format"
    )


def check_rows(dataset, data_format: str, known: dict[str, tuple[str, ...]], data: DataSection, split: str) -> None:
    """Every row carries its format's columns, and a chat row's messages have known roles and text content (named
    by row here, before tokenizing). A JSON-lines file mixing formats loads as the union of their columns with missing
    values, which would silently train on empty turns; name the first row of each format instead."""
    origin = split_origin(data, split)

    def file_row(position: int) -> int | str:
        return file_rows(data, split, [position])[0]

    needed = known[data_format]
    for position, row in enumerate(dataset.select_columns(sorted({c for cs in known.values() for c in cs} & set(dataset.column_names)))):
        if all(row.get(column) is not None for column in needed):
            if data_format in CHAT_FORMATS and data_format != "text":
                try:
                    row_messages(row, data_format, needed[0] if data_format == "messages" else None)
                except UserError as error:
                    raise UserError(f"`{origin}` row {file_row(position)}: {error}; fix or remove that row") from None
            continue
        other = next((name for name, columns in known.items()
                      if name != data_format and all(row.get(column) is not None for column in columns)), None)
        if other:
            raise UserError(
                f"`{origin}` mixes data formats: rows are `{data_format}` ({', '.join(needed)}) but row {file_row(position)} is "
                f"`{other}` ({', '.join(known[other])}); put each format in its own file (a split may list several "
                "sources: data.train: [{path: a.jsonl}, {path: b.jsonl}])"
            )
        missing = [column for column in needed if row.get(column) is None]
        raise UserError(f"`{origin}` row {file_row(position)} has no value for {missing} (format `{data_format}`); fill or remove that row")


def _check_messages(messages, what: str) -> list[dict]:
    """Messages with a known role and text content. A misspelt role (`usr`, `asistant`) is refused: chat templates
    render any role name, so the turn would train as text under that name, or not as the response."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages):
        raise UserError(f"{what} must be a list of {{role, content}} messages")
    unknown = sorted({str(m["role"]) for m in messages} - set(MESSAGE_ROLES))
    if unknown:
        raise UserError(f"{what}: role(s) {unknown} are not one of {list(MESSAGE_ROLES)}")
    empty = sorted({m["role"] for m in messages if m["content"] is None and m["role"] != "assistant"})
    if empty:
        raise UserError(f"{what}: a {empty[0]} message has no content (null); only an assistant turn may be empty")
    return [{"role": m["role"], "content": _message_text(m["content"], what)} for m in messages]


def _message_text(content, what: str) -> str:
    """Text, nothing (an assistant turn that only calls tools), or OpenAI's list of text parts, joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    raise UserError(f"{what}: a message's content must be text or a list of {{type: text, text}} parts, not {content!r:.80}")


def as_messages(value, role: str, what: str) -> list[dict]:
    """A string is one `role` turn; a list must already be messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _check_messages(value, what)


def row_messages(row: dict, data_format: str, messages_column: str | None = None) -> list[dict]:
    """One instruction / chat row as chat messages."""
    if data_format == "messages":
        column = messages_column or "messages"
        return _check_messages(row[column], f"column {column!r}")
    if data_format == "sharegpt":
        converted = maybe_convert_to_chatml({"conversations": [dict(turn) for turn in row["conversations"] or []]})
        messages = converted["messages"]
        if all(isinstance(m, dict) for m in messages):
            unknown = sorted({str(m.get("role")) for m in messages} - set(SHAREGPT_ROLES))
            if unknown:
                raise UserError(f"ShareGPT `from` value(s) {unknown} are not one of {sorted(SHAREGPT_ROLES)}")
            messages = [{**m, "role": SHAREGPT_ROLES[m["role"]]} for m in messages]
        return _check_messages(messages, "ShareGPT column 'conversations'")
    if data_format == "alpaca":
        instruction = row["instruction"] or ""
        prompt = [{"role": "user", "content": f"{instruction}\n\n{row['input']}" if row.get("input") else instruction}]
        # A prompt-only row (prediction input) has no output column.
        return prompt + ([{"role": "assistant", "content": row["output"] or ""}] if "output" in row else [])
    if data_format == "prompt_completion":
        prompt = as_messages(row["prompt"], "user", "column 'prompt'")
        return prompt + (as_messages(row["completion"] or "", "assistant", "column 'completion'") if "completion" in row else [])
    raise ValueError(f"no chat messages for format {data_format!r}")


# ---- preference rows -------------------------------------------------------------------------------------------


def dialogue_messages(text: str) -> list[dict] | None:
    """Anthropic HH-RLHF dialogue text (`\\n\\nHuman: ...\\n\\nAssistant: ...`) as messages; None if it is not one."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": content.strip()} for speaker, content in zip(parts[1::2], parts[2::2])]


def preference_row(row: dict, data_format: str, where: str) -> dict:
    """One preference row as TRL's conversational form: `{prompt, chosen, rejected}` (or `{prompt, completion,
    label}`) of message lists. `where` names the file and row in errors."""
    if data_format == "unpaired":
        label = row["label"]
        if not isinstance(label, bool):
            raise UserError(f"{where}: label {label!r} must be true (desirable) or false (undesirable)")
        completion = as_messages(row["completion"], "assistant", f"{where}: completion")
        _require_response(completion, "completion", where)
        return {"prompt": as_messages(row["prompt"], "user", f"{where}: prompt"), "completion": completion, "label": label}
    if data_format == "explicit":
        prompt = as_messages(row["prompt"], "user", f"{where}: prompt")
        chosen = as_messages(row["chosen"], "assistant", f"{where}: chosen")
        rejected = as_messages(row["rejected"], "assistant", f"{where}: rejected")
    else:
        chosen, rejected = (_whole_dialogue(row[name], f"{where}: {name}") for name in ("chosen", "rejected"))
        parts = extract_prompt({"chosen": chosen, "rejected": rejected})
        prompt, chosen, rejected = parts["prompt"], parts["chosen"], parts["rejected"]
        if chosen == rejected:
            pass  # reported below as identical responses
        elif not prompt or len(chosen) != 1 or len(rejected) != 1:
            raise UserError(
                f"{where}: `chosen` and `rejected` must share every turn but the last (the implicit prompt), but "
                f"they differ {'from the first turn' if not prompt else 'before their last turn'}; give the prompt "
                "explicitly in a `prompt` column, or fix the row"
            )
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        _require_response(response, name, where)
    if chosen == rejected:
        raise UserError(f"{where}: `chosen` and `rejected` are identical, which teaches no preference; remove the row")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _whole_dialogue(value, what: str) -> list[dict]:
    if isinstance(value, str):
        messages = dialogue_messages(value)
        if messages is None:
            raise UserError(
                f"{what}: implicit-prompt text must be a whole dialogue with `\\n\\nHuman: ` / `\\n\\nAssistant: ` "
                "turns (Anthropic HH-RLHF), or a list of messages; for other text give a `prompt` column"
            )
        return messages
    return _check_messages(value, what)


def _require_response(messages: list[dict], name: str, where: str) -> None:
    if not messages or messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise UserError(f"{where}: `{name}` has an empty response (its last turn must be a non-empty assistant turn); "
                        "fill or remove the row")
