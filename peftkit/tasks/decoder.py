"""The decoder half shared by the causal LM tasks (instruction SFT, preference tuning): loading the model,
generating for evaluation, and the deployment functions (attach, merge verification, serving). Decoding itself is
`peftkit.tasks.generation`, the one path evaluation and serving share.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from peftkit.data.chat import chat_text
from peftkit.models.build import build_model
from peftkit.recipe.schema import Recipe
from peftkit.tasks import generation
from peftkit.tasks.generation import Decoding

AUTO_CLASS = AutoModelForCausalLM
GENERATES = True
INPUT_FIELDS = {"prompt": True}
WINDOWS_LONG_INPUTS = False
COMPLETES_PROMPTS = True  # rows are {"prompt": text}: the server's completions and chat endpoints


def load_model(recipe: Recipe, info: dict):
    return build_model(recipe.model, recipe.quantization, AutoModelForCausalLM, keep_unquantized=["lm_head"])


def head_modules(model) -> list[str]:
    return []  # the LM head is the pretrained one; adapters on the body are enough


def model_kwargs(info: dict) -> dict:
    return {}


def generate(model, tokenizer, prompts: list[list[dict]], recipe: Recipe, batch_size: int) -> list[str]:
    """Continuations of each chat prompt with the recipe's decoding settings (left-padded batches)."""
    decoding = Decoding.from_settings(recipe.generation)
    device = next(model.parameters()).device
    outputs = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", unit="batch", disable=not prompts):
        texts = [chat_text(tokenizer, messages, add_generation_prompt=True) for messages in prompts[start : start + batch_size]]
        batch = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt").to(device)
        answers = generation.generate(model, tokenizer, batch, batch["input_ids"].shape[1], recipe.generation.max_new_tokens, decoding)
        outputs += [answer["text"].strip() for answer in answers]
    return outputs


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
