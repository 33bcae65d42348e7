"""Which mixed precision a recipe means on this machine (shared by TrainingArguments and DeepSpeed's config)."""

from __future__ import annotations

import warnings

import torch


def resolve_precision(precision: str) -> str:
    """The precision training really uses, which the run records (metrics.json `setup`, manifest.json).

    `auto` means bf16 where the GPU supports it, else fp32 (CPUs gain nothing from fp16/bf16 autocast). fp16 needs
    a GPU: on a CPU accelerate builds no gradient scaler and no fp16 autocast, so the run is fp32 and says so.
    """
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not torch.cuda.is_available():
        warnings.warn("training.precision: fp16 needs a GPU; this CPU run trains (and is recorded) in fp32", stacklevel=2)
        return "fp32"
    return precision
