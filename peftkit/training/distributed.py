"""Sharding: the recipe's `distributed` section turned into DeepSpeed / FSDP settings, checked against the launcher.

The recipe decides *how* the model is sharded (strategy, ZeRO stage, offload); the launcher (`torchrun`,
`accelerate launch --config_file launch/...`) decides *where* processes run. When an accelerate config also names
a sharding strategy it must agree with the recipe, otherwise the run stops before any model is loaded.
Every DeepSpeed value is explicit (no "auto"): batch sizes are computed from the real world size.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from peftkit.errors import UserError
from peftkit.recipe.schema import Recipe
from peftkit.run_folder import DEEPSPEED_FILE, FSDP_FILE, write_json
from peftkit.recipe.resolved import resolve_precision

# DeepSpeed fields that an accelerate config may set; once they are checked against the recipe, the
# generated config is the only one in force (accelerate refuses to combine both otherwise).
_ACCELERATE_DEEPSPEED_FIELDS = "ACCELERATE_CONFIG_DS_FIELDS"


def launched_world_size(environ: Mapping[str, str] = os.environ) -> int:
    """Processes started by torchrun / accelerate launch (1 for a plain `python -m peftkit`).

    Not `PartialState().num_processes`: it is needed before the TrainingArguments are built, and creating the
    accelerate state earlier would fix its backend before CPU DeepSpeed ranks ask for gloo."""
    return int(environ.get("WORLD_SIZE", "1"))


def resolve_strategy(recipe: Recipe, world_size: int) -> str:
    """`single`, `ddp`, `deepspeed` or `fsdp`; `auto` is DDP on several processes."""
    strategy = recipe.distributed.strategy
    if strategy == "auto":
        return "ddp" if world_size > 1 else "single"
    if strategy == "ddp" and world_size == 1:
        return "single"
    return strategy


def build_deepspeed_config(recipe: Recipe, world_size: int) -> dict | None:
    """The DeepSpeed JSON for this recipe and world size; None unless the strategy is deepspeed.

    The optimizer and scheduler are left to the Trainer (same math as without DeepSpeed). Under ZeRO-3 the
    16-bit gather on save is on, so saved adapters hold the full weights rather than empty partitions.
    """
    distributed, training = recipe.distributed, recipe.training
    if resolve_strategy(recipe, world_size) != "deepspeed":
        return None
    precision = resolve_precision(training.precision)
    zero: dict = {"stage": distributed.zero_stage, "contiguous_gradients": True, "overlap_comm": False}
    if distributed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if distributed.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if distributed.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": training.batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation,
        "train_batch_size": training.batch_size * training.gradient_accumulation * world_size,
        "gradient_clipping": training.max_grad_norm,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
        # The Trainer's torch optimizer also runs on offloaded states (DeepSpeed's CPU Adam needs compiled ops).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_fsdp_config(recipe: Recipe, world_size: int) -> dict | None:
    """`TrainingArguments.fsdp_config` (FSDP2, wrapping the model's transformer blocks); None unless fsdp."""
    distributed = recipe.distributed
    if resolve_strategy(recipe, world_size) != "fsdp":
        return None
    return {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "reshard_after_forward": distributed.fsdp_reshard_after_forward,
        "cpu_offload": distributed.offload_params,
        # Adapters are small: every save gathers them into one plain PEFT folder.
        "state_dict_type": "FULL_STATE_DICT",
        # QLoRA: load the quantized base on rank 0 only and let FSDP scatter the shards (peft's FSDP-QLoRA recipe).
        "cpu_ram_efficient_loading": recipe.quantization.bits == 4,
    }


def configure_cpu_deepspeed_processes() -> dict:
    """Set up DeepSpeed's process group for several ranks without GPUs; returns TrainingArguments' accelerator_config.

    There accelerate starts DeepSpeed without a backend and then counts every rank as rank 0 of 1: each rank
    would train on all the data and write every file. Initialising the state with gloo first gives the real
    ranks and world size, and the Trainer adopts that state instead of building its own.
    """
    from accelerate import PartialState

    launched = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # how accelerate recognises DeepSpeed ranks
    try:
        PartialState(backend="gloo")
    finally:
        if launched is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return {"use_configured_state": True}


def write_sharding_configs(run_dir: Path, recipe: Recipe, world_size: int, deepspeed: dict | None) -> None:
    """Record the generated DeepSpeed / FSDP settings in the run folder (what actually ran). `deepspeed` is the
    config the TrainingArguments were built with (built once per run; the Trainer works on its own copy)."""
    for name, config in ((DEEPSPEED_FILE, deepspeed), (FSDP_FILE, build_fsdp_config(recipe, world_size))):
        if config is not None:
            write_json(run_dir / name, config)


def launcher_sharding(environ: Mapping[str, str]) -> dict:
    """What `accelerate launch` asked for, read from the environment it sets for each process."""
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        sharding = {"strategy": "deepspeed"}
        if "ACCELERATE_DEEPSPEED_ZERO_STAGE" in environ:
            sharding["zero_stage"] = int(environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
        for key, variable in (("offload_optimizer", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"),
                              ("offload_params", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")):
            if variable in environ:
                sharding[key] = environ[variable].lower() not in ("none", "")
        return sharding
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        sharding = {"strategy": "fsdp"}
        for key, variable in (("offload_params", "FSDP_OFFLOAD_PARAMS"),
                              ("fsdp_reshard_after_forward", "FSDP_RESHARD_AFTER_FORWARD")):
            if variable in environ:
                sharding[key] = environ[variable].lower() == "true"
        return sharding
    return {}


def check_strategy_runs_here(recipe: Recipe, world_size: int) -> None:
    """Raise a UserError for FSDP without a GPU: accelerate would silently run DDP (every rank a full copy).

    accelerate's `AcceleratorState` turns on FSDP only for GPU-like distributed types, never for MULTI_CPU.
    """
    if resolve_strategy(recipe, world_size) == "fsdp" and not torch.cuda.is_available():
        raise UserError(
            "distributed.strategy: fsdp needs GPUs; without one accelerate runs plain DDP and nothing is sharded. "
            "On CPU use distributed.strategy: deepspeed with distributed.zero_stage: 3 (shards parameters, "
            "QLoRA included) or distributed.strategy: ddp"
        )


def check_launcher_agrees(recipe: Recipe, environ: Mapping[str, str], world_size: int) -> None:
    """Raise a UserError when the accelerate config contradicts the recipe's sharding or precision."""
    launcher = launcher_sharding(environ)
    strategy = resolve_strategy(recipe, world_size)
    hint = (
        "the recipe decides sharding: set the recipe's distributed section (or override it, e.g. "
        "distributed.strategy=deepspeed distributed.zero_stage=3) to match, or launch with the matching "
        "launch/*.yaml file (docs/distributed.md)"
    )
    if launcher and launcher["strategy"] != strategy:
        raise UserError(
            f"distributed.strategy: the accelerate config asks for {launcher['strategy']} but the recipe resolves "
            f"to {strategy}; {hint}"
        )
    for key, value in launcher.items():
        if key != "strategy" and getattr(recipe.distributed, key) != value:
            raise UserError(
                f"distributed.{key}: the accelerate config sets {value} but the recipe sets "
                f"{getattr(recipe.distributed, key)}; {hint}"
            )
    launcher_precision = environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    precision = resolve_precision(recipe.training.precision)
    if launcher_precision in ("bf16", "fp16") and launcher_precision != precision:
        raise UserError(
            f"training.precision: the accelerate config sets mixed_precision {launcher_precision} but the recipe "
            f"resolves to {precision}; set training.precision={launcher_precision} or mixed_precision: 'no' in the "
            "accelerate config (the recipe decides precision)"
        )


def adopt_recipe_sharding(environ: dict = os.environ) -> None:
    """After `check_launcher_agrees`, let the generated DeepSpeed config be the only one accelerate reads."""
    environ.pop(_ACCELERATE_DEEPSPEED_FIELDS, None)
