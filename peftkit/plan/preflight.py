"""Warn before training when the plan says the recipe will not fit the visible GPUs (no-op without CUDA)."""

from __future__ import annotations

import logging
import os

import torch
from transformers import PretrainedConfig

from peftkit.plan.fit import plan_recipe
from peftkit.plan.memory import format_bytes
from peftkit.recipe.schema import Recipe

log = logging.getLogger("peftkit")


def warn_if_recipe_will_not_fit(recipe: Recipe, config: PretrainedConfig) -> None:
    """`config` is the base model's, loaded once by the caller."""
    if not torch.cuda.is_available():
        return
    gpus = int(os.environ.get("WORLD_SIZE", "1"))
    gpu_memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    try:
        plan = plan_recipe(recipe, gpus, gpu_memory, config=config)
    except Exception as error:  # a planning gap (unusual architecture) must never stop a run
        log.warning("memory plan skipped: %s", error)
        return
    if not plan.fits:
        log.warning(
            "the memory plan predicts %s per GPU but each GPU has %s: this run will likely run out of memory; "
            "`peftkit plan RECIPE --fit` lists recipe changes that fit",
            format_bytes(plan.total), format_bytes(gpu_memory),
        )
