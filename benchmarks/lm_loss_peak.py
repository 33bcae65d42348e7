"""Peak memory of the language-model loss per token and vocabulary entry, next to the plan's `logits + loss` row.

    python -m benchmarks.lm_loss_peak [--tokens 2048] [--vocab 32000] [--dtype bfloat16]

A one-layer Llama with a 64-wide hidden state, so the loss dominates everything else, runs forward + backward the
way the Trainer does (accelerate's bf16 autocast and float32 outputs, the outputs dropped before backward), each
loss for two steps in one fresh process. Peak RSS growth over the second step, divided by tokens x vocabulary, is
the loss's peak in bytes per entry (it also holds the embedding's gradient, ~0.06 at this width); every allocation
above 64 KiB is mapped and unmapped directly (MALLOC_MMAP_THRESHOLD_), so freed tensors leave RSS at once and RSS
follows the live tensor bytes as the CUDA allocator's `max_memory_allocated` would. The autograd graph and the
tensors' lifetimes are the same on a GPU; what this cannot see is the caching allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

LOSSES = ("standard", "chunked")
HIDDEN = 64


def measure(tokens: int, vocab: int, dtype: str) -> dict[str, float]:
    """Runs in the child process: per loss, bytes of peak RSS growth per token x vocabulary entry over one step."""
    import torch
    from accelerate.utils import convert_outputs_to_fp32
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.training_memory import _release_and_reset_peak, _status_kb
    from peftkit.tasks.lm_loss import EfficientLMLoss

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=vocab, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(True)  # a trainable tensor upstream of the head, as an adapter is
    forward = model.forward
    if dtype != "float32":  # what accelerate does to the model's forward under mixed precision
        forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=getattr(torch, dtype))(forward))
    ids = torch.randint(vocab, (1, tokens), generator=torch.Generator().manual_seed(0))

    def step(efficient: EfficientLMLoss | None) -> None:
        if efficient is None:
            outputs = forward(input_ids=ids, labels=ids)
            loss = outputs.loss
            del outputs  # the Trainer drops the outputs (and their logits) before backward
        else:
            loss = efficient.loss(model, {"input_ids": ids, "labels": ids})[0]
        loss.backward()

    measured = {}
    for loss_choice in LOSSES:
        efficient = EfficientLMLoss.for_model(model, loss_choice)
        step(efficient)  # first step: lazy initializations, and the embedding's gradient exists from here on
        _release_and_reset_peak()
        before = _status_kb("VmRSS")
        step(efficient)
        measured[loss_choice] = (_status_kb("VmHWM") - before) * 1024 / (tokens * vocab)
    return measured


def planned(loss_choice: str, tokens: int, vocab: int, dtype: str) -> float:
    """The plan's `logits + loss` row for the same model and tokens, per token x vocabulary entry."""
    import torch

    from peftkit.plan.memory import loss_row
    from peftkit.plan.shapes import ParameterCounts
    from peftkit.recipe.load import validate_recipe

    recipe = validate_recipe({"model": {"name": "x"}, "data": {"train": {"path": "x.jsonl"}, "max_length": tokens},
                              "training": {"eval_strategy": "no", "lm_loss": loss_choice}})
    counts = ParameterCounts(frozen_bytes={}, trainable=[], largest_layer_bytes=0, largest_outer_bytes=0,
                             adapter_inputs=0, adapter_ranks=0, logits_width=vocab, dims={"hidden": HIDDEN})
    element = getattr(torch, dtype).itemsize
    return loss_row(recipe, counts, tokens, element, 0).bytes / (tokens * vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.tokens, args.vocab, args.dtype)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.lm_loss_peak", "--child", "--tokens", str(args.tokens),
         "--vocab", str(args.vocab), "--dtype", args.dtype],
        env=env, capture_output=True, text=True, check=True,
    )
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"{args.tokens} tokens x {args.vocab} vocabulary, {args.dtype}: bytes per token x vocabulary entry")
    print("| loss | measured peak | plan | plan / measured |\n|---|---|---|---|")
    for loss_choice in LOSSES:
        plan = planned(loss_choice, args.tokens, args.vocab, args.dtype)
        print(f"| {loss_choice} | {measured[loss_choice]:.2f} | {plan:.2f} | {plan / measured[loss_choice]:.2f} |")


if __name__ == "__main__":
    main()
