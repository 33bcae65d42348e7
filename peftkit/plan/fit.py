"""`peftkit plan --fit`: search recipe changes that make training fit, cheapest expected slowdown first.

Each change has a rough step-time factor (docs/plan.md lists them with their sources); a combination costs
the product of its factors. Changing the micro-batch raises gradient accumulation so the global batch stays.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig

from peftkit.errors import UserError
from peftkit.plan.memory import MemoryPlan, estimate, planning_precision
from peftkit.plan.shapes import ParameterCounts, count_parameters, load_model_config
from peftkit.recipe.load import set_key_path, validate_recipe
from peftkit.recipe.schema import Recipe
from peftkit.recipe.resolved import resolve_gradient_checkpointing

# Expected step-time factor of each change, relative to the recipe as written.
SLOWDOWN = {
    "model.dtype=bfloat16": 1.0,  # 16-bit base weights: what mixed precision computes in anyway
    "training.lm_loss=chunked": 1.0,  # measured equal or faster (docs/plan.md)
    "data.max_length_halving": 1.3,  # not slower, but it truncates examples: tried after changes that keep the data
    "quantization.bits=8": 1.6,  # LLM.int8 matmuls with outlier decomposition
    "quantization.bits=4": 1.25,  # dequantize every 4-bit weight in forward and backward
    "training.gradient_checkpointing=True": 1.33,  # one extra forward pass
    "training.optimizer=paged_adamw_8bit": 1.02,
    "distributed.strategy=deepspeed,zero_stage=1": 1.0,
    "distributed.strategy=deepspeed,zero_stage=2": 1.05,
    "distributed.strategy=deepspeed,zero_stage=3": 1.2,
    "distributed.strategy=fsdp": 1.15,
    "distributed.fsdp_reshard_after_forward=True": 1.1,  # every layer gathered again for its backward
    "distributed.offload_optimizer=True": 1.6,
    "distributed.offload_params=True": 2.5,
    "micro_batch_halving": 1.15,  # per halving: smaller matmuls use the GPU less well
}


@dataclass(frozen=True)
class Candidate:
    overrides: dict[str, Any]
    slowdown: float
    plan: MemoryPlan

    def as_overrides(self) -> str:
        return " ".join(f"{key}={_yaml_scalar(value)}" for key, value in self.overrides.items())


def _yaml_scalar(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def plan_recipe(
    recipe: Recipe, gpus: int, gpu_memory: int | None, counts: ParameterCounts | None = None,
    config: PretrainedConfig | None = None,
) -> MemoryPlan:
    """`config`: the base model's, when the caller has loaded it already."""
    return estimate(recipe, counts or count_parameters(recipe, config), gpus, gpu_memory)


def _options(recipe: Recipe, gpus: int) -> list[list[tuple[dict[str, Any], float]]]:
    """Per axis, the alternatives to the recipe as written (the first, empty one keeps it)."""
    keep = ({}, 1.0)
    weights = [keep]
    if recipe.quantization.bits is None and recipe.model.resolved_dtype(on_gpu=True) == "float32":
        weights.append(({"model.dtype": "bfloat16"}, SLOWDOWN["model.dtype=bfloat16"]))
    loss = [keep]
    if recipe.training.lm_loss == "standard":
        loss.append(({"training.lm_loss": "chunked"}, SLOWDOWN["training.lm_loss=chunked"]))
    quantization = [keep]
    if recipe.adapter.method != "none" and recipe.quantization.bits != 4:
        # k-bit layers compute in the training precision, not float32 (which would also double the activations)
        compute = {} if planning_precision(recipe) == "fp32" or recipe.quantization.compute_dtype != "float32" else {
            "quantization.compute_dtype": "bfloat16" if planning_precision(recipe) == "bf16" else "float16"}
        if recipe.quantization.bits is None:
            quantization.append(({"quantization.bits": 8}, SLOWDOWN["quantization.bits=8"]))
        quantization.append(({"quantization.bits": 4, **compute}, SLOWDOWN["quantization.bits=4"]))
    checkpointing = [keep]
    if not resolve_gradient_checkpointing(recipe):
        checkpointing.append(({"training.gradient_checkpointing": True}, SLOWDOWN["training.gradient_checkpointing=True"]))
    optimizer = [keep]
    if recipe.training.optimizer in ("adamw_torch", "paged_adamw_32bit"):
        optimizer.append(({"training.optimizer": "paged_adamw_8bit"}, SLOWDOWN["training.optimizer=paged_adamw_8bit"]))
    sharding = [keep]
    stages = (1, 2, 3) if gpus > 1 else (3,)  # one GPU gains from ZeRO only through offloading
    for stage in stages:
        base = {"distributed.strategy": "deepspeed", "distributed.zero_stage": stage}
        cost = SLOWDOWN[f"distributed.strategy=deepspeed,zero_stage={stage}"]
        offload_optimizer = {**base, "distributed.offload_optimizer": True}
        if gpus > 1:
            sharding.append((base, cost))
        sharding.append((offload_optimizer, cost * SLOWDOWN["distributed.offload_optimizer=True"]))
        if stage == 3:
            sharding.append((
                {**offload_optimizer, "distributed.offload_params": True},
                cost * SLOWDOWN["distributed.offload_optimizer=True"] * SLOWDOWN["distributed.offload_params=True"],
            ))
    if gpus > 1:
        sharding.append(({"distributed.strategy": "fsdp"}, SLOWDOWN["distributed.strategy=fsdp"]))
        sharding.append((
            {"distributed.strategy": "fsdp", "distributed.offload_params": True},
            SLOWDOWN["distributed.strategy=fsdp"] * SLOWDOWN["distributed.offload_params=True"],
        ))
    if recipe.distributed.strategy == "fsdp" and not recipe.distributed.fsdp_reshard_after_forward:
        sharding.append(({"distributed.fsdp_reshard_after_forward": True},
                         SLOWDOWN["distributed.fsdp_reshard_after_forward=True"]))
    sharding = [keep] + [(o, c) for o, c in sharding[1:] if not _already(recipe, o)]  # `keep` is always "already"
    micro_batch = [keep]
    batch, accumulation, halvings = recipe.training.batch_size, recipe.training.gradient_accumulation, 0
    while batch % 2 == 0:
        batch, accumulation, halvings = batch // 2, accumulation * 2, halvings + 1
        micro_batch.append((
            {"training.batch_size": batch, "training.gradient_accumulation": accumulation},
            SLOWDOWN["micro_batch_halving"] ** halvings,
        ))
    length = [keep]
    max_length = recipe.data.max_length
    for halvings in (1, 2):
        if max_length >> halvings >= 128:
            length.append(({"data.max_length": max_length >> halvings}, SLOWDOWN["data.max_length_halving"] ** halvings))
    return [weights, loss, quantization, checkpointing, optimizer, sharding, micro_batch, length]


def _already(recipe: Recipe, overrides: dict[str, Any]) -> bool:
    dumped = recipe.model_dump()
    return all(dumped[section][key] == value for path, value in overrides.items() for section, key in [path.split(".")])


def _with_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe | None:
    """The changed recipe, or None when the schema rejects the combination."""
    data = recipe.model_dump()
    for path, value in overrides.items():
        set_key_path(data, path.split("."), value)
    try:
        return validate_recipe(data)
    except UserError:
        return None


def _sharded_4bit_storage(recipe: Recipe, overrides: dict[str, Any]) -> dict[str, Any]:
    """ZeRO-3/FSDP shard 4-bit weights only when they are stored in the compute dtype."""
    bits = overrides.get("quantization.bits", recipe.quantization.bits)
    strategy = overrides.get("distributed.strategy", recipe.distributed.strategy)
    stage = overrides.get("distributed.zero_stage", recipe.distributed.zero_stage)
    sharded = strategy == "fsdp" or (strategy == "deepspeed" and stage == 3)
    if bits == 4 and sharded and recipe.quantization.storage_dtype != recipe.quantization.compute_dtype:
        return {**overrides, "quantization.storage_dtype": recipe.quantization.compute_dtype}
    return overrides


def search(recipe: Recipe, gpus: int, gpu_memory: int, limit: int = 5) -> list[Candidate]:
    """Recipe changes that fit `gpu_memory` per GPU, cheapest first, without ones that merely add to a cheaper fit.

    Each candidate's plan is that of the changed recipe, re-validated and re-counted (its model dtype and
    quantization change the parameter counts), so a suggestion fits by the same estimate `peftkit plan` prints.
    """
    counts_by_quantization: dict[Any, ParameterCounts] = {}
    config = load_model_config(recipe.model)
    fitting: list[Candidate] = []
    for combination in itertools.product(*_options(recipe, gpus)):
        overrides: dict[str, Any] = {}
        slowdown = 1.0
        for option, cost in combination:
            overrides.update(option)
            slowdown *= cost
        overrides = _sharded_4bit_storage(recipe, overrides)
        changed = _with_overrides(recipe, overrides)
        if changed is None:
            continue
        key = changed.quantization.model_dump_json(), changed.model.dtype
        if key not in counts_by_quantization:
            counts_by_quantization[key] = count_parameters(changed, config)
        plan = estimate(changed, counts_by_quantization[key], gpus, gpu_memory)
        if plan.fits:
            fitting.append(Candidate(overrides, slowdown, plan))
    fitting.sort(key=lambda c: (c.slowdown, c.plan.total))
    kept: list[Candidate] = []
    for candidate in fitting:
        if not any(_includes(candidate.overrides, cheaper.overrides) for cheaper in kept):
            kept.append(candidate)
    return kept[:limit]


def _includes(overrides: dict[str, Any], smaller: dict[str, Any]) -> bool:
    return all(overrides.get(key) == value for key, value in smaller.items())
