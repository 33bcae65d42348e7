"""Causal language models at inference: prompt in, generated text out (decoder-only models such as Llama).

This is the inference half of the task contract (what deployment needs); training tasks on decoder models
(e.g. instruction SFT) produce adapters with peft task type CAUSAL_LM that deploy through these functions.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

PEFT_TASK_TYPE = "CAUSAL_LM"
AUTO_CLASS = AutoModelForCausalLM
INPUT_FIELDS = {"prompt": True}
DEFAULT_MAX_NEW_TOKENS = 32


def model_kwargs(info: dict) -> dict:
    return {}


def forward_logits(model, tokenizer, rows: list[dict], adapter_names: list[str] | None = None) -> list[torch.Tensor]:
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
    max_new_tokens: list[int] | int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0, top_p: float = 1.0,
) -> list[dict]:
    """Greedy (temperature 0) or sampled continuation of each prompt.

    `max_new_tokens` may differ per row: the batch generates the longest and each row keeps its own prefix,
    which under greedy decoding equals what the row would get alone.
    """
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(rows)
    inputs = tokenizer([row["prompt"] for row in rows], padding=True, padding_side="left", return_tensors="pt").to(model.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    with torch.inference_mode():
        output = model.generate(
            **inputs, max_new_tokens=max(limits), pad_token_id=tokenizer.pad_token_id,
            **sampling, **({"adapter_names": adapter_names} if adapter_names else {}),
        )
    answers = []
    eos = {tokenizer.eos_token_id, *(_as_list(model.generation_config.eos_token_id))} - {None}
    for generated, limit in zip(output[:, inputs["input_ids"].shape[1]:].tolist(), limits):
        tokens = generated[:limit]
        stop = next((i for i, token in enumerate(tokens) if token in eos), None)
        finish_reason = "stop" if stop is not None else "length"
        tokens = tokens[:stop] if stop is not None else tokens  # padding only ever follows an end-of-sequence token
        answers.append({"text": tokenizer.decode(tokens, skip_special_tokens=True), "tokens": len(tokens), "finish_reason": finish_reason})
    return answers


def prompt_from_messages(tokenizer, messages: list[dict]) -> str:
    """Chat messages as one prompt: the tokenizer's chat template when it has one, else `role: content` lines."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{message['role']}: {message['content']}\n" for message in messages) + "assistant:"


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]
