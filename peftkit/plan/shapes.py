"""Exact parameter counts of a recipe's model, built on the meta device: no weights are read or allocated.

The model is instantiated from its config alone, quantized modules are swapped in by transformers' own
bitsandbytes quantizer (so the modules that stay unquantized, embeddings, norms, heads, are exactly those
`from_pretrained` would keep), and the adapter is attached by peft from the recipe's real peft config.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    PretrainedConfig,
)

from peftkit.adapters import attach_adapter
from peftkit.errors import UserError
from peftkit.models.gguf import gguf_config, is_gguf
from peftkit.models.load import load_config
from peftkit.models.build import base_dtype, build_model
from peftkit.recipe.resolved import resolve_precision
from peftkit.recipe.schema import ModelSection, Recipe
from peftkit.references import resolve_reference
from peftkit.tasks import auto_class_for_peft_type, get_task
from peftkit.tasks.base import fits_itself

KNOWN_MODELS_FILE = Path(__file__).with_name("known_models.json")

BNB_4BIT_BLOCK = 64  # elements per absmax of a 4-bit weight (bitsandbytes default)
BNB_NESTED_BLOCK = 256  # absmax values per second-level constant under double quantization
BNB_4BIT_CODE_BYTES = 16 * 4  # the 16-entry float32 lookup table of nf4/fp4
BNB_NESTED_CODE_BYTES = 256 * 4  # the 256-entry float32 table of the quantized absmax


def known_models() -> dict[str, dict]:
    """Built-in configs of popular models, so that planning works offline."""
    return json.loads(KNOWN_MODELS_FILE.read_text())


def load_model_config(model: ModelSection) -> PretrainedConfig:
    """A local `config.json` or model folder, else a built-in shape, else the hub (the config file only)."""
    local = Path(model.name).expanduser()
    if local.is_file() and local.suffix == ".json":
        return AutoConfig.from_pretrained(str(local))
    location = resolve_reference(model.name, "model.name")
    if is_gguf(location):  # the shape only: converting the weights would take a minute and half a gigabyte
        return gguf_config(Path(location))
    if not local.exists():
        known = known_models()
        by_lower_name = {name.lower(): name for name in known} | {
            name.split("/")[-1].lower(): name for name in known
        }
        match = by_lower_name.get(model.name.lower())
        if match:
            return AutoConfig.for_model(**known[match])
    try:
        return load_config(model)
    except UserError as error:
        raise UserError(f"{error}; built-in model shapes: {', '.join(known_models())}") from None


@dataclass(frozen=True)
class ParameterCounts:
    """Bytes of every parameter of the model as it will be trained, grouped by how it is stored."""

    frozen_bytes: dict[str, int]  # storage kind ("bfloat16", "4-bit nf4", "8-bit int8", ...) -> bytes
    trainable: list[tuple[int, torch.dtype]]  # (elements, dtype) of each trainable tensor, in model order
    largest_layer_bytes: int  # parameter bytes of the biggest repeated block (gathered whole under ZeRO-3/FSDP)
    largest_outer_bytes: int  # the larger of the input embeddings and the output head (gathered whole too)
    adapter_inputs: int  # summed input width of all adapted modules (each keeps its own dropout copy of the input)
    adapter_ranks: int  # summed rank of all adapted modules (each keeps its low-rank activation)
    logits_width: int  # vocabulary of a language-model head (its logits dominate peak memory); 0 for small heads
    dims: dict[str, int] = field(default_factory=dict)
    quant_state_bytes: dict[str, int] = field(default_factory=dict)  # storage kind -> its quantization state's bytes
    largest_quantized_numel: int = 0  # elements of the largest quantized weight (dequantized whole to compute with it)
    unsharded_bytes: int = 0  # every parameter as FSDP/ZeRO-3 gather it (the whole model, unsharded)
    dora_outputs: int = 0  # summed output width of the DoRA modules (each keeps two output-wide tensors)
    dora_weight_numel: int = 0  # elements of the weights DoRA modules wrap (with dropout, each forward keeps a copy)
    dora_widest: tuple[int, int] = (0, 0)  # (input, output) width of the DoRA module with the widest input
    ia3_outputs: int = 0  # summed output width of the IA3 modules that scale their output
    ia3_feedforward_inputs: int = 0  # summed input width of the IA3 modules that scale their input (feed-forward)

    @property
    def frozen_numel(self) -> int:
        return self.dims.get("frozen_numel", 0)

    @property
    def element_bytes(self) -> int:
        """Bytes per element of the unquantized base weights."""
        return self.dims.get("element_bytes", 4)

    @property
    def trainable_numel(self) -> int:
        return sum(numel for numel, _ in self.trainable)

    @property
    def trainable_bytes(self) -> int:
        return sum(numel * dtype.itemsize for numel, dtype in self.trainable)

    @property
    def frozen_total_bytes(self) -> int:
        return sum(self.frozen_bytes.values())


def build_meta_model(recipe: Recipe, config: PretrainedConfig, peft_task_type: str | None = None):
    """The model exactly as training builds it (task head, quantization, adapter), on the meta device.

    `peft_task_type` overrides the recipe task's model kind (benchmarks plan causal LMs with any task).
    """
    task = get_task(recipe.task.type)
    peft_task_type = peft_task_type or task.PEFT_TASK_TYPE
    auto_class = auto_class_for_peft_type(peft_task_type, default=AutoModel)  # the task registry's
    own_head = peft_task_type == task.PEFT_TASK_TYPE
    model_kwargs = {}
    if auto_class is AutoModelForSequenceClassification:
        model_kwargs["num_labels"] = len(getattr(recipe.task, "labels", None) or []) or 2
    model = build_model(
        recipe.model, recipe.quantization, auto_class, model_kwargs=model_kwargs, meta=True, config=config,
        keep_unquantized=list(getattr(task, "HEAD_NAMES", ())) if own_head else [],
    )
    heads = task.head_modules(model) if not fits_itself(task) and own_head else []
    precision = resolve_precision(recipe.training.precision, for_gpu=True)  # k-bit preparation's dtypes follow it
    with torch.device("meta"):
        return attach_adapter(model, recipe, peft_task_type, heads, precision=precision)


def quantized_bytes(param) -> tuple[str, int, int] | None:
    """(storage kind, bytes of the parameter's own data, bytes of its quantization state) of a not yet quantized
    bitsandbytes parameter on the meta device; None for plain tensors.

    The state (4-bit absmax, nested constants and codes; 8-bit row scales) is a plain attribute of the parameter and
    its module, not a parameter: FSDP and ZeRO-3 shard and offload only the data (bitsandbytes' modules restore the
    state from the module after FSDP flattens the weight, `fix_4bit_weight_quant_state_from_module`)."""
    kind = type(param).__name__
    numel = param.numel()
    if kind == "Params4bit":
        storage = param.quant_storage
        packed = (numel + 1) // (2 * storage.itemsize) * storage.itemsize
        blocks = math.ceil(numel / param.blocksize)
        if param.compress_statistics:
            nested = math.ceil(blocks / BNB_NESTED_BLOCK) * 4 + BNB_NESTED_CODE_BYTES + 4  # absmax, code, offset
            state = blocks + nested
        else:
            state = blocks * 4
        return f"4-bit {param.quant_type}", packed, state + BNB_4BIT_CODE_BYTES
    if kind == "Int8Params":
        rows = param.shape[0]
        return "8-bit int8", numel, rows * 4  # int8 weight + one float32 scale per output row
    return None


def count_parameters(
    recipe: Recipe, config: PretrainedConfig | None = None, peft_task_type: str | None = None
) -> ParameterCounts:
    config = config or load_model_config(recipe.model)
    model = build_meta_model(recipe, config, peft_task_type)
    frozen: dict[str, int] = {}
    quant_state: dict[str, int] = {}
    trainable = []
    frozen_numel = largest_quantized = 0
    for _, param in model.named_parameters():
        if param.requires_grad:
            trainable.append((param.numel(), param.dtype))
            continue
        frozen_numel += param.numel()
        quantized = quantized_bytes(param)
        if quantized:
            kind, data, state = quantized
            quant_state[kind] = quant_state.get(kind, 0) + state
            largest_quantized = max(largest_quantized, param.numel())
        else:
            kind, data, state = str(param.dtype).removeprefix("torch."), param.numel() * param.itemsize, 0
        frozen[kind] = frozen.get(kind, 0) + data + state
    dora = [module for module in _lora_layers(model) if "default" in module.lora_magnitude_vector]
    ia3 = [module for module in model.modules() if "default" in getattr(module, "ia3_l", {}) and hasattr(module, "in_features")]
    return ParameterCounts(
        frozen_bytes=frozen,
        trainable=trainable,
        largest_layer_bytes=_largest_layer_bytes(model),
        largest_outer_bytes=_largest_outer_bytes(model),
        adapter_inputs=sum(module.in_features for module in _lora_layers(model)),
        adapter_ranks=sum(sum(module.r.values()) for module in _lora_layers(model)),
        logits_width=_logits_width(model),
        dims={**model_dims(config), "frozen_numel": frozen_numel, "element_bytes": base_dtype(recipe.model, config).itemsize},
        quant_state_bytes=quant_state,
        largest_quantized_numel=largest_quantized,
        unsharded_bytes=_module_bytes(model),
        dora_outputs=sum(module.out_features for module in dora),
        dora_weight_numel=sum(module.in_features * module.out_features for module in dora),
        dora_widest=max(((module.in_features, module.out_features) for module in dora), default=(0, 0)),
        ia3_outputs=sum(module.out_features for module in ia3 if not module.is_feedforward),
        ia3_feedforward_inputs=sum(module.in_features for module in ia3 if module.is_feedforward),
    )


def _lora_layers(model) -> list:
    return [module for module in model.modules() if hasattr(module, "lora_A") and hasattr(module, "in_features")]


def _logits_width(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return getattr(head, "out_features", 0) if head is not None else 0


def _module_bytes(module) -> int:
    """Bytes of the module's parameters as FSDP/ZeRO-3 gather them: quantized data without its (unsharded) state."""
    return sum((quantized_bytes(p) or ("", p.numel() * p.itemsize))[1] for p in module.parameters())


def _largest_outer_bytes(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = [getattr(base, name)() for name in ("get_input_embeddings", "get_output_embeddings") if hasattr(base, name)]
    return max((_module_bytes(module) for module in modules if module is not None), default=0)


def _largest_layer_bytes(model) -> int:
    """Bytes of the biggest direct child of the model's repeated-layer list (what FSDP/ZeRO-3 gather at once)."""
    largest = 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1:
            for layer in module:
                largest = max(largest, _module_bytes(layer))
    return largest


def model_dims(config: PretrainedConfig) -> dict[str, int]:
    """The sizes activation memory depends on, read across architectures' differing config names."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    intermediate = (
        getattr(text, "intermediate_size", None) or getattr(text, "d_ff", None) or getattr(text, "n_inner", None)
        or 4 * hidden
    )
    layers = text.num_hidden_layers + (getattr(text, "num_decoder_layers", 0) if text.is_encoder_decoder else 0)
    return {
        "hidden": hidden,
        "heads": heads,
        "head_dim": head_dim,
        "kv_heads": kv_heads,
        "intermediate": intermediate,
        "layers": layers,
        "vocab": text.vocab_size,
        "gated_mlp": int(getattr(text, "hidden_act", "") in ("silu", "swiglu") or "gated" in str(getattr(text, "feed_forward_proj", ""))),
    }
