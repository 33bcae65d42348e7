"""`launch/slurm.sbatch` without Slurm: stub `srun`/`scontrol` on PATH start two local "nodes" (one accelerate
launcher each, one CPU rank per node, gloo) that train ZeRO-3 QLoRA with periodic evaluation, checkpoints and
load-best. The job is pre-empted (SIGUSR1 to the batch script, as `--signal=B:USR1@180` sends), saves and requeues
itself; the requeued job resumes and is SIGKILLed with every process (a node failure); the next one resumes and
finishes: every evaluation done, the best checkpoint loaded as the final adapter. (Exactness of ZeRO-3 resume is
checked in test_distributed_training.py; that evaluation and saving leave the 4-bit base unchanged, in
test_quantization.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, classification_recipe, sentiment_rows, write_jsonl, write_recipe
from tests.test_distributed_training import assert_best_checkpoint_is_the_final_adapter, free_port, reload_in_plain_peft

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STUBS = Path(__file__).parent / "slurm_stubs"
STEPS = 4


def job_env(tmp_path: Path, restart: int) -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(STUBS), str(Path(sys.executable).parent), os.environ["PATH"]]),
        "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1",
        "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.1", "SLURM_NNODES": "2",
        "SLURM_CPUS_PER_TASK": "2", "GPUS_PER_NODE": "1", "MAIN_PORT": free_port(),
        "STUB_SLURM_LOG": str(tmp_path / "slurm.jsonl"),
    }
    if restart:
        env["SLURM_RESTART_COUNT"] = str(restart)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def submit(tmp_path: Path, recipe: Path, run_dir: Path, restart: int = 0) -> subprocess.Popen:
    # `name=...` holds a space and a quote: it must reach peftkit as one argument on every node.
    command = ["bash", "launch/slurm.sbatch", str(recipe), f"output.dir={run_dir}", "name=qlora 'zero3' job"]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=job_env(tmp_path, restart), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(path: Path, job: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert job.poll() is None, job.stdout.read()[-5000:]
        assert time.monotonic() < deadline, f"no {path} before the timeout"
        time.sleep(0.05)


def steps_of(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*"))


def test_slurm_script_preemption_requeue_and_node_failure_resume_zero3_qlora(tmp_path, tiny_llama_dir):
    files = {"train": write_jsonl(tmp_path / "train.jsonl", sentiment_rows(32, seed=1)),
             "validation": write_jsonl(tmp_path / "dev.jsonl", sentiment_rows(8, seed=2))}
    recipe = write_recipe(tmp_path / "recipe.yaml", classification_recipe(
        tiny_llama_dir, files, tmp_path / "unused", data={"max_length": 32}, evaluation={"splits": []},
        quantization={"bits": 4, "storage_dtype": "float32"}, adapter={"dropout": 0.1},
        training={"max_steps": STEPS, "batch_size": 4, "logging_steps": 1, "eval_strategy": "steps", "eval_steps": 1,
                  "save_strategy": "steps", "save_steps": 1, "keep_last": 5, "warmup_ratio": 0.0},
    ))

    # Pre-emption: SIGUSR1 to the batch script once checkpoint-1 is written -> SIGTERM -> checkpoint -> requeue.
    run_dir = tmp_path / "run"
    job = submit(tmp_path, recipe, run_dir)
    wait_for(run_dir / "checkpoints" / "checkpoint-1" / "trainer_state.json", job)
    job.send_signal(signal.SIGUSR1)
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0 and "requeueing job 77" in output, output[-5000:]
    calls = [json.loads(line) for line in (tmp_path / "slurm.jsonl").read_text().splitlines()]
    assert calls[0]["srun"] == ["--kill-on-bad-exit=1"] and calls[0]["SRUN_CPUS_PER_TASK"] == "2"
    assert calls[-1] == {"requeue": "77"}
    # each rank saved and stopped with peftkit's message (the launcher then reports its workers' exit 143)
    assert output.count("peftkit: stopped: SIGTERM received: saved") == 2, output[-5000:]
    preempted_at = steps_of(run_dir)[-1]
    assert not (run_dir / "adapter").exists() and preempted_at < STEPS

    # The requeued job resumes; a node failure kills it (every process) after its next checkpoint.
    job = submit(tmp_path, recipe, run_dir, restart=1)
    if preempted_at + 1 < STEPS:
        wait_for(run_dir / "checkpoints" / f"checkpoint-{preempted_at + 1}" / "trainer_state.json", job)
        for process in [*psutil.Process(job.pid).children(recursive=True), psutil.Process(job.pid)]:
            process.kill()
        job.wait()
        job = submit(tmp_path, recipe, run_dir, restart=2)
    output, _ = job.communicate(timeout=900)
    assert job.returncode == 0, output[-5000:]
    assert "resuming from" in output

    # Evaluations at every step (the one SIGTERM skipped was run on resume), the best checkpoint is the final
    # adapter (load-best under ZeRO-3 QLoRA), which holds gathered, non-empty weights and reloads in plain peft.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train"]["global_step"] == STEPS
    final = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert_best_checkpoint_is_the_final_adapter(run_dir, metrics, final)
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["name"] == "qlora 'zero3' job"
    from transformers import BitsAndBytesConfig

    reloaded = reload_in_plain_peft(tiny_llama_dir, run_dir / "adapter", BitsAndBytesConfig(load_in_4bit=True))
    assert len(reloaded) == len([name for name in final if "lora_" in name]) > 0
