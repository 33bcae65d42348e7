"""Build a task's model: the one place that training, planning (meta device), merging, evaluation and serving
make a model, so they all get the same modules, the same quantization and the same checks.

transformers reports which weights the checkpoint lacked (the loading report's missing keys). Those modules
(a classification head's extra dense layer, a pooler the base checkpoint never had) are freshly initialized:
they are recorded on the model (`fresh_modules`) so the adapter trains and saves them, and they are never
quantized. A checkpoint that fills almost none of the model (its keys carry another prefix) is an error, not a
random backbone trained in silence.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import PretrainedConfig

from peftkit.errors import UserError
from peftkit.models.load import context_length, loader_problem, is_causal_lm, load_config, model_location
from peftkit.models.quantization import (
    build_quantization_config,
    freeze_4bit_layout,
    layers_cast_to,
    tied_output_layers,
    torch_dtype,
)
from peftkit.recipe.schema import ModelSection, QuantizationSection

FRESH_MODULES = "peftkit_fresh_modules"  # attribute of a built model: the modules its checkpoint did not fill
# Above this share of randomly initialized parameters the backbone did not load (a head is a few percent).
MOST_WEIGHTS_MISSING = 0.5
# Tables of absolute positions: BERT-like encoders, GPT-2, OPT/BART/Marian (learned or sinusoidal, fixed size)
POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")


def build_model(
    model: ModelSection, quantization: QuantizationSection, auto_class: type, *, model_kwargs: dict | None = None,
    keep_unquantized: list[str] = (), meta: bool = False, config: PretrainedConfig | None = None,
):
    """`auto_class` (a task's head) on the recipe's base, with its dtype and quantization.

    `meta=True` builds it on the meta device from the config alone (the planner: no weights read), quantized
    modules swapped in by the same transformers quantizer that `from_pretrained` uses.
    """
    config = config or load_config(model)
    check_model_does_task(model, config, auto_class)
    model_kwargs = model_kwargs or {}
    if quantization.bits:
        keep_unquantized = [*keep_unquantized, *layers_cast_to(auto_class, config),
                            *tied_output_layers(auto_class, config)]
    if meta:
        return _build_on_meta(model, quantization, auto_class, model_kwargs, keep_unquantized, config)
    built, report = _from_pretrained(model, quantization, auto_class, model_kwargs, keep_unquantized)
    fresh = fresh_modules(built, report["missing_keys"])
    _check_backbone_loaded(model, built, fresh, report)
    if quantization.bits and any(_is_quantized(built.get_submodule(name)) for name in fresh):
        # Seen only after loading: reload with the fresh modules kept in full precision (they are trained).
        built, _ = _from_pretrained(model, quantization, auto_class, model_kwargs, [*keep_unquantized, *fresh])
    setattr(built, FRESH_MODULES, fresh)
    if quantization.bits:
        check_layers_quantized(model, quantization, built)
    # Training, evaluation and serving compute with the 4-bit layout it was loaded in (see freeze_4bit_layout).
    return freeze_4bit_layout(built) if quantization.bits == 4 else built


def position_limit(built, side: str | None = None) -> int | None:
    """Most tokens a model with a fixed table of absolute positions reads; a longer input indexes past the table and
    fails deep inside the forward pass. None for relative or rotary positions (T5, Llama, ...): no hard limit.
    `side` ("encoder" / "decoder") asks about one stack of an encoder-decoder (whose sides may differ: two
    warm-started encoders); None takes the smaller."""
    config = getattr(built.config, side, None) if side else None
    config = config if isinstance(config, PretrainedConfig) else built.config
    limits = []
    for name, module in built.named_modules():
        if side and (".decoder." in f".{name}.") != (side == "decoder"):
            continue
        if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES:
            # RoBERTa-like tables start after their padding row (514 rows, 512 positions); OPT/BART-like ones hide
            # an offset of 2 that their config's limit already leaves out
            padding = module.padding_idx
            limits.append(module.num_embeddings - (padding + 1 if padding is not None else 0))
    configured = context_length(config)
    return min(limits + ([configured] if configured else [])) if limits else None


def check_input_lengths(
    model: ModelSection, built, tokenized: dict, bounds: dict[str, int], virtual_tokens: int = 0
) -> None:
    """The tokenized rows fit the model's table of positions, if it has one: a longer row fails deep inside the
    forward pass, possibly hours in. `bounds`: recipe key -> its value (`data.max_length`, and for an
    encoder-decoder `task.max_target_length`), which caps the rows; only a bound beyond the table makes the rows
    worth reading. `virtual_tokens`: what a prompt method puts before every input."""
    columns = {"data.max_length": ("input_ids", virtual_tokens, "encoder"),
               "task.max_target_length": ("labels", 0, "decoder")}
    for key, bound in bounds.items():
        column, virtual, side = columns[key]
        limit = position_limit(built, side if built.config.is_encoder_decoder else None)
        if limit is None or bound + virtual <= limit:
            continue
        longest = max((len(ids) for split in tokenized.values() if column in split.column_names
                       for batch in split.select_columns([column]).iter(batch_size=1024) for ids in batch[column]),
                      default=0)
        if longest + virtual > limit:
            after = f" after the {virtual} virtual tokens of adapter.num_virtual_tokens" if virtual else ""
            raise UserError(
                f"{key}: rows of up to {longest} tokens{after} are more than `{model.name}` can read "
                f"({type(built).__name__} has absolute positions for {limit} tokens); set {key} to "
                f"{limit - virtual} or less"
            )


def check_model_does_task(model: ModelSection, config: PretrainedConfig, auto_class: type) -> None:
    """A masked-LM encoder (BERT) loads as `...LMHeadModel` but attends both ways: refuse it for causal LM."""
    from transformers import AutoModelForCausalLM

    if auto_class is AutoModelForCausalLM and not is_causal_lm(config):
        raise UserError(
            f"model.name: `{model.name}` ({config.model_type}) is not a causal (left-to-right) language model, which "
            "task.type causal_lm and preference need; use a decoder model (Llama, Qwen, GPT-2, ...), or this model "
            "with classification, extractive_qa or features"
        )


def fresh_modules(built, missing_keys: list[str]) -> list[str]:
    """Modules whose parameters the checkpoint lacked, outermost only (a module inside another is covered)."""
    parameters = dict(built.named_parameters())
    owners = sorted({key.rsplit(".", 1)[0] for key in missing_keys if key in parameters and "." in key})
    return [name for name in owners if not any(name.startswith(other + ".") for other in owners)]


def _check_backbone_loaded(model: ModelSection, built, fresh: list[str], report: dict) -> None:
    total = sum(p.numel() for p in built.parameters())
    random = sum(p.numel() for name in fresh for p in built.get_submodule(name).parameters())
    if total and random / total > MOST_WEIGHTS_MISSING:
        prefix = getattr(built, "base_model_prefix", "") or "(none)"
        found = sorted({key.split(".")[0] for key in report.get("unexpected_keys", [])})
        raise UserError(
            f"model.name: `{model.name}` filled only {1 - random / total:.0%} of {type(built).__name__}'s weights: "
            f"it expects the backbone under `{prefix}.`"
            + (f" but the checkpoint's weights are under {', '.join(f'`{p}.`' for p in found[:5])}" if found else "")
            + "; transformers cannot load this checkpoint for this task. Use another task or model"
        )


def _is_quantized(module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


def quantized_layer_count(model) -> int:
    """The bitsandbytes layers of a model (0 for a full-precision one); recorded with a run's parameter counts."""
    return sum(_is_quantized(module) for module in model.modules())


def check_layers_quantized(model: ModelSection, quantization: QuantizationSection, built) -> None:
    """A run that asked for k-bit quantization and got no layer quantized would silently train in full precision.

    transformers' bitsandbytes integration converts only `torch.nn.Linear` itself (and GPT-2's Conv1D), not its
    subclasses: a model whose linear layers are its own class (Falcon's `FalconLinear`) loads with none quantized.
    """
    if quantized_layer_count(built):
        return
    kept = {type(module).__name__ for module in built.modules()
            if isinstance(module, torch.nn.Linear) and type(module) is not torch.nn.Linear}
    why = (f"its linear layers are {', '.join(f'`{name}`' for name in sorted(kept))}, which transformers' "
           "bitsandbytes integration does not convert (it converts torch.nn.Linear itself)" if kept
           else "it has no torch.nn.Linear layer outside the ones kept in full precision")
    raise UserError(
        f"quantization.bits: {quantization.bits}: no layer of `{model.name}` ({type(built).__name__}) would be "
        f"quantized: {why}. Remove quantization.bits to train it in full precision, or choose another model"
    )


def _from_pretrained(model: ModelSection, quantization: QuantizationSection, auto_class: type, model_kwargs: dict,
                     keep_unquantized: list[str]) -> tuple[Any, dict]:
    kwargs: dict[str, Any] = {
        "revision": model.revision, "trust_remote_code": model.trust_remote_code, **model.dropout_overrides,
        **model_kwargs,  # from_pretrained folds config keys among its kwargs into the config
        # None lets transformers fall back to .bin, which it reads with torch.load(weights_only=True).
        "use_safetensors": None if model.allow_pickle_weights else True,
        "dtype": _loading_dtype(model.resolved_dtype(on_gpu=torch.cuda.is_available())),
        "output_loading_info": True,
    }
    if model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    quantization_config = build_quantization_config(quantization, keep_unquantized)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        return auto_class.from_pretrained(model_location(model), **kwargs)
    except (OSError, ValueError) as exc:
        hint = ""
        if not model.allow_pickle_weights and "safetensors" in str(exc).lower():
            hint = " (only safetensors weights are read; set model.allow_pickle_weights: true to accept .bin files)"
        raise UserError(f"model.name: cannot load `{model.name}`: {loader_problem(exc, model)}{hint}") from None


def _loading_dtype(dtype: str):
    return "auto" if dtype == "auto" else torch_dtype(dtype)


def base_dtype(model: ModelSection, config: PretrainedConfig) -> torch.dtype:
    """The dtype of the base's unquantized weights on a GPU (what the planner counts; meta models are for plans)."""
    dtype = model.resolved_dtype(on_gpu=True)
    if dtype != "auto":
        return torch_dtype(dtype)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype or torch.float32


def _build_on_meta(model: ModelSection, quantization: QuantizationSection, auto_class: type, model_kwargs: dict,
                   keep_unquantized: list[str], config: PretrainedConfig):
    from accelerate import init_empty_weights

    dtype = base_dtype(model, config)
    config = copy.deepcopy(config)
    for key, value in model_kwargs.items():  # from_pretrained folds such kwargs (num_labels, ...) into the config
        setattr(config, key, value)
    with init_empty_weights(include_buffers=True):
        built = auto_class.from_config(config, dtype=dtype, trust_remote_code=model.trust_remote_code)
    _quantize_on_meta(built, quantization, keep_unquantized, dtype)
    _keep_in_fp32(built, dtype)
    setattr(built, FRESH_MODULES, [])
    return built


def _quantize_on_meta(built, quantization: QuantizationSection, keep_unquantized: list[str], dtype: torch.dtype) -> None:
    """Swap in bitsandbytes layers with the same quantizer `from_pretrained` uses (it touches no weights)."""
    quantization_config = build_quantization_config(quantization, keep_unquantized)
    if quantization_config is None:
        return
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
    quantizer.preprocess_model(model=built, dtype=dtype, device_map=None, checkpoint_files=None, use_kernels=False)
    built.hf_quantizer = quantizer
    quantizer.postprocess_model(built)  # marks the model as loaded in 4/8 bits, which peft's layer dispatch reads


def _keep_in_fp32(built, dtype: torch.dtype) -> None:
    """Apply the model's own `_keep_in_fp32_modules` upcast, as `from_pretrained` does when loading weights."""
    plan = built._get_dtype_plan(dtype)
    if not plan:
        return
    from transformers.core_model_loading import build_glob_alternation

    pattern, group_to_key, _ = build_glob_alternation(list(plan))
    for name, param in built.named_parameters():
        match = pattern.search(name)
        if match and param.is_floating_point():
            param.data = param.data.to(plan[group_to_key[match.lastgroup]])
