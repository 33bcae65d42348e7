"""The one supervised trainer every task uses (transformers' Trainer, configured from the recipe)."""
