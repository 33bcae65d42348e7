"""Recipe schema defaults, validation errors, `extends` + override precedence."""

from __future__ import annotations

import pytest
import yaml

from peftkit.errors import UserError
from peftkit.recipe.load import load_recipe, parse_override, validate_recipe
from peftkit.recipe.schema import Recipe

MINIMAL = {"model": {"name": "some/model"}, "data": {"train": {"path": "train.jsonl"}}, "training": {"eval_strategy": "no", "save_strategy": "steps"}}


def write(path, content):
    path.write_text(yaml.safe_dump(content))
    return path


def test_defaults_are_safe_and_complete():
    recipe = validate_recipe(MINIMAL)
    assert recipe.model.trust_remote_code is False
    assert recipe.adapter.method == "lora" and recipe.adapter.target_modules == "all-linear"
    assert recipe.task.type == "classification" and recipe.task.text_column == "text"
    assert recipe.quantization.bits is None and recipe.distributed.strategy == "auto"
    assert recipe.training.learning_rate == 2e-4 and recipe.training.seed == 42


def test_every_schema_field_has_a_description():
    from peftkit.recipe.docs import _sections

    for path, model in _sections(Recipe, ""):
        for name, field in model.model_fields.items():
            assert field.description, f"{path}.{name} has no description"


def test_extends_then_recipe_then_overrides(tmp_path):
    (tmp_path / "fragments").mkdir()
    write(tmp_path / "fragments" / "base.yaml", {**MINIMAL, "training": {**MINIMAL["training"], "epochs": 1, "batch_size": 4, "learning_rate": 0.1}})
    write(tmp_path / "lr.yaml", {"training": {"learning_rate": 0.2, "seed": 5}})
    recipe_file = write(tmp_path / "exp.yaml", {"extends": ["base.yaml", "lr.yaml"], "training": {"batch_size": 8}})
    recipe = load_recipe(recipe_file, ["training.seed=9", "adapter.target_modules=[q_proj, v_proj]", "output.tensorboard=false"])
    assert recipe.name == "exp"
    assert recipe.training.epochs == 1  # fragment
    assert recipe.training.learning_rate == 0.2  # later fragment wins
    assert recipe.training.batch_size == 8  # recipe wins over fragments
    assert recipe.training.seed == 9  # override wins over everything
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]
    assert recipe.output.tensorboard is False


def test_override_values_are_typed():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=1.5e-4")[1] == pytest.approx(1.5e-4)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    recipe = validate_recipe({**MINIMAL, "training": {**MINIMAL["training"], "learning_rate": "1.5e-4"}})
    assert recipe.training.learning_rate == pytest.approx(1.5e-4)


@pytest.mark.parametrize(
    "content, expected",
    [
        ({**MINIMAL, "trainig": {}}, ["trainig: unknown key", "did you mean `training`"]),
        ({**MINIMAL, "adapter": {"alhpa": 8}}, ["adapter.alhpa: unknown key", "did you mean `alpha`", "allowed keys: method"]),
        ({**MINIMAL, "training": {**MINIMAL["training"], "learning_rate": "fast"}}, ["training.learning_rate", "valid number"]),
        ({**MINIMAL, "training": {**MINIMAL["training"], "batch_size": 0}}, ["training.batch_size", "greater than 0"]),
        ({**MINIMAL, "adapter": {"method": "lorax"}}, ["adapter.method", "'lora'"]),
        ({"data": MINIMAL["data"]}, ["model: required key is missing"]),
        ({**MINIMAL, "task": {"type": "classification", "txt_column": "x"}}, ["task.txt_column: unknown key", "did you mean `text_column`"]),
        ({**MINIMAL, "quantization": {"bits": 4}, "adapter": {"method": "none"}}, ["quantization.bits needs an adapter"]),
        ({**MINIMAL, "training": {"eval_strategy": "epoch"}}, ["needs validation data"]),
    ],
)
def test_invalid_recipes_name_the_key_and_the_fix(content, expected):
    with pytest.raises(UserError) as caught:
        validate_recipe(content)
    for fragment in expected:
        assert fragment in str(caught.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model: [unclosed", "is not valid YAML"),
        ("model: {name: a}\nmodel: {name: b}\n", r'the key `model` twice; keep one\n  in ".*bad.yaml", line 2'),
        ("model:\n\tname: a\n", r'in ".*bad.yaml", line 2, column 1:\n    \tname: a'),  # the file and the line
        ("- just\n- a list\n", "must hold a mapping"),
        ("extends: [missing.yaml]\n", "fragment `missing.yaml`"),
    ],
)
def test_unreadable_recipe_files(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=expected):
        load_recipe(path)


def test_extends_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", {"extends": ["b.yaml"]})
    write(tmp_path / "b.yaml", {"extends": ["a.yaml"]})
    with pytest.raises(UserError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


@pytest.mark.parametrize("override", ["novalue", "=3", "a..b=1", "model.name.x=1"])
def test_malformed_overrides(tmp_path, override):
    path = write(tmp_path / "r.yaml", MINIMAL)
    with pytest.raises(UserError):
        load_recipe(path, [override])


def test_yaml_tags_that_run_code_are_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(path)


def test_shipped_recipes_validate():
    from tests.conftest import REPO_ROOT

    # Fragments (recipes/fragments/) and sweep search spaces are not recipes on their own.
    recipes = [p for p in (REPO_ROOT / "recipes").rglob("*.yaml") if "fragments" not in p.parts and "sweep_space" not in p.name]
    assert len(recipes) > 10
    for path in sorted(recipes):
        load_recipe(path)


def test_yaml_no_means_the_strategy_no():
    recipe = validate_recipe({**MINIMAL, **yaml.safe_load("training: {eval_strategy: no, save_strategy: no}")})
    assert recipe.training.eval_strategy == "no" and recipe.training.save_strategy == "no"
