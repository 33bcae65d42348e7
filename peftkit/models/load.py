"""Load the tokenizer and base model a recipe names, turning loader failures into user errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from peftkit.errors import UserError
from peftkit.models.gguf import converted_folder, is_gguf
from peftkit.models.quantization import build_quantization_config, freeze_4bit_layout, torch_dtype
from peftkit.recipe.schema import ModelSection, Recipe
from peftkit.references import resolve_reference


def model_location(model: ModelSection) -> str:
    """A local folder or hub id; a `.gguf` file is dequantized once into a cached folder (see `models.gguf`)."""
    location = resolve_reference(model.name, "model.name")
    return str(converted_folder(Path(location))) if is_gguf(location) else location


def _hub_kwargs(model: ModelSection) -> dict[str, Any]:
    return {"revision": model.revision, "trust_remote_code": model.trust_remote_code}


def _loader_problem(exc: Exception, model: ModelSection) -> str:
    """The first line of a loader's error, plus the recipe key to change when the model needs its own code."""
    text = str(exc).strip()
    first = text.splitlines()[0][:300] if text else type(exc).__name__
    if "trust_remote_code" in text and not model.trust_remote_code:
        first += (
            ". The model ships its own Python code, which peftkit does not run unless the recipe sets "
            "model.trust_remote_code: true (only for repositories you trust)"
        )
    return first


def load_config(model: ModelSection) -> PretrainedConfig:
    """Reading the config first catches a wrong model path before any data work is done."""
    location = model_location(model)
    try:
        return AutoConfig.from_pretrained(location, **_hub_kwargs(model))
    except Exception as exc:  # OSError, ValueError, EnvironmentError from hub/local resolution
        raise UserError(
            f"model.name: cannot load a model config from `{model.name}` ({location}): "
            f"{_loader_problem(exc, model)}. Give a local model folder, a hub id, or package:<module>/<dir>"
        ) from None


def is_decoder_only(config: PretrainedConfig) -> bool:
    """A causal-LM architecture with no masked-LM or encoder-decoder form (Llama, Mistral, GPT-2, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return (
        not config.is_encoder_decoder
        and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def load_tokenizer(model: ModelSection) -> PreTrainedTokenizerBase:
    location = model_location(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **_hub_kwargs(model))
    except Exception as exc:
        raise UserError(f"model.name: cannot load a tokenizer from `{model.name}`: {_loader_problem(exc, model)}") from None
    if tokenizer.pad_token is None:
        # Decoder-only models often ship without a pad token; padding positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(recipe: Recipe, auto_class: type, keep_unquantized: list[str] = (), **task_kwargs: Any):
    """Load `auto_class` with the recipe's dtype, quantization and trust settings plus task-specific kwargs."""
    model = recipe.model
    # use_safetensors=None lets transformers fall back to .bin, which it reads with torch.load(weights_only=True).
    kwargs: dict[str, Any] = {**_hub_kwargs(model), **task_kwargs, "use_safetensors": None if model.allow_pickle_weights else True}
    dtype = model.resolved_dtype(on_gpu=torch.cuda.is_available())
    kwargs["dtype"] = "auto" if dtype == "auto" else torch_dtype(dtype)
    if model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    quantization_config = build_quantization_config(recipe.quantization, keep_unquantized)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        loaded = auto_class.from_pretrained(model_location(model), **kwargs)
    except (OSError, ValueError) as exc:
        hint = ""
        if not model.allow_pickle_weights and "safetensors" in str(exc).lower():
            hint = " (only safetensors weights are read; set model.allow_pickle_weights: true to accept .bin files)"
        raise UserError(f"model.name: cannot load `{model.name}`: {_loader_problem(exc, model)}{hint}") from None
    return freeze_4bit_layout(loaded) if recipe.quantization.bits == 4 else loaded
