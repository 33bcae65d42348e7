"""Models shipped as GGUF files: dequantize once into a normal HF model folder in a cache, then load that.

transformers can read GGUF but refuses `save_pretrained` on such a model, and dequantizing takes a while,
so the first use builds a fresh model from the config, copies the weights in and saves it; later runs
(and the adapter's `base_model_name_or_path`) use the cached folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

CACHE_ENV = "PEFTKIT_CACHE"
COMPLETE_MARKER = ".converted"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "peftkit")


def is_gguf(location: str) -> bool:
    return location.lower().endswith(".gguf") and Path(location).is_file()


def converted_folder(gguf_file: Path) -> Path:
    """The cached HF folder for `gguf_file`, converting it on first use (keyed by path, size and mtime)."""
    gguf_file = Path(gguf_file).resolve()
    stat = gguf_file.stat()
    # v2: folders converted before carried the GGUF quantization_config, which made trainers refuse the model.
    key = hashlib.sha256(f"v2|{gguf_file}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_root() / "gguf" / f"{gguf_file.stem}-{key}"
    if (folder / COMPLETE_MARKER).is_file() and is_plain_model_folder(folder):
        return folder
    _convert(gguf_file, folder)
    return folder


def gguf_config(gguf_file: Path):
    """The config of the converted folder, read from the GGUF file's metadata alone (seconds, no conversion): what
    `peftkit plan` needs. The converted weights are float32."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    config.dtype = torch.float32
    return config


def is_plain_model_folder(folder: Path) -> bool:
    """False for a folder converted by an older peftkit, whose config still claims GGUF quantization."""
    import json

    return "quantization_config" not in json.loads((folder / "config.json").read_text())


def _convert(gguf_file: Path, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    config = loaded.config
    # The weights are dequantized: a leftover GGUF quantization_config would mark the saved model as quantized
    # (not trainable, and loaded through the GGUF quantizer again).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    staging.chmod(0o755)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / COMPLETE_MARKER).write_text(str(gguf_file) + "\n")
        if (folder / COMPLETE_MARKER).is_file() and is_plain_model_folder(folder):
            return  # another process converted it meanwhile, and may be reading it: keep theirs
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete or outdated conversion
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
