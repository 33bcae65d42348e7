"""`peftkit train` on 2 CPU processes (gloo) under DDP, ZeRO-2 and ZeRO-3, launched by torchrun and accelerate.

(FSDP is refused without GPUs: accelerate would run DDP instead; see tests/test_distributed.py.)

For each strategy one torchrun run trains 4 steps (= one epoch: 32 examples, 2 ranks x batch 4), evaluating and
saving after every step and loading the best checkpoint at the end. A second torchrun run is SIGKILLed (launcher
and workers) after a checkpoint chosen by a seeded RNG, and `accelerate launch --config_file launch/<file>`
resumes it. Checked: data shards (disjoint, complete), losses against 1 process x batch 8, the best checkpoint
and the final adapter (non-empty, equal to the best checkpoint's, reloads in plain peft), and that the killed and
resumed run ends with the uninterrupted run's adapter.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import HOOKS, REPO_ROOT, classification_recipe, sentiment_rows, write_jsonl, write_recipe
from peftkit.training.checkpoints import check_saved_weights

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STEPS, BATCH, RANKS, TRAIN_EXAMPLES = 4, 4, 2, 32
# Strategy -> (recipe overrides, accelerate config in launch/ used to resume).
STRATEGIES = {
    "ddp": (["distributed.strategy=ddp"], "multi_gpu.yaml"),
    "zero2": (["distributed.strategy=deepspeed", "distributed.zero_stage=2"], "zero2.yaml"),
    "zero3": (["distributed.strategy=deepspeed", "distributed.zero_stage=3"], "zero3.yaml"),
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
    files = {"train": write_jsonl(root / "train.jsonl", rows), "validation": write_jsonl(root / "dev.jsonl", sentiment_rows(8, seed=2)),
             "test": write_jsonl(root / "test.jsonl", sentiment_rows(12, seed=3))}
    # A decoder without dropout: DDP and the reference see the same deterministic forward pass.
    recipe = classification_recipe(
        tiny_llama_dir, files, root / "unused",
        data={"max_length": 32},
        training={"max_steps": STEPS, "batch_size": BATCH, "logging_steps": 1, "eval_strategy": "steps", "eval_steps": 1,
                  "save_strategy": "steps", "save_steps": 1, "warmup_ratio": 0.0},
        evaluation={"splits": ["test"]},
    )
    recipe_path = write_recipe(root / "recipe.yaml", recipe)
    reference = root / "reference"
    result = launch([sys.executable, "-m", "peftkit"], recipe_path, reference, f"training.batch_size={BATCH * RANKS}")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "recipe": recipe_path, "model": tiny_llama_dir, "rows": rows, "reference_losses": losses(reference)}


def launch(launcher: list[str], recipe: Path, run_dir: Path, *overrides: str, record: Path | None = None,
           resume: bool = False, timeout: float = 900, param_bytes: Path | None = None) -> subprocess.CompletedProcess:
    command = [*launcher, "train", str(recipe), f"output.dir={run_dir}", *overrides] + (["--resume"] if resume else [])
    env = worker_env(record, param_bytes=param_bytes)
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=timeout)


def worker_env(record: Path | None = None, hold_at_step: int | None = None, param_bytes: Path | None = None) -> dict[str, str]:
    """Environment of launched workers; the PEFTKIT_TEST_* variables drive tests/worker_hooks."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HOOKS), str(REPO_ROOT)]),
        "OMP_NUM_THREADS": "1",
        "PEFTKIT_TEST_RECORD_DIR": str(record or ""),
        "PEFTKIT_TEST_HOLD_AT_STEP": "" if hold_at_step is None else str(hold_at_step),
        "PEFTKIT_TEST_PARAM_BYTES_DIR": str(param_bytes or ""),
    }
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def sigkill_after_checkpoint(recipe: Path, run_dir: Path, step: int, *overrides: str) -> None:
    """Start a torchrun job and SIGKILL the launcher's process group and every worker once checkpoint-`step` is
    complete. torchrun starts each worker in a session of its own, so killing the launcher's group alone would
    leave the workers training."""
    job = subprocess.Popen([*torchrun(), "train", str(recipe), f"output.dir={run_dir}", *overrides], cwd=REPO_ROOT,
                           env=worker_env(hold_at_step=step), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    checkpoint = run_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json"
    try:
        deadline = time.monotonic() + 600
        while not checkpoint.is_file():
            assert job.poll() is None, job.stderr.read()[-5000:]
            assert time.monotonic() < deadline, "no checkpoint before the timeout"
            time.sleep(0.05)
    finally:
        workers = psutil.Process(job.pid).children(recursive=True)
        os.killpg(job.pid, signal.SIGKILL)
        for worker in workers:
            worker.kill()
        job.wait()
        job.stderr.close()
    assert not (run_dir / "adapter").exists()


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


def reload_in_plain_peft(model_dir: Path, adapter_dir: Path, quantization_config=None) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, quantization_config=quantization_config)
    model = PeftModel.from_pretrained(base, adapter_dir)
    return {name: parameter.detach() for name, parameter in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_two_ranks_shard_data_match_one_rank_keep_the_best_and_resume_after_sigkill(strategy, setup):
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

    # Periodic evaluation picked the best checkpoint, and the final adapter is that checkpoint's adapter.
    best_step = assert_best_checkpoint_is_the_final_adapter(run_dir, metrics, saved)

    # SIGKILL a second run after a checkpoint (seeded choice), resume it with accelerate launch and launch/<file>.
    kill_step = random.Random(strategy).randint(1, STEPS - 1)
    killed = root / "killed"
    sigkill_after_checkpoint(setup["recipe"], killed, kill_step, *overrides)
    result = launch(accelerate(launch_file), setup["recipe"], killed, *overrides, record=resume_record, resume=True)
    assert result.returncode == 0, result.stderr[-5000:]
    assert f"resuming from {killed / 'checkpoints' / f'checkpoint-{kill_step}'}" in result.stderr

    resumed = recorded(resume_record)
    for rank in range(RANKS):  # the same examples on the same rank for the remaining steps
        assert resumed[rank] == {step: seen[rank][step] for step in range(kill_step, STEPS)}
    assert {step: loss for step, loss in losses(killed).items() if step > kill_step} == pytest.approx(
        {step: loss for step, loss in two_ranks.items() if step > kill_step}, rel=1e-6
    )
    assert json.loads((killed / "metrics.json").read_text())["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    after_resume = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert after_resume.keys() == saved.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(after_resume[name], tensor, rtol=0, atol=1e-6, msg=name)


def assert_best_checkpoint_is_the_final_adapter(run_dir: Path, metrics: dict, final: dict[str, torch.Tensor]) -> int:
    """The best evaluation names the best checkpoint in metrics.json and the trainer state; returns its step."""
    key = f"eval_{metrics['best_metric_name']}"
    evaluations = {entry["step"]: entry[key] for entry in json.loads((run_dir / "log_history.json").read_text()) if key in entry}
    assert sorted(evaluations) == list(range(1, STEPS + 1))
    best_step = max(evaluations, key=lambda step: (evaluations[step], -step))  # the first of equals is kept
    best = run_dir / "checkpoints" / f"checkpoint-{best_step}"
    assert metrics["best_checkpoint"] == str(best) and metrics["best_metric"] == evaluations[best_step]
    last_state = json.loads((run_dir / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert last_state["best_model_checkpoint"] == str(best)
    check_saved_weights(best)
    best_weights = load_file(str(best / "adapter_model.safetensors"))
    assert best_weights.keys() == final.keys()
    for name, tensor in best_weights.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=0, msg=name)
    if best_step != STEPS:  # then the final weights were really reloaded: the last step's differ
        last_weights = load_file(str(run_dir / "checkpoints" / f"checkpoint-{STEPS}" / "adapter_model.safetensors"))
        assert any(not torch.equal(last_weights[name], tensor) for name, tensor in final.items())
    return best_step


def test_exploding_gradients_stop_every_rank(setup):
    """The guard reads the global gradient norm (under ZeRO-2 p.grad holds nothing) and all ranks stop together."""
    overrides, _ = STRATEGIES["zero2"]
    run_dir = setup["root"] / "zero2-diverged"
    # A rank that stopped alone would leave the other waiting in a collective until the timeout.
    result = launch(torchrun(), setup["recipe"], run_dir, *overrides, "training.abort_grad_norm=1e-12", timeout=300)
    message = "peftkit: error: training stopped at step 1: the gradient norm"
    assert result.stderr.count(message) == RANKS, result.stderr[-5000:]  # each rank, its own clear message
    # torchrun exits 1 whenever a worker fails; the first worker to end reports the CLI's user-error code.
    assert result.returncode == 1 and "exitcode  : 2" in result.stderr, result.stderr[-5000:]
    assert not run_dir.exists()


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory) -> Path:
    """One Llama layer with 1024 x 1024 projections: each 4-bit weight (131,072 float32 storage elements) is above
    DeepSpeed's stage3_param_persistence_threshold (1e5), so ZeRO-3 keeps only partitions of it between uses."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import _word_level_tokenizer

    directory = tmp_path_factory.mktemp("wide-llama")
    tokenizer = _word_level_tokenizer(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("strategy", [
    "zero3",
    pytest.param("fsdp", marks=pytest.mark.skipif(
        torch.cuda.device_count() < RANKS,
        reason="FSDP needs GPUs: on CPU accelerate runs DDP, so peftkit refuses it (test_fsdp_without_a_gpu_is_refused)")),
])
def test_qlora_partitions_the_4bit_base(strategy, setup, wide_llama_dir):
    """4-bit nf4 base (float32 storage = compute dtype) + LoRA, 2 ranks: each holds half of the packed weights."""
    from transformers import BitsAndBytesConfig

    root = setup["root"] / f"qlora-{strategy}"
    param_bytes, run_dir = root / "bytes", root / "run"
    param_bytes.mkdir(parents=True)
    quantization = {"bits": 4, "quant_type": "nf4", "compute_dtype": "float32", "storage_dtype": "float32"}
    recipe = write_recipe(root / "recipe.yaml", classification_recipe(
        wide_llama_dir, {"train": setup["root"] / "train.jsonl"}, run_dir, data={"max_length": 32},
        quantization=quantization, evaluation={"splits": []},
        training={"max_steps": 2, "batch_size": BATCH, "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no"},
    ))
    sharding = STRATEGIES["zero3"][0] if strategy == "zero3" else ["distributed.strategy=fsdp"]
    result = launch(torchrun(), recipe, run_dir, *sharding, param_bytes=param_bytes)
    assert result.returncode == 0, result.stderr[-5000:]
    assert sorted(losses(run_dir)) == [1, 2]

    # 7 quantized projections of 1024 x 1024 = 7 x 512 KiB packed; one rank would hold all of it.
    ranks = [json.loads((param_bytes / f"rank{rank}.json").read_text()) for rank in range(RANKS)]
    for measured in ranks:
        assert measured["weights"] == 7 and measured["whole"] == 7 * 1024 * 1024 // 2
        assert measured["held"] / measured["whole"] == pytest.approx(1 / RANKS, abs=0.01)

    adapter = run_dir / "adapter"
    check_saved_weights(adapter)
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                bnb_4bit_quant_storage=torch.float32)
    reloaded = reload_in_plain_peft(wide_llama_dir, adapter, quantization_config=config)
    lora = {name: tensor for name, tensor in saved.items() if "lora_" in name}
    assert len(reloaded) == len(lora) > 0 and all(tensor.numel() > 0 for tensor in saved.values())
    for name, tensor in lora.items():  # peft names the loaded adapter "default"
        torch.testing.assert_close(reloaded[name.replace(".weight", ".default.weight")], tensor, rtol=0, atol=0)
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in lora.items())  # trained
