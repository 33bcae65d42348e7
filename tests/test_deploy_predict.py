"""`peftkit predict --base --adapter NAME=PATH ... --adapter-column`: a mixed-adapter file, one answer per row."""

from __future__ import annotations

import json

from tests.conftest import run_cli, run_cli_in_process, write_jsonl
from peftkit.deploy.attach import AttachedModel


def test_cli_predict_with_an_adapter_column(bert_runs, tiny_bert_dir, tmp_path):
    rows = [
        {"text": "the movie was great", "which": "quality"},
        {"text": "awful service", "which": "sentiment"},
        {"text": "a lovely place", "which": "quality"},
    ]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    result = run_cli(
        "predict", "--base", str(tiny_bert_dir), "--adapter", f"sentiment={bert_runs['sentiment']}",
        "--adapter", f"quality={bert_runs['quality']}", "--input", str(source), "--output", str(tmp_path / "out.jsonl"),
        "--adapter-column", "which", "--batch-size", "2",
    )
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    attached = AttachedModel(str(tiny_bert_dir), {name: str(path) for name, path in bert_runs.items()})
    for row, answer in zip(rows, answers):
        assert answer["adapter"] == row["which"] and answer["text"] == row["text"]
        assert answer["label"] == attached.predict([{"text": row["text"]}], row["which"])[0]["label"]

    single = run_cli_in_process("predict", str(bert_runs["sentiment"]), "--input", str(source), "--output", str(tmp_path / "one.jsonl"))
    assert single.returncode == 0, single.stderr  # one run alone: the run's own task, base and adapter
    assert {json.loads(line)["predicted"] for line in (tmp_path / "one.jsonl").read_text().splitlines()} <= {"positive", "negative"}

    bad = run_cli_in_process("predict", "--base", str(tiny_bert_dir), "--adapter", "nopath", "--input", str(source), "--output", str(tmp_path / "x"))
    assert bad.returncode == 2 and "expected NAME=PATH" in bad.stderr
    unknown = run_cli_in_process(
        "predict", "--base", str(tiny_bert_dir), "--adapter", f"sentiment={bert_runs['sentiment']}", "--input", str(source),
        "--output", str(tmp_path / "x"), "--adapter-column", "which",
    )
    assert unknown.returncode == 2 and "unknown adapter 'quality'" in unknown.stderr


def test_predict_qa_spans_with_two_adapters(qa_adapters, tiny_bert_dir, tmp_path):
    from peftkit.cli import main

    records = [json.loads(line) for line in (qa_adapters["first"] / "predictions.jsonl").read_text().splitlines()][:4]
    rows = [{"question": r["question"], "context": r["context"], "which": w} for r, w in zip(records, ["first", "second"] * 2)]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    code = main([
        "predict", "--base", str(tiny_bert_dir), "--adapter", f"first={qa_adapters['first']}",
        "--adapter", f"second={qa_adapters['second']}", "--input", str(source), "--output", str(tmp_path / "out.jsonl"),
        "--adapter-column", "which",
    ])
    assert code == 0
    answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    attached = AttachedModel(str(tiny_bert_dir), {name: str(path) for name, path in qa_adapters.items()})
    for row, answer in zip(rows, answers):
        expected = attached.predict([{"question": row["question"], "context": row["context"]}], row["which"])[0]
        assert answer["adapter"] == row["which"] and answer["answer"] == expected["answer"]
        assert row["context"][answer["start"]:answer["end"]] == answer["answer"]
    assert answers[0]["answer"] == records[0]["predicted"]  # the run's own adapter gives the run's own span


def test_cli_predict_mixes_a_dora_adapter_column(llama_adapters, dora_adapter, tiny_llama_dir, tmp_path):
    """DoRA rows cannot share peft's mixed batch; they run apart and every row equals the row run alone."""
    names = ["dora", "poet", "dora", "critic", "__base__"]
    rows = [{"prompt": f"the movie was {word}", "which": name} for word, name in zip(["good", "bad", "so", "fine", "it"], names)]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    adapters = {**llama_adapters, "dora": dora_adapter}
    result = run_cli_in_process(
        "predict", "--base", str(tiny_llama_dir), *[f"--adapter={name}={path}" for name, path in adapters.items()],
        "--input", str(source), "--output", str(tmp_path / "out.jsonl"), "--adapter-column", "which", "--max-new-tokens", "4",
    )
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    attached = AttachedModel(str(tiny_llama_dir), {name: str(path) for name, path in adapters.items()})
    for row, answer in zip(rows, answers):
        alone = attached.predict([{"prompt": row["prompt"]}], row["which"], max_new_tokens=4)[0]
        assert answer["adapter"] == row["which"] and answer["text"] == alone["text"]
