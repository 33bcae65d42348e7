"""Training throughput: peftkit vs a plain transformers Trainer + peft script, same model, data, batches, steps.

Prints samples/s of each and the ratio peftkit / baseline (target >= 0.97). Runs are interleaved
(baseline, peftkit, baseline, peftkit, ...) in one process so machine load affects both alike.

    python benchmarks/throughput.py [--steps 40] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from peftkit.recipe.load import load_recipe

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def recipe_for(steps: int, run_dir: Path):
    return load_recipe(QUICKSTART, [
        f"training.max_steps={steps}", "training.eval_strategy=no", "training.save_strategy=no",
        "training.logging_steps=1000", "evaluation.splits=[]", "output.tensorboard=false", f"output.dir={run_dir}",
        "data.validation_fraction=0",
    ])


def peftkit_run(steps: int, workdir: Path) -> float:
    from peftkit.training.run import train

    run_dir = train(recipe_for(steps, workdir / "peftkit"))
    return json.loads((run_dir / "metrics.json").read_text())["train"]["train_samples_per_second"]


def baseline_run(steps: int, workdir: Path) -> float:
    """What a user would write by hand with transformers + peft for the same recipe."""
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    from peftkit.references import resolve_reference

    recipe = recipe_for(steps, workdir)
    model_dir = resolve_reference(recipe.model.name, "model.name")
    data = load_dataset("json", data_files=resolve_reference(recipe.data.train.path, "data"), split="train")
    labels = sorted(set(data["label"]))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = data.map(
        lambda b: {**tokenizer(b["text"], truncation=True, max_length=recipe.data.max_length),
                   "labels": [labels.index(x) for x in b["label"]]},
        batched=True, remove_columns=data.column_names,
    )
    set_seed(recipe.training.seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=recipe.adapter.r, lora_alpha=recipe.adapter.alpha,
                                             lora_dropout=recipe.adapter.dropout, target_modules="all-linear"))
    args = TrainingArguments(
        output_dir=str(workdir / "baseline"), max_steps=steps, per_device_train_batch_size=recipe.training.batch_size,
        learning_rate=recipe.training.learning_rate, warmup_steps=recipe.training.warmup_ratio,
        seed=recipe.training.seed, data_seed=recipe.training.seed, save_strategy="no", eval_strategy="no",
        logging_steps=1000, report_to=[], use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer))
    return trainer.train().metrics["train_samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    baseline, peftkit = [], []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as workdir:
            baseline.append(baseline_run(args.steps, Path(workdir)))
            peftkit.append(peftkit_run(args.steps, Path(workdir)))
        print(f"repeat {repeat}: baseline {baseline[-1]:.2f} samples/s, peftkit {peftkit[-1]:.2f} samples/s")
    ratio = statistics.median(peftkit) / statistics.median(baseline)
    print(f"throughput ratio peftkit/baseline (median of {args.repeats}): {ratio:.3f}  (target >= 0.97)")


if __name__ == "__main__":
    main()
