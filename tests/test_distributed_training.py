"""`peftkit train` on 2 CPU processes (gloo) under DDP, ZeRO-2, ZeRO-3 and FSDP, launched by torchrun and accelerate.

For each strategy one torchrun run trains 4 steps (= one epoch: 32 examples, 2 ranks x batch 4), saving at
steps 2 and 4; then everything after step 2 is deleted and `accelerate launch --config_file launch/<file>`
resumes it. Checked: data shards (disjoint, complete), losses against 1 process x batch 8, the saved adapter
(non-empty, reloads in plain peft) and that the resumed run ends with the same adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, classification_recipe, sentiment_rows, write_jsonl, write_recipe
from peftkit.training.checkpoints import check_saved_weights

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

HOOKS = Path(__file__).parent / "worker_hooks"
STEPS, BATCH, RANKS, TRAIN_EXAMPLES = 4, 4, 2, 32
# Strategy -> (recipe overrides, accelerate config in launch/ used to resume).
STRATEGIES = {
    "ddp": (["distributed.strategy=ddp"], "multi_gpu.yaml"),
    "zero2": (["distributed.strategy=deepspeed", "distributed.zero_stage=2"], "zero2.yaml"),
    "zero3": (["distributed.strategy=deepspeed", "distributed.zero_stage=3"], "zero3.yaml"),
    "fsdp": (["distributed.strategy=fsdp"], "fsdp.yaml"),
}
# Same initial weights, same 8 examples per optimizer step: 2 ranks x 4 differ from 1 rank x 8 only in the
# order of float32 sums (all-reduce of gradients, mean of per-rank losses), relative ~1e-7 per step; Adam's
# update of 4 steps keeps that far below 1e-4 (measured: <= 1e-6 here), while any change in which examples
# form a step or in gradient scaling (e.g. a sum instead of a mean across ranks) moves the loss by > 1e-2.
LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir):
    """Data, recipe and the 1-process x batch-8 reference losses."""
    root = tmp_path_factory.mktemp("distributed")
    rows = sentiment_rows(TRAIN_EXAMPLES, seed=1)
    assert len({row["text"] for row in rows}) == TRAIN_EXAMPLES  # example identity by text must be unambiguous
    files = {"train": write_jsonl(root / "train.jsonl", rows), "test": write_jsonl(root / "test.jsonl", sentiment_rows(12, seed=3))}
    # A decoder without dropout: DDP and the reference see the same deterministic forward pass.
    recipe = classification_recipe(
        tiny_llama_dir, files, root / "unused",
        data={"max_length": 32},
        training={"max_steps": STEPS, "batch_size": BATCH, "logging_steps": 1, "eval_strategy": "no",
                  "save_strategy": "steps", "save_steps": STEPS // 2, "warmup_ratio": 0.0},
        evaluation={"splits": ["test"]},
    )
    recipe_path = write_recipe(root / "recipe.yaml", recipe)
    reference = root / "reference"
    result = launch([sys.executable, "-m", "peftkit"], recipe_path, reference, f"training.batch_size={BATCH * RANKS}")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "recipe": recipe_path, "model": tiny_llama_dir, "rows": rows, "reference_losses": losses(reference)}


def launch(launcher: list[str], recipe: Path, run_dir: Path, *overrides: str, record: Path | None = None,
           resume: bool = False, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HOOKS), str(REPO_ROOT)]),
        "OMP_NUM_THREADS": "1",
        "PEFTKIT_TEST_RECORD_DIR": str(record or ""),
    }
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [*launcher, "train", str(recipe), f"output.dir={run_dir}", *overrides] + (["--resume"] if resume else [])
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=timeout)


def free_port() -> str:
    """Other jobs on this machine may hold the default port 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS), "--master_port", free_port(),
            "-m", "peftkit"]


def accelerate(config: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO_ROOT / "launch" / config),
            "--num_processes", str(RANKS), "--main_process_port", free_port(), "-m", "peftkit"]


def losses(run_dir: Path) -> dict[int, float]:
    history = json.loads((run_dir / "log_history.json").read_text())
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def recorded(record: Path) -> dict[int, dict[int, list[str]]]:
    """rank -> step -> examples."""
    seen = {}
    for rank in range(RANKS):
        lines = (record / f"rank{rank}.jsonl").read_text().splitlines()
        seen[rank] = {entry["step"]: entry["examples"] for entry in map(json.loads, lines)}
    return seen


def example_keys(model_dir: Path, rows: list[dict]) -> set[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return {" ".join(map(str, tokenizer(row["text"], truncation=True, max_length=32)["input_ids"])) for row in rows}


def reload_in_plain_peft(model_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, adapter_dir)
    return {name: parameter.detach() for name, parameter in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_two_ranks_shard_data_match_one_rank_save_and_resume(strategy, setup):
    overrides, launch_file = STRATEGIES[strategy]
    root = setup["root"] / strategy
    run_dir, first_record, resume_record = root / "run", root / "record-first", root / "record-resume"
    first_record.mkdir(parents=True)
    resume_record.mkdir()

    result = launch(torchrun(), setup["recipe"], run_dir, *overrides, record=first_record)
    assert result.returncode == 0, result.stderr[-5000:]

    # Data: every example exactly once per epoch, each rank its own half, BATCH per rank and step.
    seen = recorded(first_record)
    assert all(sorted(steps) == list(range(STEPS)) for steps in seen.values())
    assert all(len(examples) == BATCH for steps in seen.values() for examples in steps.values())
    per_rank = [{key for examples in seen[rank].values() for key in examples} for rank in range(RANKS)]
    assert per_rank[0].isdisjoint(per_rank[1])
    assert per_rank[0] | per_rank[1] == example_keys(setup["model"], setup["rows"])

    # Losses: 2 ranks x batch 4 follow 1 rank x batch 8.
    two_ranks = losses(run_dir)
    assert sorted(two_ranks) == list(range(1, STEPS + 1))
    assert two_ranks == pytest.approx(setup["reference_losses"], rel=LOSS_RTOL)

    # The adapter holds gathered weights (not ZeRO-3 partitions) and reloads in plain peft.
    adapter = run_dir / "adapter"
    check_saved_weights(adapter)
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    reloaded = reload_in_plain_peft(setup["model"], adapter)
    assert len(reloaded) == len([name for name in saved if "lora_" in name]) > 0
    assert all(tensor.numel() > 0 for tensor in saved.values())
    assert any(name.endswith("lora_B.default.weight") and tensor.abs().sum() > 0 for name, tensor in reloaded.items())

    # Only rank 0 wrote results; the sharding config records the real world size.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == RANKS and metrics["train"]["global_step"] == STEPS
    assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == metrics["test"]["examples"] == 12
    if strategy.startswith("zero"):
        deepspeed = json.loads((run_dir / "deepspeed.json").read_text())
        assert deepspeed["train_batch_size"] == BATCH * RANKS
        assert deepspeed["zero_optimization"]["stage"] == int(strategy[-1])
    assert (run_dir / "fsdp.json").exists() is (strategy == "fsdp")

    # Interrupt after step 2: delete what came later, resume with accelerate launch and the launch/ file.
    expected = dict(saved)
    for path in run_dir.iterdir():
        if path.name not in ("checkpoints", "recipe.yaml"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(run_dir / "checkpoints" / f"checkpoint-{STEPS}")
    result = launch(accelerate(launch_file), setup["recipe"], run_dir, *overrides, record=resume_record, resume=True)
    assert result.returncode == 0, result.stderr[-5000:]

    resumed = recorded(resume_record)
    for rank in range(RANKS):  # the same examples on the same rank for the remaining steps
        assert resumed[rank] == {step: seen[rank][step] for step in range(STEPS // 2, STEPS)}
    assert {step: loss for step, loss in losses(run_dir).items() if step > STEPS // 2} == pytest.approx(
        {step: loss for step, loss in two_ranks.items() if step > STEPS // 2}, rel=1e-6
    )
    after_resume = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert after_resume.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(after_resume[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_exploding_gradients_stop_every_rank(strategy, setup):
    """The guard reads the global gradient norm (under ZeRO-2 p.grad holds nothing) and all ranks stop together."""
    overrides, _ = STRATEGIES[strategy]
    run_dir = setup["root"] / f"{strategy}-diverged"
    # A rank that stopped alone would leave the other waiting in a collective until the timeout.
    result = launch(torchrun(), setup["recipe"], run_dir, *overrides, "training.abort_grad_norm=1e-12", timeout=300)
    message = "peftkit: error: training stopped at step 1: the gradient norm"
    assert result.stderr.count(message) == RANKS, result.stderr[-5000:]  # each rank, its own clear message
    # torchrun exits 1 whenever a worker fails; the first worker to end reports the CLI's user-error code.
    assert result.returncode == 1 and "exitcode  : 2" in result.stderr, result.stderr[-5000:]
    assert not run_dir.exists()
