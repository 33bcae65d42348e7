"""Locate a recipe's model and load its config and tokenizer, turning loader failures into user errors.

The model itself is built by `peftkit.models.build`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from peftkit.errors import UserError, first_line
from peftkit.models.gguf import converted_folder, is_gguf
from peftkit.recipe.schema import ModelSection
from peftkit.references import resolve_reference


def model_location(model: ModelSection) -> str:
    """A local folder or hub id; a `.gguf` file is dequantized once into a cached folder (see `models.gguf`)."""
    location = resolve_reference(model.name, "model.name")
    return str(converted_folder(Path(location))) if is_gguf(location) else location


def _hub_kwargs(model: ModelSection) -> dict[str, Any]:
    return {"revision": model.revision, "trust_remote_code": model.trust_remote_code}


def loader_problem(exc: Exception, model: ModelSection) -> str:
    """The first line of a loader's error, plus the recipe key to change when the model needs its own code."""
    text = str(exc).strip()
    first = first_line(exc).rstrip(".")
    if "trust_remote_code" in text and not model.trust_remote_code:
        first += (
            ". The model ships its own Python code, which peftkit does not run unless the recipe sets "
            "model.trust_remote_code: true (only for repositories you trust)"
        )
    return first


def load_config(model: ModelSection) -> PretrainedConfig:
    """Reading the config first catches a wrong model path before any data work is done. The recipe's dropout
    overrides are applied (and checked against the config's own keys)."""
    location = model_location(model)
    if location.startswith(("/", "./", "../", "~")) and not Path(location).expanduser().exists():
        # transformers would take it for a malformed hub id ("Repo id must be in the form ...")
        raise UserError(f"model.name: there is no folder `{location}`; give a local model folder, a hub id "
                        "(organization/name) or package:<module>/<dir>")
    try:
        config = AutoConfig.from_pretrained(location, **_hub_kwargs(model))
    except Exception as exc:  # OSError, ValueError, EnvironmentError from hub/local resolution
        raise UserError(
            f"model.name: cannot load a model config from `{model.name}` ({location}): "
            f"{loader_problem(exc, model)}. Give a local model folder, a hub id, or package:<module>/<dir>"
        ) from None
    keys = config.to_dict()
    for key, value in model.dropout_overrides.items():
        if key not in keys:
            known = sorted(name for name in keys if "drop" in name)
            raise UserError(
                f"model.dropout_overrides.{key}: {type(config).__name__} (`{model.name}`) has no such key; its dropout "
                f"keys are {', '.join(known) if known else '(none)'}"
            )
        setattr(config, key, value)
    return config


def is_decoder_only(config: PretrainedConfig) -> bool:
    """A causal-LM architecture with no masked-LM or encoder-decoder form (Llama, Mistral, GPT-2, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return (
        not config.is_encoder_decoder
        and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def is_causal_lm(config: PretrainedConfig) -> bool:
    """Attends left to right: a decoder-only model, or an encoder configured as a decoder (`is_decoder`)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return is_decoder_only(config) or (
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and bool(getattr(config, "is_decoder", False))
    )


def context_length(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> int | None:
    """Most input tokens the model takes, across config spellings; T5-like models (relative positions) have no
    fixed limit in the config, so the tokenizer's `model_max_length` decides (None when it is unset)."""
    text = config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(text, key, None), int):
            return getattr(text, key)
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 1_000_000 else None


def load_tokenizer(model: ModelSection) -> PreTrainedTokenizerBase:
    location = model_location(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **_hub_kwargs(model))
    except Exception as exc:
        raise UserError(f"model.name: cannot load a tokenizer from `{model.name}`: {loader_problem(exc, model)}") from None
    if tokenizer.pad_token is None:
        # Decoder-only models often ship without a pad token; padding positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
