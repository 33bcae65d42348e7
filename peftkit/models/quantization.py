"""Build the bitsandbytes quantization config of the frozen base from the recipe."""

from __future__ import annotations

import inspect
import re
import sys

import torch
from transformers import BitsAndBytesConfig

from peftkit.recipe.schema import QuantizationSection


# Output layers of decoder LMs: quantizing them costs quality for little memory.
ALWAYS_UNQUANTIZED = ("lm_head",)


# `hidden_states.to(self.wo.weight.dtype)`: code that casts activations to a layer's weight dtype.
_CAST_TO_WEIGHT_DTYPE = re.compile(r"\.to\(self\.(\w+)\.weight\.dtype\)")


def _transformers_class(auto_class: type, config) -> type | None:
    """The class `auto_class` builds for this config; None for remote code (its class is not in transformers' map)
    or a head the architecture does not have."""
    try:
        return auto_class._model_mapping[type(config)]
    except (KeyError, AttributeError):
        return None


def layers_cast_to(auto_class: type, config) -> list[str]:
    """Layers whose weight dtype the model's code casts activations to (the feed-forward `wo` of T5 and the models
    copied from it). A quantized weight reports its storage dtype (uint8 for 4-bit), so the activations would be
    cast to bytes and the forward fails; T5 keeps `wo` out of quantization through `_keep_in_fp32_modules`, LongT5
    and SwitchTransformers do not. Read from the model's source, so every such model is covered, not a list."""
    model_class = _transformers_class(auto_class, config)
    if model_class is None:  # remote code: its module is not transformers'
        return []
    return sorted(set(_CAST_TO_WEIGHT_DTYPE.findall(inspect.getsource(sys.modules[model_class.__module__]))))


def tied_output_layers(auto_class: type, config) -> list[str]:
    """The modules the model class ties to its input embeddings: its output head whatever its name (BioGPT's
    `output_projection`), whether this config ties them or not. transformers keeps these unquantized only when it
    is given no skip list, and peftkit always gives one (task heads). Read from the class's `_tied_weights_keys`, not
    from an instance: building one under DeepSpeed ZeRO-3 would start ZeRO-3's own initialisation."""
    model_class = _transformers_class(auto_class, config)
    if model_class is None:  # remote code: `lm_head` by name only (ALWAYS_UNQUANTIZED)
        return []
    tied = getattr(model_class, "_tied_weights_keys", None) or {}
    keys = [*tied, *tied.values()] if isinstance(tied, dict) else list(tied)
    return sorted({key.rsplit(".", 1)[0] for key in keys if "." in key})


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}[name]


def build_quantization_config(quant: QuantizationSection, keep_unquantized: list[str] = ()) -> BitsAndBytesConfig | None:
    """None when the base stays in full precision; task heads listed in `keep_unquantized` stay unquantized.

    Takes the recipe's quantization section (training) or an adapter's record of it (attaching at inference).
    """
    if quant.bits is None:
        return None
    # transformers protects a decoder's output layer only when no skip list is given, so name it explicitly.
    skip_modules = sorted({*keep_unquantized, *ALWAYS_UNQUANTIZED})
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
        bnb_4bit_quant_storage=torch_dtype(quant.storage_dtype),
        llm_int8_skip_modules=skip_modules,
    )


def freeze_4bit_layout(model: torch.nn.Module) -> torch.nn.Module:
    """Keep every 4-bit weight in the layout it was loaded in, for the model's whole life.

    On CPUs with AVX512-BF16, bitsandbytes' `Linear4bit.forward` repacks a weight for a faster kernel the first
    time it runs in eval mode without gradients (an evaluation pass) and leaves it so: the absmax scales become
    bf16 and double quantization is undone. Saving (`_save_to_state_dict`) converts back and re-quantizes the
    scales, so each eval + save changed the frozen base (training logits by ~5e-4) and a resumed run started from
    a different base than the one it left. ZeRO-3 saves of repacked 4-bit shards also failed outright. The
    module's own switch `support_avx512bf16_for_cpu` turns the repack off; GPU paths never repack.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model
