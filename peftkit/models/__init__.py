"""Loading base models and tokenizers, with quantization and adapters applied from the recipe."""
