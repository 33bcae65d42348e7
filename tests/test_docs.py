"""The generated recipe reference must match the schema."""

from peftkit.recipe.docs import DOC_PATH, render


def test_recipe_reference_is_current():
    assert DOC_PATH.read_text(encoding="utf-8") == render(), "docs/recipe.md is stale: run `python -m peftkit.recipe.docs`"
