"""One GPU training measurement: peak CUDA memory and tokens/s of a few LoRA/QLoRA steps on a real Llama shape.

`benchmarks/gpu_check.sh` runs every setting x stack in its own process (clean peak-memory counters):
- stack `peftkit`: the model is built from a recipe (`build_model`, `attach_adapter`, `build_training_args`);
- stack `baseline`: the same thing written directly against transformers + peft, as a user would without peftkit.
Both train with `transformers.Trainer` on random tokens (causal LM loss), so differences come from model
preparation. `--dry-run` runs every combination in-process on a tiny shape on CPU (for the test suite).

    python -m benchmarks.gpu_check --prepare --shape llama-3.2-1b --dir /tmp/ckpt
    python -m benchmarks.gpu_check --shape llama-3.2-1b --dir /tmp/ckpt --setting qlora-nf4-gc --stack peftkit
    python -m benchmarks.gpu_check --dry-run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.random_llama import save_random_llama

# `loss` is peftkit's training.lm_loss; the baseline always uses transformers' loss, so a setting with a
# memory-efficient loss is compared with the baseline of the same model preparation (`compare`).
SETTINGS = {
    "lora-bf16": {"bits": None, "gradient_checkpointing": False, "loss": "standard"},
    "qlora-nf4": {"bits": 4, "gradient_checkpointing": False, "loss": "standard"},
    "qlora-nf4-gc": {"bits": 4, "gradient_checkpointing": True, "loss": "standard"},
    "lora-bf16-chunked": {"bits": None, "gradient_checkpointing": False, "loss": "chunked", "compare": "lora-bf16"},
    "lora-bf16-liger": {"bits": None, "gradient_checkpointing": False, "loss": "liger", "compare": "lora-bf16"},
    "qlora-nf4-gc-chunked": {"bits": 4, "gradient_checkpointing": True, "loss": "chunked", "compare": "qlora-nf4-gc"},
}
STACKS = ("peftkit", "baseline")
LORA = {"r": 16, "alpha": 32}


def _random_tokens(vocab: int, rows: int, seq: int):
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (rows, seq), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def _peftkit_model_and_args(model_dir: Path, setting: dict, args, output_dir: Path):
    from transformers import AutoModelForCausalLM

    from peftkit.adapters import attach_adapter
    from peftkit.models.build import build_model
    from peftkit.recipe.load import validate_recipe
    from peftkit.training.arguments import build_training_args

    recipe = validate_recipe({
        "model": {"name": str(model_dir), "dtype": args.dtype},
        "data": {"train": {"path": "unused.jsonl"}},
        "adapter": {"method": "lora", "dropout": 0.0, **LORA},
        "quantization": {"bits": setting["bits"], "compute_dtype": args.dtype},
        "training": {
            "max_steps": args.steps, "batch_size": args.batch, "learning_rate": 1e-4, "warmup_ratio": 0.0,
            "gradient_checkpointing": setting["gradient_checkpointing"], "precision": args.precision,
            "eval_strategy": "no", "save_strategy": "no", "logging_steps": args.steps, "lm_loss": setting["loss"],
        },
        "output": {"dir": str(output_dir), "tensorboard": False},
    })
    model = attach_adapter(build_model(recipe.model, recipe.quantization, AutoModelForCausalLM), recipe, "CAUSAL_LM")
    return model, build_training_args(recipe, output_dir, "loss")


def _baseline_model_and_args(model_dir: Path, setting: dict, args, output_dir: Path):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainingArguments

    dtype = getattr(torch, args.dtype)
    quantization = None
    if setting["bits"]:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, quantization_config=quantization)
    if quantization:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    training_args = TrainingArguments(
        output_dir=str(output_dir), max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=1e-4,
        bf16=args.precision == "bf16", activation_checkpointing=setting["gradient_checkpointing"],
        save_strategy="no", logging_steps=args.steps,
        report_to=[], use_cpu=not torch.cuda.is_available(),
    )
    return model, training_args


def measure(model_dir: Path, setting_name: str, stack: str, args) -> dict:
    """Prepare the model with `stack`, train `args.steps` steps, and report memory and throughput."""
    import torch
    from transformers import Trainer, TrainerCallback, default_data_collator

    cuda = torch.cuda.is_available()
    setting = SETTINGS[setting_name]
    with tempfile.TemporaryDirectory() as output_dir:
        prepare = _peftkit_model_and_args if stack == "peftkit" else _baseline_model_and_args
        model, training_args = prepare(model_dir, setting, args, Path(output_dir))
        if cuda:
            torch.cuda.synchronize()
            model_bytes = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

        step_ends: list[float] = []

        class StepClock(TrainerCallback):
            def on_step_end(self, *_, **__):
                if cuda:
                    torch.cuda.synchronize()
                step_ends.append(time.perf_counter())

        dataset = _random_tokens(model.config.vocab_size, args.steps * args.batch, args.seq)
        if stack == "peftkit":
            from peftkit.training.trainer import PeftkitTrainer

            trainer = PeftkitTrainer(model=model, args=training_args, train_dataset=dataset,
                                     data_collator=default_data_collator, callbacks=[StepClock()],
                                     lm_loss=setting["loss"])
        else:
            trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                              data_collator=default_data_collator, callbacks=[StepClock()])
        trainer.train()
    # The first step includes one-off work (allocator warm-up, kernel selection); throughput uses the others.
    timed_steps = len(step_ends) - 1
    seconds = step_ends[-1] - step_ends[0] if timed_steps else float("nan")
    return {
        "setting": setting_name,
        "stack": stack,
        "steps": len(step_ends),
        "tokens_per_s": timed_steps * args.batch * args.seq / seconds if timed_steps else None,
        "model_gib": model_bytes / 2**30 if cuda else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def runs_here(setting: str, stack: str, cuda: bool) -> bool:
    """Baselines run once per model preparation; CUDA-only kernels need a GPU."""
    if stack == "baseline" and "compare" in SETTINGS[setting]:
        return False
    return cuda or SETTINGS[setting]["loss"] not in ("liger", "cut_cross_entropy")


def summarize(rows: list[dict]) -> str:
    """A table with each peftkit row next to its baseline and their ratios."""
    lines = [f"{'setting':<21} {'stack':<9} {'peak GiB':>9} {'weights GiB':>12} {'tokens/s':>10} {'peak ratio':>11} {'speed ratio':>12}"]
    baselines = {row["setting"]: row for row in rows if row["stack"] == "baseline"}
    for row in rows:
        base = baselines.get(SETTINGS[row["setting"]].get("compare", row["setting"]), {})
        peak_ratio = row["peak_gib"] / base["peak_gib"] if row.get("peak_gib") and base.get("peak_gib") else None
        speed_ratio = row["tokens_per_s"] / base["tokens_per_s"] if row.get("tokens_per_s") and base.get("tokens_per_s") else None
        lines.append(
            f"{row['setting']:<21} {row['stack']:<9} {_number(row.get('peak_gib'), 2):>9} {_number(row.get('model_gib'), 2):>12} "
            f"{_number(row.get('tokens_per_s'), 0):>10} {_number(peak_ratio, 3):>11} {_number(speed_ratio, 3):>12}"
        )
    return "\n".join(lines)


def _number(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--dir", type=Path, help="random checkpoint folder (written by --prepare)")
    parser.add_argument("--prepare", action="store_true", help="only write the random checkpoint (bf16)")
    parser.add_argument("--setting", choices=SETTINGS)
    parser.add_argument("--stack", choices=STACKS)
    parser.add_argument("--summarize", type=Path, help="print the table for a JSON-lines file of results")
    parser.add_argument("--list", action="store_true", help="print the setting/stack pairs that run on this machine")
    parser.add_argument("--dry-run", action="store_true", help="every setting x stack on a tiny shape, on CPU")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    args = parser.parse_args()
    args.dtype, args.precision = "bfloat16", "bf16"

    if args.list:
        import torch

        for setting in SETTINGS:
            for stack in STACKS:
                if runs_here(setting, stack, torch.cuda.is_available()):
                    print(setting, stack)
    elif args.summarize:
        print(summarize([json.loads(line) for line in args.summarize.read_text().splitlines() if line.strip()]))
    elif args.prepare:
        save_random_llama(args.dir, args.shape, dtype="bfloat16")
    elif args.dry_run:
        import torch

        torch._dynamo.config.disable = True  # bitsandbytes' CPU kernels would compile every tiny weight shape
        args.dtype, args.precision, args.steps, args.batch, args.seq = "float32", "fp32", 2, 2, 16
        with tempfile.TemporaryDirectory() as temporary:
            model_dir = save_random_llama(Path(temporary) / "tiny", "tiny")
            rows = [measure(model_dir, setting, stack, args) for setting in SETTINGS for stack in STACKS
                    if runs_here(setting, stack, cuda=False)]
        print(summarize(rows))
    else:
        print(json.dumps(measure(args.dir, args.setting, args.stack, args)))


if __name__ == "__main__":
    main()
