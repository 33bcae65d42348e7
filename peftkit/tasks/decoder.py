"""The decoder half shared by the causal LM tasks (instruction SFT, preference tuning): loading the model,
generating for evaluation, and the deployment functions (attach, merge verification, serving).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from peftkit.data.chat import chat_text
from peftkit.models.load import load_base_model
from peftkit.recipe.schema import Recipe


def load_model(recipe: Recipe, info: dict):
    return load_base_model(recipe, AutoModelForCausalLM, keep_unquantized=["lm_head"])


def head_modules(model) -> list[str]:
    return []  # the LM head is the pretrained one; adapters on the body are enough


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], recipe: Recipe, batch_size: int) -> list[str]:
    """Continuations of each chat prompt with the recipe's decoding settings (left-padded batches)."""
    decoding = recipe.generation
    device = next(model.parameters()).device
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outputs = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [chat_text(tokenizer, messages, add_generation_prompt=True) for messages in prompts[start : start + batch_size]]
            batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
            generated = model.generate(
                **batch, max_new_tokens=decoding.max_new_tokens, num_beams=decoding.num_beams,
                length_penalty=decoding.length_penalty, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            outputs += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = padding_side
    return outputs


AUTO_CLASS = AutoModelForCausalLM
GENERATES = True
INPUT_FIELDS = {"prompt": True}
WINDOWS_LONG_INPUTS = False
COMPLETES_PROMPTS = True  # rows are {"prompt": text}: the server's completions and chat endpoints
DEFAULT_MAX_NEW_TOKENS = 32


def model_kwargs(info: dict) -> dict:
    return {}


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
    max_new_tokens: list[int] | int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0, top_p: float = 1.0,
) -> list[dict]:
    """Greedy (temperature 0) or sampled continuation of each prompt.

    `max_new_tokens` may differ per row: the batch generates the longest and each row keeps its own prefix,
    which under greedy decoding equals what the row would get alone.
    """
    inputs = tokenizer([row["prompt"] for row in rows], padding=True, padding_side="left", return_tensors="pt").to(model.device)
    return generate_answers(
        model, tokenizer, inputs, inputs["input_ids"].shape[1], adapter_names, max_new_tokens, temperature, top_p
    )


def generate_answers(
    model, tokenizer, inputs, new_tokens_start: int, adapter_names: list[str] | None,
    max_new_tokens: list[int] | int, temperature: float, top_p: float,
) -> list[dict]:
    """Generate for a batch (greedy at temperature 0, else sampled) and cut each row's answer at its own limit.

    Output tokens from `new_tokens_start` on are new: after the prompt (decoders) or the decoder start token (seq2seq).
    """
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(inputs["input_ids"])
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    with torch.inference_mode():
        output = model.generate(
            **inputs, max_new_tokens=max(limits), pad_token_id=tokenizer.pad_token_id,
            **sampling, **({"adapter_names": adapter_names} if adapter_names else {}),
        )
    return generated_answers(model, tokenizer, output[:, new_tokens_start:].tolist(), limits)


def generated_answers(model, tokenizer, generated: list[list[int]], limits: list[int]) -> list[dict]:
    """Text, token count and finish reason of each row's new tokens, cut at its own limit and first end token."""
    answers = []
    eos = {tokenizer.eos_token_id, *(_as_list(model.generation_config.eos_token_id))} - {None}
    for tokens, limit in zip(generated, limits):
        tokens = tokens[:limit]
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
