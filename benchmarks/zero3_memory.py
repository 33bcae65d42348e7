"""ZeRO-3 training-state memory per rank: 2 ranks vs 1 rank, with the DeepSpeed config peftkit generates.

Counts, on each rank after one optimizer step, the bytes of parameters (the local ZeRO-3 partitions), gradient
partitions, fp32 master weights and optimizer states (Adam moments), for full fine-tuning and for LoRA of a small
Llama (~14 M parameters, built from a config). The ratio is the largest 2-rank total / the 1-rank total:
ideal partitioning gives 0.5 (plus padding and any parameters DeepSpeed keeps whole on every rank).

    python benchmarks/zero3_memory.py          # launches torchrun twice (1 and 2 processes) on CPU/gloo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.55
METHODS = ("none", "lora")


def build_model(directory: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(directory)


def recipe_for(model_dir: Path, method: str):
    from peftkit.recipe.load import validate_recipe

    return validate_recipe({
        "model": {"name": str(model_dir)},
        "data": {"train": {"path": "unused.jsonl"}},
        "adapter": {"method": method, "target_modules": "all-linear"},
        "distributed": {"strategy": "deepspeed", "zero_stage": 3},
        "training": {"batch_size": 2, "eval_strategy": "no", "precision": "fp32"},
    })


def _bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def training_state_bytes(engine) -> dict[str, int]:
    """This rank's share of parameters, gradients, fp32 master weights and optimizer states."""
    optimizer = engine.optimizer
    parameters = sum(_bytes(p.ds_tensor) if hasattr(p, "ds_tensor") else _bytes(p) for p in engine.module.parameters())
    # In fp32 training the master weights may be the parameter partitions themselves: count each storage once.
    parameter_storages = {p.ds_tensor.data_ptr() for p in engine.module.parameters() if hasattr(p, "ds_tensor")}
    parameter_storages |= {flat.data_ptr() for flat in optimizer.fp16_partitioned_groups_flat}
    master = sum(_bytes(flat) for flat in optimizer.fp32_partitioned_groups_flat if flat.data_ptr() not in parameter_storages)
    states = sum(_bytes(value) for state in optimizer.optimizer.state.values() for value in state.values()
                 if hasattr(value, "numel") and value.dim() > 0)
    gradients = _bytes(optimizer.grad_partitions_flat_buffer)
    return {"parameters": parameters, "gradients": gradients, "master_weights": master, "optimizer_states": states,
            "total": parameters + gradients + master + states}


def worker(model_dir: Path, output: Path) -> None:
    """One rank: build the model under ZeRO-3 init with peftkit's config, take one step, count bytes."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from peftkit.adapters import attach_adapter
    from peftkit.training.distributed import build_deepspeed_config, launched_world_size

    deepspeed.init_distributed(dist_backend="gloo")
    world_size, rank = launched_world_size(), int(os.environ["RANK"])
    results = {}
    for method in METHODS:
        recipe = recipe_for(model_dir, method)
        config = build_deepspeed_config(recipe, world_size)
        zero3 = HfDeepSpeedConfig(config)  # noqa: F841 (kept alive: from_pretrained loads partitioned weights)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = attach_adapter(model, recipe, "CAUSAL_LM")
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-4), config=config)
        input_ids = torch.randint(0, 1000, (recipe.training.batch_size, 32))
        loss = engine(input_ids=input_ids, labels=input_ids).loss
        engine.backward(loss)
        engine.step()
        results[method] = training_state_bytes(engine)
        del engine, model, zero3
    output.with_name(f"{output.stem}-rank{rank}.json").write_text(json.dumps(results))


def launch(processes: int, model_dir: Path, output: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               __file__, "--worker", str(model_dir), str(output)]
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{processes}-process run failed:\n{result.stderr[-4000:]}")
    return [json.loads(output.with_name(f"{output.stem}-rank{rank}.json").read_text()) for rank in range(processes)]


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        build_model(folder / "model")
        one = launch(1, folder / "model", folder / "one.json")[0]
        two = launch(2, folder / "model", folder / "two.json")
    print("ZeRO-3 training-state bytes per rank (parameters + gradients + master weights + optimizer states)")
    for method in METHODS:
        worst = max(rank[method]["total"] for rank in two)
        ratio = worst / one[method]["total"]
        per_rank = ", ".join(f"{rank[method]['total'] / 2**20:.2f}" for rank in two)
        print(f"adapter.method={method:5s} 1 rank: {one[method]['total'] / 2**20:8.2f} MiB   "
              f"2 ranks: {per_rank} MiB   ratio {ratio:.3f} (target <= {TARGET})")
        print(f"    1 rank  {one[method]}\n    2 ranks {[rank[method] for rank in two]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("MODEL_DIR", "OUTPUT"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        worker(Path(arguments.worker[0]), Path(arguments.worker[1]))
    else:
        main()
