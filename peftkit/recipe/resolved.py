"""Settings a recipe leaves to peftkit, resolved: pure functions of the recipe (and the machine), shared by the
trainer, DeepSpeed's config and the planner so that neither has to import the other."""

from __future__ import annotations

import torch

from peftkit.recipe.schema import Recipe


def resolve_precision(precision: str) -> str:
    """`auto` means bf16 where the GPU supports it, else fp32 (CPUs gain nothing from fp16/bf16 autocast)."""
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def resolve_gradient_checkpointing(recipe: Recipe) -> bool:
    """Unset means on for a quantized base: QLoRA trades recomputation for activation memory. Never for prefix
    tuning: its prefix is a key/value cache, which recomputed layers do not receive."""
    if recipe.training.gradient_checkpointing is not None:
        return recipe.training.gradient_checkpointing
    return recipe.quantization.bits is not None and recipe.adapter.method != "prefix_tuning"
