"""Predicted vs measured peak GPU memory: random-init models with real shapes, a few training steps per recipe.

    python benchmarks/plan_vs_measured.py            # GPU grid (1B, 3B, 8B Llama, 7B Qwen2), < 8 min on one H200
    python benchmarks/plan_vs_measured.py --smoke    # tiny Llama on CPU: exercises the same code path

Each row prints the plan's allocated bytes (everything but the runtime allowance) next to
`torch.cuda.max_memory_allocated`, their ratio (target: within 10%), and what the allowance must cover
(CUDA context + allocator slack: device memory in use minus the peak allocated bytes).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from peftkit.adapters import attach_adapter
from peftkit.models.build import build_model
from peftkit.plan.memory import GiB, estimate
from peftkit.plan.shapes import count_parameters, known_models
from peftkit.recipe.load import deep_merge, validate_recipe
from peftkit.training.arguments import build_training_args
from peftkit.tasks.lm_loss import EfficientLMLoss

LORA = {"adapter": {"r": 16, "alpha": 32, "dropout": 0.05}}
QLORA = deep_merge(LORA, {"quantization": {"bits": 4, "compute_dtype": "bfloat16"}})
INT8 = deep_merge(LORA, {"quantization": {"bits": 8}})
FULL = {"adapter": {"method": "none"}}
CHECKPOINTED = {"training": {"gradient_checkpointing": True}}


def shape(batch: int, seq: int, **training) -> dict:
    return {"data": {"max_length": seq}, "training": {"batch_size": batch, **training}}


GRID = {
    "meta-llama/Llama-3.2-1B": [
        deep_merge(LORA, shape(4, 1024)),
        deep_merge(FULL, shape(2, 1024)),
        deep_merge(QLORA, shape(4, 1024)),
        deep_merge(deep_merge(LORA, {"adapter": {"use_dora": True}}), deep_merge(CHECKPOINTED, shape(2, 1024))),
    ],
    "meta-llama/Llama-3.2-3B": [
        deep_merge(LORA, shape(2, 1024)),
        deep_merge(deep_merge(QLORA, CHECKPOINTED), shape(4, 2048)),
        deep_merge(deep_merge(LORA, {"model": {"attn_implementation": "eager"}}), shape(1, 1024)),
    ],
    "meta-llama/Llama-3.1-8B": [
        deep_merge(deep_merge(LORA, CHECKPOINTED), shape(2, 2048)),
        deep_merge(deep_merge(QLORA, CHECKPOINTED), shape(2, 2048)),
        deep_merge(deep_merge(QLORA, CHECKPOINTED), shape(2, 2048, lm_loss="standard")),
        deep_merge(deep_merge(INT8, CHECKPOINTED), shape(1, 1024)),
    ],
    "Qwen/Qwen2-7B": [
        deep_merge(deep_merge(LORA, CHECKPOINTED), shape(2, 1024)),
        deep_merge(QLORA, shape(1, 1024, optimizer="paged_adamw_8bit")),
    ],
}

TINY_LLAMA = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def recipe_for(model_dir: Path, sections: dict):
    base = {
        "model": {"name": str(model_dir), "dtype": "bfloat16"},
        "data": {"train": {"path": "unused.jsonl"}},
        "training": {"eval_strategy": "no", "precision": "bf16"},
    }
    return validate_recipe(deep_merge(base, sections))


def save_random_model(config, directory: Path, device: str) -> None:
    """Random weights with the real shapes, saved as a normal model folder (what peftkit loads)."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    del model


def train_steps(recipe, steps: int, device: str, workdir: Path) -> None:
    """Load, attach the adapter and run `steps` optimizer steps the way the trainer does."""
    from transformers import Trainer

    device_map = {"": 0} if device == "cuda" else None
    model = build_model(recipe.model, recipe.quantization, AutoModelForCausalLM, model_kwargs={"device_map": device_map})
    if recipe.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = attach_adapter(model, recipe, "CAUSAL_LM")
    efficient = EfficientLMLoss.for_model(model, recipe.training.lm_loss)  # the loss the plan assumes
    optimizer = Trainer(model=model, args=build_training_args(recipe, workdir, "loss")).create_optimizer()
    vocab = model.config.vocab_size
    shape_ = (recipe.training.batch_size, recipe.data.max_length)
    for _ in range(steps):
        tokens = torch.randint(0, vocab, shape_, device=device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=recipe.training.precision == "bf16"):
            if efficient is None:
                loss = model(input_ids=tokens, labels=tokens).loss
            else:
                loss = efficient.loss(model, {"input_ids": tokens, "labels": tokens})[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    del model, optimizer


def describe(recipe) -> str:
    parts = [recipe.adapter.method if not recipe.quantization.bits else f"{recipe.quantization.bits}-bit lora"]
    if recipe.adapter.use_dora:
        parts.append("dora")
    parts.append(f"bs{recipe.training.batch_size}x{recipe.data.max_length}")
    if recipe.training.gradient_checkpointing:
        parts.append("ckpt")
    if recipe.model.attn_implementation:
        parts.append(recipe.model.attn_implementation)
    if recipe.training.optimizer != "adamw_torch":
        parts.append(recipe.training.optimizer)
    parts.append(f"{recipe.training.lm_loss} loss")
    return " ".join(parts)


def run(grid: dict[str, list[dict]], configs: dict, steps: int, device: str) -> None:
    print("| model | recipe | predicted | measured | predicted/measured | in use - peak allocated | seconds |")
    print("|---|---|---|---|---|---|---|")
    root = Path(tempfile.mkdtemp(prefix="plan-bench-"))
    try:
        for name, recipes in grid.items():
            model_dir = root / name.replace("/", "--")
            save_random_model(configs[name], model_dir, device)
            for sections in recipes:
                recipe = recipe_for(model_dir, sections)
                predicted = estimate(recipe, count_parameters(recipe, peft_task_type="CAUSAL_LM")).allocated
                start = time.time()
                gc.collect()  # the previous recipe's model and optimizer must be gone before measuring
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                train_steps(recipe, steps, device, root / "work")
                if device == "cuda":
                    measured = torch.cuda.max_memory_allocated()
                    free, total = torch.cuda.mem_get_info()
                    slack = f"{(total - free - measured) / GiB:.2f} GiB"
                    ratio = f"{predicted / measured:.3f}"
                    measured_text = f"{measured / GiB:.2f} GiB"
                else:
                    measured_text, ratio, slack = "n/a (CPU)", "n/a", "n/a"
                print(f"| {name} | {describe(recipe)} | {predicted / GiB:.3f} GiB | {measured_text} | {ratio} | "
                      f"{slack} | {time.time() - start:.0f} |", flush=True)
            shutil.rmtree(model_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny Llama on CPU (no GPU needed)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", help="comma-separated subset of the grid's models (default: all)")
    args = parser.parse_args()
    if args.smoke:
        grid = {"tiny-llama": [deep_merge(LORA, shape(2, 32)), deep_merge(FULL, shape(2, 32)),
                               deep_merge(LORA, shape(2, 32, lm_loss="standard")),
                               deep_merge(deep_merge(LORA, {"adapter": {"use_dora": True}}), shape(2, 32))]}
        configs = {"tiny-llama": AutoConfig.for_model(**TINY_LLAMA)}
        run(grid, configs, steps=1, device="cpu")
        return
    if not torch.cuda.is_available():
        raise SystemExit("no GPU visible: run with --smoke for the CPU check")
    grid = {name: GRID[name] for name in args.models.split(",")} if args.models else GRID
    configs = {name: AutoConfig.for_model(**known_models()[name]) for name in grid}
    run(grid, configs, args.steps, "cuda")


if __name__ == "__main__":
    main()
