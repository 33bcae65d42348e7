"""Which mixed precision a recipe means on this machine (shared by TrainingArguments and DeepSpeed's config)."""

from __future__ import annotations

import torch


def resolve_precision(precision: str) -> str:
    """`auto` means bf16 where the GPU supports it, else fp32 (CPUs gain nothing from fp16/bf16 autocast)."""
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
