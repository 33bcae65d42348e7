"""Random-init Llama checkpoints of chosen shapes, saved as ordinary model folders, for the benchmarks.

Benchmarks load them through the same `from_pretrained` + bitsandbytes path a recipe uses; no download needed.
"""

from __future__ import annotations

from pathlib import Path

# Real shapes of public Llama checkpoints (config.json values), plus small ones for CPU runs.
SHAPES = {
    # ~105M parameters, 98% of them in quantizable linear layers: a small tied vocabulary keeps the unquantized
    # embedding from dominating the 4-bit footprint (the real Llama 3.2 1B and 3.1 8B shapes have 21% and 13%).
    "bench-100m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=2048, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}


def save_random_llama(directory: Path, shape: str, dtype: str = "float32", seed: int = 0) -> Path:
    """Write a random-init `LlamaForCausalLM` of `shape` to `directory` (safetensors); reuse it if present."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    torch.manual_seed(seed)
    config = LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])
    # Random init of billions of weights takes minutes on CPU and seconds on a GPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(directory)
    return directory


def parameter_count(shape: str) -> int:
    """Parameters of a shape without building it (meta device)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    return sum(p.numel() for p in model.parameters())
