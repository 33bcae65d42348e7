"""Adapter methods x quantization: every valid combination trains and reloads exactly; invalid ones exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import FILLER_WORDS, REPO_ROOT, classification_recipe, run_cli, run_cli_in_process, sentiment_rows, write_jsonl, write_recipe
from peft import AdaLoraConfig, IA3Config, LoraConfig, PeftModel, PromptEncoderConfig, PromptTuningConfig

from peftkit.adapters import build_peft_config
from peftkit.recipe.load import validate_recipe

# Every valid single-process combination on classification: (name, adapter section, quantization bits, model).
# Prompt methods run on the encoder: a decoder classifier is rejected for them (test below).
METHODS = {
    "lora": ({"method": "lora", "r": 4}, "llama"),
    "adalora": ({"method": "adalora", "r": 2, "adalora_init_r": 4}, "llama"),
    "ia3": ({"method": "ia3"}, "llama"),
    "prompt_tuning": ({"method": "prompt_tuning", "num_virtual_tokens": 4}, "bert"),
    "p_tuning": ({"method": "p_tuning", "num_virtual_tokens": 4}, "bert"),
}
LORA_VARIANTS = {
    "dora": {"method": "lora", "r": 4, "use_dora": True},
    "rslora": {"method": "lora", "r": 4, "use_rslora": True},
    "gaussian": {"method": "lora", "r": 4, "init": "gaussian"},
    "pissa": {"method": "lora", "r": 4, "init": "pissa"},
    "olora": {"method": "lora", "r": 4, "init": "olora"},
    "pissa-dora": {"method": "lora", "r": 4, "init": "pissa", "use_dora": True},
}
COMBINATIONS = (
    [(name, adapter, bits, model) for name, (adapter, model) in METHODS.items() for bits in (None, 8, 4)]
    + [(name, adapter, None, "llama") for name, adapter in LORA_VARIANTS.items()]
    + [("dora", LORA_VARIANTS["dora"], 4, "llama"), ("rslora", LORA_VARIANTS["rslora"], 8, "llama"),
       ("full", {"method": "none"}, None, "llama"), ("full", {"method": "none"}, None, "bert")]
)


@pytest.fixture(scope="module", autouse=True)
def eager_bitsandbytes():
    """bitsandbytes' CPU kernels torch.compile every weight shape; compiling costs more than tiny models ever run."""
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = False


def rows_of_varied_length(count: int, seed: int) -> list[dict]:
    """Sentiment rows with 0-2 filler words dropped, so that batches need padding."""
    rows = sentiment_rows(count, seed)
    for i, row in enumerate(rows):
        words = row["text"].split()
        dropped = [word for word in words if word in FILLER_WORDS][: i % 3]
        row["text"] = " ".join(word for word in words if word not in dropped)
    return rows


@pytest.fixture(scope="module")
def small_files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("sentiment-small")
    return {
        "train": write_jsonl(folder / "train.jsonl", rows_of_varied_length(48, seed=1)),
        "test": write_jsonl(folder / "test.jsonl", rows_of_varied_length(8, seed=3)),
    }


def quick_recipe(model_dir, files, run_dir, adapter: dict, bits: int | None, steps: int = 2, **sections) -> dict:
    """A few optimizer steps, no periodic evaluation: enough to change weights and write every artifact."""
    recipe = classification_recipe(
        model_dir, files, run_dir,
        training={"max_steps": steps, "batch_size": 4, "eval_batch_size": 8, "eval_strategy": "no",
                  "save_strategy": "no", "logging_steps": 1},
        evaluation={"splits": ["test"], "worst_examples": 0},
        quantization={"bits": bits},
        **sections,
    )
    recipe["adapter"] = adapter
    return recipe


def reloaded_probabilities(run_dir, model_dir, recipe) -> torch.Tensor:
    """Probabilities of each run's predicted label, recomputed from the saved folder with plain peft/transformers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from peftkit.models.quantization import build_quantization_config
    from peftkit.tasks.classification import HEAD_NAMES

    adapter_dir = run_dir / "adapter"
    if recipe.adapter.method == "none":
        model = AutoModelForSequenceClassification.from_pretrained(adapter_dir)
    else:
        quantization = build_quantization_config(recipe.quantization, list(HEAD_NAMES))
        base = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=2, dtype=torch.float32, quantization_config=quantization
        )
        if quantization is not None:
            # As peftkit does (bitsandbytes' own switch): no lossy bf16 repack of 4-bit weights in eval on CPUs
            # with AVX512-BF16, which alone moves probabilities by ~1e-3.
            for module in base.modules():
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = False
        model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    collate = DataCollatorWithPadding(tokenizer)
    encoded = [tokenizer(r["text"]) for r in records]
    with torch.no_grad():
        probabilities = model(**collate(encoded)).logits.softmax(-1)
        # Each example alone (no padding) must score as in the padded batch, for every method: a decoder's head
        # reads the last position, which must be a real token (left padding), also for prompt methods.
        alone = torch.cat([model(**collate([example])).logits.softmax(-1) for example in encoded])
    torch.testing.assert_close(alone, probabilities, atol=1e-5, rtol=0)
    labels = json.loads((run_dir / "task.json").read_text())["labels"]
    return probabilities[torch.arange(len(records)), [labels.index(r["predicted"]) for r in records]]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,adapter,bits,model", COMBINATIONS, ids=[f"{n}-{b or 32}bit-{m}" for n, _, b, m in COMBINATIONS]
)
def test_method_trains_and_reloads_identically(name, adapter, bits, model, small_files, tmp_path, request):
    from peftkit.training.run import train

    model_dir = request.getfixturevalue(f"tiny_{model}_dir")
    recipe = validate_recipe(quick_recipe(model_dir, small_files, tmp_path / "run", adapter, bits))
    run_dir = train(recipe)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 2
    assert metrics["setup"]["quantization_bits"] == bits
    assert metrics["setup"]["kbit_preparation"] is (bits is not None)
    assert metrics["setup"]["gradient_checkpointing"] is (bits is not None)
    assert json.loads((run_dir / "manifest.json").read_text())["setup"] == metrics["setup"]
    trainable, total = metrics["parameters"]["trainable"], metrics["parameters"]["total"]
    assert (trainable == total) if name == "full" else (0 < trainable < total / 2)

    expected = torch.tensor([json.loads(line)["probability"] for line in (run_dir / "predictions.jsonl").read_text().splitlines()])
    torch.testing.assert_close(reloaded_probabilities(run_dir, model_dir, recipe), expected, atol=2e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_prompt_methods_on_a_decoder_classifier_exit_2_before_loading(method, tiny_llama_dir, small_files, tmp_path):
    """The decoder's head reads the last position; with embeddings-only input it cannot skip padding."""
    adapter = {"method": method, "num_virtual_tokens": 4}
    path = write_recipe(tmp_path / "r.yaml", quick_recipe(tiny_llama_dir, small_files, tmp_path / "run", adapter, None))
    result = run_cli_in_process("train", str(path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"adapter.method: {method} cannot classify with the decoder-only model" in result.stderr
    assert "use lora, adalora or ia3" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option", [{"dropout": 0.05}, {"dropout": 0.0, "use_dora": True}])
def test_a_mixture_of_experts_adapter_peft_cannot_add_exits_2_with_the_fix(option, tiny_mixtral_dir, small_files,
                                                                           tmp_path):
    """all-linear reaches a mixture-of-experts model's fused expert weights through peft's parameter wrapper, which
    takes neither dropout (peftkit's default 0.05) nor DoRA: peft's ValueError reaches the user as exit 2 with the
    settings that work, not a traceback; with them, LoRA trains the experts."""
    adapter = {"method": "lora", "r": 4, "alpha": 8, **option}
    path = write_recipe(tmp_path / "r.yaml", quick_recipe(tiny_mixtral_dir, small_files, tmp_path / "run", adapter, None))
    result = run_cli_in_process("train", str(path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "peft cannot add this lora adapter to" in result.stderr and "(mixtral)" in result.stderr
    assert "set adapter.dropout: 0 (and adapter.use_dora: false)" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()
    adapter.update(dropout=0.0, use_dora=False)
    path = write_recipe(tmp_path / "r.yaml", quick_recipe(tiny_mixtral_dir, small_files, tmp_path / "run", adapter, None))
    assert run_cli_in_process("train", str(path)).returncode == 0
    trained = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert any("experts" in name for name in trained), sorted(trained)


@pytest.mark.slow
def test_adalora_reallocates_ranks_during_training(tiny_llama_dir, small_files, tmp_path):
    """Ranks start at adalora_init_r everywhere and end unequal, averaging the target r (peft's budget)."""

    from peftkit.training.run import train

    adapter = {"method": "adalora", "r": 2, "adalora_init_r": 6, "adalora_warmup": 0.2, "adalora_final": 0.2}
    recipe = validate_recipe(quick_recipe(tiny_llama_dir, small_files, tmp_path / "run", adapter, None, steps=10))
    run_dir = train(recipe)

    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    ranks = config["rank_pattern"]
    assert ranks, "the final allocation must be recorded in the saved config"
    kept = {name: sum(flags) for name, flags in ranks.items()}
    assert len(set(kept.values())) > 1, f"ranks did not differ between modules: {kept}"
    assert sum(kept.values()) == 2 * len(kept)
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    lora_e = [key for key in weights if key.endswith("lora_E")]
    assert sorted(weights[key].shape[0] for key in lora_e) == sorted(kept.values())


def test_peft_configs_carry_the_recipe():
    def config(adapter: dict):
        recipe = validate_recipe({"model": {"name": "m"}, "data": {"train": {"path": "t.jsonl"}}, "adapter": adapter,
                                  "training": {"eval_strategy": "no"}})
        return build_peft_config(recipe, "SEQ_CLS", ["score"])

    lora = config({"method": "lora", "r": 16, "use_dora": True, "use_rslora": True, "init": "olora"})
    assert isinstance(lora, LoraConfig) and lora.use_dora and lora.use_rslora
    assert (lora.r, lora.init_lora_weights, lora.modules_to_save) == (16, "olora", ["score"])
    assert config({"method": "lora", "init": "gaussian"}).init_lora_weights == "gaussian"
    adalora = config({"method": "adalora", "r": 4, "adalora_init_r": 8, "adalora_interval": 3})
    assert isinstance(adalora, AdaLoraConfig) and (adalora.target_r, adalora.init_r, adalora.deltaT) == (4, 8, 3)
    ia3 = config({"method": "ia3"})
    assert isinstance(ia3, IA3Config) and ia3.target_modules is None  # peft's per-architecture defaults
    assert config({"method": "ia3", "target_modules": ["v_proj"]}).target_modules == {"v_proj"}
    prompt = config({"method": "prompt_tuning", "num_virtual_tokens": 7})
    assert isinstance(prompt, PromptTuningConfig) and prompt.num_virtual_tokens == 7
    assert isinstance(config({"method": "p_tuning"}), PromptEncoderConfig)
    assert config({"method": "none"}) is None


INVALID = {
    "full-4bit": ({"adapter": {"method": "none"}, "quantization": {"bits": 4}}, "quantization.bits needs an adapter"),
    "pissa-4bit": ({"adapter": {"method": "lora", "init": "pissa"}, "quantization": {"bits": 4}},
                   "init: pissa rewrites the base weights"),
    "olora-8bit": ({"adapter": {"method": "lora", "init": "olora"}, "quantization": {"bits": 8}},
                   "init: olora rewrites the base weights"),
    "loftq-unquantized": ({"adapter": {"method": "lora", "init": "loftq"}}, "needs quantization.bits: 4"),
    "loftq-8bit": ({"adapter": {"method": "lora", "init": "loftq"}, "quantization": {"bits": 8}}, "(got 8)"),
    "prefix-classification": ({"adapter": {"method": "prefix_tuning"}}, "prefix_tuning does not work for task classification"),
    "adalora-preference": ({"adapter": {"method": "adalora"}, "task": {"type": "preference"}},
                           "adalora does not work for task preference"),
    "dora-on-ia3": ({"adapter": {"method": "ia3", "use_dora": True}}, "adapter.use_dora applies to method lora, not `ia3`"),
    "rank-on-prompt": ({"adapter": {"method": "prompt_tuning", "r": 4}}, "adapter.r applies to method lora / adalora"),
    "adalora-init-below-r": ({"adapter": {"method": "adalora", "r": 8, "adalora_init_r": 4}}, "must be at least adapter.r"),
}


@pytest.mark.parametrize("sections,message", INVALID.values(), ids=INVALID.keys())
def test_invalid_combinations_exit_2_with_what_would_work(sections, message, tmp_path):
    recipe = {"model": {"name": str(tmp_path / "never-loaded")}, "data": {"train": {"path": "t.jsonl"}},
              "training": {"eval_strategy": "no"}, **sections}
    result = run_cli("train", str(write_recipe(tmp_path / "r.yaml", recipe)), timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_bits_none_means_unquantized():
    recipe = validate_recipe({"model": {"name": "m"}, "data": {"train": {"path": "t.jsonl"}},
                              "quantization": {"bits": "none"}, "training": {"eval_strategy": "no"}})
    assert recipe.quantization.bits is None


@pytest.mark.slow
def test_loftq_without_a_gpu_is_a_user_error(tiny_llama_dir, small_files, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("LoftQ runs on CUDA machines")
    adapter = {"method": "lora", "r": 4, "init": "loftq"}
    path = write_recipe(tmp_path / "r.yaml", quick_recipe(tiny_llama_dir, small_files, tmp_path / "run", adapter, 4))
    result = run_cli_in_process("train", str(path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "loftq is computed by peft on a CUDA GPU" in result.stderr
    assert not (tmp_path / "run").exists()


def test_qlora_fragment_turns_on_4bit_kbit_preparation_and_checkpointing(tmp_path):
    from peftkit.recipe.load import load_recipe
    from peftkit.training.arguments import training_setup

    fragment = REPO_ROOT / "recipes" / "fragments" / "qlora.yaml"
    recipe_file = write_recipe(tmp_path / "r.yaml", {
        "extends": [str(fragment)], "model": {"name": "m"}, "data": {"train": {"path": "t.jsonl"}},
        "training": {"eval_strategy": "no"},
    })
    recipe = load_recipe(recipe_file, ["quantization.compute_dtype=float32"])
    quantization = recipe.quantization
    assert (quantization.bits, quantization.quant_type, quantization.double_quant) == (4, "nf4", True)
    assert (recipe.adapter.method, recipe.adapter.target_modules) == ("lora", "all-linear")
    setup = training_setup(recipe)
    assert setup["kbit_preparation"] and setup["gradient_checkpointing"]
    assert not training_setup(load_recipe(recipe_file, ["training.gradient_checkpointing=false"]))["gradient_checkpointing"]


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3", "prompt_tuning", "none"])
def test_a_dumped_recipe_validates_again(method):
    """Run folders store the fully resolved recipe, every adapter option included; it must load back."""
    recipe = validate_recipe({"model": {"name": "m"}, "data": {"train": {"path": "t.jsonl"}},
                              "adapter": {"method": method}, "training": {"eval_strategy": "no"}})
    assert validate_recipe(recipe.model_dump(mode="json")) == recipe


def test_prefix_tuning_turns_gradient_checkpointing_off_and_refuses_it_when_asked(tiny_llama_dir):
    """Checkpointed layers recompute without the prefix's key/value cache (a size mismatch inside the model)."""
    from peftkit.adapters import check_adapter_fits_model
    from peftkit.errors import UserError
    from peftkit.models.load import load_config
    from peftkit.recipe.load import validate_recipe
    from peftkit.recipe.resolved import resolve_gradient_checkpointing

    def recipe(**training):
        return validate_recipe({
            "model": {"name": str(tiny_llama_dir)}, "task": {"type": "causal_lm", "prompt": "{q}", "response": "{a}"},
            "data": {"train": {"path": "t.jsonl"}}, "adapter": {"method": "prefix_tuning"},
            "quantization": {"bits": 4}, "training": {"eval_strategy": "no", **training},
        })

    assert resolve_gradient_checkpointing(recipe()) is False
    asked = recipe(gradient_checkpointing=True)
    with pytest.raises(UserError, match="training.gradient_checkpointing"):
        check_adapter_fits_model(asked, load_config(asked.model), "CAUSAL_LM")


def test_qlora_with_bf16_embeddings_trains_under_bf16_autocast(tiny_llama_dir, small_files, tmp_path):
    """k-bit preparation leaves the frozen embeddings in bf16 next to float32 norms and a float32 trained head under
    bf16 training (tests/test_quantization.py): the mixed dtypes that autocast must reconcile train end to end."""
    from peftkit.training.run import train

    recipe = quick_recipe(tiny_llama_dir, small_files, tmp_path / "run", {"method": "lora", "r": 4, "alpha": 8}, 4)
    recipe["model"]["dtype"] = recipe["quantization"]["compute_dtype"] = "bfloat16"
    recipe["training"]["precision"] = "bf16"
    run_dir = train(validate_recipe(recipe))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 2 and metrics["setup"]["precision"] == "bf16"
    assert metrics["setup"]["kbit_preparation"] and torch.isfinite(torch.tensor(metrics["train"]["train_loss"]))


def test_all_linear_leaves_out_the_layers_peft_refuses_on_mamba():
    """peft refuses LoRA on Mamba's out_proj (its fused kernels read the weight directly), so the default
    `target_modules: all-linear` made every Mamba LoRA run exit 2; it now adapts every other linear layer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftkit.adapters import attach_adapter
    from peftkit.recipe.load import validate_recipe

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "mamba", vocab_size=32, hidden_size=16, num_hidden_layers=1, state_size=4, intermediate_size=32))
    recipe = validate_recipe({"model": {"name": "tiny-mamba"}, "task": {"type": "causal_lm"},
                              "data": {"train": {"path": "t.jsonl"}}, "training": {"eval_strategy": "no"}})
    model = attach_adapter(model, recipe, "CAUSAL_LM")
    adapted = {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"in_proj", "x_proj", "dt_proj"}
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model(input_ids=ids, labels=ids).loss.backward()
    # Mamba's own code multiplies by dt_proj's weight instead of calling the layer, so that adapter stays at its
    # zero start (training, eval and merge still agree); the others learn.
    learning = {name.split(".")[-4] for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert learning == {"in_proj", "x_proj"}


def test_ia3_without_peft_defaults_scales_every_linear_layer_but_the_output_head():
    """peft has no IA3 targets for BioGPT, so every linear layer is scaled; its LM head is `output_projection`, tied
    to the input embeddings: adapted, TRL refused the model and a merge scaled the embeddings too (the merge check
    refused it: outputs differed by 1.7e-3)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftkit.adapters import attach_adapter
    from peftkit.recipe.load import validate_recipe

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "biogpt", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    recipe = validate_recipe({"model": {"name": "tiny-biogpt"}, "task": {"type": "causal_lm"}, "adapter": {"method": "ia3"},
                              "data": {"train": {"path": "t.jsonl"}}, "training": {"eval_strategy": "no"}})
    model = attach_adapter(model, recipe, "CAUSAL_LM")
    adapted = {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "ia3_l")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "ia3_l" in name:
                parameter.uniform_(0.5, 1.5)
    model.eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    attached = model(input_ids=ids).logits
    merged = model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged, attached, rtol=0, atol=1e-5)


def test_adalora_rank_allocation_survives_an_adapted_module_the_forward_never_reaches():
    """BigBird's classifier reads the sequence, not the pooler, so an adapted pooler has no gradient: peft's
    sensitivity update multiplied by None and every such AdaLoRA run crashed after its first optimizer step."""
    from types import SimpleNamespace

    from peft import get_peft_model

    from peftkit.adapters import AdaLoraRankAllocation

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = get_peft_model(Toy(), AdaLoraConfig(target_modules=["used", "unused"], init_r=4, target_r=2, total_step=10,
                                                tinit=0, tfinal=0))
    with torch.no_grad():  # AdaLoRA starts with zero singular values: no importance anywhere yet
        for name, parameter in model.named_parameters():
            if "lora_E" in name:
                parameter.fill_(0.5)
    model(torch.randn(4, 8)).pow(2).sum().backward()
    callback = AdaLoraRankAllocation(adapter=None)
    callback.on_optimizer_step(None, SimpleNamespace(global_step=1), None, model=model)
    allocator = model.base_model.rankallocator
    unused = [name for name in allocator.ipt if name.split(".")[-3] == "unused"]
    used = [name for name in allocator.ipt if name.split(".")[-3] == "used"]
    assert unused and all(allocator.ipt[name].abs().sum() == 0 for name in unused)
    assert any(allocator.ipt[name].abs().sum() > 0 for name in used)
