"""Every shipped recipe runs from a fresh install: the real CLI, the real offline models, an empty peftkit cache.

Each recipe trains for one step on a few rows (tiny limits set by overrides); everything else, the model, its
conversion and the task, is exactly what a new user gets. The cache is one empty folder for the whole module,
so the SmolLM2 GGUF conversion happens once, inside the first recipe that needs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peftkit.run_folder import METRICS_FILE
from tests.conftest import REPO_ROOT, SHARED_DATA

RECIPES = REPO_ROOT / "recipes"
# Recipes that read a hub model or hub dataset: no network in CI. Their offline twins in recipes/local run instead.
NEEDS_HUB = {
    "qa_squad.yaml": "data rajpurkar/squad from the hub (recipes/local/qa_xquad.yaml runs the same recipe offline)",
    "sft_alpaca.yaml": "model HuggingFaceTB/SmolLM2-135M-Instruct and data yahma/alpaca-cleaned from the hub",
    "sft_gsm8k.yaml": "model and data openai/gsm8k from the hub (sft_gsm8k_local.yaml runs offline)",
    "sst2_lora.yaml": "data stanfordnlp/sst2 from the hub",
    "sst2_qlora.yaml": "data stanfordnlp/sst2 from the hub",
    "summarization_xsum.yaml": "model facebook/bart-base from the hub",
    "translation_multi30k.yaml": "model google-t5/t5-small from the hub",
    "local/summarization_xsum.yaml": "model facebook/bart-base from the hub (local data only)",
    "local/summarization_scitldr.yaml": "model facebook/bart-base from the hub (local data only)",
    "local/translation_multi30k.yaml": "model google-t5/t5-small from the hub (local data only)",
}


def _shipped() -> list[str]:
    files = sorted(p.relative_to(RECIPES).as_posix() for p in RECIPES.glob("*.yaml"))
    return files + sorted(p.relative_to(RECIPES).as_posix() for p in (RECIPES / "local").glob("*.yaml"))


def test_hub_list_names_shipped_recipes():
    """A renamed or deleted recipe must not leave a stale skip behind."""
    assert set(NEEDS_HUB) <= set(_shipped())


@pytest.mark.parametrize("name", [n for n in _shipped() if "params" not in yaml.safe_load((RECIPES / n).read_text())])
def test_every_shipped_recipe_plans_offline(name, tmp_path, monkeypatch):
    """`peftkit plan` needs only the model's shape: the hub models of the shipped recipes (SmolLM2, BART, T5) are
    built in, so planning works offline too (it failed with "couldn't connect to huggingface.co"), and a GGUF model's
    shape comes from the file's metadata (planning converted the whole model into the cache first)."""
    from tests.conftest import run_cli_in_process

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    result = run_cli_in_process("plan", str(RECIPES / name), "--gpus", "1", "--gpu-memory", "24GiB")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fits in 24.00 GiB per GPU" in result.stdout
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name, parameters", [  # the published sizes: 134.5M, 139M, 60.5M
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 134_515_008), ("facebook/bart-base", 139_420_416), ("google-t5/t5-small", 60_506_624),
])
def test_built_in_shapes_of_the_recipes_models(name, parameters):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from peftkit.plan.shapes import load_model_config
    from peftkit.recipe.schema import ModelSection

    config = load_model_config(ModelSection(name=name))
    with torch.device("meta"):
        model = (AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM).from_config(config)
    assert sum(p.numel() for p in model.parameters()) == parameters


@pytest.fixture(scope="module")
def empty_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("peftkit-cache")


def _tiny_overrides(path: Path, out_dir: Path) -> list[str]:
    """One step on a few rows of every split the recipe defines, short generations."""
    from peftkit.recipe.load import load_recipe

    recipe = load_recipe(path)
    if isinstance(recipe.data.train, list):  # a mixture: each source limited, the list replaced as one value
        sources = [{**source.model_dump(mode="json", exclude_defaults=True), "limit": 8} for source in recipe.data.train]
        train_limit = f"data.train={json.dumps(sources)}"
    else:
        train_limit = "data.train.limit=8"
    overrides = [
        "training.max_steps=1", "training.batch_size=2", "training.eval_batch_size=2", "training.logging_steps=1",
        train_limit, "generation.max_new_tokens=4", "evaluation.worst_examples=2", f"output.dir={out_dir}",
    ]
    # A decoder's prompt + response must fit and a QA window goes with its stride, so their recipes' lengths stay.
    if recipe.task.type not in ("causal_lm", "extractive_qa"):
        overrides.append(f"data.max_length={min(recipe.data.max_length, 256)}")
    overrides += [f"data.{split}.limit=3" for split in ("validation", "test") if getattr(recipe.data, split) is not None]
    return overrides


def _reads_shared_data(path: Path) -> bool:
    """Whether the recipe or a fragment it extends reads ../shared/ (sst2_full.yaml only extends sst2_lora.yaml)."""
    from peftkit.recipe.load import read_with_extends

    return "../shared/" in json.dumps(read_with_extends(path))


def _peftkit(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PEFTKIT_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "peftkit", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("name", _shipped())
def test_shipped_recipe_runs_from_an_empty_cache(name, empty_cache, tmp_path):
    if name in NEEDS_HUB:
        pytest.skip(f"needs the hub: {NEEDS_HUB[name]}")
    path = RECIPES / name
    text = path.read_text()
    if _reads_shared_data(path) and not SHARED_DATA.is_dir():
        pytest.skip("reads the real data in ../shared/data, which this checkout lacks")
    content = yaml.safe_load(text)
    out_dir = tmp_path / "run"
    if "params" in content:  # a sweep search space, run against the quickstart recipe
        args = ["sweep", str(RECIPES / "quickstart.yaml"), *_tiny_overrides(RECIPES / "quickstart.yaml", out_dir),
                "--space", str(path), "--trials", "1"]
    else:
        args = ["train", str(path), *_tiny_overrides(path, out_dir)]
    result = _peftkit(args, empty_cache)
    assert result.returncode == 0, f"peftkit {' '.join(args)} failed:\n{result.stderr[-3000:]}"
    metrics_files = list(out_dir.rglob(METRICS_FILE))
    assert metrics_files, f"no {METRICS_FILE} under {out_dir}"
    metrics = json.loads(metrics_files[0].read_text())
    # One optimizer step, or none for a task fitted without gradient steps (frozen features + a classifier).
    assert metrics["train"]["global_step"] == (0 if content.get("task", {}).get("type") == "features" else 1)
    assert {"validation", "test"} & set(metrics), "no split was evaluated"
    for converted in (empty_cache / "gguf").glob("*/config.json"):
        # A converted GGUF model is a plain fp32 folder: a kept `quantization_config` makes peft refuse it.
        config = json.loads(converted.read_text())
        assert "quantization_config" not in config and config["dtype"] == "float32"
