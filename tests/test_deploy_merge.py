"""`peftkit merge`: merged == attached, standalone loading, sharding, verification failures, QLoRA merges."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import run_cli, run_cli_in_process, train_tiny_run
from peftkit.deploy.attach import BASE_ADAPTER, AttachedModel
from peftkit.deploy.merge import merge_run
from peftkit.run_folder import read_recipe
from peftkit.errors import UserError

TEXTS = ["the movie was great", "awful service and sad food", "a lovely place", "boring it was", "really fine"]

# Loads the merged folder in a fresh interpreter where importing peft or peftkit fails.
STANDALONE = """
import sys, json, torch
sys.modules["peftkit"] = None
sys.modules["peft"] = None
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
with torch.no_grad():
    logits = model(**tokenizer(json.loads(sys.argv[2]), padding=True, return_tensors="pt")).logits
print(json.dumps({"logits": logits.tolist(), "labels": model.config.id2label}))
"""


def test_cli_merge_writes_a_standalone_model_equal_to_the_attached_adapter(bert_runs, tiny_bert_dir, tmp_path):
    out = tmp_path / "merged"
    result = run_cli("merge", str(bert_runs["sentiment"]), "--out", str(out), "--max-shard-size", "40KB")
    assert result.returncode == 0, result.stderr
    assert "prediction agreement 100.00%" in result.stdout
    shards = sorted(path.name for path in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    assert not list(out.glob("*.bin")) and (out / "tokenizer.json").exists()
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_bert_dir}" in card and "- Method: LoRA (r=" in card and "| test | " in card and "accuracy" in card

    loaded = subprocess.run([sys.executable, "-c", STANDALONE, str(out), json.dumps(TEXTS)], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    standalone = json.loads(loaded.stdout)
    attached = AttachedModel(str(tiny_bert_dir), {"sentiment": str(bert_runs["sentiment"])})
    expected = torch.stack(attached.logits([{"text": text} for text in TEXTS]))
    assert torch.allclose(torch.tensor(standalone["logits"]), expected, atol=1e-5)
    assert standalone["labels"] == {"0": "negative", "1": "positive"}


def test_bf16_merge_stays_within_its_tolerance(bert_runs, tmp_path):
    result = merge_run(bert_runs["quality"], tmp_path / "bf16", dtype="bf16")
    assert 0 < result.verification.max_abs_diff <= result.tolerance
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16


def test_failed_verification_writes_nothing_unless_forced(bert_runs, tmp_path):
    with pytest.raises(UserError, match="merge verification failed.*--force"):
        merge_run(bert_runs["quality"], tmp_path / "strict", dtype="bf16", tolerance=1e-9)
    assert not (tmp_path / "strict").exists()
    forced = merge_run(bert_runs["quality"], tmp_path / "strict", dtype="bf16", tolerance=1e-9, force=True)
    assert forced.verification.max_abs_diff > 1e-9 and (tmp_path / "strict" / "config.json").exists()
    result = run_cli_in_process("merge", str(bert_runs["quality"]), "--out", str(tmp_path / "strict"))
    assert result.returncode == 2 and "already exists" in result.stderr


@pytest.mark.slow
def test_qlora_merge_onto_dequantized_weights_reproduces_the_trained_model(tiny_bert_dir, tmp_path):
    run = train_tiny_run(tiny_bert_dir, tmp_path / "qlora", quantization={"bits": 4})
    dequantized = merge_run(run, tmp_path / "dequantized")
    original = merge_run(run, tmp_path / "original", onto="original")
    assert dequantized.onto == "dequantized" and original.onto == "original"
    assert dequantized.verification.max_abs_diff < 1e-4 and original.verification.max_abs_diff < 1e-4
    assert dequantized.vs_trained.max_abs_diff < 1e-4
    assert original.vs_trained.max_abs_diff > 100 * dequantized.vs_trained.max_abs_diff
    config = json.loads((tmp_path / "dequantized" / "config.json").read_text())
    assert "quantization_config" not in config
    assert "4-bit (nf4) base" in (tmp_path / "dequantized" / "README.md").read_text()
    with pytest.raises(UserError, match="needs a run trained on a quantized base"):
        merge_run(train_tiny_run(tiny_bert_dir, tmp_path / "plain"), tmp_path / "x", onto="dequantized")


def test_qa_merge_verifies_and_plain_transformers_gives_the_same_spans(qa_adapters, tiny_bert_dir, tmp_path):
    from transformers import AutoModelForQuestionAnswering

    from peftkit.cli import main
    from peftkit.tasks import extractive_qa

    run = qa_adapters["first"]
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "AutoModelForQuestionAnswering" in card and "predictions agree on 100.00%" in card
    records = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    rows = [{"question": record["question"], "context": record["context"]} for record in records]
    info = json.loads((run / "task.json").read_text())
    plain = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = extractive_qa.infer(plain, tokenizer, rows, [info] * len(rows))
    attached = AttachedModel(str(tiny_bert_dir), {"first": str(run)})
    alone = attached.predict(rows)
    assert [(a["answer"], a["start"], a["end"]) for a in merged] == [(a["answer"], a["start"], a["end"]) for a in alone]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(merged, alone)) < 1e-5
    for got, expected in zip(extractive_qa.forward_logits(plain, tokenizer, rows, infos=[info] * len(rows)), attached.logits(rows)):
        assert torch.allclose(got, expected, atol=1e-5)


def _generative_run(model_dir, directory, task: dict, rows: list[dict]):
    """A 3-step LoRA run of a generating task (translation on T5, SFT on Llama) with 6 test rows."""
    from tests.conftest import classification_recipe, write_jsonl
    from peftkit.recipe.load import validate_recipe
    from peftkit.training.run import train

    directory.mkdir()
    files = {"train": write_jsonl(directory / "train.jsonl", rows[:24]), "test": write_jsonl(directory / "test.jsonl", rows[24:30])}
    recipe = classification_recipe(
        model_dir, files, directory / "run", adapter={"r": 4, "alpha": 32, "target_modules": "all-linear"},
        training={"max_steps": 3, "eval_strategy": "no", "save_strategy": "no", "batch_size": 8, "learning_rate": 5e-2},
        generation={"max_new_tokens": 3}, evaluation={"splits": ["test"], "worst_examples": 0},
    )
    return train(validate_recipe({**recipe, "task": task}))


@pytest.mark.parametrize("kind", ["translation", "causal_lm"])
def test_generative_merges_equal_the_attached_adapter(kind, tiny_t5_dir, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from tests.conftest import number_rows, sentiment_rows
    from peftkit.tasks import get_task

    if kind == "translation":
        base, auto_class, rows = tiny_t5_dir, AutoModelForSeq2SeqLM, number_rows(30, seed=1)
        task = {"type": "translation", "source_prefix": "translate: "}
    else:
        base, auto_class, rows = tiny_llama_dir, AutoModelForCausalLM, sentiment_rows(30, seed=1)
        task = {"type": "causal_lm", "prompt": "{text}", "response": "{label}", "chat_template": "plain"}
    run = _generative_run(base, tmp_path / kind, task, rows)
    result = merge_run(run, tmp_path / "merged")
    assert result.verification.max_abs_diff < 1e-5 and result.verification.agreement == 1.0
    assert (tmp_path / "merged" / "generation_config.json").exists()

    module = get_task(kind)
    info = json.loads((run / "task.json").read_text())
    verification_rows = module.inference_rows(read_recipe(run), Dataset.from_list(rows[24:30]))
    attached = AttachedModel(str(base), {"run": str(run)})
    plain = auto_class.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = module.forward_logits(plain, tokenizer, verification_rows, infos=[info] * len(verification_rows))
    for got, expected, base_logits in zip(merged, attached.logits(verification_rows), attached.logits(verification_rows, BASE_ADAPTER)):
        assert torch.allclose(got, expected, atol=1e-5)
        assert not torch.allclose(got, base_logits, atol=1e-3)  # the adapter changed the model
    inputs = [{field: row[field] for field in module.INPUT_FIELDS} for row in verification_rows]
    generated = module.infer(plain, tokenizer, inputs, [info] * len(inputs), max_new_tokens=4)
    assert generated == attached.predict(inputs, max_new_tokens=4)
