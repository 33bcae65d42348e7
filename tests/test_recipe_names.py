"""Hugging Face / peft names as recipe keys, pass-through options checked against the library dataclasses, and
command-line overrides (raw text, null, switching adapter method)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from peftkit.errors import UserError
from peftkit.recipe.load import load_recipe, validate_recipe
from peftkit.recipe.schema import Recipe, aliases_of

QUICKSTART_PATH = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
QUICKSTART = str(QUICKSTART_PATH)
BASE = {"model": {"name": "m"}, "data": {"train": {"path": "t.jsonl"}}, "training": {"eval_strategy": "no"}}


def test_hf_names_set_the_same_options_as_recipe_names(tmp_path):
    hf = {
        "extends": ["base.yaml"],
        "model": {"model_name_or_path": "org/model", "torch_dtype": "bfloat16"},
        "data": {"max_seq_length": 48},
        "adapter": {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "lora_target_modules": ["query"]},
        "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": "bfloat16",
                         "bnb_4bit_use_double_quant": False},
        "training": {"num_train_epochs": 2, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
                     "gradient_accumulation_steps": 3, "lr_scheduler_type": "cosine", "optim": "adafactor",
                     "save_total_limit": 1, "metric_for_best_model": "accuracy"},
        "output": {"output_dir": "runs/x", "overwrite_output_dir": True},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "hf.yaml").write_text(yaml.safe_dump(hf))
    recipe = load_recipe(tmp_path / "hf.yaml", ["training.num_train_epochs=5", "adapter.lora_alpha=32"])
    assert (recipe.model.name, recipe.model.dtype, recipe.data.max_length) == ("org/model", "bfloat16", 48)
    assert (recipe.adapter.r, recipe.adapter.alpha, recipe.adapter.dropout) == (4, 32, 0.1)
    assert recipe.adapter.target_modules == ["query"]
    q = recipe.quantization
    assert (q.bits, q.quant_type, q.compute_dtype, q.double_quant) == (4, "fp4", "bfloat16", False)
    t = recipe.training
    assert (t.epochs, t.batch_size, t.eval_batch_size, t.gradient_accumulation) == (5, 4, 8, 3)
    assert (t.scheduler, t.optimizer, t.keep_last, t.metric_for_best) == ("cosine", "adafactor", 1, "accuracy")
    assert (recipe.output.dir, recipe.output.overwrite) == ("runs/x", True)
    # An override by the recipe name wins over a file's HF name too (one key, not two).
    assert load_recipe(tmp_path / "hf.yaml", ["training.epochs=7"]).training.epochs == 7


def test_both_names_of_one_option_in_one_file_is_an_error(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**BASE, "training": {"epochs": 1, "num_train_epochs": 2}}))
    with pytest.raises(UserError, match="num_train_epochs and training.epochs are one option"):
        load_recipe(tmp_path / "r.yaml")


def test_every_alias_gets_a_did_you_mean(tmp_path):
    sections = {"model": ..., "data": ..., "adapter": ..., "quantization": ..., "training": ..., "output": ...}
    checked = 0
    for section in sections:
        model = Recipe.model_fields[section].annotation
        model = next(m for m in (model, *getattr(model, "__args__", ())) if hasattr(m, "model_fields"))
        for alias in aliases_of(model):
            typo = alias[:-1] + ("x" if alias[-1] != "x" else "y")
            with pytest.raises(UserError, match=f"did you mean `{alias}`"):
                load_recipe(QUICKSTART, [f"{section}.{typo}=1"])
            checked += 1
    assert checked >= 20


def test_pass_through_options_are_checked_against_the_library_fields():
    def fails(sections, message):
        with pytest.raises(UserError, match=message):
            validate_recipe({**BASE, **sections})

    fails({"training": {"eval_strategy": "no", "trainer_args": {"neftune_noise_alpa": 5}}},
          "trainer_args.neftune_noise_alpa is not an option of transformers's TrainingArguments; did you mean "
          "`neftune_noise_alpha`")
    fails({"training": {"eval_strategy": "no", "trainer_args": {"num_train_epochs": 5}}},
          "trainer_args.num_train_epochs is a recipe key: set training.epochs instead")
    fails({"training": {"eval_strategy": "no", "trainer_args": {"group_by_length": True}}},
          "trainer_args.group_by_length is not an option of transformers's TrainingArguments; it is now a value: "
          "`train_sampling_strategy: group_by_length`")
    fails({"adapter": {"peft_args": {"rank_patern": {"query": 2}}}}, "did you mean `rank_pattern`")
    fails({"adapter": {"peft_args": {"lora_alpha": 2}}}, "set adapter.alpha instead")
    fails({"adapter": {"method": "ia3", "peft_args": {"rank_pattern": {"q": 2}}}}, "not an option of peft's IA3Config")
    fails({"adapter": {"method": "none", "peft_args": {"x": 1}}}, "peft_args needs an adapter method")


def test_overrides_take_raw_text_null_and_switch_methods(tmp_path):
    recipe = load_recipe(QUICKSTART, ["task.text_column=Translate to German: {en}", "data.train.rows=0:970"])
    assert recipe.task.text_column == "Translate to German: {en}"
    assert recipe.data.train.rows == "0:970"  # YAML 1.1 would read 0:970 as a base-60 integer
    assert load_recipe(QUICKSTART, ["adapter.method=none"]).adapter.method == "none"
    ia3 = load_recipe(QUICKSTART, ["adapter.method=ia3"]).adapter
    assert (ia3.method, ia3.r) == ("ia3", 8)
    assert load_recipe(QUICKSTART, ["adapter.method=ia3", "adapter.r=null", "adapter.alpha=null"]).adapter.method == "ia3"
    assert load_recipe(QUICKSTART, ["training.learning_rate=null"]).training.learning_rate == 2e-4  # the default
    (tmp_path / "full.yaml").write_text(f"extends: {QUICKSTART_PATH}\nadapter: {{method: none}}\n")
    assert load_recipe(tmp_path / "full.yaml").adapter.method == "none"  # a later file switches method too
    with pytest.raises(UserError, match="adapter.r applies to method lora / adalora"):
        load_recipe(QUICKSTART, ["adapter.method=ia3", "adapter.r=4"])  # set explicitly with the switch: still an error


def test_peft_args_reach_the_injected_adapter(tiny_bert_dir):
    """rank_pattern and layers_to_transform change which modules get LoRA and at what rank."""
    from transformers import AutoModelForSequenceClassification

    from peftkit.adapters import attach_adapter

    recipe = validate_recipe({
        **BASE, "model": {"name": str(tiny_bert_dir)},
        "adapter": {"r": 8, "target_modules": ["query", "value"],
                    "peft_args": {"rank_pattern": {"value": 2}, "layers_to_transform": [1]}},
    })
    model = attach_adapter(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2), recipe,
                           "SEQ_CLS", ["classifier"])
    ranks = {name: module.weight.shape[0] for name, module in model.named_modules() if name.endswith("lora_A.default")}
    assert ranks == {
        "base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.default": 8,
        "base_model.model.bert.encoder.layer.1.attention.self.value.lora_A.default": 2,
    }


def test_trainer_args_reach_the_trainer(tmp_path):
    """lr_scheduler_kwargs reshapes the schedule; neftune_noise_alpha arms NEFTune; peftkit's own keys are refused."""
    import torch
    from transformers import Trainer

    from peftkit.training.arguments import build_training_args

    def schedule(trainer_args: dict) -> list[float]:
        recipe = validate_recipe({**BASE, "training": {"eval_strategy": "no", "scheduler": "cosine", "warmup_ratio": 0,
                                                       "max_steps": 8, "trainer_args": trainer_args}})
        args = build_training_args(recipe, tmp_path, "loss")
        trainer = Trainer(model=torch.nn.Linear(2, 2), args=args)
        trainer.create_optimizer_and_scheduler(num_training_steps=8)
        rates = []
        for _ in range(8):
            rates.append(trainer.lr_scheduler.get_last_lr()[0])
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
        return rates, args

    plain, _ = schedule({})
    full_cycle, args = schedule({"lr_scheduler_kwargs": {"num_cycles": 1.0}, "neftune_noise_alpha": 5.0})
    # Half-way through 8 steps: a plain cosine is at half the peak, one full cycle (num_cycles 1.0) at its trough.
    assert plain[4] == pytest.approx(plain[0] / 2) and full_cycle[4] == pytest.approx(0, abs=1e-12)
    assert args.neftune_noise_alpha == 5.0
    recipe = validate_recipe({**BASE, "training": {"eval_strategy": "no", "trainer_args": {"output_dir": "x"}}})
    with pytest.raises(UserError, match=r"\['output_dir'\] are set by peftkit"):
        build_training_args(recipe, tmp_path, "loss")


@pytest.mark.parametrize("ratio", [None, 4.0])
def test_loraplus_trains_the_b_matrices_at_the_higher_rate(ratio, tmp_path, sentiment_files, tiny_bert_dir):
    """One AdamW step moves each weight by the learning rate times ~1 (m / sqrt(v) = sign of the gradient), so after
    step 1 LoRA's B matrices (zero at init) hold exactly +-lr, or +-lr x ratio under LoRA+."""
    import torch
    from safetensors.torch import load_file

    from peftkit.training.run import train
    from tests.conftest import classification_recipe

    learning_rate = 1e-3
    recipe = validate_recipe(classification_recipe(
        tiny_bert_dir, {"train": sentiment_files["train"]}, tmp_path / "run",
        adapter={"loraplus_lr_ratio": ratio}, evaluation={"splits": []},
        training={"max_steps": 1, "warmup_ratio": 0.0, "learning_rate": learning_rate, "eval_strategy": "no",
                  "save_strategy": "no"},
    ))
    weights = load_file(str(train(recipe) / "adapter" / "adapter_model.safetensors"))
    b_steps = torch.cat([tensor.flatten().abs() for name, tensor in weights.items() if "lora_B" in name])
    assert b_steps.max().item() == pytest.approx(learning_rate * (ratio or 1), rel=1e-4)


def test_loraplus_is_refused_for_other_methods():
    with pytest.raises(UserError, match="adapter.loraplus_lr_ratio applies to method lora"):
        load_recipe(QUICKSTART, ["adapter.method=ia3", "adapter.loraplus_lr_ratio=16"])
