"""The console shows peftkit's messages, progress and final metrics; library messages go to the run's log file."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import classification_recipe, sentiment_rows, write_jsonl
from peftkit.cli import build_parser, main

pytestmark = pytest.mark.slow


def test_train_console_is_quiet_and_ends_with_the_metrics(tiny_bert_dir, tmp_path, capfd):
    files = {"train": write_jsonl(tmp_path / "train.jsonl", sentiment_rows(48, seed=1)),
             "test": write_jsonl(tmp_path / "test.jsonl", sentiment_rows(16, seed=2))}
    recipe = classification_recipe(tiny_bert_dir, files, tmp_path / "run",
                                   training={"max_steps": 4, "eval_strategy": "no", "save_strategy": "no"},
                                   evaluation={"splits": ["test"]})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    capfd.readouterr()
    assert main(["train", str(tmp_path / "r.yaml")]) == 0
    out, err = capfd.readouterr()
    log = (tmp_path / "run" / "peftkit.log").read_text()
    # transformers' load report (the new classifier head) is the library's business: in the log, not on the console.
    assert "LOAD REPORT" in log and "LOAD REPORT" not in out + err
    assert "[peftkit] trainable parameters" in err
    lines = out.strip().splitlines()
    assert lines[-2].startswith("test: examples 16, accuracy ") and lines[-1].startswith(f"run folder: {tmp_path / 'run'}")
    report = (tmp_path / "run" / "report.md").read_text()
    assert report.startswith("# Run report: run\n") and "nan" not in report


def test_library_loggers_with_their_own_handler_reach_only_the_log_file(tmp_path, capfd):
    """huggingface_hub printed its retry notices ("... thrown while requesting HEAD ...") on every command offline."""
    import logging

    from peftkit import console

    console.configure(verbose=False)
    console.attach_log_file(tmp_path / "peftkit.log")
    for name in ("huggingface_hub", "huggingface_hub.utils._http", "DeepSpeed"):
        logging.getLogger(name).warning("notice from %s", name)
    logging.getLogger("peftkit").warning("for the user")
    out, err = capfd.readouterr()
    log = (tmp_path / "peftkit.log").read_text()
    assert "notice from" not in out + err and "[peftkit] for the user" in err
    assert all(f"notice from {name}" in log for name in ("huggingface_hub", "huggingface_hub.utils._http", "DeepSpeed"))


def test_every_command_has_a_description_an_example_and_a_version(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"train", "eval", "predict", "merge", "serve", "plan", "sweep", "validate"} <= set(commands)
    for name, command in commands.items():
        text = command.format_help()
        assert command.description and f"example:\n  peftkit {name} " in text, name
    with pytest.raises(SystemExit):
        parser.parse_args(["--version"])
    assert capsys.readouterr().out.startswith("peftkit ")
    assert parser.parse_args(["-v", "validate", "r.yaml"]).verbose is True
    assert parser.parse_args(["validate", "r.yaml", "-v"]).verbose is True
