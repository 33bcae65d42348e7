"""Which full-precision weights should a QLoRA adapter be merged onto? Measured against the model as trained.

For a run trained on a 4-bit base, builds the merged model both ways (onto the original weights, onto the 4-bit
weights dequantized) and compares each with the adapter on the 4-bit base (what training optimised), on every
row of a labelled file: prediction agreement, logit differences and accuracy.

    python benchmarks/qlora_merge_onto.py RUN_DIR --data ../shared/data/classification/sst2/dev.tsv \
        --text-column content --label-column label
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoTokenizer

from peftkit.data.sources import load_source
from peftkit.deploy.adapter_folder import find_adapter
from peftkit.deploy.merge import full_precision_base, trained_model
from peftkit.deploy.verification import compare_outputs
from peftkit.run_folder import read_recipe
from peftkit.recipe.schema import DataSource
from peftkit.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--data", required=True)
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    recipe = read_recipe(Path(args.run_dir))
    adapter = find_adapter("run", args.run_dir)
    task = get_task(adapter.task)
    tokenizer = AutoTokenizer.from_pretrained(adapter.path)
    dataset = load_source(DataSource(path=args.data), "--data")
    rows = [{"text": row[args.text_column]} for row in dataset]
    names = adapter.info["labels"]
    gold = torch.tensor([_label_id(row[args.label_column], names) for row in dataset])

    def batched(model) -> list[torch.Tensor]:
        return [out for i in range(0, len(rows), args.batch_size) for out in task.forward_logits(model, tokenizer, rows[i:i + args.batch_size])]

    start = time.time()
    trained = batched(trained_model(recipe, task, adapter))
    print(f"rows: {len(rows)}; trained (4-bit base + adapter) accuracy {_accuracy(trained, gold):.4f}")
    print("| merged onto | agreement with trained | max abs logit diff | mean abs logit diff | accuracy |")
    print("|---|---|---|---|---|")
    for onto in ("original", "dequantized"):
        merged = PeftModel.from_pretrained(full_precision_base(recipe, task, adapter, onto), str(adapter.path)).merge_and_unload().eval()
        outputs = batched(merged)
        comparison = compare_outputs(trained, outputs)
        mean = float(torch.stack([(a - b).abs().mean() for a, b in zip(trained, outputs)]).mean())
        print(f"| {onto} | {comparison.agreement:.4f} | {comparison.max_abs_diff:.4g} | {mean:.4g} | {_accuracy(outputs, gold):.4f} |")
    print(f"({time.time() - start:.0f} s)")


def _label_id(value, names: list[str]) -> int:
    return names.index(str(value)) if str(value) in names else int(value)


def _accuracy(outputs: list[torch.Tensor], gold: torch.Tensor) -> float:
    return float((torch.stack(outputs).argmax(-1) == gold).float().mean())


if __name__ == "__main__":
    main()
