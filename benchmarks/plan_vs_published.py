"""Predicted per-GPU memory next to published measurements, with the published runs' settings.

Run: python benchmarks/plan_vs_published.py   (offline: built-in model shapes, meta-device counting)
Each published figure comes from a framework that differs from peftkit in ways listed in docs/plan.md.
"""

from __future__ import annotations

from peftkit.plan.memory import GiB, estimate
from peftkit.plan.shapes import count_parameters
from peftkit.recipe.load import deep_merge, validate_recipe

GB = 10**9

TORCHTUNE_LLAMA2_LORA = {
    "model": {"name": "meta-llama/Llama-2-7b-hf", "dtype": "bfloat16"}, "data": {"max_length": 512},
    "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
    "training": {"batch_size": 2, "gradient_checkpointing": True, "precision": "bf16"},
}
TORCHTUNE_4BIT = {"quantization": {"bits": 4, "compute_dtype": "bfloat16", "double_quant": False}}
PEFT_FSDP_QLORA_70B = {
    "model": {"name": "meta-llama/Llama-2-70b-hf", "dtype": "bfloat16", "attn_implementation": "flash_attention_2"},
    "data": {"max_length": 2048}, "adapter": {"r": 8, "alpha": 16, "dropout": 0.1},
    "quantization": {"bits": 4, "compute_dtype": "bfloat16", "storage_dtype": "bfloat16"},
    "distributed": {"strategy": "fsdp"},
    "training": {"batch_size": 2, "gradient_accumulation": 2, "gradient_checkpointing": True, "precision": "bf16"},
}

# (label, published bytes, what "published" measures, source, recipe sections, gpus)
PUBLISHED = [
    (
        "Llama-3.1-8B QLoRA, 1x 4090 (torchtune README)", 7.4 * GiB, "peak allocated",
        "github.com/pytorch/torchtune README, 'Memory and training speed': bs 2, packed 2048, compile",
        deep_merge(deep_merge(TORCHTUNE_LLAMA2_LORA, TORCHTUNE_4BIT),
                   {"model": {"name": "meta-llama/Llama-3.1-8B"}, "data": {"max_length": 2048}}),
        1,
    ),
    (
        "Llama-2-7B LoRA (torchtune QLoRA tutorial)", 15.57 * GB, "peak reserved",
        "pytorch.org/torchtune/stable/tutorials/qlora_finetune.html: llama2/7B_lora_single_device, bs 2, Alpaca",
        TORCHTUNE_LLAMA2_LORA,
        1,
    ),
    (
        "Llama-2-7B QLoRA (torchtune QLoRA tutorial)", 9.29 * GB, "peak reserved",
        "same tutorial: llama2/7B_qlora_single_device",
        deep_merge(TORCHTUNE_LLAMA2_LORA, TORCHTUNE_4BIT),
        1,
    ),
    (
        "Llama-2-70B FSDP+QLoRA, 2x24GB, no offload (PEFT docs)", 35.6 * GB, "GPU memory in use",
        "huggingface.co/docs/peft/accelerate/fsdp: bs 2, packed 2048, r 8, dropout 0.1, flash-attn, checkpointing",
        PEFT_FSDP_QLORA_70B,
        2,
    ),
    (
        "Llama-2-70B FSDP+QLoRA, 2x24GB, CPU offload (PEFT docs)", 19.6 * GB, "GPU memory in use",
        "same page, fsdp_offload_params: true",
        deep_merge(PEFT_FSDP_QLORA_70B, {"distributed": {"offload_params": True, "offload_optimizer": True}}),
        2,
    ),
]


def recipe_from(sections: dict):
    return validate_recipe(deep_merge({"data": {"train": {"path": "unused.jsonl"}}, "training": {"eval_strategy": "no"}}, sections))


def main() -> None:
    counts_cache = {}
    print(f"| run | published | predicted total | predicted allocated | total / published |")
    print("|---|---|---|---|---|")
    for label, published, kind, source, sections, gpus in PUBLISHED:
        recipe = recipe_from(sections)
        key = recipe.model.name, recipe.quantization.model_dump_json(), recipe.adapter.model_dump_json()
        if key not in counts_cache:
            counts_cache[key] = count_parameters(recipe, peft_task_type="CAUSAL_LM")
        plan = estimate(recipe, counts_cache[key], gpus)
        print(f"| {label} | {published / GiB:.2f} GiB ({kind}) | {plan.total / GiB:.2f} GiB | "
              f"{plan.allocated / GiB:.2f} GiB | {plan.total / published:.2f} |")
        for row in plan.rows:
            print(f"|   {row.component} | | {row.bytes / GiB:.2f} GiB | {row.note} | |")


if __name__ == "__main__":
    main()
