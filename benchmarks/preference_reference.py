"""DPO's reference model as the base with the adapter disabled (peftkit) against a second copy of the base (what
TRL builds for a model without an adapter): bytes of weights the trainer holds, and the reference log-probabilities
of both on the same pairs (they must agree: a fresh LoRA adds nothing to the base).

    python -m benchmarks.preference_reference [--model DIR] [--pairs 8]

Without `--model` a random-init Llama of ~105M parameters (`bench-100m`) is written to a temporary folder.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch


def weight_bytes(*models) -> int:
    seen, total = set(), 0
    for model in models:
        for tensor in model.parameters():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from benchmarks.random_llama import save_random_llama
    from peftkit.tasks.preference import completion_logps

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local causal LM folder (default: random bench-100m)")
    parser.add_argument("--pairs", type=int, default=8)
    args = parser.parse_args()
    model_dir = Path(args.model) if args.model else save_random_llama(Path(tempfile.gettempdir()) / "peftkit-bench-100m", "bench-100m")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    second_copy = copy.deepcopy(base).eval()  # TRL's `create_model_from_path` for the reference: same weights again
    policy = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    policy.eval()

    generator = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    sequences = [(torch.randint(0, vocab, (48,), generator=generator).tolist(), 16) for _ in range(2 * args.pairs)]

    class Tokens:  # completion_logps reads only the pad id
        pad_token_id, eos_token_id = 0, 0

    with policy.disable_adapter():
        disabled = completion_logps(policy, Tokens, sequences, batch_size=4)
    copied = completion_logps(second_copy, Tokens, sequences, batch_size=4)
    largest = max(abs(a[0] - b[0]) for a, b in zip(disabled, copied))

    adapter_disabled = weight_bytes(policy)
    with_copy = weight_bytes(policy, second_copy)
    print(f"model: {model_dir}")
    print(f"weights held, reference = adapter disabled: {adapter_disabled / 2**20:,.0f} MiB")
    print(f"weights held, reference = second copy:      {with_copy / 2**20:,.0f} MiB")
    print(f"ratio: {adapter_disabled / with_copy:.3f} (saved {(with_copy - adapter_disabled) / 2**20:,.0f} MiB)")
    print(f"largest difference of reference log-probs over {len(sequences)} sequences: {largest:.2e}")


if __name__ == "__main__":
    main()
