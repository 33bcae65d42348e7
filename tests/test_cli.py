"""The CLI: `validate` prints the resolved recipe; every kind of bad input exits 2 with one clear message,
no traceback, and no run folder left behind."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import classification_recipe, run_cli, run_cli_in_process, write_jsonl, write_recipe


def test_validate_prints_the_resolved_recipe(tmp_path, sentiment_files, tiny_bert_dir):
    path = write_recipe(tmp_path / "r.yaml", classification_recipe(tiny_bert_dir, sentiment_files, tmp_path / "run"))
    result = run_cli("validate", str(path), "training.learning_rate=0.5", "adapter.r=2")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["training"]["learning_rate"] == 0.5 and resolved["adapter"]["r"] == 2
    assert resolved["name"] == "tiny" and resolved["model"]["trust_remote_code"] is False
    assert resolved["training"]["scheduler"] == "linear"  # defaults are filled in
    assert not (tmp_path / "run").exists()


def _bad_cases(tmp_path, files, model_dir):
    def recipe(**sections):
        return classification_recipe(model_dir, files, tmp_path / "run", **sections)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    unseen = write_jsonl(tmp_path / "unseen.jsonl", [{"text": "good", "label": "neutral"}])
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    return {
        "malformed yaml": ("model: [", "is not valid YAML"),
        "unknown key": (recipe(trainng={"epochs": 1}), "trainng: unknown key; did you mean `training`?"),
        "wrong type": (recipe(training={"epochs": "many"}), "training.epochs: Input should be a valid number"),
        "out of range": (recipe(adapter={"dropout": 1.5}), "adapter.dropout: Input should be less than 1"),
        "missing data file": (recipe(data={"train": {"path": str(tmp_path / "nope.jsonl")}}), "data.train.path: file"),
        "missing column": (recipe(task={"text_column": "sentence"}), "has no column 'sentence'"),
        "empty split": (recipe(data={"test": {"path": str(empty)}}), "data.test"),
        "unseen label": (recipe(data={"validation": {"path": str(unseen)}}), "label(s) ['neutral'] that do not occur"),
        "unreadable model": (recipe(model={"name": str(not_a_model)}), "model.name: cannot load"),
        "missing package": (recipe(model={"name": "package:no_such_pkg/model"}), "package `no_such_pkg` is not installed"),
    }


# Two cases go through a real `python -m peftkit` process (a parse error, and one that loads model and data);
# the others through `peftkit.cli.main` in this process, which the module entry point only wraps in `sys.exit`.
IN_A_PROCESS = ("malformed yaml", "missing column")


@pytest.mark.slow
def test_bad_input_exits_2_without_traceback_or_run_folder(tmp_path, sentiment_files, tiny_bert_dir):
    for case, (content, expected) in _bad_cases(tmp_path, sentiment_files, tiny_bert_dir).items():
        path = tmp_path / "bad.yaml"
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        result = (run_cli if case in IN_A_PROCESS else run_cli_in_process)("train", str(path))
        assert result.returncode == 2, (case, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (case, result.stderr[-2000:])
        assert expected in result.stderr, (case, result.stderr[-2000:])
        assert not (tmp_path / "run").exists(), case


def test_existing_run_folder_is_not_overwritten(tmp_path, sentiment_files, tiny_bert_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "precious.txt").write_text("keep me")
    path = write_recipe(tmp_path / "r.yaml", classification_recipe(tiny_bert_dir, sentiment_files, run_dir))
    result = run_cli("train", str(path))
    assert result.returncode == 2 and "already exists" in result.stderr and "--resume" in result.stderr
    assert (run_dir / "precious.txt").read_text() == "keep me"


def test_module_and_console_entry_points_exist():
    from importlib.metadata import entry_points

    assert any(ep.name == "peftkit" and ep.value == "peftkit.cli:run" for ep in entry_points(group="console_scripts"))
    assert run_cli("--help").returncode == 0



@pytest.mark.parametrize("outcome", ["finished", "user error"])
def test_a_launched_command_leaves_its_process_group(outcome, monkeypatch, tmp_path):
    """Every command ends the process group it joined, also on an error: gloo's worker threads left to interpreter
    shutdown aborted a finished 2-rank run (exit -6) in CI."""
    import argparse

    import torch.distributed as dist

    from peftkit import cli
    from peftkit.errors import UserError

    def joins_then_ends(args):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        if outcome == "user error":
            raise UserError("recipe.yaml: a bad key")

    command = argparse.Namespace(handler=joins_then_ends, verbose=False)
    monkeypatch.setattr(cli, "parse_arguments", lambda argv: command)
    assert cli.main([]) == (0 if outcome == "finished" else 2)
    assert not dist.is_initialized()


# How each entry starts the command: `python -m peftkit`, and the installed `peftkit` console script's target.
ENTRIES = {
    "module": "runpy.run_module('peftkit', run_name='__main__')",
    "console script": "entry_points(group='console_scripts', name='peftkit')['peftkit'].load()()",
}


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_launched_process_skips_the_interpreter_teardown(world_size, entry, tmp_path, sentiment_files, tiny_bert_dir):
    """`python -m peftkit` and the `peftkit` console script, in a process of a multi-process launch, end with the
    command's exit code and its whole output, without the exit-time teardown (an atexit handler stands for it)
    where third-party C++ threads aborted finished ranks; a single process exits normally."""
    import os
    import subprocess
    import sys

    path = write_recipe(tmp_path / "r.yaml", classification_recipe(tiny_bert_dir, sentiment_files, tmp_path / "run"))
    script = ("import atexit, runpy, sys; from importlib.metadata import entry_points; "
              "atexit.register(print, 'teardown ran'); "
              f"sys.argv = ['peftkit', 'validate', {str(path)!r}]; {ENTRIES[entry]}")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "WORLD_SIZE": world_size}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout.replace("teardown ran", ""))["name"] == "tiny"  # flushed in full
    assert ("teardown ran" in result.stdout) == (world_size == "1")
