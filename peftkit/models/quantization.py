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


def layers_cast_to(auto_class: type, config) -> list[str]:
    """Layers whose weight dtype the model's code casts activations to (the feed-forward `wo` of T5 and the models
    copied from it). A quantized weight reports its storage dtype (uint8 for 4-bit), so the activations would be
    cast to bytes and the forward fails; T5 keeps `wo` out of quantization through `_keep_in_fp32_modules`, LongT5
    and SwitchTransformers do not. Read from the model's source, so every such model is covered, not a list."""
    try:
        model_class = auto_class._model_mapping[type(config)]
    except (KeyError, AttributeError):  # remote code: its module is not transformers'
        return []
    return sorted(set(_CAST_TO_WEIGHT_DTYPE.findall(inspect.getsource(sys.modules[model_class.__module__]))))


def transformers_default_skips(auto_class: type, config, trust_remote_code: bool) -> list[str]:
    """What transformers keeps unquantized when it is given no skip list: the output embeddings whatever their name
    (BioGPT's `output_projection`), tied weights and the last layer. It drops these as soon
    as any skip list is given, and peftkit always gives one (task heads), so they are added back; read from the
    model built on the meta device by transformers' own rule (`get_keys_to_not_convert`)."""
    from accelerate import init_empty_weights
    from transformers.quantizers.base import get_keys_to_not_convert

    try:
        with init_empty_weights(include_buffers=True):
            model = auto_class.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError:  # no such head for this architecture: loading it reports that to the user
        return []
    return sorted(get_keys_to_not_convert(model))


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
