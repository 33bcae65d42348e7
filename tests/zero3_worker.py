"""Run by torchrun from tests/test_plan_zero3.py: one ZeRO-3 step on CPU, then write this rank's partition bytes
to `rank<N>.json` in the working folder (two ranks printing at once can interleave their lines)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
from transformers import AutoModelForCausalLM


def main(model_dir: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    tokens = torch.randint(0, model.config.vocab_size, (2, 8))
    engine.backward(engine(input_ids=tokens, labels=tokens).loss)
    engine.step()
    states = [t for state in optimizer.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    rank = int(os.environ["RANK"])
    Path(f"rank{rank}.json").write_text(json.dumps({
        "rank": rank,
        "weights": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in engine.module.parameters()),
        "optimizer": sum(t.numel() * t.element_size() for t in states + list(optimizer.fp32_partitioned_groups_flat)),
    }))
    torch.distributed.destroy_process_group()
    # gloo's threads can still abort the process at interpreter shutdown ("terminate called without an active
    # exception", SIGABRT after the files were written: seen once in a clean-clone CI run): leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
