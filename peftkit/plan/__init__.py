"""`peftkit plan`: predict per-GPU training memory from a recipe and search for recipe changes that fit."""
