"""Settings a recipe leaves to peftkit, resolved: pure functions of the recipe (and the machine), shared by the
trainer, DeepSpeed's config and the planner so that neither has to import the other."""

from __future__ import annotations

import functools
import logging

import torch

from peftkit.recipe.schema import Recipe


def resolve_precision(precision: str, for_gpu: bool = False) -> str:
    """The precision training really uses, which the run records (metrics.json `setup`, manifest.json).

    `auto` means bf16 where the GPU supports it, else fp32. On a CPU with native bf16 (AVX512-BF16/AMX) bf16 autocast
    runs a single 1024x576 @ 576x1536 matmul 4.9x faster than fp32 at one thread, but whole LoRA steps of
    SmolLM2-135M gained little and not reliably (benchmarks/peers.py, fp32 -> bf16 tokens/s: SFT 93 -> 97 same
    seed, TRL's SFTTrainer 82 -> 65; DPO 60 -> 66, TRL's 56 -> 77; losses within 0.7%). `auto` stays fp32 there;
    `training.precision: bf16` is worth measuring on such CPUs, and CPUs without native bf16 emulate it. fp16 needs
    a GPU: on a CPU accelerate builds no gradient scaler and no fp16 autocast, so the run is fp32 and says so.
    `for_gpu` resolves it for a bf16-capable GPU instead of this machine (what the planner plans for).
    """
    if for_gpu:
        return "bf16" if precision == "auto" else precision
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not torch.cuda.is_available():
        _say_once("training.precision: fp16 needs a GPU; this CPU run trains (and is recorded) in fp32")
        return "fp32"
    return precision


def resolve_gradient_checkpointing(recipe: Recipe) -> bool:
    """Unset means on for a quantized base: QLoRA trades recomputation for activation memory. Never for prefix
    tuning: its prefix is a key/value cache, which recomputed layers do not receive."""
    if recipe.training.gradient_checkpointing is not None:
        return recipe.training.gradient_checkpointing
    return recipe.quantization.bits is not None and recipe.adapter.method != "prefix_tuning"


@functools.cache
def _say_once(message: str) -> None:
    """On the console (peftkit's logger: the user asked for something else), once per process however often the
    setting is resolved. A Python warning went only to the run's log file."""
    logging.getLogger("peftkit").warning(message)
