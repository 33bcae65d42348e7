"""Under ZeRO-3 on 2 ranks the plan's per-rank weight and optimizer partitions equal DeepSpeed's (CPU, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from peftkit.plan.memory import estimate
from peftkit.plan.shapes import count_parameters
from peftkit.recipe.load import validate_recipe
from tests.conftest import REPO_ROOT


@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero3_partition_per_rank_matches_deepspeed(tiny_llama_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         str(REPO_ROOT / "tests" / "zero3_worker.py"), str(tiny_llama_dir)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert len(measured) == 2

    recipe = validate_recipe({
        "model": {"name": str(tiny_llama_dir)}, "data": {"train": {"path": "x.jsonl"}},
        "adapter": {"method": "none"}, "distributed": {"strategy": "deepspeed", "zero_stage": 3},
        "training": {"eval_strategy": "no", "precision": "fp32"},
    })
    rows = {row.component: row.bytes for row in estimate(recipe, count_parameters(recipe, peft_task_type="CAUSAL_LM"), 2).rows}
    for rank in measured:
        assert rows["trainable weights"] == rank["weights"]
        assert rows["optimizer states"] == rank["optimizer"]
