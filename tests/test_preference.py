"""Preference tuning (DPO, ORPO, KTO through TRL) on a tiny decoder: learning direction, the implicit reward against
TRL's own, exact resume, deployment like SFT adapters, bad preference data, and 2-rank ZeRO-2 and ZeRO-3 runs."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from peftkit.errors import UserError
from peftkit.recipe.load import deep_merge, validate_recipe
from peftkit.training.run import train
from tests.conftest import FILLER_WORDS, NEGATIVE_WORDS, POSITIVE_WORDS, REPO_ROOT, write_jsonl, write_recipe


def pair_rows(count: int, seed: int) -> list[dict]:
    """A filler prompt; the chosen answer is a positive word, the rejected one a negative word."""
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choices(FILLER_WORDS, k=4)), "chosen": rng.choice(POSITIVE_WORDS),
             "rejected": rng.choice(NEGATIVE_WORDS)} for _ in range(count)]


def preference_recipe(model_dir, files, run_dir, **sections) -> dict:
    recipe = {
        "name": "tiny-dpo",
        "model": {"name": str(model_dir)},
        "task": {"type": "preference", "loss": "dpo", "beta": 0.5, "chat_template": "plain", "compare_generations": 2},
        "data": {**{name: {"path": str(path)} for name, path in files.items()}, "max_length": 32},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"max_steps": 16, "batch_size": 8, "learning_rate": 1e-2, "logging_steps": 1, "warmup_ratio": 0.0,
                     "eval_strategy": "no", "save_strategy": "steps", "save_steps": 4, "keep_last": 4},
        "evaluation": {"splits": ["validation"]},
        "generation": {"max_new_tokens": 4},
        "output": {"dir": str(run_dir), "tensorboard": False},
    }
    return deep_merge(recipe, sections)


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return {"train": write_jsonl(root / "train.jsonl", pair_rows(64, seed=1)),
            "validation": write_jsonl(root / "dev.jsonl", pair_rows(16, seed=2))}


@pytest.fixture(scope="module")
def dpo_run(tiny_llama_dir, pair_files, tmp_path_factory):
    return train(validate_recipe(preference_recipe(tiny_llama_dir, pair_files, tmp_path_factory.mktemp("runs") / "dpo")))


def _train_losses(run_dir) -> list[float]:
    return [entry["loss"] for entry in json.loads((run_dir / "log_history.json").read_text()) if "loss" in entry]


@pytest.mark.parametrize("loss", ["dpo", "orpo", "kto", "dpo-qlora"])
def test_a_preference_loss_moves_loss_and_accuracy_the_right_way(loss, dpo_run, tiny_llama_dir, pair_files, tmp_path):
    # dpo-qlora: a 4-bit base (bitsandbytes nf4); the reference is the quantized base with the adapter disabled.
    extra = {"quantization": {"bits": 4}} if loss == "dpo-qlora" else {}
    loss = loss.removesuffix("-qlora")
    run_dir = dpo_run if loss == "dpo" and not extra else train(validate_recipe(
        preference_recipe(tiny_llama_dir, pair_files, tmp_path / loss, task={"loss": loss}, **extra)))
    if extra:
        assert json.loads((run_dir / "metrics.json").read_text())["setup"]["quantization_bits"] == 4
    metrics = json.loads((run_dir / "metrics.json").read_text())["validation"]
    history = [entry for entry in json.loads((run_dir / "log_history.json").read_text()) if "loss" in entry]
    if loss == "kto":
        # KTO's loss compares each reward with a batch KL estimate that rises as the policy moves (it stays near
        # 0.5 here); its objective shows in the implicit reward of the desirable completions, which TRL logs.
        # (a logged batch may hold desirable or undesirable rows only, so each key is read where present)
        rewards = [entry.get("rewards/chosen", 0.0) - entry.get("rewards/rejected", 0.0) for entry in history]
        assert sum(rewards[-4:]) / 4 > rewards[0] + 0.05
    else:
        assert sum(entry["loss"] for entry in history[-4:]) / 4 < history[0]["loss"] - 0.05
    # The base is at chance on held-out pairs; the tuned adapter ranks chosen over rejected.
    assert metrics["pairs"] == 16
    assert metrics["preference_accuracy"] >= 0.8 > metrics["base_preference_accuracy"] + 0.15
    assert metrics["margin"] > metrics["base_margin"] + 0.05
    assert ("reward_accuracy" in metrics) == (loss != "orpo")  # ORPO has no reference model


def test_dpo_implicit_reward_equals_trls_and_the_report_compares_with_the_base(dpo_run, tiny_llama_dir, pair_files, tmp_path):
    """Our implicit reward (beta * log pi/pi_ref, reference = adapter disabled) is what TRL's DPO evaluation logs."""
    run_dir = train(validate_recipe(preference_recipe(
        tiny_llama_dir, pair_files, tmp_path / "eval", training={"max_steps": 4, "eval_strategy": "steps", "eval_steps": 4,
                                                                  "save_steps": 4})))
    metrics = json.loads((run_dir / "metrics.json").read_text())["validation"]
    logged = [entry for entry in json.loads((run_dir / "log_history.json").read_text()) if "eval_rewards/margins" in entry][-1]
    assert metrics["reward_margin"] == pytest.approx(logged["eval_rewards/margins"], abs=1e-3)
    assert metrics["chosen_reward"] == pytest.approx(logged["eval_rewards/chosen"], abs=1e-3)
    report = (dpo_run / "report.md").read_text()
    assert "| preference accuracy (per-token log-likelihood) |" in report and "Responses side by side" in report
    records = [json.loads(line) for line in (dpo_run / "predictions.jsonl").read_text().splitlines()]
    assert sum("base_generated" in record for record in records) == 2
    # The adapter folder holds the trained adapter only (TRL's `ref` copy is not saved) and loads in plain peft.
    assert not (dpo_run / "adapter" / "ref").exists()
    assert all(".ref." not in name for name in load_file(dpo_run / "adapter" / "adapter_model.safetensors"))


def test_dpo_resume_from_a_checkpoint_equals_the_uninterrupted_run(dpo_run, tiny_llama_dir, pair_files, tmp_path):
    run_dir = tmp_path / "resumed"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(dpo_run / "checkpoints" / "checkpoint-8", run_dir / "checkpoints" / "checkpoint-8")
    shutil.copy(dpo_run / "recipe.yaml", run_dir / "recipe.yaml")
    train(validate_recipe(preference_recipe(tiny_llama_dir, pair_files, run_dir)), resume=True)
    expected = load_file(dpo_run / "adapter" / "adapter_model.safetensors")
    actual = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=0)
    assert _train_losses(run_dir)[-8:] == pytest.approx(_train_losses(dpo_run)[-8:], abs=1e-6)


def test_a_preference_adapter_attaches_and_generates_like_an_sft_adapter(dpo_run, tiny_llama_dir):
    from peftkit.deploy.attach import AttachedModel

    attached = AttachedModel(str(tiny_llama_dir), {"dpo": str(dpo_run / "adapter")})
    assert attached.task_type == "preference"
    answers = attached.predict([{"prompt": "the movie was"}], "dpo", max_new_tokens=3)
    assert answers[0]["tokens"] <= 3 and isinstance(answers[0]["text"], str)


def _prepare_error(tiny_llama_dir, tmp_path, rows, **task) -> str:
    from transformers import AutoTokenizer

    from peftkit.data.sources import load_splits
    from peftkit.tasks import preference

    files = {"train": write_jsonl(tmp_path / "bad.jsonl", rows)}
    recipe = validate_recipe(preference_recipe(tiny_llama_dir, files, tmp_path / "run", task=task,
                                               evaluation={"splits": []}))
    with pytest.raises(UserError) as caught:
        preference.prepare(recipe, load_splits(recipe.data), AutoTokenizer.from_pretrained(tiny_llama_dir))
    return str(caught.value)


HH = "\n\nHuman: {q}\n\nAssistant: {a}"


@pytest.mark.parametrize("rows, expected", [
    ([{"prompt": "a", "chosen": "good"}], r"cannot tell the data format .* columns \['prompt', 'chosen'\].*explicit: prompt, chosen, rejected"),
    ([{"prompt": "a", "chosen": "good", "rejected": "good"}], r"bad.jsonl` row 1: `chosen` and `rejected` are identical"),
    ([{"prompt": "a", "chosen": "good", "rejected": "bad"}, {"prompt": "a", "chosen": " ", "rejected": "bad"}],
     r"row 2: `chosen` has an empty response"),
    ([{"chosen": HH.format(q="hi", a="good"), "rejected": HH.format(q="yo", a="bad")}],
     r"row 1: `chosen` and `rejected` must share every turn but the last .* differ from the first turn"),
    ([{"chosen": HH.format(q="hi", a="good") + HH.format(q="and", a="fine"),
       "rejected": HH.format(q="hi", a="bad") + HH.format(q="and", a="fine")}], r"differ before their last turn"),
    ([{"chosen": "plain text", "rejected": "other text"}], r"must be a whole dialogue .* give a `prompt` column"),
    ([{"prompt": "a", "chosen": "good", "rejected": "bad"}, {"prompt": "a", "completion": "good", "label": True}],
     r"mixes data formats: rows are `explicit` .* row 2 is `unpaired`"),
    ([{"prompt": "a", "completion": "good", "label": True}], r"only task.loss: kto trains on"),
])
def test_bad_preference_data_names_file_row_and_fix(rows, expected, tiny_llama_dir, tmp_path):
    assert __import__("re").search(expected, _prepare_error(tiny_llama_dir, tmp_path, rows))


def test_implicit_prompt_split_of_hh_dialogues_and_message_lists():
    from peftkit.data.formats import preference_row

    shared = HH.format(q="How do I pick a lock?", a="Why do you ask?") + "\n\nHuman: It is my own door."
    row = {"chosen": shared + "\n\nAssistant: Call a locksmith.", "rejected": shared + "\n\nAssistant: Use a pin."}
    pair = preference_row(row, "implicit", "row 1")
    assert pair["prompt"] == [
        {"role": "user", "content": "How do I pick a lock?"}, {"role": "assistant", "content": "Why do you ask?"},
        {"role": "user", "content": "It is my own door."}]
    assert pair["chosen"] == [{"role": "assistant", "content": "Call a locksmith."}]
    assert pair["rejected"] == [{"role": "assistant", "content": "Use a pin."}]
    as_messages = {name: pair["prompt"] + pair[name] for name in ("chosen", "rejected")}
    assert preference_row(as_messages, "implicit", "row 1") == pair
    explicit = preference_row({"prompt": "hi", "chosen": "good", "rejected": "bad"}, "explicit", "row 1")
    assert explicit == {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "good"}],
                        "rejected": [{"role": "assistant", "content": "bad"}]}


def test_long_prompts_keep_their_last_turns_within_max_prompt_length(tiny_llama_dir, tmp_path):
    """task.max_prompt_length drops the earliest whole turns (never the system message or the last user turn) and
    keeps as many recent turns as fit, so a long HH dialogue trains on its end instead of being dropped."""
    from transformers import AutoTokenizer

    from peftkit.data.chat import chat_text
    from peftkit.data.sources import load_splits
    from peftkit.tasks import preference

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    turns = [{"role": role, "content": " ".join(FILLER_WORDS[: 3 + 2 * i])}
             for i, role in enumerate(["user", "assistant", "user", "assistant", "user"])]

    def length(messages, tokenizer=tokenizer):
        return len(tokenizer(chat_text(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"])

    assert length(turns[2:]) < length(turns)
    for limit, kept in [(length(turns), turns), (length(turns) - 1, turns[2:]), (length(turns[2:]), turns[2:]),
                        (length(turns[2:]) - 1, turns[4:]), (1, turns[4:])]:
        assert preference.keep_prompt_end(turns, tokenizer, limit) == kept, limit
    system = [{"role": "system", "content": "be kind"}]
    assert preference.keep_prompt_end(system + turns, tokenizer, length(system + turns[2:])) == system + turns[2:]
    assert preference.keep_prompt_end(system + turns, tokenizer, 1) == system + turns[4:]

    # Through the recipe: an HH-RLHF dialogue of three human turns keeps the last two with a limit between.
    dialogue = HH.format(q="first question here", a="an answer") + HH.format(q="second", a="reply") + "\n\nHuman: third"
    files = {"train": write_jsonl(tmp_path / "hh.jsonl", [{"chosen": dialogue + "\n\nAssistant: good",
                                                           "rejected": dialogue + "\n\nAssistant: bad"}])}
    recipe = validate_recipe(preference_recipe(tiny_llama_dir, files, tmp_path / "run", evaluation={"splits": []}))
    plain = AutoTokenizer.from_pretrained(tiny_llama_dir)
    whole = preference.prepare(recipe, load_splits(recipe.data), plain)[0]["train"][0]["prompt"]
    limit = length(whole[2:], plain)
    cut = recipe.model_copy(update={"task": recipe.task.model_copy(update={"max_prompt_length": limit})})
    kept = preference.prepare(cut, load_splits(cut.data), plain)[0]["train"][0]["prompt"]
    assert [m["content"] for m in whole] == ["first question here", "an answer", "second", "reply", "third"]
    assert kept == whole[2:]


@pytest.fixture(scope="module")
def one_rank_dpo(tiny_llama_dir, pair_files, tmp_path_factory):
    """A 4-step DPO run of 8 pairs per step on one process: what 2 ranks x 4 pairs must reproduce."""
    from tests.test_distributed_training import worker_env

    root = tmp_path_factory.mktemp("one-rank-dpo")
    recipe = write_recipe(root / "dpo.yaml", preference_recipe(
        tiny_llama_dir, pair_files, root / "unused", training={"max_steps": 4, "save_steps": 2},
        evaluation={"splits": []}))
    one = subprocess.run([sys.executable, "-m", "peftkit", "train", str(recipe), f"output.dir={root / 'one'}"],
                         cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    return recipe, _train_losses(root / "one")


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_zero_dpo_matches_one_rank(stage, one_rank_dpo, tmp_path):
    """accelerate launch, 2 gloo ranks x 4 pairs under ZeRO-2/3 = 1 rank x 8 pairs: same DPO losses step by step.

    Under ZeRO-3 the policy and the reference (the same module with the adapter disabled) gather the partitioned
    base weights for each forward; the saved adapter holds whole gathered weights."""
    from tests.test_distributed_training import accelerate, worker_env

    recipe, one_rank_losses = one_rank_dpo
    two = subprocess.run([*accelerate(f"zero{stage}.yaml"), "train", str(recipe), f"output.dir={tmp_path / 'two'}",
                          "training.batch_size=4", "distributed.strategy=deepspeed", f"distributed.zero_stage={stage}"],
                         cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["world_size"] == 2
    assert _train_losses(tmp_path / "two") == pytest.approx(one_rank_losses, rel=1e-4)
    saved = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert saved and all(tensor.numel() > 0 for tensor in saved.values())



@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_a_mixture_of_experts_model_trains_with_the_router_loss_or_is_refused(method, tiny_mixtral_dir, pair_files,
                                                                               tmp_path):
    """TRL adds the router's load-balancing loss over the attention mask: virtual tokens in the input (prompt
    tuning) keep mask and router aligned and train; peft's key/value prefix lengthens the mask only, which failed
    with a shape error inside TRL, so it is refused before training, naming what to use."""
    sections = preference_recipe(tiny_mixtral_dir, pair_files, tmp_path / "run",
                                 training={"max_steps": 2, "save_strategy": "no"}, evaluation={"splits": []})
    recipe = validate_recipe({**sections, "adapter": {"method": method, "num_virtual_tokens": 4}})
    if method == "prefix_tuning":
        with pytest.raises(UserError, match="prefix tuning cannot train the mixture-of-experts model .*use lora"):
            train(recipe)
        return
    losses = _train_losses(train(recipe))
    assert len(losses) == 2 and all(loss == loss for loss in losses)
