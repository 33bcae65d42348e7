"""Property-based: any recipe content or override either validates or raises the one user-error type."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftkit.errors import UserError
from peftkit.recipe.load import load_recipe, parse_override, set_key_path, validate_recipe
from peftkit.recipe.schema import Recipe

SECTION_KEYS = {name: list(field.annotation.model_fields) if hasattr(field.annotation, "model_fields") else []
                for name, field in Recipe.model_fields.items()}
KEYS = st.sampled_from([*SECTION_KEYS, *(k for keys in SECTION_KEYS.values() for k in keys), "bogus", ""])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)
BASE = {"model": {"name": "m"}, "data": {"train": {"path": "t.jsonl"}}, "training": {"eval_strategy": "no"}}


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_arbitrary_recipe_content(content):
    try:
        assert isinstance(validate_recipe({**BASE, **content}), Recipe)
    except UserError as error:
        assert str(error).startswith("the recipe is invalid")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_arbitrary_override_strings(text):
    try:
        key_path, value = parse_override(text)
        data = {"model": {"name": "m"}}
        set_key_path(data, key_path, value)
        validate_recipe({**BASE, **data})
    except UserError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_arbitrary_yaml_files(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_recipe(path)
    except UserError:
        pass


def test_strategy_reaches_valid_recipes_too():
    """Guard against a fuzz test that only ever exercises the error path."""
    assert validate_recipe({**BASE, **yaml.safe_load("adapter: {r: 4}")}).adapter.r == 4
