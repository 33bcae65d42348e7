"""Decoding text: the one generate-and-cut path behind evaluation (the run's report), `peftkit predict` and
`peftkit serve`, for decoders and encoder-decoders.

Deployment decodes with the settings the run was evaluated with (`Decoding.from_settings` of the adapter
record's `generation`), so a served adapter answers what its report measured; a request may shorten each row's
answer or ask for sampling, which replaces beam search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from peftkit.recipe.schema import GenerationSection

DEFAULT_MAX_NEW_TOKENS = GenerationSection.model_fields["max_new_tokens"].default  # the recipe's default


@dataclass(frozen=True)
class Decoding:
    """How to pick tokens: beam search / greedy (temperature 0) or sampling (temperature > 0, `top_p`, `seed`)."""

    num_beams: int = 1
    length_penalty: float = 1.0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # sampling only: the same seed, prompt and settings give the same text

    @classmethod
    def from_settings(cls, generation: Any) -> Decoding:
        """The recipe's `generation` section (or its JSON in an adapter record) as decoding settings."""
        get = generation.get if isinstance(generation, dict) else lambda key, default: getattr(generation, key, default)
        return cls(num_beams=get("num_beams", 1), length_penalty=get("length_penalty", 1.0))

    def sampled(self, temperature: float, top_p: float = 1.0, seed: int | None = None) -> Decoding:
        """These settings, or sampling when `temperature` > 0 (a request asked for it)."""
        return self if temperature <= 0 else Decoding(temperature=temperature, top_p=top_p, seed=seed)

    @property
    def samples(self) -> bool:
        return self.temperature > 0

    def generate_kwargs(self) -> dict:
        if self.samples:
            return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "num_beams": 1}
        return {"do_sample": False, "num_beams": self.num_beams, "length_penalty": self.length_penalty}


def generate(
    model, tokenizer, inputs, new_tokens_start: int, max_new_tokens: list[int] | int, decoding: Decoding = Decoding(),
    adapter_names: list[str] | None = None, streamer=None, start_tokens: dict | None = None,
) -> list[dict]:
    """Generate for a batch and cut each row's answer at its own limit and first end token.

    Output tokens from `new_tokens_start` on are new: after the (left-padded) prompt for decoders, after the
    decoder start token for encoder-decoders. Rows share one `generate` call up to the longest limit; under greedy
    decoding or sampling a row's first k tokens do not depend on how many follow, but beam search ranks whole
    sequences, so beam-search rows run in one call per limit. `start_tokens` are `generate` arguments that set the
    decoder's first token (a multilingual model's target language, `peftkit.tasks.languages`). Returns
    `{text, tokens, finish_reason}` per row.
    """
    count = len(inputs["input_ids"])
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * count
    if decoding.num_beams > 1 and not decoding.samples and len(set(limits)) > 1:
        answers: list[dict | None] = [None] * count
        for limit in sorted(set(limits)):
            rows = [i for i, row_limit in enumerate(limits) if row_limit == limit]
            part = {key: value[rows] for key, value in inputs.items()}
            names = [adapter_names[i] for i in rows] if adapter_names else None
            for i, answer in zip(rows, generate(model, tokenizer, part, new_tokens_start, limit, decoding, names,
                                                      start_tokens=start_tokens)):
                answers[i] = answer
        return answers
    if decoding.num_beams > 1 and not decoding.samples:
        streamer = None  # beams are ranked at the end: the text is known only when they finish
    if decoding.samples and decoding.seed is not None:
        torch.manual_seed(decoding.seed)
    with torch.inference_mode():
        output = model.generate(
            **inputs, max_new_tokens=max(limits), pad_token_id=tokenizer.pad_token_id, **decoding.generate_kwargs(),
            **({"adapter_names": adapter_names} if adapter_names else {}), **({"streamer": streamer} if streamer else {}),
            **(start_tokens or {}),
        )
    return answers_from_tokens(model, tokenizer, output[:, new_tokens_start:].tolist(), limits)


def answers_from_tokens(model, tokenizer, generated: list[list[int]], limits: list[int]) -> list[dict]:
    """Text, token count and finish reason of each row's new tokens, cut at its own limit and first end token."""
    answers = []
    eos = end_tokens(model, tokenizer)
    for tokens, limit in zip(generated, limits):
        tokens = tokens[:limit]
        stop = next((i for i, token in enumerate(tokens) if token in eos), None)
        finish_reason = "stop" if stop is not None else "length"
        tokens = tokens[:stop] if stop is not None else tokens  # padding only ever follows an end-of-sequence token
        answers.append({"text": tokenizer.decode(tokens, skip_special_tokens=True), "tokens": len(tokens), "finish_reason": finish_reason})
    return answers


def end_tokens(model, tokenizer) -> set[int]:
    configured = model.generation_config.eos_token_id
    return {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}


class TokenStream:
    """A `generate` streamer for one row: calls `on_tokens(new token ids so far)` after every decoding step.

    transformers first puts the prompt (decoders) or the decoder start token (encoder-decoders); that is skipped.
    """

    def __init__(self, on_tokens):
        self.on_tokens, self.tokens, self._prompt_seen = on_tokens, [], False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.tokens += value.reshape(-1).tolist()
        self.on_tokens(list(self.tokens))

    def end(self) -> None:
        pass
