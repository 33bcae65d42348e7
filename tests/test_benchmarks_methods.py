"""The method x quantization benchmarks run and print what docs/methods.md quotes (tiny shapes, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from tests.conftest import REPO_ROOT


def run_module(*args: str, timeout: float = 600) -> str:
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_quantization_memory_ratios_on_a_tiny_llama():
    output = run_module("benchmarks.quantization_memory", "--shape", "tiny")
    rows = {}
    for line in output.splitlines():
        *label, megabytes, ratio, linear_ratio = line.split() if len(line.split()) >= 4 else [""] * 4
        if label[0] not in ("", "setting") and ratio.replace(".", "").isdigit():
            rows[" ".join(label)] = [float(megabytes), float(ratio), float(linear_ratio)]
    assert rows["fp32"][1:] == [1.0, 1.0]
    # Linear layers only: int8 plus one fp32 scale per row; 4 bits plus per-64-block constants.
    assert 0.25 < rows["8-bit"][2] < 0.30
    assert 0.125 < rows["4-bit nf4"][2] < 0.2
    assert rows["4-bit fp4"][2] == rows["4-bit nf4"][2]  # same packing, different code book
    assert rows["4-bit nf4"][1] < rows["8-bit"][1] < 1


@pytest.mark.slow
def test_gpu_check_dry_run_measures_every_setting_and_stack():
    assert subprocess.run(["bash", "-n", str(REPO_ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
        timeout=600, env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] and line.split()[0] in
            ("lora-bf16", "qlora-nf4", "qlora-nf4-gc")]
    assert sorted((row[0], row[1]) for row in rows) == sorted(
        (setting, stack) for setting in ("lora-bf16", "qlora-nf4", "qlora-nf4-gc") for stack in ("peftkit", "baseline")
    )
    assert all(float(row[4]) > 0 for row in rows)  # tokens/s measured (memory columns need CUDA: "-")
    # the memory-efficient loss runs through peftkit only (liger needs CUDA) and is compared with the HF-loss baseline
    efficient = [line.split() for line in result.stdout.splitlines() if line.split()[:1] and line.split()[0].endswith("-chunked")]
    assert sorted(row[0] for row in efficient) == ["lora-bf16-chunked", "qlora-nf4-gc-chunked"]
    assert all(row[1] == "peftkit" and float(row[6]) > 0 for row in efficient)
