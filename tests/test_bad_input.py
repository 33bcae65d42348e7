"""Classes of bad input that used to pass validation and fail later (after the model loaded, with a traceback, or
silently): each now exits 2 with one message naming the key, file or option, and leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import classification_recipe, qa_rows, run_cli_in_process, write_jsonl, write_recipe


def _train_cases(tmp_path: Path, files: dict, model_dir: Path) -> dict:
    """name -> (recipe dict or raw YAML text, extra CLI args, expected text in the message)."""

    def recipe(**sections):
        return classification_recipe(model_dir, files, tmp_path / "run", **sections)

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    data_dir = tmp_path / "data-folder"
    data_dir.mkdir()
    write_jsonl(data_dir / "part1.jsonl", [{"text": "good", "label": "positive"}])
    remote = tmp_path / "remote-code-model"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps(
        {"model_type": "my_custom_arch", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}))
    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("my files")
    qa_file = write_jsonl(tmp_path / "qa.jsonl", qa_rows(8, seed=1))
    longformer = _tiny_longformer(tmp_path / "longformer")
    plain = yaml.safe_dump(recipe())
    return {
        "output.dir is a file": (recipe(output={"dir": str(a_file)}), (), f"output.dir: `{a_file}` is a file"),
        "infinite epochs": (recipe(training={"epochs": float("inf")}), (), "training.epochs: Input should be a finite"),
        "NaN learning rate": (recipe(training={"learning_rate": float("nan")}), (), "training.learning_rate"),
        "negative seed": (recipe(training={"seed": -1}), (), "training.seed: Input should be greater than or equal to 0"),
        "seed numpy cannot take": (recipe(training={"seed": 2**40}), (), "training.seed: Input should be less than"),
        "LoRA rank beyond the layers": (recipe(adapter={"r": 100000}), (), "adapter.r=100000 exceeds the hidden size 32"),
        "duplicate nested key": (plain.replace("  r: 8\n", "  r: 8\n  r: 16\n"), (), "found the key `r` twice"),
        "duplicate section": (plain + "adapter:\n  r: 4\n", (), "found the key `adapter` twice"),
        "duplicate key in an override": (recipe(), ("adapter={r: 2, r: 4}",), "is not a valid YAML value"),
        "data folder": (recipe(data={"train": {"path": str(data_dir)}}), (), "is a folder; name one data file (it holds part1.jsonl)"),
        "remote code": (recipe(model={"name": str(remote)}), (), "model.trust_remote_code: true"),
        "model folder that does not exist": (recipe(model={"name": str(tmp_path / "no-such-model")}), (),
                                             f"model.name: there is no folder `{tmp_path / 'no-such-model'}`"),
        "prompt tuning + extractive QA": (
            classification_recipe(model_dir, {"train": qa_file}, tmp_path / "run", task={"type": "extractive_qa"},
                                  adapter={"method": "prompt_tuning"}, training={"eval_strategy": "no"},
                                  evaluation={"splits": []}),
            (), "answer positions are not",
        ),
        # Unknown to every check before training: Longformer's classifier builds its global-attention mask from
        # input_ids, which prompt tuning replaces by embeddings (a TypeError traceback after loading, before).
        "a method the model's code cannot run": (
            recipe(model={"name": str(longformer)}, adapter={"method": "prompt_tuning"}), (),
            "adapter.method prompt_tuning cannot train `" + str(longformer) + "` (longformer) for task.type "
            "classification: its first training step failed in transformers/models/longformer/modeling_longformer.py",
        ),
        "--resume on a folder that is not a run": (
            recipe(output={"dir": str(not_a_run)}), ("--resume",), "is not a peftkit run folder"),
        "output.overwrite on a folder that is not a run": (  # deleted the whole folder, then trained into it
            recipe(output={"dir": str(not_a_run), "overwrite": True}), (),
            f"output.dir: `{not_a_run}` holds files but is not a peftkit run folder (no recipe.yaml)"),
    }


def _tiny_longformer(directory: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM

    from tests.conftest import _word_level_tokenizer

    tokenizer = _word_level_tokenizer(directory)
    config = AutoConfig.for_model("longformer", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=130,
                                  attention_window=[8], pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForMaskedLM.from_config(config).save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_bad_recipes_exit_2_without_traceback_or_run_folder(tmp_path, sentiment_files, tiny_bert_dir):
    cases = _train_cases(tmp_path, sentiment_files, tiny_bert_dir)
    for case, (content, extra, expected) in cases.items():
        path = tmp_path / "bad.yaml"
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        result = run_cli_in_process("train", str(path), *extra)
        assert result.returncode == 2, (case, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (case, result.stderr[-2000:])
        assert expected in result.stderr, (case, result.stderr[-2000:])
        assert any(line.startswith("peftkit: error: ") for line in result.stderr.splitlines()), case  # not after a bar
        assert not (tmp_path / "run").exists(), case
    # -v prints what such a refusal summarizes, for a bug report
    path.write_text(yaml.safe_dump(cases["a method the model's code cannot run"][0]))
    verbose = run_cli_in_process("train", str(path), "-v")
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr and "zeros_like" in verbose.stderr
    assert (tmp_path / "not-a-run" / "notes.txt").read_text() == "my files"  # nothing trained into it
    assert sorted(p.name for p in (tmp_path / "not-a-run").iterdir()) == ["notes.txt"]


def test_sweep_space_with_broken_or_duplicate_yaml(tmp_path, sentiment_files, tiny_bert_dir):
    recipe_path = write_recipe(tmp_path / "r.yaml", classification_recipe(tiny_bert_dir, sentiment_files, tmp_path / "run"))
    for text, expected in [
        ("params: [", "is not valid YAML"),
        ("params:\n  training.learning_rate: {low: 1e-4, high: 1e-2}\nparams: {}\n", "found the key `params` twice"),
        ("- just\n- a list\n", "must hold a mapping"),
    ]:
        space = tmp_path / "space.yaml"
        space.write_text(text)
        result = run_cli_in_process("sweep", str(recipe_path), "--space", str(space), "--trials", "1")
        assert result.returncode == 2 and expected in result.stderr and str(space) in result.stderr, result.stderr
    assert run_cli_in_process("sweep", str(recipe_path), "--space", str(tmp_path), "--trials", "1").returncode == 2


def test_counts_below_one_are_refused_by_the_parser(capsys):
    from peftkit.cli import build_parser

    for args in (["plan", "r.yaml", "--gpus", "0"], ["sweep", "r.yaml", "--space", "s.yaml", "--trials", "-1"],
                 ["predict", "run", "--input", "x.jsonl", "--output", "y.jsonl", "--batch-size", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(args)
        assert exit_info.value.code == 2
        assert "must be at least 1" in capsys.readouterr().err


@pytest.fixture
def finished_copy(trained_run, tmp_path) -> Path:
    run_dir = tmp_path / "copy"
    shutil.copytree(trained_run[0], run_dir)
    return run_dir


def _fails_cleanly(result, *expected: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr[-2000:]


def test_run_folder_without_adapter_weights(finished_copy):
    for weights in (finished_copy / "adapter").glob("*.safetensors"):
        weights.unlink()
    _fails_cleanly(run_cli_in_process("eval", str(finished_copy)), "has no usable trained weights", "no *.safetensors")


def test_run_folder_with_truncated_adapter_weights(finished_copy, tmp_path):
    """A weights file cut short (a full disk, an interrupted copy) failed with safetensors' traceback in every command."""
    (weights,) = (finished_copy / "adapter").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"text": "good"}])
    commands = {
        "eval": ["eval", str(finished_copy)],
        "predict RUN": ["predict", str(finished_copy), "--input", str(rows), "--output", str(tmp_path / "a.jsonl")],
        "predict --adapter": ["predict", "--adapter", f"a={finished_copy}", "--input", str(rows), "--output", str(tmp_path / "b.jsonl")],
        "merge": ["merge", str(finished_copy), "--out", str(tmp_path / "merged")],
    }
    for command in commands.values():
        _fails_cleanly(run_cli_in_process(*command), str(weights), "(truncated?)")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "a.jsonl").exists() and not (tmp_path / "b.jsonl").exists()


@pytest.mark.parametrize("content, expected", [
    ("model: [", "is not valid YAML"),
    ("model:\n  name: x\nmodel:\n  name: y\n", "found the key `model` twice"),
    ("just text", "must hold a mapping"),
    ("training: {epochs: -1}\n", "training.epochs"),
])
def test_run_folder_with_a_corrupt_recipe(finished_copy, content, expected):
    (finished_copy / "recipe.yaml").write_text(content)
    for command in (["eval", str(finished_copy)], ["merge", str(finished_copy), "--out", str(finished_copy / "m")]):
        _fails_cleanly(run_cli_in_process(*command), expected, "recipe.yaml")


def test_eval_file_without_the_label_column(finished_copy, tmp_path):
    unlabelled = write_jsonl(tmp_path / "unlabelled.jsonl", [{"text": "good movie"}, {"text": "awful food"}])
    _fails_cleanly(
        run_cli_in_process("eval", str(finished_copy), "--data", str(unlabelled)), "has no column `label`", "peftkit predict")
    assert not (finished_copy / "evaluations").exists()


def test_predict_output_that_is_a_folder_leaves_nothing(finished_copy, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"text": "good movie"}])
    out = tmp_path / "out"
    out.mkdir()
    _fails_cleanly(run_cli_in_process("predict", str(finished_copy), "--input", str(rows), "--output", str(out)), "is a folder")
    assert list(out.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["copy", "out", "rows.jsonl"]


def test_replacing_a_folder_never_deletes_what_the_command_reads(finished_copy, tmp_path, tiny_bert_dir):
    """`--overwrite` / `output.overwrite` delete the folder they replace: `merge RUN --out RUN --overwrite` deleted the
    run it had just merged (adapter and checkpoints), `output.overwrite` deleted a data file kept in the run folder, and
    `predict --output` equal to `--input` replaced the input file."""
    before = sorted(str(p.relative_to(finished_copy)) for p in finished_copy.rglob("*"))
    (tmp_path / "config.json").write_text("{}")  # so that --out tmp_path passes for a model folder and reaches the check
    for out, expected in [
        (finished_copy, "holds files but no config.json"),
        (finished_copy / "adapter", "holds files but no config.json"),
        (tmp_path, f"--out: `{tmp_path}` holds the run folder `{finished_copy}`"),
    ]:
        _fails_cleanly(run_cli_in_process("merge", str(finished_copy), "--out", str(out), "--overwrite"), expected)
    _fails_cleanly(run_cli_in_process("merge", str(finished_copy), "--out", str(tiny_bert_dir), "--overwrite"),
                   f"--out: `{tiny_bert_dir}` is the base model")

    data = write_jsonl(finished_copy / "train.jsonl", [{"text": t, "label": l} for t, l in [("good", "positive"), ("bad", "negative")] * 8])
    recipe = write_recipe(tmp_path / "again.yaml", classification_recipe(
        tiny_bert_dir, {"train": data, "validation": data}, finished_copy, output={"overwrite": True}))
    _fails_cleanly(run_cli_in_process("train", str(recipe)),
                   f"output.dir: `{finished_copy}` holds data.train.path `{data}`, which this command reads")
    data.unlink()
    assert sorted(str(p.relative_to(finished_copy)) for p in finished_copy.rglob("*")) == before

    rows = write_jsonl(tmp_path / "rows.jsonl", [{"text": "good movie"}])
    _fails_cleanly(run_cli_in_process("predict", str(finished_copy), "--input", str(rows), "--output", str(rows)),
                   "is the --input file")
    assert rows.read_text() == '{"text": "good movie"}\n'
