"""Causal LM SFT: response-only labels, packing without cross-example leakage, generative scoring end to end."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import run_cli, sentiment_rows, write_jsonl, write_recipe
from peftkit.errors import UserError
from peftkit.saved_run import load_run
from peftkit.recipe.load import deep_merge, validate_recipe
from peftkit.data import chat
from peftkit.tasks import causal_lm


def sft_recipe(model_dir, files, run_dir, **sections) -> dict:
    recipe = {
        "name": "tiny-sft",
        "model": {"name": str(model_dir)},
        "task": {"type": "causal_lm", "prompt": "{text}", "response": "{label}", "chat_template": "plain"},
        "data": {name: {"path": str(path)} for name, path in files.items()},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "training": {
            "max_steps": 6, "batch_size": 8, "learning_rate": 5e-3, "logging_steps": 2, "seed": 7,
            "eval_strategy": "steps", "eval_steps": 3, "save_strategy": "steps", "save_steps": 3,
        },
        "output": {"dir": str(run_dir), "tensorboard": False},
    }
    if "validation" not in files:
        recipe["training"].update(eval_strategy="no", save_strategy="no")
    if sections.get("adapter", {}).get("method", "lora") != "lora":
        del recipe["adapter"]  # LoRA's options are errors for other methods
    return deep_merge(recipe, sections)


@pytest.fixture
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def answer_rows(count: int, seed: int) -> list[dict]:
    """Sentiment rows whose response is a word of the tiny vocabulary (`happy` / `sad`)."""
    return [{"text": r["text"], "label": "happy" if r["label"] == "positive" else "sad"} for r in sentiment_rows(count, seed)]


@pytest.fixture
def sft_files(tmp_path):
    return {
        "train": write_jsonl(tmp_path / "train.jsonl", answer_rows(48, seed=1)),
        "validation": write_jsonl(tmp_path / "validation.jsonl", answer_rows(12, seed=2)),
    }


def test_prompt_tokens_are_masked_and_response_tokens_kept(tokenizer):
    tokenizer.chat_template = chat.NAMED_TEMPLATES["plain"]
    messages = [{"role": "user", "content": "the movie was bad"}, {"role": "assistant", "content": "sad"}]
    example = chat.encode(tokenizer, messages, max_length=64)
    ids = tokenizer("the movie was bad sad </s>", add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == ids
    # Exactly the response word and the end-of-sequence token are learned.
    assert example["labels"] == [-100, -100, -100, -100, ids[4], tokenizer.eos_token_id]


def test_every_assistant_turn_of_a_chat_is_learned(tokenizer):
    tokenizer.chat_template = chat.NAMED_TEMPLATES["chatml"]
    messages = [
        {"role": "user", "content": "good"}, {"role": "assistant", "content": "happy"},
        {"role": "user", "content": "bad"}, {"role": "assistant", "content": "sad"},
    ]
    example = chat.encode(tokenizer, messages, max_length=128)
    learned = [token for token, label in zip(example["input_ids"], example["labels"]) if label != -100]
    words = tokenizer.convert_ids_to_tokens(learned)
    assert "happy" in words and "sad" in words
    assert "good" not in words and "bad" not in words
    assert [label for label in example["labels"] if label != -100] == learned


def test_truncation_that_removes_the_response_drops_the_example(tokenizer):
    tokenizer.chat_template = chat.NAMED_TEMPLATES["plain"]
    messages = [{"role": "user", "content": "the movie was very bad"}, {"role": "assistant", "content": "sad"}]
    assert chat.encode(tokenizer, messages, max_length=3) is None


def _examples(tokenizer, count):
    tokenizer.chat_template = chat.NAMED_TEMPLATES["plain"]
    rows = sentiment_rows(count, seed=5)
    examples = []
    for i, row in enumerate(rows):
        prompt = " ".join([row["text"]] * (1 + i % 3))  # different lengths, so padding is needed
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["label"]}]
        examples.append(chat.encode(tokenizer, messages, max_length=64))
    return examples


def test_packing_has_no_cross_example_attention_and_the_same_loss(tiny_llama_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa").eval()
    examples = _examples(tokenizer, 4)
    recipe = validate_recipe(sft_recipe(tiny_llama_dir, {"train": "x.jsonl"}, "run"))
    packed = causal_lm.collator(tokenizer, recipe)(examples)
    padded_recipe = recipe.model_copy(update={"task": recipe.task.model_copy(update={"packing": False})})
    padded = causal_lm.collator(tokenizer, padded_recipe)(examples)

    lengths = [len(e["input_ids"]) for e in examples]
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert padded["input_ids"].shape == (4, max(lengths))

    with torch.no_grad():
        packed_out = model(**packed)
        padded_out = model(**padded)
        offset = 0
        for example, n in zip(examples, lengths):
            alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
            # Each example's logits inside the pack equal its logits alone: nothing leaks across the boundary.
            torch.testing.assert_close(packed_out.logits[0, offset : offset + n], alone, atol=1e-4, rtol=1e-4)
            offset += n
    # Labels at each example's first position are -100, so no token is predicted across a boundary.
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    assert all(packed["labels"][0, s].item() == -100 for s in starts)
    assert abs(packed_out.loss.item() - padded_out.loss.item()) < 1e-4


def test_leakage_check_can_fail_without_position_ids(tiny_llama_dir, tokenizer):
    """Control for the test above: concatenating without restarting positions changes the second example."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa").eval()
    first, second = _examples(tokenizer, 2)
    with torch.no_grad():
        joined = model(input_ids=torch.tensor([first["input_ids"] + second["input_ids"]])).logits[0]
        alone = model(input_ids=torch.tensor([second["input_ids"]])).logits[0]
    assert not torch.allclose(joined[len(first["input_ids"]) :], alone, atol=1e-3)


@pytest.mark.slow
def test_sft_trains_and_scores_generated_labels(tiny_llama_dir, sft_files, tmp_path):
    recipe = sft_recipe(
        tiny_llama_dir, {**sft_files, "test": sft_files["validation"]}, tmp_path / "run",
        task={"response_metric": "classification"}, generation={"max_new_tokens": 3},
    )
    result = run_cli("train", str(write_recipe(tmp_path / "sft.yaml", recipe)))
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 6
    assert metrics["best_metric_name"] == "loss"
    for split in ("validation", "test"):
        assert metrics[split]["examples"] == 12
        assert 0.0 <= metrics[split]["accuracy"] <= 1.0 and "f1_macro" in metrics[split]
        assert metrics[split]["perplexity"] == pytest.approx(2.718281828 ** metrics[split]["loss"], rel=1e-6)
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 24
    assert {"prompt", "gold", "generated", "predicted", "loss"} <= set(records[0])
    accuracy = sum(r["predicted"] == r["gold"] for r in records if r["split"] == "test") / 12
    assert metrics["test"]["accuracy"] == pytest.approx(accuracy)
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert "Confusion matrix" in (run_dir / "report.md").read_text() or "confusion" in (run_dir / "report.md").read_text()


@pytest.mark.slow
def test_sft_learns_the_responses(tiny_llama_dir, sft_files, tmp_path):
    """A few dozen steps of padding-free SFT cut the held-out response loss well below the untrained model's."""
    from peftkit.training.run import train

    recipe = validate_recipe(sft_recipe(
        tiny_llama_dir, sft_files, tmp_path / "run",
        task={"response_metric": "bleu"}, generation={"max_new_tokens": 2},
        adapter={"method": "none"},  # a random tiny model learns fastest with every weight free
        training={"max_steps": 20, "eval_steps": 10, "save_steps": 10, "learning_rate": 3e-3},
        evaluation={"splits": ["validation"], "worst_examples": 3},
    ))
    run_dir = train(recipe)
    history = json.loads((run_dir / "log_history.json").read_text())
    evals = [e["eval_loss"] for e in history if "eval_loss" in e]
    metrics = json.loads((run_dir / "metrics.json").read_text())["validation"]
    assert evals[-1] < evals[0]
    # Untrained, the response tokens cost about ln(55 words) = 4.0 nats; 20 steps at least halve that.
    assert metrics["loss"] < 0.5 * history[0]["loss"]
    assert {"bleu", "chrf"} <= set(metrics)
    report = (run_dir / "report.md").read_text()
    assert "| loss | perplexity | bleu | chrf | examples |" in report and "Highest-loss responses" in report


def test_missing_template_column_names_the_column(tiny_llama_dir, sft_files, tmp_path):
    from peftkit.training.run import train

    recipe = validate_recipe(sft_recipe(tiny_llama_dir, sft_files, tmp_path / "run", task={"prompt": "{question}"}))
    with pytest.raises(UserError, match="no column 'question'.*task.prompt"):
        train(recipe)
    assert not (tmp_path / "run").exists()


def test_empty_responses_are_counted_and_all_empty_is_an_error(tiny_llama_dir, tokenizer, tmp_path, caplog):
    rows = sentiment_rows(10, seed=3)
    for row in rows[:3]:
        row["label"] = "  "
    files = {"train": write_jsonl(tmp_path / "train.jsonl", rows)}
    recipe = validate_recipe(sft_recipe(tiny_llama_dir, files, tmp_path / "run"))
    from peftkit.data.sources import load_splits

    with caplog.at_level(logging.WARNING, logger="peftkit"):
        tokenized, _ = causal_lm.prepare(recipe, load_splits(recipe.data), tokenizer)
    assert len(tokenized["train"]) == 7
    assert "skipped 3 of 10 rows with an empty response" in caplog.text

    for row in rows:
        row["label"] = ""
    write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(UserError, match="data.train: no row .* has a non-empty response"):
        causal_lm.prepare(recipe, load_splits(recipe.data), tokenizer)


def test_tokenizer_without_chat_template_needs_a_named_one(tiny_llama_dir, tokenizer, tmp_path):
    recipe = validate_recipe(sft_recipe(tiny_llama_dir, {"train": tmp_path / "t.jsonl"}, tmp_path / "r",
                                        task={"chat_template": "auto"}))
    with pytest.raises(UserError, match="task.chat_template: .* has no chat template"):
        chat.use_chat_template(tokenizer, recipe.task, recipe.model.name)


def test_labels_option_belongs_to_classification(tiny_llama_dir):
    with pytest.raises(UserError, match="task.labels is only used with task.response_metric: classification"):
        validate_recipe(sft_recipe(tiny_llama_dir, {"train": "t.jsonl"}, "r", task={"labels": ["a", "b"]}))


def test_integer_responses_index_into_label_names(tiny_llama_dir):
    recipe = validate_recipe(sft_recipe(tiny_llama_dir, {"train": "t.jsonl"}, "r",
                                        task={"response_metric": "classification", "labels": ["negative", "positive"]}))
    messages = chat.conversation({"text": "good", "label": 1}, recipe.task, ["negative", "positive"])
    assert messages[-1] == {"role": "assistant", "content": "positive"}


def test_nested_template_fields_read_self_instruct_rows(tiny_llama_dir):
    recipe = validate_recipe(sft_recipe(tiny_llama_dir, {"train": "t.jsonl"}, "r", task={
        "prompt": "{instruction}\n\n{instances[0][input]}", "response": "{instances[0][output]}"}))
    row = {"instruction": "Say hi.", "instances": [{"input": "", "output": "hi"}]}
    assert chat.template_columns(recipe.task.prompt) == ["instruction", "instances"]
    assert chat.conversation(row, recipe.task)[-2:] == [
        {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]


def test_generated_label_matching():
    names = ["negative", "positive"]
    assert causal_lm.match_label(" Positive", names) == "positive"
    assert causal_lm.match_label("negative, clearly", names) == "negative"
    assert causal_lm.match_label("unsure", names) == "unsure"


def test_generative_scores_on_known_outputs():
    def record(gold, generated):
        return {"gold": gold, "generated": generated, "loss": 0.5, "tokens": 2}

    qa = causal_lm.score([record("cat", "The cat"), record("dog", "a dog sat")], {"response_metric": "qa"})
    assert qa["exact_match"] == 50.0 and qa["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert qa["loss"] == pytest.approx(0.5) and qa["perplexity"] == pytest.approx(1.6487, abs=1e-4)
    bleu = causal_lm.score([record("a small white dog runs .", "a small white dog runs .")], {"response_metric": "bleu"})
    assert bleu["bleu"] == pytest.approx(100) and bleu["chrf"] == pytest.approx(100)
    rouge = causal_lm.score([record("the cat sat on the mat", "the cat sat on the mat"), record("the cat sat", "dogs bark")],
                            {"response_metric": "rouge"})
    assert rouge["rouge1"] == pytest.approx(50) and rouge["rougeL"] == pytest.approx(50)


def test_predict_on_prompt_only_rows_writes_generations_without_scores(tiny_llama_dir, sft_files, tmp_path):
    """`peftkit predict` on rows without the response column: the run's own generations, no gold or loss."""
    from peftkit.cli import main
    from peftkit.training.run import train

    recipe = validate_recipe(sft_recipe(
        tiny_llama_dir, {"train": sft_files["train"], "test": sft_files["validation"]}, tmp_path / "run",
        task={"response_metric": "classification"}, generation={"max_new_tokens": 3}, training={"max_steps": 4},
    ))
    run_dir = train(recipe)
    trained = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in sft_files["validation"].read_text().splitlines()]
    inputs = write_jsonl(tmp_path / "prompts.jsonl", [{"text": row["text"]} for row in rows])
    output = tmp_path / "out.jsonl"
    assert main(["predict", str(run_dir), "--input", str(inputs), "--output", str(output)]) == 0
    predicted = [json.loads(line) for line in output.read_text().splitlines()]
    assert [p["prompt"] for p in predicted] == [row["text"] for row in rows]
    assert [p["generated"] for p in predicted] == [t["generated"] for t in trained]
    assert len({p["generated"] for p in predicted}) > 1  # real generations, not one empty string
    assert [p["predicted"] for p in predicted] == [t["predicted"] for t in trained]
    assert not any({"gold", "loss", "tokens", "gold_probability"} & set(p) for p in predicted)
    # Mixed input: rows with an empty response are generated for and left out of the scores.
    for row in rows[:4]:
        row["label"] = ""
    mixed = causal_lm.predict(load_run(run_dir).predictor, None, rows, recipe, {"response_metric": "qa"})
    assert [("gold" in r) for r in mixed] == [False] * 4 + [True] * 8
    assert causal_lm.score(mixed, {"response_metric": "qa"})["examples"] == 8
