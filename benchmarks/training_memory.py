"""Peak process memory (RSS) of training steps: full fine-tuning vs LoRA vs QLoRA on the same model, on CPU.

Each setting runs in its own process: the model is loaded and prepared through peftkit (`build_model`,
`attach_adapter`), the peak-RSS counter is reset (Linux `clear_refs`), then a few AdamW steps on random tokens
run and the process reports its peak RSS (`VmHWM`). The peak therefore covers the training steps (weights,
gradients, optimizer state, activations) and not the one-off cost of loading/quantizing the checkpoint.
Ratios are against full fine-tuning measured in the same invocation.

    python -m benchmarks.training_memory [--shape bench-100m] [--steps 3] [--batch 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.random_llama import save_random_llama

SETTINGS = {
    "full fine-tuning": {"adapter": {"method": "none"}},
    "LoRA r=16": {"adapter": {"method": "lora", "r": 16, "alpha": 32}},
    "QLoRA r=16 (nf4)": {
        "adapter": {"method": "lora", "r": 16, "alpha": 32}, "quantization": {"bits": 4},
        "training": {"gradient_checkpointing": False, "eval_strategy": "no"},
    },
    "QLoRA r=16 (nf4) + grad. checkpointing": {
        "adapter": {"method": "lora", "r": 16, "alpha": 32}, "quantization": {"bits": 4},
        "training": {"gradient_checkpointing": True, "eval_strategy": "no"},
    },
}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _own_unquantized_weights(model) -> None:
    """Copy weights still backed by the memory-mapped checkpoint into process memory, in every setting alike.

    transformers maps the safetensors file: unquantized weights stay file-backed pages (counted in RSS only once
    touched), and a quantized model keeps the fp32 file's pages resident after quantizing from them. Owning the
    weights and dropping the mapping makes RSS count each setting's real weights once.
    """
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            if type(parameter).__name__ not in ("Params4bit", "Int8Params"):
                parameter.data = parameter.data.clone()
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.clone()


def _release_and_reset_peak() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back so the reset peak starts from live memory
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS


def measure(model_dir: Path, setting: dict, steps: int, batch: int, seq: int) -> dict:
    """Runs in the child process: prepare the model as peftkit does, then train and report peak RSS in MB."""
    import torch
    from transformers import AutoModelForCausalLM

    from peftkit.adapters import attach_adapter, count_parameters
    from peftkit.models.build import build_model
    from peftkit.recipe.load import validate_recipe
    from peftkit.recipe.resolved import resolve_gradient_checkpointing

    torch._dynamo.config.disable = True  # bitsandbytes' CPU kernels would compile per shape inside the measurement
    recipe = validate_recipe({
        "model": {"name": str(model_dir)}, "data": {"train": {"path": "unused.jsonl"}},
        "training": {"eval_strategy": "no"}, **setting,
    })
    before_load = _status_kb("VmRSS")
    model = build_model(recipe.model, recipe.quantization, AutoModelForCausalLM)
    _own_unquantized_weights(model)
    model = attach_adapter(model, recipe, "CAUSAL_LM")
    if resolve_gradient_checkpointing(recipe):
        model.activation_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    _release_and_reset_peak()
    after_load = _status_kb("VmRSS")
    for _ in range(steps):
        tokens = torch.randint(vocab, (batch, seq), generator=generator)
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {
        "before_load_mb": before_load / 1024,
        "after_load_mb": after_load / 1024,
        "file_backed_after_load_mb": _status_kb("RssFile") / 1024,  # e.g. checkpoint pages still mapped
        "peak_mb": _status_kb("VmHWM") / 1024,
        "trainable": count_parameters(model)["trainable"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="bench-100m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dir", type=Path, help="where the random checkpoint is written (default: a temp folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.dir, SETTINGS[args.child], args.steps, args.batch, args.seq)))
        return
    with tempfile.TemporaryDirectory() as temporary:
        model_dir = save_random_llama(args.dir or Path(temporary) / args.shape, args.shape)
        results = {}
        for label in SETTINGS:
            command = [sys.executable, "-m", "benchmarks.training_memory", "--child", label, "--dir", str(model_dir),
                       "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[label] = json.loads(output.strip().splitlines()[-1])
    print(f"model: {args.shape}; {args.steps} AdamW steps of {args.batch}x{args.seq} tokens on CPU")
    full = results["full fine-tuning"]
    full_growth = full["peak_mb"] - full["before_load_mb"]
    print(f"{'setting':<40} {'trainable':>11} {'peak RSS MB':>12} {'ratio':>7} {'peak - runtime MB':>18} {'ratio':>7} "
          f"{'RSS at start MB':>16} {'file-backed MB':>15}")
    for label, row in results.items():
        growth = row["peak_mb"] - row["before_load_mb"]
        print(f"{label:<40} {row['trainable']:>11,} {row['peak_mb']:12.0f} {row['peak_mb'] / full['peak_mb']:7.3f} "
              f"{growth:18.0f} {growth / full_growth:7.3f} {row['after_load_mb']:16.0f} {row['file_backed_after_load_mb']:15.0f}")


if __name__ == "__main__":
    main()
