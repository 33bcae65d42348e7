"""Crash safety, exact resume, numeric guards, pre-emption, safe loading and secrets (single process).

Distributed variants of kill-and-resume live with the distributed tests."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftkit.errors import UserError
from peftkit.recipe.load import validate_recipe
from peftkit.run_folder import check_resume_matches
from peftkit.training.run import train
from tests.conftest import HOOKS, REPO_ROOT, classification_recipe, run_cli, run_cli_in_process, write_recipe

STEPS = 12


def _recipe(model_dir, files, run_dir, **extra):
    from peftkit.recipe.load import deep_merge

    base = classification_recipe(
        model_dir, {"train": files["train"]}, run_dir,
        training={"max_steps": STEPS, "eval_strategy": "no", "save_strategy": "steps", "save_steps": 2, "keep_last": 3},
        adapter={"dropout": 0.1}, evaluation={"splits": []},
    )
    return deep_merge(base, extra)


def _assert_same_adapter(left: Path, right: Path) -> None:
    expected = load_file(left / "adapter" / "adapter_model.safetensors")
    actual = load_file(right / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def uninterrupted(tiny_bert_dir, tmp_path_factory):
    from tests.conftest import sentiment_rows, write_jsonl

    data = tmp_path_factory.mktemp("data")
    files = {"train": write_jsonl(data / "train.jsonl", sentiment_rows(160, seed=1))}
    run_dir = train(validate_recipe(_recipe(tiny_bert_dir, files, tmp_path_factory.mktemp("runs") / "full")))
    return run_dir, files


def _resume_matches(recipe_path: Path, uninterrupted_run: Path, run_dir: Path) -> None:
    """An interrupted run left no adapter; `--resume` finishes it with the uninterrupted run's adapter."""
    assert not (run_dir / "adapter").exists()
    result = run_cli("train", str(recipe_path), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_adapter(uninterrupted_run, run_dir)


def _start_training(recipe_path: Path, *extra: str) -> subprocess.Popen:
    """`peftkit train` in a subprocess whose steps take at least 0.25 s: a tiny model otherwise runs 12 steps in under a
    second, and a test waiting for checkpoint-3 (kept only until checkpoint-5 replaces it) could miss it under load."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HOOKS), str(REPO_ROOT)]), "PEFTKIT_TEST_STEP_SECONDS": "0.25"}
    return subprocess.Popen(
        [sys.executable, "-m", "peftkit", "train", str(recipe_path), *extra],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(uninterrupted, tiny_bert_dir, tmp_path):
    full, files = uninterrupted
    kill_after = random.Random(os.getpid()).choice([2, 4, 6, 8])
    recipe_path = write_recipe(tmp_path / "r.yaml", _recipe(tiny_bert_dir, files, tmp_path / "run"))
    process = _start_training(recipe_path)
    checkpoint = tmp_path / "run" / "checkpoints" / f"checkpoint-{kill_after}"
    _wait_for(checkpoint.is_dir, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    _resume_matches(recipe_path, full, tmp_path / "run")


def test_kill_during_a_save_resumes_from_the_previous_checkpoint(uninterrupted, tiny_bert_dir, tmp_path):
    """What a kill mid-save leaves: a complete checkpoint-8 and a half-written checkpoint-10 in the staging folder."""
    full, files = uninterrupted
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    (checkpoints / ".staging").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "checkpoint-8", checkpoints / "checkpoint-8")
    shutil.copytree(full / "checkpoints" / "checkpoint-10", checkpoints / ".staging" / "checkpoint-10")
    (checkpoints / ".staging" / "checkpoint-10" / "trainer_state.json").unlink()
    (checkpoints / ".staging" / "checkpoint-10" / "optimizer.pt").write_bytes(b"half-written")
    shutil.copy(full / "recipe.yaml", run_dir / "recipe.yaml")
    train(validate_recipe(_recipe(tiny_bert_dir, files, run_dir)), resume=True)
    _assert_same_adapter(full, run_dir)


def test_checkpoints_appear_complete_and_retention_keeps_the_latest(uninterrupted):
    full, _ = uninterrupted
    names = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert names == ["checkpoint-10", "checkpoint-12", "checkpoint-8"], names  # keep_last=3, staging folder gone
    for checkpoint in (full / "checkpoints").iterdir():
        names = {p.name for p in checkpoint.iterdir()}
        assert {"trainer_state.json", "optimizer.pt", "rng_state.pth", "adapter_model.safetensors"} <= names
        assert not any(name.startswith(("tokenizer", "special_tokens", "vocab")) for name in names), names
    assert (full / "adapter" / "tokenizer.json").is_file()  # the run keeps one copy, with the adapter


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(uninterrupted, tiny_bert_dir, tmp_path):
    full, files = uninterrupted
    recipe = _recipe(tiny_bert_dir, files, tmp_path / "run", training={"save_steps": 100})  # no scheduled saves
    recipe_path = write_recipe(tmp_path / "r.yaml", recipe)
    process = _start_training(recipe_path)
    _wait_for(lambda: (tmp_path / "run" / "recipe.yaml").is_file(), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    assert "SIGTERM received" in stderr and "Traceback" not in stderr
    saved = list((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    assert len(saved) == 1 and (saved[0] / "trainer_state.json").is_file()
    _resume_matches(recipe_path, full, tmp_path / "run")


def test_resume_with_a_changed_recipe_is_refused_unless_forced(uninterrupted, tiny_bert_dir, tmp_path):
    full, files = uninterrupted
    run_dir = tmp_path / "run"
    shutil.copytree(full, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-12")
    changed = validate_recipe(_recipe(tiny_bert_dir, files, run_dir, adapter={"r": 4}))
    with pytest.raises(UserError, match=r"recipe changed since the run started \(adapter.r\)"):
        train(changed, resume=True)
    path = write_recipe(tmp_path / "r.yaml", _recipe(tiny_bert_dir, files, run_dir, adapter={"dropout": 0.2}))
    refused = run_cli_in_process("train", str(path), "--resume")
    assert refused.returncode == 2 and "adapter.dropout" in refused.stderr and "--force-resume" in refused.stderr
    # training settings count too: the run record must not describe settings that never ran
    lr = write_recipe(tmp_path / "lr.yaml", _recipe(tiny_bert_dir, files, run_dir, training={"learning_rate": 1e-3}))
    refused = run_cli_in_process("train", str(lr), "--resume")
    assert refused.returncode == 2 and "training.learning_rate" in refused.stderr
    # what cannot change the weights may change: logging cadence, final evaluation, tensorboard
    allowed = validate_recipe(_recipe(tiny_bert_dir, files, run_dir, training={"logging_steps": 3}, output={"tensorboard": True}))
    check_resume_matches(run_dir, allowed, force=False)
    forced = run_cli("train", str(path), "--force-resume")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert json.loads((run_dir / "log_history.json").read_text())[-1]["step"] == STEPS
    # both recipes are kept, with the step where they changed; the manifest lists the replaced one
    kept = yaml.safe_load((run_dir / "recipe.until-step-10.yaml").read_text())
    assert kept["adapter"]["dropout"] == 0.1 and yaml.safe_load((run_dir / "recipe.yaml").read_text())["adapter"]["dropout"] == 0.2
    assert json.loads((run_dir / "manifest.json").read_text())["replaced_recipes"] == ["recipe.until-step-10.yaml"]


def test_resume_with_changed_data_is_refused_unless_forced(tiny_bert_dir, tmp_path):
    """The recipe check passed an edited data file: the resumed run skipped the batches it had read of the old data
    and trained on the rest of the new one, a run that is neither the interrupted one nor a new one."""
    from tests.conftest import sentiment_rows, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(40, seed=1))
    recipe = validate_recipe(_recipe(tiny_bert_dir, {"train": data}, tmp_path / "run", training={"max_steps": 4}))
    run_dir = train(recipe)
    recorded = json.loads((run_dir / "data.json").read_text())
    assert list(recorded) == ["data.train.path"] and len(recorded["data.train.path"]) == 64
    write_jsonl(data, sentiment_rows(40, seed=2))
    with pytest.raises(UserError, match=r"data changed since the run started \(data.train.path: other file content\)"):
        train(recipe, resume=True)
    path = write_recipe(tmp_path / "r.yaml", recipe.model_dump(mode="json"))
    forced = run_cli("train", str(path), "--force-resume")
    assert forced.returncode == 0 and "--force-resume with changed data (data.train.path)" in forced.stderr
    assert json.loads((run_dir / "data.json").read_text()) != recorded


def test_exploding_gradients_stop_with_step_and_checkpoint(uninterrupted, tiny_bert_dir, tmp_path):
    _, files = uninterrupted
    recipe = validate_recipe(_recipe(tiny_bert_dir, files, tmp_path / "run", training={"abort_grad_norm": 1e-12}))
    with pytest.raises(UserError, match=r"training stopped at step 1: the gradient norm .* exceeded"):
        train(recipe)
    assert not (tmp_path / "run").exists()  # nothing was saved, so nothing is left behind


def test_nan_loss_stops_the_run_before_an_adapter_is_written(uninterrupted, tiny_bert_dir, tmp_path):
    _, files = uninterrupted
    recipe = validate_recipe(_recipe(tiny_bert_dir, files, tmp_path / "run", training={"learning_rate": 1e30, "max_grad_norm": 0}))
    with pytest.raises(UserError, match=r"training stopped at step \d+: the (loss|gradient norm) became (nan|inf)") as caught:
        train(recipe)
    assert "Last good checkpoint" in str(caught.value)
    assert not (tmp_path / "run" / "adapter").exists()


def test_skip_mode_drops_bad_steps_and_records_them(uninterrupted, tiny_bert_dir, tmp_path):
    _, files = uninterrupted
    recipe = validate_recipe(_recipe(
        tiny_bert_dir, files, tmp_path / "run", training={"abort_grad_norm": 1e-12, "on_nonfinite": "skip", "max_steps": 3}))
    run_dir = train(recipe)
    assert json.loads((run_dir / "metrics.json").read_text())["skipped_steps"] == [1, 2, 3]
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(w) == 0 for w in lora_b)  # never updated from their zero init


def test_pickle_weights_need_an_explicit_key(tiny_bert_dir, sentiment_files, tmp_path):
    from transformers import AutoModel

    pickled = tmp_path / "pickled-model"
    shutil.copytree(tiny_bert_dir, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(AutoModel.from_pretrained(tiny_bert_dir).state_dict(), pickled / "pytorch_model.bin")
    assert not list(pickled.glob("*.safetensors")) and list(pickled.glob("*.bin"))
    files = {"train": sentiment_files["train"]}
    refused = classification_recipe(pickled, files, tmp_path / "r1", training={"max_steps": 1, "eval_strategy": "no"}, evaluation={"splits": []})
    with pytest.raises(UserError, match="allow_pickle_weights"):
        train(validate_recipe(refused))
    allowed = classification_recipe(pickled, files, tmp_path / "r2", model={"allow_pickle_weights": True},
                                    training={"max_steps": 1, "eval_strategy": "no"}, evaluation={"splits": []})
    assert (train(validate_recipe(allowed)) / "adapter" / "adapter_model.safetensors").is_file()


def test_tokens_from_the_environment_never_reach_the_run_folder(tiny_bert_dir, sentiment_files, tmp_path):
    secret = "hf_SECRETtoken1234567890"
    recipe = write_recipe(tmp_path / "r.yaml", classification_recipe(
        tiny_bert_dir, {"train": sentiment_files["train"]}, tmp_path / "run",
        training={"max_steps": 2, "eval_strategy": "no", "save_strategy": "steps", "save_steps": 1},
        evaluation={"splits": []}, output={"tensorboard": True}))
    result = run_cli("train", str(recipe), env={"HF_TOKEN": secret, "WANDB_API_KEY": secret, "HUGGING_FACE_HUB_TOKEN": secret})
    assert result.returncode == 0, result.stderr[-3000:]
    assert secret not in result.stdout + result.stderr
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_fp16_scaler_skipped_steps_are_counted_and_reported(tmp_path):
    """accelerate's fp16 needs a GPU (on CPU it builds no scaler), so a real GradScaler on CPU tensors drives the count."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from peftkit.evaluation.report import write_report
    from peftkit.training.trainer import PeftkitTrainer

    accelerator = Accelerator()
    weight = torch.nn.Parameter(torch.ones(2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    optimizer = AcceleratedOptimizer(torch.optim.SGD([weight], lr=0.1), device_placement=False, scaler=scaler)
    accelerator._optimizers.append(optimizer)
    trainer = SimpleNamespace(accelerator=accelerator, state=SimpleNamespace(global_step=0), overflow_steps=[])
    for factor in (1e38, 1.0, 1e38, 1.0):  # 1e38 x the scale overflows fp32: inf gradients
        scaler.scale(weight.sum() * factor).backward()
        optimizer.step()
        optimizer.zero_grad()
        PeftkitTrainer._record_scaler_skip(trainer)
        trainer.state.global_step += 1
    assert trainer.overflow_steps == [1, 3]
    assert scaler.get_scale() == 2.0**14  # halved once per overflow
    assert weight.tolist() == pytest.approx([0.8, 0.8])  # only the two finite steps updated it

    recipe = validate_recipe({"model": {"name": "m"}, "data": {"train": {"path": "t.jsonl"}}, "training": {"eval_strategy": "no"}})
    summary = {"parameters": {"trainable": 1, "total": 2}, "examples": {"train": 4}, "fp16_overflow_steps": [1, 3]}
    write_report(tmp_path, recipe, summary, {}, has_loss_plot=False)
    assert "fp16 overflow: the gradient scaler skipped 2 step(s) and lowered its scale: [1, 3]" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("damage", ["adapter_model.safetensors", "optimizer.pt"])
def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(uninterrupted, tiny_bert_dir, tmp_path, damage, caplog):
    full, files = uninterrupted
    run_dir = tmp_path / "run"
    shutil.copytree(full, run_dir, ignore=shutil.ignore_patterns("adapter", "manifest.json", "checkpoint-12"))
    damaged = run_dir / "checkpoints" / "checkpoint-10" / damage
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="peftkit"):
        train(validate_recipe(_recipe(tiny_bert_dir, files, run_dir)), resume=True)
    assert f"checkpoint-10: {damage} is" in caplog.text and "resuming from checkpoint-8" in caplog.text
    _assert_same_adapter(full, run_dir)


def test_every_checkpoint_damaged_is_refused(uninterrupted, tiny_bert_dir, tmp_path):
    full, files = uninterrupted
    run_dir = tmp_path / "run"
    shutil.copytree(full, run_dir, ignore=shutil.ignore_patterns("adapter", "manifest.json"))
    for state in (run_dir / "checkpoints").glob("*/trainer_state.json"):
        state.write_text("{")
    with pytest.raises(UserError, match="every checkpoint of .* is damaged"):
        train(validate_recipe(_recipe(tiny_bert_dir, files, run_dir)), resume=True)


def test_resume_refuses_a_finished_run_without_checkpoints(uninterrupted, tiny_bert_dir, tmp_path):
    full, files = uninterrupted
    run_dir = tmp_path / "run"
    shutil.copytree(full, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="holds a finished run and no checkpoint"):
        train(validate_recipe(_recipe(tiny_bert_dir, files, run_dir)), resume=True)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_last_good_checkpoint_is_the_last_with_finite_weights_before_the_bad_step(uninterrupted, tmp_path):
    from safetensors.torch import save_file

    from peftkit.training.checkpoints import last_good_checkpoint

    full, _ = uninterrupted
    run_dir = tmp_path / "run"
    shutil.copytree(full / "checkpoints", run_dir / "checkpoints")
    weights_file = run_dir / "checkpoints" / "checkpoint-12" / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, float("inf")) for k, v in load_file(weights_file).items()}, str(weights_file))
    assert last_good_checkpoint(run_dir, before_step=13).name == "checkpoint-10"  # 12 holds inf weights
    # a non-finite loss at step 11 was computed from the weights step 10 wrote: checkpoint-10 is not good either
    assert last_good_checkpoint(run_dir, before_step=10).name == "checkpoint-8"


def test_dead_training_stops_naming_the_last_good_checkpoint(uninterrupted, tiny_bert_dir, tmp_path):
    """Exact-zero gradients (what a saturated model gives) through gradient hooks on the real trainable parameters."""
    from transformers import TrainerCallback

    from peftkit.training.trainer import DEAD_STEPS

    class ZeroGradients(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.register_hook(torch.zeros_like)

    _, files = uninterrupted
    for mode in ("stop", "skip"):  # skipping steps that change nothing would run on silently: both stop
        recipe = validate_recipe(_recipe(tiny_bert_dir, files, tmp_path / mode, training={"on_nonfinite": mode}))
        with pytest.raises(UserError, match=rf"stopped at step {DEAD_STEPS}: the gradient norm was exactly 0 for {DEAD_STEPS} steps"
                           ) as caught:
            train(recipe, callbacks=[ZeroGradients()])
        assert f"Last good checkpoint: {tmp_path / mode / 'checkpoints' / 'checkpoint-4'}" in str(caught.value)


def test_sigterm_skips_the_due_evaluation_and_saves_first():
    """On the preempted step, the evaluation DefaultFlowCallback scheduled is dropped and the save kept; at the
    epoch end that follows, neither an evaluation nor a second save."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from peftkit.training.trainer import PreemptionCallback

    callback, control = PreemptionCallback(), TrainerControl(should_evaluate=True)
    args, state = TrainingArguments(output_dir="unused", report_to=[]), TrainerState()
    callback.on_step_end(args, state, control)
    assert control.should_evaluate and not control.should_save  # no SIGTERM: the schedule is untouched
    callback.received = True
    callback.on_step_end(args, state, control)
    assert not control.should_evaluate and control.should_save and control.should_training_stop
    control.should_evaluate = control.should_save = True  # what the epoch-end flow would ask for
    callback.on_epoch_end(args, state, control)
    assert not control.should_evaluate and not control.should_save


def test_fp16_on_cpu_is_recorded_as_the_fp32_it_trains_in(tmp_path, caplog):
    """The fallback is said once on peftkit's logger (the console); as a Python warning it reached only the log file."""
    from peftkit.recipe import resolved
    from peftkit.training.arguments import build_training_args, training_setup

    if torch.cuda.is_available():
        pytest.skip("fp16 is real on a GPU")
    recipe = validate_recipe({"model": {"name": "m"}, "data": {"train": {"path": "t.jsonl"}},
                              "training": {"eval_strategy": "no", "precision": "fp16"}})
    resolved._say_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        assert training_setup(recipe)["precision"] == "fp32"
        args = build_training_args(recipe, tmp_path, "accuracy")
    said = [r for r in caplog.records if r.name == "peftkit" and "fp16 needs a GPU" in r.getMessage()]
    assert len(said) == 1
    assert not args.fp16 and not args.bf16


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted on a folder (root or CAP_SYS_ADMIN only); resized with `remount`."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}")

    def resize(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

    yield mount, resize
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_a_save_stops_clearly_and_keeps_earlier_checkpoints(uninterrupted, tiny_bert_dir, tmp_path, small_disk):
    from peftkit.training.checkpoints import checkpoint_problem

    full, files = uninterrupted
    mount, resize = small_disk
    page = 4096
    checkpoint_bytes = sum(-(-p.stat().st_size // page) * page for p in (full / "checkpoints" / "checkpoint-8").iterdir())
    resize(2 * checkpoint_bytes + checkpoint_bytes // 2 + 16 * page)  # room for two checkpoints and the recipe
    run_dir = mount / "run"
    recipe_path = write_recipe(tmp_path / "r.yaml", _recipe(tiny_bert_dir, files, run_dir))
    result = run_cli_in_process("train", str(recipe_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "could not write checkpoint checkpoint-6" in result.stderr, result.stderr[-3000:]
    assert f"Last complete checkpoint: {run_dir / 'checkpoints' / 'checkpoint-4'}" in result.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]  # no staging
    assert all(checkpoint_problem(p) is None for p in (run_dir / "checkpoints").iterdir())
    resize(64 * checkpoint_bytes)  # space freed: the run continues to the uninterrupted run's adapter
    train(validate_recipe(_recipe(tiny_bert_dir, files, run_dir)), resume=True)
    _assert_same_adapter(full, run_dir)


def _qlora_recipe(model_dir, files, run_dir) -> dict:
    """QLoRA with everything that made resume inexact: periodic evaluation (the 4-bit repack), accumulation, dropout."""
    return classification_recipe(
        model_dir, files, run_dir, quantization={"bits": 4}, adapter={"dropout": 0.1, "r": 4},
        training={"max_steps": 8, "batch_size": 4, "gradient_accumulation": 2, "eval_strategy": "steps", "eval_steps": 2,
                  "save_strategy": "steps", "save_steps": 2, "keep_last": 5, "eval_batch_size": 20},
        evaluation={"splits": []},
    )


@pytest.mark.slow
def test_qlora_with_evaluation_resumes_exactly_after_a_kill(tiny_llama_dir, tmp_path):
    """What a SIGKILL after checkpoint k leaves on disk (checkpoint k, nothing later), resumed: the uninterrupted
    run's adapter and best checkpoint. (Real SIGKILLs of a process: the tests above and the 2-rank tests.)"""
    from tests.conftest import sentiment_rows, write_jsonl

    files = {"train": write_jsonl(tmp_path / "train.jsonl", sentiment_rows(80, seed=1)),
             "validation": write_jsonl(tmp_path / "validation.jsonl", sentiment_rows(20, seed=2))}
    full = train(validate_recipe(_qlora_recipe(tiny_llama_dir, files, tmp_path / "full")))
    kill_after = random.Random(os.getpid()).choice([2, 4, 6])
    run_dir = tmp_path / "run"
    shutil.copytree(full / "checkpoints" / f"checkpoint-{kill_after}", run_dir / "checkpoints" / f"checkpoint-{kill_after}")
    shutil.copy(full / "recipe.yaml", run_dir / "recipe.yaml")
    train(validate_recipe(_qlora_recipe(tiny_llama_dir, files, run_dir)), resume=True)
    _assert_same_adapter(full, run_dir)
    expected, resumed = (json.loads((run / "metrics.json").read_text()) for run in (full, run_dir))
    assert resumed["best_checkpoint"].endswith(Path(expected["best_checkpoint"]).name)
    assert resumed["best_metric"] == pytest.approx(expected["best_metric"], abs=1e-6)


@pytest.mark.slow
def test_sigterm_at_an_evaluation_step_saves_first_and_the_resumed_run_evaluates_it(tiny_bert_dir, tmp_path):
    """Every step evaluates, so SIGTERM always lands on a due evaluation: the checkpoint is saved without it, marked,
    and the resumed run evaluates it before training on; the evaluations, the best checkpoint and the adapter are
    those of an uninterrupted run."""
    from tests.conftest import sentiment_rows, write_jsonl

    from peftkit.training.trainer import EVALUATION_PENDING

    files = {"train": write_jsonl(tmp_path / "train.jsonl", sentiment_rows(96, seed=1)),
             "validation": write_jsonl(tmp_path / "validation.jsonl", sentiment_rows(24, seed=2))}

    def recipe(run_dir):
        return classification_recipe(
            tiny_bert_dir, files, run_dir, adapter={"dropout": 0.1}, evaluation={"splits": []},
            training={"max_steps": STEPS, "eval_strategy": "steps", "eval_steps": 1, "save_strategy": "steps",
                      "save_steps": 1, "keep_last": 2, "learning_rate": 3e-3})

    full = train(validate_recipe(recipe(tmp_path / "full")))
    recipe_path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path / "run"))
    process = _start_training(recipe_path)
    _wait_for((tmp_path / "run" / "checkpoints" / "checkpoint-3").is_dir, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    last = max((tmp_path / "run" / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert (last / EVALUATION_PENDING).is_file() and int(last.name.split("-")[1]) < STEPS
    train(validate_recipe(recipe(tmp_path / "run")), resume=True)
    _assert_same_adapter(full, tmp_path / "run")
    assert not (last / EVALUATION_PENDING).exists()

    def evaluations(run_dir):
        history = json.loads((run_dir / "log_history.json").read_text())
        return {entry["step"]: entry["eval_loss"] for entry in history if "eval_loss" in entry}

    assert sorted(evaluations(tmp_path / "run")) == list(range(1, STEPS + 1))
    assert evaluations(tmp_path / "run") == pytest.approx(evaluations(full), abs=1e-6)
    best = [json.loads((run / "metrics.json").read_text())["best_checkpoint"] for run in (full, tmp_path / "run")]
    assert Path(best[0]).name == Path(best[1]).name
