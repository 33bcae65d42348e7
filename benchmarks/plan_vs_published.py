"""Predicted per-GPU memory next to published measurements, with the published runs' settings.

Run: python benchmarks/plan_vs_published.py   (offline: built-in model shapes, meta-device counting)
Each published figure comes from a framework that differs from peftkit in ways listed in docs/plan.md.
"""

from __future__ import annotations

import statistics
import sys

from peftkit.plan.memory import FRAGMENTATION_SHARE, GiB, estimate
from peftkit.plan.shapes import count_parameters
from peftkit.recipe.load import deep_merge, validate_recipe

GB = 10**9

# torchtune v0.1's QLoRA tutorial (docs/source/tutorials/qlora_finetune.rst, commit 0914d5cfb, 2024-04-15):
# configs llama2/7B_{lora,qlora}_single_device: batch 2, alpaca_cleaned (max_seq_len 512 by default, padded to the
# batch's longest), checkpointing, bf16, AdamW; LoRA r 8 / alpha 16 / dropout 0 on q, v (LoRA) or q, k, v, o and the
# MLP (QLoRA); `torch.nn.CrossEntropyLoss` over the float32 logits of every token (recipes/lora_finetune_single_
# device.py:447-453): the standard loss, not a chunked one. torchao's NF4 quantizes the scalers too (double quant).
TORCHTUNE_LLAMA2_LORA = {
    "model": {"name": "meta-llama/Llama-2-7b-hf", "dtype": "bfloat16"}, "data": {"max_length": 512},
    "adapter": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    "training": {"batch_size": 2, "gradient_checkpointing": True, "precision": "bf16", "lm_loss": "standard"},
}
# None of the published 4-bit runs calls peft's `prepare_model_for_kbit_training` (torchtune keeps every weight in
# bf16, ms-swift of that commit never calls it, TRL skips it for sharded QLoRA: docs/plan.md), so their frozen
# embeddings and LM head stay bf16: recorded explicitly, so that the points do not follow peftkit's default for its
# own runs. (peftkit still upcasts the norms to float32, under 1 MB on these models.)
NO_KBIT_PREPARATION = {"upcast_embeddings": False}
TORCHTUNE_4BIT = {"quantization": {"bits": 4, "compute_dtype": "bfloat16", "double_quant": True, **NO_KBIT_PREPARATION}}
TORCHTUNE_QLORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_FSDP_QLORA_70B = {
    "model": {"name": "meta-llama/Llama-2-70b-hf", "dtype": "bfloat16", "attn_implementation": "flash_attention_2"},
    "data": {"max_length": 2048}, "adapter": {"r": 8, "alpha": 16, "dropout": 0.1},
    "quantization": {"bits": 4, "compute_dtype": "bfloat16", "storage_dtype": "bfloat16", **NO_KBIT_PREPARATION},
    "distributed": {"strategy": "fsdp"},
    "training": {"batch_size": 2, "gradient_accumulation": 2, "gradient_checkpointing": True, "precision": "bf16",
                 "lm_loss": "standard"},  # transformers' Trainer: logits over the whole vocabulary
}
# ms-swift's benchmark (docs/source_en/LLM/Benchmark.md, figures of commit 4312aeb28, 2024-01-04; A100 80GB, torch
# 2.1.1, scripts/benchmark/test_memory_time/run_single.py): `swift sft` defaults of that commit are LoRA r 8 (alpha 32,
# dropout 0.05) on DEFAULT targets (Qwen-1: the fused c_attn, i.e. q/k/v; Yi: q_proj/k_proj/v_proj), batch 1,
# max_length 2048, checkpointing, flash-attn, bf16 weights, AdamW (swift/llm/utils/argument.py), the `-chat` models
# (same shapes), the model's own loss over the full logits (swift/trainers/trainers.py:171-195), bnb 4-bit with
# double quantization (argument.py:81) and no k-bit preparation (no float32 embeddings). Rows longer than max_length
# are dropped (`truncation_strategy: delete`, argument.py:62) and a batch is padded to its longest row
# (sft.py:146-149), so the longest batch is max_length tokens but shapes vary from step to step; above 2048 tokens
# only 1000 sampled rows are trained (run_single.py). Memory is `torch.cuda.max_memory_reserved` (trainers.py:47).
SWIFT_LORA = {
    "model": {"name": "Qwen/Qwen-7B", "dtype": "bfloat16", "attn_implementation": "flash_attention_2"},
    "data": {"max_length": 2048},
    "adapter": {"r": 8, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj"]},
    "training": {"batch_size": 1, "gradient_accumulation": 16, "gradient_checkpointing": True, "precision": "bf16",
                 "lm_loss": "standard"},
}
# What a published counter holds beyond the training step's allocations, and the plan cannot know from a recipe.
VARIABLE_SHAPES = ("reserved after batches of varying length: the caching allocator keeps blocks sized for earlier "
                   "batches, a history-dependent amount")
LOAD_TIME_CACHE = "reserved includes the load-time cache: torchtune quantizes bf16 weights on the GPU (9.13 GB at init)"
# Qwen-1's own finetune.py (github.com/QwenLM/Qwen README, "Profiling of Memory and Speed": one A100 80GB,
# torch 2.0, flash-attn 2, batch 1, accumulation 8): LoRA r 64 / alpha 16 / dropout 0.05 on c_attn, c_proj, w1,
# w2 (every linear layer), bf16, checkpointing, AdamW; every sample is padded to model_max_length, so a batch is
# exactly that many tokens. The README says "memory (GB)" without the counter; read as device memory in GiB.
QWEN_README_LORA = deep_merge(SWIFT_LORA, {"adapter": {"r": 64, "alpha": 16, "target_modules": "all-linear"},
                                           "training": {"gradient_accumulation": 8}})
QWEN_README_SOURCE = "github.com/QwenLM/Qwen README, 'Profiling of Memory and Speed'"
QWEN_README_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
QWEN_README = {  # model -> "G" per sequence length, the LoRA rows (no trainable embedding / output layer)
    "Qwen/Qwen-1_8B": (6.7, 7.4, 8.4, 11.0, 16.2, 21.8),
    "Qwen/Qwen-7B": (20.1, 20.4, 21.5, 23.8, 29.7, 36.6),
    "Qwen/Qwen-14B": (34.6, 35.1, 35.3, 37.4, 42.5, 55.2),
}
# "LoRA (emb)": the same sweep on the base (non-chat) models, for which finetune.py also trains copies of the
# embeddings and the LM head (`modules_to_save = ["wte", "lm_head"]`, finetune.py lines 331-334).
QWEN_README_EMB = {
    "Qwen/Qwen-1_8B": (13.7, 14.0, 14.0, 15.1, 19.7, 27.7),
    "Qwen/Qwen-7B": (33.7, 34.1, 35.2, 35.1, 39.2, 48.5),
    "Qwen/Qwen-14B": (51.2, 51.1, 51.5, 54.1, 56.8, 67.7),
}
SWIFT_SOURCE = "github.com/modelscope/ms-swift docs/source_en/LLM/Benchmark.md"
SWIFT_MAX_LENGTH = {  # model -> GiB at max_length 512, 1024, 2048, 4096, 8192 ("Model Type & Max Length", LoRA)
    "Qwen/Qwen-1_8B": (6.99, 10.71, 16.35, 23.80, 37.03),
    "Qwen/Qwen-7B": (18.01, 21.73, 27.74, 35.31, 48.41),
    "Qwen/Qwen-14B": (30.14, 34.43, 40.14, 47.95, 60.74),
    "01-ai/Yi-6B": (13.72, 15.44, 16.95, 28.25, 43.81),
}

# (label, published bytes, what "published" measures, source, recipe sections, gpus, caveat or None)
PUBLISHED = [
    (
        # README "Memory and training speed" (8B_qlora_single_device at that time: q, v, o + MLP, r 8, packed 2048,
        # torchtune's chunked cross-entropy, compile). "Peak Memory per GPU" does not name the counter: read as
        # peak allocated, the one torchtune logs first.
        "Llama-3.1-8B QLoRA, 1x 4090 (torchtune README)", 7.4 * GiB, "peak allocated",
        "github.com/pytorch/torchtune README, 'Memory and training speed': bs 2, packed 2048, compile",
        deep_merge(deep_merge(TORCHTUNE_LLAMA2_LORA, TORCHTUNE_4BIT), {
            "model": {"name": "meta-llama/Llama-3.1-8B"}, "data": {"max_length": 2048},
            "adapter": {"target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
            "training": {"lm_loss": "chunked"}}),
        1, None,
    ),
    (
        "Llama-2-7B LoRA (torchtune QLoRA tutorial)", 15.57 * GB, "peak reserved",
        "pytorch.org/torchtune/stable/tutorials/qlora_finetune.html: llama2/7B_lora_single_device, bs 2, Alpaca",
        TORCHTUNE_LLAMA2_LORA,
        1, VARIABLE_SHAPES,
    ),
    (
        "Llama-2-7B QLoRA (torchtune QLoRA tutorial)", 9.29 * GB, "peak reserved",
        "same tutorial: llama2/7B_qlora_single_device",
        deep_merge(deep_merge(TORCHTUNE_LLAMA2_LORA, TORCHTUNE_4BIT), {"adapter": {"target_modules": TORCHTUNE_QLORA_TARGETS}}),
        1, LOAD_TIME_CACHE,
    ),
    (
        "Llama-2-70B FSDP+QLoRA, 2x24GB, no offload (PEFT docs)", 35.6 * GB, "GPU memory in use",
        "huggingface.co/docs/peft/accelerate/fsdp: bs 2, packed 2048, r 8, dropout 0.1, flash-attn, checkpointing",
        PEFT_FSDP_QLORA_70B,
        2, None,
    ),
    (
        "Llama-2-70B FSDP+QLoRA, 2x24GB, CPU offload (PEFT docs)", 19.6 * GB, "GPU memory in use",
        "same page, fsdp_offload_params: true",
        deep_merge(PEFT_FSDP_QLORA_70B, {"distributed": {"offload_params": True, "offload_optimizer": True}}),
        2, None,
    ),
    (
        "Llama-2-70B DeepSpeed ZeRO-3 + QLoRA, 2 GPUs (PEFT docs)", 36.6 * GB, "GPU memory in use",
        "huggingface.co/docs/peft/accelerate/deepspeed, 'Memory usage' (run_peft_qlora_deepspeed_stage3.sh: "
        "bs 2, packed 2048, r 8, all-linear, nested quant, bf16 quant storage, flash-attn, checkpointing)",
        deep_merge(PEFT_FSDP_QLORA_70B, {"quantization": {"double_quant": True},
                                         "distributed": {"strategy": "deepspeed", "zero_stage": 3}}),
        2, None,
    ),
]

def add(label: str, gib: float, kind: str, source: str, base: dict, changes: dict, caveat: str | None = None) -> None:
    """One single-GPU published point: `base` settings with `changes` applied."""
    PUBLISHED.append((label, gib * GiB, kind, source, deep_merge(base, changes), 1, caveat))


for name, figures in SWIFT_MAX_LENGTH.items():
    for length, gib in zip((512, 1024, 2048, 4096, 8192), figures):
        add(f"{name.split('/')[-1]} LoRA, max_length {length} (ms-swift)", gib, "peak reserved",
            f"{SWIFT_SOURCE}, 'Model Type & Max Length'", SWIFT_LORA,
            {"model": {"name": name}, "data": {"max_length": length}}, VARIABLE_SHAPES)
for name, figures in QWEN_README.items():
    for length, gib in zip(QWEN_README_LENGTHS, figures):
        add(f"{name.split('/')[-1]} LoRA r 64, {length} tokens (Qwen README)", gib, "GPU memory in use",
            QWEN_README_SOURCE, QWEN_README_LORA, {"model": {"name": name}, "data": {"max_length": length}})
for name, figures in QWEN_README_EMB.items():
    for length, gib in zip(QWEN_README_LENGTHS, figures):
        add(f"{name.split('/')[-1]} LoRA (emb) r 64, {length} tokens (Qwen README)", gib, "GPU memory in use",
            QWEN_README_SOURCE, QWEN_README_LORA, {"model": {"name": name}, "data": {"max_length": length},
                                                   "adapter": {"modules_to_save": ["embed_tokens", "lm_head"]}})
for batch, gib in ((2, 43.11), (4, 63.81)):
    add(f"Qwen-7B LoRA, batch {batch} (ms-swift)", gib, "peak reserved", f"{SWIFT_SOURCE}, 'Batch Size'",
        SWIFT_LORA, {"training": {"batch_size": batch}}, VARIABLE_SHAPES)
add("Qwen-7B LoRA, no checkpointing (ms-swift)", 37.70, "peak reserved",
    f"{SWIFT_SOURCE}, 'Use Flash Attn & Gradient Checkpointing'", SWIFT_LORA,
    {"training": {"gradient_checkpointing": False}}, VARIABLE_SHAPES)
add("Qwen-7B LoRA r 64 (ms-swift)", 27.85, "peak reserved", f"{SWIFT_SOURCE}, 'LoRA Rank & Target Modules'",
    SWIFT_LORA, {"adapter": {"r": 64}}, VARIABLE_SHAPES)
add("Qwen-7B LoRA all linear (ms-swift)", 27.87, "peak reserved", f"{SWIFT_SOURCE}, 'LoRA Rank & Target Modules'",
    SWIFT_LORA, {"adapter": {"target_modules": "all-linear"}}, VARIABLE_SHAPES)
for name, gib in (("Qwen/Qwen-7B", 23.85), ("Qwen/Qwen-14B", 30.05)):
    add(f"{name.split('/')[-1]} QLoRA bnb int4 (ms-swift)", gib, "peak reserved", f"{SWIFT_SOURCE}, 'Quantization'",
        SWIFT_LORA, {"model": {"name": name},
                     "quantization": {"bits": 4, "compute_dtype": "bfloat16", "double_quant": True,
                                      **NO_KBIT_PREPARATION}}, VARIABLE_SHAPES)

def recipe_from(sections: dict):
    return validate_recipe(deep_merge({"data": {"train": {"path": "unused.jsonl"}}, "training": {"eval_strategy": "no"}}, sections))


def comparable(plan, kind: str) -> int:
    """The plan's figure for what was published: peak allocated is the allocator's peak, peak reserved adds the
    allocator's caching (the plan's fragmentation share), device memory in use adds the CUDA context too."""
    if kind == "peak allocated":
        return plan.allocated
    if kind == "peak reserved":
        return int(plan.allocated * (1 + FRAGMENTATION_SHARE))
    return plan.total


def summary(name: str, errors: list[float]) -> str:
    return (f"{name}: {len(errors)} points, median error {statistics.median(errors):.1%}, worst {max(errors):.1%}, "
            f"{sum(error <= 0.10 for error in errors)} within 10%")


def main() -> None:
    counts_cache = {}
    errors, plannable = [], []
    by_source: dict[str, list[float]] = {}
    print(f"| run | published | predicted total | predicted allocated | plan / published |")
    print("|---|---|---|---|---|")
    for label, published, kind, source, sections, gpus, caveat in PUBLISHED:
        recipe = recipe_from(sections)
        key = recipe.model.name, recipe.quantization.model_dump_json(), recipe.adapter.model_dump_json()
        if key not in counts_cache:
            counts_cache[key] = count_parameters(recipe, peft_task_type="CAUSAL_LM")
        plan = estimate(recipe, counts_cache[key], gpus)
        ratio = comparable(plan, kind) / published
        errors.append(abs(ratio - 1))
        if caveat is None:
            plannable.append(abs(ratio - 1))
        by_source.setdefault(label.rsplit("(", 1)[-1].rstrip(")"), []).append(abs(ratio - 1))
        print(f"| {label}{' ' + chr(8224) if caveat else ''} | {published / GiB:.2f} GiB ({kind}) | {plan.total / GiB:.2f} GiB | "
              f"{plan.allocated / GiB:.2f} GiB | {ratio:.2f} |")
        if VERBOSE:
            for row in plan.rows:
                print(f"|   {row.component} | | {row.bytes / GiB:.2f} GiB | {row.note} | |")
    print()
    for source, source_errors in by_source.items():
        print(summary(source, source_errors))
    print(summary("all", errors))
    caveats = sorted({point[-1] for point in PUBLISHED if point[-1]})
    print(summary(f"without the {len(errors) - len(plannable)} points marked {chr(8224)}", plannable))
    for caveat in caveats:
        print(f"  {chr(8224)} {caveat}")


VERBOSE = "--rows" in sys.argv  # print each plan's rows too

if __name__ == "__main__":
    main()
