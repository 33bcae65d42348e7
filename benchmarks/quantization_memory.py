"""Bytes of base weights after bitsandbytes quantization, as a fraction of the fp32 weights (same model, same process).

Model: a random-init Llama of ~105M parameters (`bench-100m` in random_llama.py), loaded through peftkit's own
`build_model` with each quantization setting. Counted: every parameter and buffer plus the quantization
state bitsandbytes keeps beside each weight (4-bit absmax/code tables, 8-bit row scales), i.e. what the model
holds in memory. Embeddings, norms and the (tied) output layer stay unquantized, as in any QLoRA model; the
shape keeps them at 2% of the weights so that the ratio measures the quantized layers, and the linear-layers-only
ratio is printed too (its floor is 4/32 = 0.125 for 4 bits).

    python -m benchmarks.quantization_memory [--shape bench-100m] [--dir /tmp/peftkit-bench-100m]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import torch

from benchmarks.random_llama import save_random_llama

SETTINGS = {
    "fp32": {},
    "8-bit": {"bits": 8},
    "4-bit fp4": {"bits": 4, "quant_type": "fp4", "double_quant": False},
    "4-bit nf4": {"bits": 4, "quant_type": "nf4", "double_quant": False},
    "4-bit nf4 + double quant": {"bits": 4, "quant_type": "nf4", "double_quant": True},
}


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def weight_bytes(model) -> tuple[int, int]:
    """(all weights, weights of linear layers inside the decoder blocks), quantization state included."""
    total = _tensor_bytes(itertools.chain(model.parameters(), model.buffers()))
    linear = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or not isinstance(module, torch.nn.Linear) or ".layers." not in name:
            continue
        extra = 0
        if getattr(weight, "quant_state", None) is not None:  # 4-bit: absmax, code tables, nested statistics
            extra = _tensor_bytes(weight.quant_state.as_dict(packed=True).values())
        elif getattr(weight, "SCB", None) is not None:  # 8-bit: one fp32 scale per output row
            extra = _tensor_bytes([weight.SCB])
        total += extra
        linear += _tensor_bytes([weight]) + extra
    return total, linear


def load(model_dir: Path, quantization: dict):
    from transformers import AutoModelForCausalLM

    from peftkit.models.build import build_model
    from peftkit.recipe.load import validate_recipe

    recipe = validate_recipe({
        "model": {"name": str(model_dir)}, "data": {"train": {"path": "unused.jsonl"}},
        "training": {"eval_strategy": "no"}, "quantization": quantization,
    })
    return build_model(recipe.model, recipe.quantization, AutoModelForCausalLM)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="bench-100m")
    parser.add_argument("--dir", type=Path, help="where the random checkpoint is written (default: a temp folder)")
    args = parser.parse_args()
    torch._dynamo.config.disable = True  # bitsandbytes' CPU quantizer would torch.compile every weight shape
    with tempfile.TemporaryDirectory() as temporary:
        model_dir = save_random_llama(args.dir or Path(temporary) / args.shape, args.shape)
        rows = {}
        for label, quantization in SETTINGS.items():
            model = load(model_dir, quantization)
            rows[label] = weight_bytes(model)
            parameters = sum(p.numel() for p in model.parameters()) if label == "fp32" else None
            if parameters:
                print(f"model: {args.shape}, {parameters / 1e6:.1f}M parameters")
            del model
    base_total, base_linear = rows["fp32"]
    print(f"{'setting':<26} {'MB':>8} {'ratio vs fp32':>14} {'linear layers only':>19}")
    for label, (total, linear) in rows.items():
        print(f"{label:<26} {total / 1e6:8.1f} {total / base_total:14.4f} {linear / base_linear:19.4f}")


if __name__ == "__main__":
    main()
