#!/usr/bin/env bash
# GPU check, under 8 minutes on one H200 (budget per part below): a random-init model with a real Llama shape
# trains a few steps with LoRA (bf16), QLoRA (nf4 + double quant) and QLoRA + gradient checkpointing, through
# peftkit and through plain transformers + peft; then with the memory-efficient loss (training.lm_loss chunked and
# liger) against transformers' loss; prints peak torch.cuda.max_memory_allocated, weights, tokens/s and ratios.
# Then the planner against measured peaks (benchmarks/plan_vs_measured.py, 1B/3B rows) and the peer comparison
# (benchmarks/peers.py: peftkit vs TRL SFTTrainer, when the SmolLM2 package and the Self-Instruct data are there).
#
#   bash benchmarks/gpu_check.sh                 # Llama-3.2-1B shape
#   SHAPE=llama-3.1-8b STEPS=4 bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --dry-run       # tiny shape on CPU, seconds (what the test suite runs)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [[ "${1:-}" == "--dry-run" ]]; then
    exec "$PYTHON" -m benchmarks.gpu_check --dry-run
fi
SHAPE=${SHAPE:-llama-3.2-1b}
STEPS=${STEPS:-6}
SEQ=${SEQ:-1024}
BATCH=${BATCH:-4}
WORK=${WORK:-/tmp/peftkit-gpu-check}
RESULTS="$WORK/results-$SHAPE.jsonl"
mkdir -p "$WORK"
: > "$RESULTS"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
"$PYTHON" -m benchmarks.gpu_check --prepare --shape "$SHAPE" --dir "$WORK/$SHAPE"
# 10 processes x ~25 s (model build + STEPS steps of the 1B shape): ~4 minutes
"$PYTHON" -m benchmarks.gpu_check --list | while read -r setting stack; do
    {
        # One process per measurement, so that peak-memory counters and allocator caches start clean;
        # a failing or slow measurement is reported and the others still run.
        if ! timeout 120 "$PYTHON" -m benchmarks.gpu_check --shape "$SHAPE" --dir "$WORK/$SHAPE" \
            --setting "$setting" --stack "$stack" --steps "$STEPS" --seq "$SEQ" --batch "$BATCH" < /dev/null \
            > "$WORK/$setting-$stack.out" 2> "$WORK/$setting-$stack.err"; then
            echo "FAILED: $setting / $stack (last lines of its stderr follow)"; tail -n 5 "$WORK/$setting-$stack.err"
            continue
        fi
        tail -n 1 "$WORK/$setting-$stack.out" | tee -a "$RESULTS"
    }
done
echo "shape $SHAPE, $STEPS steps of $BATCH x $SEQ tokens"
"$PYTHON" -m benchmarks.gpu_check --summarize "$RESULTS"
# Planner vs measured peak memory, the 1B and 3B rows (~1.5 minutes); the full grid: python -m benchmarks.plan_vs_measured
timeout 150 "$PYTHON" -m benchmarks.plan_vs_measured --models meta-llama/Llama-3.2-1B,meta-llama/Llama-3.2-3B \
    || echo "FAILED or timed out: plan_vs_measured"
# Peers on the GPU (~1.5 minutes); it prints why it skips when the model package or data are missing
timeout 150 "$PYTHON" -m benchmarks.peers --tools peftkit,trl --steps 8 --batch 8 --rounds 1 --threads 4 \
    || echo "FAILED or timed out: peers"
# FSDP-QLoRA needs 2 GPUs (on CPU accelerate runs DDP, so peftkit refuses FSDP there): with 2 or more, check that
# each rank holds half of the 4-bit base and the adapter reloads (the CPU suite runs the ZeRO-3 twin of this test).
if (( $(nvidia-smi -L | wc -l) >= 2 )); then
    "$PYTHON" -m pytest tests/test_distributed_training.py -q -k "qlora and fsdp" -p no:cacheprovider
else
    echo "FSDP-QLoRA check skipped: it needs 2 GPUs"
fi
