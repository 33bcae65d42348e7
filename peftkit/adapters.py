"""Adapter methods from the recipe: build the peft config, inject it, and supply what a method needs around training.

peft does the work; this module is the glue. Everything method-specific lives here so that the trainer stays
generic: `attach_adapter` before training, `adapter_callbacks` during, `save_adapter` after.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptLearningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
    replace_lora_weights_loftq,
)
from peft.utils.error import NoMatchingPeftModuleError
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig, TrainerCallback

from peftkit.errors import UserError
from peftkit.models.build import FRESH_MODULES, quantized_layer_count
from peftkit.models.fingerprint import architecture, fingerprint
from peftkit.models.load import is_decoder_only, model_location
from peftkit.recipe.resolved import resolve_precision
from peftkit.recipe.schema import AdapterSection, Recipe
from peftkit.references import hub_id

# peft names of the LoRA initializations; pissa/olora move the principal part of W into the adapter.
LORA_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": True}
BASE_REWRITING_INITS = ("pissa", "olora")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Attribute of the peft model holding the adapter as initialized, for saving base-rewriting inits as plain LoRA.
_INITIAL_ADAPTER = "_peftkit_initial_adapter"


def _low_rank_options(adapter: AdapterSection, task_type: str, modules_to_save: list[str] | None) -> dict:
    """Options LoRA and AdaLoRA share."""
    return {
        "task_type": task_type,
        "lora_alpha": adapter.alpha,
        "lora_dropout": adapter.dropout,
        "target_modules": adapter.target_modules,
        "bias": adapter.bias,
        "modules_to_save": modules_to_save,
    }


def _lora(adapter: AdapterSection, task_type: str, modules_to_save: list[str] | None) -> LoraConfig:
    return LoraConfig(
        r=adapter.r,
        use_dora=adapter.use_dora,
        use_rslora=adapter.use_rslora,
        init_lora_weights=LORA_INIT[adapter.init],
        **_low_rank_options(adapter, task_type, modules_to_save),
    )


def _adalora(adapter: AdapterSection, task_type: str, modules_to_save: list[str] | None) -> AdaLoraConfig:
    # The schedule (total_step, tinit, tfinal) is set from the Trainer's real step count when training starts;
    # these placeholders only satisfy peft's constructor checks.
    return AdaLoraConfig(
        target_r=adapter.r,
        init_r=adapter.adalora_init_r,
        deltaT=adapter.adalora_interval,
        total_step=1,
        tinit=0,
        tfinal=0,
        **_low_rank_options(adapter, task_type, modules_to_save),
    )


def _ia3(adapter: AdapterSection, task_type: str, modules_to_save: list[str] | None) -> IA3Config:
    # `all-linear` means peft's per-architecture defaults (keys, values, feed-forward output); an explicit list
    # scales every listed module's output.
    explicit = adapter.target_modules != "all-linear"
    return IA3Config(
        task_type=task_type,
        target_modules=adapter.target_modules if explicit else None,
        feedforward_modules=[] if explicit else None,
        modules_to_save=modules_to_save,
    )


def _virtual_tokens(config_class: type[PeftConfig]):
    """Prompt tuning, prefix tuning and P-tuning differ only in where their learned virtual tokens enter the model."""

    def build(adapter: AdapterSection, task_type: str, modules_to_save: list[str] | None) -> PeftConfig:
        return config_class(
            task_type=task_type, num_virtual_tokens=adapter.num_virtual_tokens, modules_to_save=modules_to_save
        )

    return build


PEFT_CONFIG_BUILDERS = {
    "lora": _lora,
    "adalora": _adalora,
    "ia3": _ia3,
    "prompt_tuning": _virtual_tokens(PromptTuningConfig),
    "prefix_tuning": _virtual_tokens(PrefixTuningConfig),
    "p_tuning": _virtual_tokens(PromptEncoderConfig),
}


def build_peft_config(recipe: Recipe, task_type: str, head_modules: list[str] = ()) -> PeftConfig | None:
    """None means full fine-tuning. Task heads are trained fully and saved with the adapter."""
    adapter = recipe.adapter
    if adapter.method == "none":
        return None
    modules_to_save = sorted({*(adapter.modules_to_save or []), *head_modules}) or None
    config = PEFT_CONFIG_BUILDERS[adapter.method](adapter, task_type, modules_to_save)
    if not adapter.peft_args:
        return config
    defaults = {
        field.name: field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
        for field in dataclasses.fields(config)
    }
    set_by_peftkit = sorted(key for key in adapter.peft_args if getattr(config, key) != defaults[key])
    if set_by_peftkit:
        raise UserError(
            f"adapter.peft_args: {set_by_peftkit} are set by peftkit from the recipe for method {adapter.method}; "
            "remove them from peft_args"
        )
    try:  # replace() runs peft's own checks of the combined options again
        return dataclasses.replace(config, **adapter.peft_args)
    except (TypeError, ValueError) as exc:
        raise UserError(f"adapter.peft_args: peft rejects {adapter.peft_args}: {exc}") from None


def check_adapter_fits_model(recipe: Recipe, config: PretrainedConfig, task_type: str) -> None:
    """Method x model/hardware rules that need the model's config (checked before any weights or data load)."""
    method = recipe.adapter.method
    if recipe.adapter.init == "loftq" and not torch.cuda.is_available():
        raise UserError(
            "adapter.init: loftq is computed by peft on a CUDA GPU and none is available; "
            "use init: default or gaussian with quantization"
        )
    if task_type == "CAUSAL_LM":
        from peftkit.models.build import check_model_does_task
        from transformers import AutoModelForCausalLM

        check_model_does_task(recipe.model, config, AutoModelForCausalLM)
    alternative = "use lora, adalora or ia3"
    if method in ("prompt_tuning", "p_tuning") and task_type == "SEQ_CLS" and config.is_encoder_decoder:
        raise UserError(
            f"adapter.method: {method} cannot classify with the encoder-decoder model `{recipe.model.name}` "
            f"({config.model_type}): its classification head finds the end-of-sequence token in input_ids, and peft "
            f"prepends virtual tokens as embeddings only; {alternative}"
        )
    if method == "prefix_tuning" and task_type == "QUESTION_ANS":
        raise UserError(f"adapter.method: peft has no prefix tuning for extractive question answering; {alternative}")
    if method == "prefix_tuning" and _shared_key_value_heads(config):
        raise UserError(
            f"adapter.method: prefix tuning cannot build the key/value prefix of `{recipe.model.name}` "
            f"({config.model_type}): its attention shares keys and values across heads (multi-query), which peft's "
            f"prefix does not follow; {alternative}"
        )
    if method == "prefix_tuning" and recipe.training.gradient_checkpointing:
        raise UserError(
            "training.gradient_checkpointing: prefix tuning passes its prefix as a key/value cache, which gradient "
            "checkpointing recomputes without it; set training.gradient_checkpointing: false or use lora"
        )
    hidden = _hidden_size(config)
    rank = max(recipe.adapter.r, recipe.adapter.adalora_init_r if method == "adalora" else 0)
    if method in ("lora", "adalora") and hidden and rank > hidden:
        # A factor of rank above min(in, out) of a layer adds memory and no capacity; a huge r would only fail
        # (out of memory) after the model is loaded.
        raise UserError(
            f"adapter.r{'/adalora_init_r' if method == 'adalora' else ''}={rank} exceeds the hidden size {hidden} of "
            f"`{recipe.model.name}`: LoRA rank cannot usefully exceed a layer's smaller dimension; use r <= {hidden} "
            "(typically 4 to 64)"
        )
    if method in ("prompt_tuning", "p_tuning") and task_type == "SEQ_CLS" and is_decoder_only(config):
        raise UserError(
            f"adapter.method: {method} cannot classify with the decoder-only model `{recipe.model.name}` "
            f"({config.model_type}): its head reads the last position, and peft passes only embeddings, so the model "
            "cannot skip padding and the result changes with batch composition; use lora, adalora or ia3, "
            "or an encoder model (BERT-like) for prompt methods"
        )


def _fix_for(peft_refusal: ValueError) -> str:
    if "ParamWrapper" in str(peft_refusal):
        # all-linear reaches a mixture-of-experts model's fused expert weights (3-D tensors, not linear layers) through
        # peft's parameter wrapper, which has no dropout and no DoRA.
        return ("peft adapts this mixture-of-experts model's fused expert weights as parameters, which take neither "
                "dropout nor DoRA: set adapter.dropout: 0 (and adapter.use_dora: false), or set "
                "adapter.target_modules to linear layers only, e.g. [q_proj, k_proj, v_proj, o_proj]")
    return ("Change adapter.method, adapter.target_modules or the method's options (docs/support-matrix.md lists "
            "what each architecture supports)")


def _shared_key_value_heads(config: PretrainedConfig) -> bool:
    """Multi-query attention declared in a form peft's prefix does not read (Falcon's `multi_query`, `num_kv_heads`)."""
    text = config.get_text_config()
    if getattr(text, "num_key_value_heads", None) is not None and not hasattr(text, "num_kv_heads"):
        return False  # the form peft follows (Llama, Mistral, Qwen)
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_kv_heads", None)
    return bool(getattr(text, "multi_query", False)) or (kv_heads is not None and kv_heads != heads)


def _hidden_size(config: PretrainedConfig) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def attach_adapter(model, recipe: Recipe, task_type: str, head_modules: list[str] = (), precision: str | None = None):
    """Prepare a quantized base for training, inject the adapter, and apply initializations that need the model.

    Besides the task's heads, the modules the checkpoint did not fill (`models.build.FRESH_MODULES`) are trained
    and saved with the adapter: left out, they would stay random and differ on every reload. `precision` is the
    training precision (default: as training resolves it on this machine; the planner passes the GPU's).
    """
    config = build_peft_config(recipe, task_type, outermost_modules(model, [*head_modules, *getattr(model, FRESH_MODULES, [])]))
    if config is None:
        return model
    fit_config_to_model(config, model, recipe)
    if recipe.quantization.bits:
        bf16 = (precision or resolve_precision(recipe.training.precision)) == "bf16"
        embedding_dtype = torch.bfloat16 if bf16 and not recipe.quantization.upcast_embeddings else torch.float32
        prepare_quantized_base(model, config.modules_to_save or [], embedding_dtype)
    try:
        model = get_peft_model(model, config)
    except NoMatchingPeftModuleError:
        raise UserError(
            f"adapter.target_modules: {recipe.adapter.target_modules} names no module of `{recipe.model.name}`; its "
            f"linear layers are {sorted(linear_module_names(model))[:30]} (or use all-linear)"
        ) from None
    except ValueError as exc:  # peft's refusals of a method x layer combination
        raise UserError(
            f"adapter: peft cannot add this {recipe.adapter.method} adapter to `{recipe.model.name}` "
            f"({model.config.model_type}): {exc} {_fix_for(exc)}"
        ) from None
    shared_name = hub_id(recipe.model.name, recipe.model.hub_id)
    if shared_name:  # peft records the local path it loaded from; the hub id is what others can load
        model.peft_config[model.active_adapter].base_model_name_or_path = shared_name
    has_weights = not next(model.parameters()).is_meta  # planners build the model on the meta device
    if recipe.adapter.init == "loftq" and has_weights:
        # LoftQ re-reads the unquantized weights from the checkpoint's safetensors (a local folder or the hub cache).
        location = model_location(recipe.model)
        replace_lora_weights_loftq(model, model_path=location if Path(location).is_dir() else None)
    if recipe.adapter.init in BASE_REWRITING_INITS and has_weights:
        initial = {name: tensor.detach().clone() for name, tensor in get_peft_model_state_dict(model).items()}
        setattr(model, _INITIAL_ADAPTER, initial)
    return model


def prepare_quantized_base(model, trained_modules: list[str], embedding_dtype: torch.dtype = torch.float32) -> None:
    """peft's k-bit preparation: freeze the base and upcast its unquantized fp16/bf16 parameters to float32 for stable
    training (gradient checkpointing is left to the Trainer: training.gradient_checkpointing).

    The frozen input embeddings and LM head are cast to `embedding_dtype` instead: peftkit passes bf16 under bf16
    training, as QLoRA's own code and torchtune keep them, because autocast computes the head's matmul in bf16 from a
    float32 weight anyway, so the float32 copy (3.9 GiB on Llama-3-8B) only cost memory
    (`benchmarks/kbit_embedding_dtype.py` measures the loss). The norms stay float32, and modules the adapter trains
    (`trained_modules`, peft's `modules_to_save`) keep float32 master weights. peft's function has no switch for
    this, hence its loop here.
    """
    if embedding_dtype == torch.float32:
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return
    embeddings = {_embedding_module(model, "get_input_embeddings"), _embedding_module(model, "get_output_embeddings")} - {None}
    kept = {
        id(param) for path, module in model.named_modules() if module in embeddings
        and not any(path == name or path.endswith("." + name) for name in trained_modules)
        for param in module.parameters()
    }
    for param in model.parameters():
        param.requires_grad = False
        if id(param) in kept and param.is_floating_point():
            param.data = param.data.to(embedding_dtype)
        elif param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)


def _embedding_module(model, getter: str):
    """The module `getter` names, or None where the architecture does not say (it then keeps peft's float32)."""
    try:
        return getattr(model, getter)()
    except (AttributeError, NotImplementedError):
        return None


def outermost_modules(model, names: list[str]) -> list[str]:
    """`names` without those inside another listed module (peft matches by suffix: `classifier` covers
    `classifier.dense`), so a module is never wrapped for saving inside a wrapped module."""
    paths = {name: [path for path, _ in model.named_modules() if path == name or path.endswith("." + name)] for name in names}
    return [
        name for name in dict.fromkeys(names)
        if not any(path.startswith(other_path + ".") for other in names if other != name for other_path in paths[other]
                   for path in paths[name])
    ]


def linear_module_names(model) -> set[str]:
    """Leaf names of the model's linear layers (GPT-2's Conv1D included), as peft's target_modules match them."""
    from transformers.pytorch_utils import Conv1D

    return {name.split(".")[-1] for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))}


def _output_head_paths(model) -> set[str]:
    """Module paths of the model's output embeddings (its language-model head), if it has one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def _layers_peft_refuses(config: PeftConfig, model) -> set[str]:
    """Linear layers peft refuses to adapt on this architecture (Mamba's `out_proj`, which its fused kernels read
    directly), by peft's own rule; `all-linear` would otherwise make peft refuse the model."""
    from peft.tuners import tuners_utils

    check = getattr(tuners_utils, "_check_lora_target_modules_mamba", None)
    refused = set()
    for name in linear_module_names(model) if check else ():
        try:
            check(config, model, name)
        except ValueError:
            refused.add(name)
    return refused


def fit_config_to_model(config: PeftConfig, model, recipe: Recipe) -> None:
    """Fill in what peft would guess wrongly, or not at all, from the model itself."""
    saved = config.modules_to_save or []
    if saved and hasattr(config, "exclude_modules"):
        # peft picks modules_to_save by name suffix ("classifier" also names "pre_classifier"); a module wrapped for
        # saving must not also receive adapter layers (peft refuses such a model), so adapters skip all of them.
        wrapped = {name for name, _ in model.named_modules() if name and any(name.endswith(key) for key in saved)}
        config.exclude_modules = set(config.exclude_modules or ()) | wrapped
    if isinstance(config, (LoraConfig, AdaLoraConfig)) and config.target_modules == "all-linear":
        refused = _layers_peft_refuses(config, model)
        if refused:  # `all-linear` means every layer the method can adapt, not a refusal of the whole model
            config.exclude_modules = set(config.exclude_modules or ()) | refused
    if isinstance(config, IA3Config) and config.target_modules is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING

        if model.config.model_type not in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING:
            # peft has no IA3 defaults for this architecture: scale the output of every linear layer instead, except
            # the language-model head, whatever its name (BioGPT's `output_projection`), as peft's all-linear does.
            config.target_modules = linear_module_names(model)
            config.exclude_modules = set(config.exclude_modules or ()) | _output_head_paths(model)
            config.feedforward_modules = set()
    if isinstance(config, PromptLearningConfig):
        # Read through the config's attribute aliases (DistilBERT's `dim`, `n_heads`), which peft's dict lookup
        # misses; virtual tokens are input embeddings, narrower than the hidden size in ELECTRA-like models.
        text = model.config.get_text_config()
        config.num_layers = config.num_layers or getattr(text, "num_hidden_layers", None)
        config.num_attention_heads = config.num_attention_heads or getattr(text, "num_attention_heads", None)
        if config.token_dim is None:
            embedding_dim = model.get_input_embeddings().embedding_dim
            config.token_dim = getattr(text, "hidden_size", None) if isinstance(config, PrefixTuningConfig) else embedding_dim


class AdaLoraRankAllocation(TrainerCallback):
    """Runs AdaLoRA's budget schedule: after each optimizer step (gradients still present), prune and re-allocate ranks.

    peft leaves `update_and_allocate` to the training loop; without it AdaLoRA is plain LoRA with an SVD shape.
    """

    def __init__(self, adapter: AdapterSection):
        self.adapter = adapter

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        config = model.peft_config[model.active_adapter]
        config.total_step = state.max_steps
        config.tinit = int(self.adapter.adalora_warmup * state.max_steps)
        config.tfinal = int(self.adapter.adalora_final * state.max_steps)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # A module the task's forward never reaches (BigBird's pooler under a classifier that reads the sequence) has
        # no gradient, and peft's sensitivity multiplies by it: its importance is zero, so it gives up its rank.
        for name, parameter in model.named_parameters():
            if "lora_" in name and parameter.requires_grad and parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        model.base_model.update_and_allocate(state.global_step)


def adapter_callbacks(recipe: Recipe) -> list[TrainerCallback]:
    """Trainer callbacks the adapter method needs during training."""
    if recipe.adapter.method == "adalora":
        return [AdaLoraRankAllocation(recipe.adapter)]
    return []


def save_adapter(trainer, directory: Path) -> None:
    """Save the trained adapter (or full model) so that plain `PeftModel.from_pretrained` on the original base works.

    PiSSA/OLoRA rewrite the base weights at initialization; their adapter is saved as the equivalent plain LoRA
    (rank 2r) relative to the unmodified base, using the initial adapter kept by `attach_adapter`.
    """
    trainer.save_model(str(directory))
    initial = getattr(trainer.model, _INITIAL_ADAPTER, None)
    if initial is None or not trainer.is_world_process_zero():
        return
    model = trainer.model
    with tempfile.TemporaryDirectory() as initial_dir:
        model.peft_config[model.active_adapter].save_pretrained(initial_dir)
        save_file({name: tensor.contiguous() for name, tensor in initial.items()}, f"{initial_dir}/{ADAPTER_WEIGHTS}")
        model.save_pretrained(str(directory), path_initial_model_for_weight_conversion=initial_dir)
    # peft's conversion keeps only lora_A/lora_B; the trained task head and DoRA magnitudes carry over unchanged
    # (W_res + BA equals W + the converted update, so the magnitudes' reference norm is the same).
    converted = load_file(directory / ADAPTER_WEIGHTS)
    trained = get_peft_model_state_dict(model)
    carried = {name: tensor for name, tensor in trained.items() if name not in converted and ".lora_A." not in name
               and ".lora_B." not in name}
    save_file({**converted, **carried}, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def count_parameters(model) -> dict[str, int]:
    """Trainable and total parameters as peft / transformers count them (4-bit weights unpacked, ZeRO-3 shards whole),
    and on a quantized base how many layers bitsandbytes quantized (some architectures keep some in full precision)."""
    if isinstance(model, PeftModel):
        trainable, total = model.get_nb_trainable_parameters()
    else:  # full fine-tuning: no adapter
        trainable, total = model.num_parameters(only_trainable=True), model.num_parameters()
    quantized = quantized_layer_count(model)
    return {"trainable": trainable, "total": total, **({"quantized_layers": quantized} if quantized else {})}


def adapter_record(recipe: Recipe, base_config: PretrainedConfig, task_info: dict) -> dict:
    """What an adapter folder needs to be deployed on its own: the base it was trained on and its task.

    Written next to the weights as `run_folder.ADAPTER_RECORD`; attaching checks the base fingerprint against it.
    """
    fields = architecture(base_config)
    return {
        "base": {
            "name": recipe.model.name,
            "location": model_location(recipe.model),
            "hub_id": hub_id(recipe.model.name, recipe.model.hub_id),
            "revision": recipe.model.revision,
            "architecture": fields,
            "fingerprint": fingerprint(fields),
        },
        "task": {"type": recipe.task.type, **task_info},
        "quantization": recipe.quantization.model_dump(mode="json"),
        "generation": recipe.generation.model_dump(mode="json"),  # deployment decodes as the run's evaluation did
    }
