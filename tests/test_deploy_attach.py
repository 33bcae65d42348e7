"""Multi-adapter inference on one base: records, base checks, switching, hot-swap, mixed batches."""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from peftkit.deploy.attach import BASE_ADAPTER, AttachedModel, InputTooLong, UnknownAdapter
from peftkit.errors import UserError

TEXTS = ["the movie was great", "awful service and sad food", "a lovely place", "boring it was", "really fine"]


def test_training_writes_adapter_record(bert_runs, tiny_bert_dir):
    record = json.loads((bert_runs["quality"] / "adapter" / "peftkit_adapter.json").read_text())
    assert record["base"]["name"] == str(tiny_bert_dir)
    assert record["base"]["architecture"]["hidden_size"] == 32
    assert len(record["base"]["fingerprint"]) == 16
    assert record["task"] == {"type": "classification", "labels": ["bad", "good"]}


def test_attached_matches_plain_peft_and_decodes_each_adapters_labels(bert_runs, tiny_bert_dir):
    attached = AttachedModel(str(tiny_bert_dir), {name: str(path) for name, path in bert_runs.items()})
    rows = [{"text": text} for text in TEXTS]
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    for name, run in bert_runs.items():
        labels = json.loads((run / "task.json").read_text())["labels"]
        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
        plain = PeftModel.from_pretrained(base, run / "adapter").eval()
        with torch.no_grad():
            expected = plain(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
        got = torch.stack(attached.logits(rows, name))
        assert torch.allclose(got, expected, atol=1e-6)
        answers = attached.predict(rows, name)
        assert [a["label"] for a in answers] == [labels[i] for i in expected.argmax(-1).tolist()]
        assert set(answers[0]["scores"]) == set(labels)


def test_mixed_batch_equals_each_row_alone(bert_runs, tiny_bert_dir):
    attached = AttachedModel(str(tiny_bert_dir), {name: str(path) for name, path in bert_runs.items()})
    rows = [{"text": text} for text in TEXTS]
    names = ["sentiment", "quality", BASE_ADAPTER, "quality", "sentiment"]
    mixed = attached.logits(rows, names)
    for row, name, got in zip(rows, names, mixed):
        alone = attached.logits([row], name)[0]
        assert torch.allclose(got, alone, atol=1e-5)
    assert not torch.allclose(mixed[0], attached.logits(rows[:1], "quality")[0])  # the adapters really differ
    labels = [answer["label"] for answer in attached.predict(rows, names)]
    assert labels[1] in {"good", "bad"} and labels[0] in {"positive", "negative"}


def test_switch_hot_swap_and_unload(bert_runs, tiny_bert_dir):
    attached = AttachedModel(str(tiny_bert_dir), {"first": str(bert_runs["sentiment"])})
    rows = [{"text": text} for text in TEXTS]
    sentiment = torch.stack(attached.logits(rows))
    attached.load("second", str(bert_runs["quality"]))
    assert attached.active == "first"
    attached.activate("second")
    quality = torch.stack(attached.logits(rows))
    assert not torch.allclose(sentiment, quality)
    attached.load("first", str(bert_runs["quality"]))  # hot-swap: same name, other weights
    assert torch.allclose(torch.stack(attached.logits(rows, "first")), quality, atol=1e-6)
    attached.unload("second")
    assert attached.active == "first" and set(attached.adapters) == {"first"}
    with pytest.raises(UnknownAdapter, match="unknown adapter 'second'"):
        attached.predict(rows, "second")
    with pytest.raises(UserError, match="last one"):
        attached.unload("first")


def test_hot_swap_failure_keeps_the_old_adapter(bert_runs, tiny_bert_dir, tmp_path):
    attached = AttachedModel(str(tiny_bert_dir), {"first": str(bert_runs["sentiment"])})
    rows = [{"text": text} for text in TEXTS]
    before = torch.stack(attached.logits(rows))
    broken = tmp_path / "broken"
    shutil.copytree(bert_runs["quality"] / "adapter", broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    config["r"] = 2  # the saved weights have rank 4: loading must fail
    (broken / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not fit"):
        attached.load("first", str(broken))
    assert torch.allclose(torch.stack(attached.logits(rows)), before)


def test_incompatible_base_fails_naming_both(bert_runs, tiny_llama_dir, tiny_bert_dir):
    with pytest.raises(UserError) as error:
        AttachedModel(str(tiny_llama_dir), {"first": str(bert_runs["sentiment"])})
    assert str(tiny_bert_dir) in str(error.value) and str(tiny_llama_dir) in str(error.value)
    assert "model_type: bert vs llama" in str(error.value)


def test_compatible_base_with_another_name_warns(bert_runs, tiny_bert_dir, tmp_path, caplog):
    """On peftkit's logger, i.e. the console: `predict` and `serve` have no run folder, whose log file took (and,
    lacking one, dropped) the Python warning this was."""
    copy = tmp_path / "bert-copy"
    shutil.copytree(tiny_bert_dir, copy)
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        AttachedModel(str(copy), {"first": str(bert_runs["sentiment"])})
    assert "same architecture fingerprint" in caplog.text


def test_bad_inputs_are_user_errors(bert_runs, tiny_bert_dir, tmp_path):
    attached = AttachedModel(str(tiny_bert_dir), {"first": str(bert_runs["sentiment"])})
    with pytest.raises(UserError, match="must be strings"):
        attached.check_rows([{"prompt": "x"}])
    with pytest.raises(InputTooLong, match="exceed the model's context of 128"):
        attached.check_rows([{"text": "good " * 200}])
    with pytest.raises(UserError, match="no adapter_config.json"):
        attached.load("c", str(tmp_path))


def test_causal_generation_mixed_batch_equals_each_row_alone(llama_adapters, tiny_llama_dir):
    attached = AttachedModel(str(tiny_llama_dir), {name: str(path) for name, path in llama_adapters.items()})
    assert attached.task_type == "causal_lm"
    rows = [{"prompt": "the movie was"}, {"prompt": "a lovely place and"}, {"prompt": "it was"}]
    names = ["poet", "critic", BASE_ADAPTER]
    mixed = attached.predict(rows, names, max_new_tokens=[6, 4, 5])
    alone = [attached.predict([row], name, max_new_tokens=n)[0] for row, name, n in zip(rows, names, [6, 4, 5])]
    assert mixed == alone
    for answer, limit in zip(mixed, [6, 4, 5]):
        assert answer["tokens"] == limit if answer["finish_reason"] == "length" else answer["tokens"] < limit
    # the adapters change the generated text, and attached outputs equal plain peft's
    assert len({attached.predict(rows[:1], name, max_new_tokens=6)[0]["text"] for name in names}) > 1
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), llama_adapters["critic"]).eval()
    with torch.no_grad():
        expected = plain(**tokenizer(["it was"], return_tensors="pt")).logits[0]
    assert torch.allclose(attached.logits([rows[2]], "critic")[0], expected, atol=1e-5)
    logits_mixed = attached.logits(rows, names)
    for row, name, got in zip(rows, names, logits_mixed):
        assert torch.allclose(got, attached.logits([row], name)[0], atol=1e-5)


def test_qa_spans_equal_the_runs_predictions_and_mixed_batches_equal_rows_alone(qa_adapters, tiny_bert_dir):
    run = qa_adapters["first"]
    attached = AttachedModel(str(tiny_bert_dir), {name: str(path) for name, path in qa_adapters.items()})
    expected = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    rows = [{"question": record["question"], "context": record["context"]} for record in expected]
    assert max(len(row["context"].split()) for row in rows) > 32  # some contexts need several 32-token windows
    answers = attached.predict(rows, "first")
    assert [answer["answer"] for answer in answers] == [record["predicted"] for record in expected]
    for row, answer in zip(rows, answers):
        assert row["context"][answer["start"]:answer["end"]] == answer["answer"] != ""
    names = ["first", "second", BASE_ADAPTER, "second", "first", "second"]
    mixed = attached.predict(rows[:6], names)
    for row, name, got in zip(rows, names, mixed):
        alone = attached.predict([row], name)[0]
        assert (got["answer"], got["start"], got["end"]) == (alone["answer"], alone["start"], alone["end"])
        assert got["score"] == pytest.approx(alone["score"], abs=1e-4)
    assert [a["answer"] for a in attached.predict(rows, "second")] != [a["answer"] for a in answers]  # adapters differ
    attached.check_rows([{"question": "which number", "context": "good " * 300}])  # long contexts are windowed


def test_qlora_adapter_attaches_to_a_base_quantized_as_in_training(tiny_bert_dir, tmp_path, caplog):
    from bitsandbytes.nn import Linear4bit

    from tests.conftest import train_tiny_run

    run = train_tiny_run(tiny_bert_dir, tmp_path / "qlora", quantization={"bits": 4})
    expected = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    rows = [{"text": record["text"]} for record in expected]
    attached = AttachedModel(str(tiny_bert_dir), {"qlora": str(run)})
    assert attached.quantization.bits == 4 and any(isinstance(m, Linear4bit) for m in attached.model.modules())
    answers = attached.predict(rows)
    assert [a["label"] for a in answers] == [r["predicted"] for r in expected]
    assert max(abs(a["probability"] - r["probability"]) for a, r in zip(answers, expected)) < 1e-5
    full = AttachedModel(str(tiny_bert_dir), {"qlora": str(run)}, full_precision_base=True)
    assert full.quantization.bits is None and not any(isinstance(m, Linear4bit) for m in full.model.modules())
    assert max(abs(a["probability"] - b["probability"]) for a, b in zip(full.predict(rows), answers)) > 1e-4
    plain = train_tiny_run(tiny_bert_dir, tmp_path / "plain")
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        attached.load("plain", str(plain))
    assert re.search("trained on a base quantized as full precision.*loaded as 4-bit", caplog.text)


def test_dora_rows_run_apart_and_a_failed_forward_leaves_no_state(llama_adapters, dora_adapter, tiny_llama_dir):
    """peft cannot put a DoRA adapter in a mixed batch and leaves its per-row hooks behind when a forward raises."""
    adapters = {**{name: str(path) for name, path in llama_adapters.items()}, "dora": str(dora_adapter)}
    attached = AttachedModel(str(tiny_llama_dir), adapters)
    rows = [{"prompt": "the movie was"}, {"prompt": "a lovely place and"}, {"prompt": "it was"}, {"prompt": "so"}]
    names = ["poet", "dora", "critic", BASE_ADAPTER]
    alone = [attached.predict([row], name, max_new_tokens=5)[0] for row, name in zip(rows, names)]
    assert attached.predict(rows, names, max_new_tokens=5) == alone
    assert alone[1]["text"] != attached.predict(rows[1:2], "poet", max_new_tokens=5)[0]["text"]  # DoRA really served
    logits = [attached.logits([row], name)[0] for row, name in zip(rows, names)]

    layer = attached.model.base_model.model.model.layers[0]
    handle = layer.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        attached.predict(rows, names, max_new_tokens=5)  # fails inside a mixed forward, with peft's hooks in place
    handle.remove()
    leftover = [name for name, module in attached.model.named_modules() if module._forward_pre_hooks]
    assert leftover == []
    assert attached.active == "poet"
    for row, name, expected, expected_logits in zip(rows, names, alone, logits):  # every adapter still answers as before
        assert attached.predict([row], name, max_new_tokens=5)[0] == expected
        assert torch.allclose(attached.logits([row], name)[0], expected_logits, atol=1e-5)
    attached.unload("dora")
    assert attached.predict(rows[:1], "poet", max_new_tokens=5)[0] == alone[0]


def test_failed_loads_leave_nothing_behind(bert_runs, tiny_bert_dir, tmp_path):
    attached = AttachedModel(str(tiny_bert_dir), {"first": str(bert_runs["sentiment"])})
    broken = tmp_path / "broken"
    shutil.copytree(bert_runs["quality"] / "adapter", broken)
    (broken / "adapter_model.safetensors").unlink()
    (broken / "adapter_model.bin").write_bytes(b"not a pickle")
    parameters = sum(p.numel() for p in attached.model.parameters())
    modules = len(list(attached.model.modules()))
    for i in range(5):
        with pytest.raises(UserError, match="could not be loaded") as error:
            attached.load(f"broken{i}", str(broken))
        assert str(tmp_path) not in str(error.value).replace(str(broken), "")  # names what was given, nothing more
    assert list(attached.model.peft_config) == ["adapter_1"] and sorted(attached.adapters) == ["first"]
    assert sum(p.numel() for p in attached.model.parameters()) == parameters
    assert len(list(attached.model.modules())) == modules
    with pytest.raises(UserError, match="could not be loaded"):
        attached.load("first", str(broken))  # a failed hot-swap keeps the old adapter serving
    assert attached.predict([{"text": "great"}])[0]["label"] in {"positive", "negative"}


@pytest.mark.parametrize("record, problem", [
    ("{not json", "not readable JSON"),
    ('{"base": null}', "task.type"),
    ('{"task": {"type": "astrology"}}', "task.type"),
    ('[1, 2]', "task.type"),
    ('{"task": {"type": "classification"}, "base": "x"}', "`base` must hold"),
    ('{"task": {"type": "classification"}, "base": null, "quantization": {"bits": 3}}', "bits"),
])
def test_malformed_adapter_records_are_user_errors(bert_runs, tiny_bert_dir, tmp_path, record, problem):
    from peftkit.deploy.adapter_folder import find_adapter

    folder = tmp_path / "adapter"
    shutil.copytree(bert_runs["quality"] / "adapter", folder)
    (folder / "peftkit_adapter.json").write_text(record)
    with pytest.raises(UserError, match="peftkit_adapter.json is malformed") as error:
        find_adapter("x", str(folder))
    assert problem in str(error.value)


def test_plain_peft_classifier_reads_labels_from_id2label(tiny_bert_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"])).save_pretrained(tmp_path / "plain")
    attached = AttachedModel(str(tiny_bert_dir), {"plain": str(tmp_path / "plain")})
    answer = attached.predict([{"text": "great"}])[0]
    assert set(answer["scores"]) == {"LABEL_0", "LABEL_1"} and answer["label"] in answer["scores"]


@pytest.mark.parametrize("name", ["a\nb", "", "../x", "a b", "x" * 65, BASE_ADAPTER, "-x"])
def test_adapter_names_are_validated(bert_runs, tiny_bert_dir, name):
    attached = AttachedModel(str(tiny_bert_dir), {"first": str(bert_runs["sentiment"])})
    with pytest.raises(UserError, match="is not allowed"):
        attached.load(name, str(bert_runs["quality"]))
