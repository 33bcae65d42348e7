"""The plan's parameter, gradient and optimizer bytes equal what a real training step allocates (CPU, tiny models)."""

from __future__ import annotations

import pytest
import torch

from peftkit.adapters import attach_adapter
from peftkit.plan.memory import optimizer_state_bytes
from peftkit.plan.shapes import count_parameters, load_model_config
from peftkit.recipe.load import validate_recipe
from peftkit.tasks import get_task
from peftkit.training.arguments import build_training_args

TINY_CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(model_type="mistral", vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1),
    "qwen2": dict(model_type="qwen2", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "gpt2": dict(model_type="gpt2", vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64),
    "bert": dict(model_type="bert", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64),
    "t5": dict(model_type="t5", vocab_size=96, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2,
               num_heads=4, decoder_start_token_id=0),
}


@pytest.fixture(scope="module")
def tiny_model_dirs(tmp_path_factory) -> dict:
    from transformers import AutoConfig, AutoModel

    dirs = {}
    for name, kwargs in TINY_CONFIGS.items():
        directory = tmp_path_factory.mktemp(name)
        config = AutoConfig.for_model(pad_token_id=0, **kwargs)
        torch.manual_seed(0)
        AutoModel.from_config(config).save_pretrained(directory)
        dirs[name] = directory
    return dirs


def tiny_recipe(model_dir, bits=None, method="lora", optimizer="adamw_torch", precision="fp32", **adapter) -> object:
    """`precision` explicit: the plan resolves `auto` for a GPU (bf16), this CPU trains in fp32, and k-bit preparation
    keeps the embeddings in bf16 only under bf16 training."""
    return validate_recipe({
        "model": {"name": str(model_dir)},
        "data": {"train": {"path": "unused.jsonl"}, "max_length": 8},
        "adapter": {"method": method, **({"r": 4, "alpha": 8, "dropout": 0.0} if method != "none" else {}), **adapter},
        "quantization": {"bits": bits},
        "training": {"eval_strategy": "no", "optimizer": optimizer, "batch_size": 2, "precision": precision},
    })


def _storage_bytes(tensors) -> int:
    """Bytes of distinct storages (tensors sharing memory count once)."""
    seen = {}
    for tensor in tensors:
        if torch.is_tensor(tensor):
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


def _parameter_tensors(model):
    for module in model.modules():
        state = getattr(module, "state", None)  # bitsandbytes 8-bit layers move the row scales here on first use
        yield getattr(state, "CB", None)
        yield getattr(state, "SCB", None)
    for param in model.parameters():
        yield param
        state = getattr(param, "quant_state", None)
        if state is not None:
            yield from (state.absmax, state.code, state.offset)
            if state.state2 is not None:
                yield from (state.state2.absmax, state.state2.code)
        if getattr(param, "SCB", None) is not None:
            yield param.SCB


def measure_training_step(recipe, tmp_path) -> dict[str, int]:
    """Load the model the way training does, run one optimizer step, and sum the bytes actually allocated."""
    from transformers import Trainer

    task = get_task(recipe.task.type)
    model = task.load_model(recipe, {"labels": ["a", "b"]})
    model = attach_adapter(model, recipe, task.PEFT_TASK_TYPE, task.head_modules(model))
    trainer = Trainer(model=model, args=build_training_args(recipe, tmp_path, "loss"))
    optimizer = trainer.create_optimizer()
    # token 1 is T5's end of sequence, where its classification head reads
    model(input_ids=torch.tensor([[3, 4, 5, 1], [7, 8, 9, 1]]), labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    trainable = [p for p in model.parameters() if p.requires_grad]
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return {
        "parameters": _storage_bytes(_parameter_tensors(model)),
        # what FSDP/ZeRO-3 neither shard nor offload: the quantization state tensors outside the parameters' storage
        "quantization state": _storage_bytes(t for t in _parameter_tensors(model) if torch.is_tensor(t)
                                             and t.untyped_storage().data_ptr() not in parameter_storages),
        "gradients": _storage_bytes(p.grad for p in trainable),
        "optimizer": _storage_bytes(t for state in optimizer.state.values() for t in state.values()),
    }


def predicted(recipe) -> dict[str, int]:
    counts = count_parameters(recipe)
    return {
        "parameters": counts.frozen_total_bytes + counts.trainable_bytes,
        "quantization state": sum(counts.quant_state_bytes.values()),
        "gradients": counts.trainable_bytes,
        "optimizer": optimizer_state_bytes(counts.trainable, recipe.training.optimizer),
    }


COMBINATIONS = [(bits, method) for bits in (None, 8, 4) for method in ("lora", "none") if not (bits and method == "none")]


@pytest.mark.parametrize("architecture", list(TINY_CONFIGS))
@pytest.mark.parametrize("bits,method", COMBINATIONS)
def test_predicted_bytes_equal_allocated_bytes(tiny_model_dirs, tmp_path, architecture, bits, method):
    recipe = tiny_recipe(tiny_model_dirs[architecture], bits=bits, method=method)
    assert predicted(recipe) == measure_training_step(recipe, tmp_path)


@pytest.mark.parametrize("bits", [4, 8])
def test_plan_counts_bf16_kbit_embeddings_as_training_keeps_them(tiny_model_dirs, tmp_path, bits):
    """Under bf16 training k-bit preparation keeps the frozen embeddings in bf16: the plan counts what training holds."""
    recipe = tiny_recipe(tiny_model_dirs["llama"], bits=bits, precision="bf16")
    assert predicted(recipe) == measure_training_step(recipe, tmp_path)
    assert predicted(recipe)["parameters"] < predicted(tiny_recipe(tiny_model_dirs["llama"], bits=bits))["parameters"]


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"])
def test_optimizer_states_are_exact(tiny_model_dirs, tmp_path, optimizer):
    recipe = tiny_recipe(tiny_model_dirs["llama"], bits=4, optimizer=optimizer, r=64)
    assert predicted(recipe) == measure_training_step(recipe, tmp_path)


def test_builtin_shapes_count_published_parameter_totals():
    """Full fine-tuning of the built-in causal LM shapes counts the parameters their model cards state."""
    expected = {"meta-llama/Llama-3.1-8B": 8_030_261_248, "Qwen/Qwen2-7B": 7_615_616_512, "Mistral-7B-v0.1": 7_241_732_096}
    for name, total in expected.items():
        recipe = validate_recipe({
            "model": {"name": name}, "data": {"train": {"path": "x.jsonl"}}, "adapter": {"method": "none"},
            "training": {"eval_strategy": "no"},
        })
        assert load_model_config(recipe.model).model_type in ("llama", "qwen2", "mistral")
        counts = count_parameters(recipe)
        # classification swaps the 1-row-per-token LM head for a 2-label score head
        dims = counts.dims
        assert counts.trainable_numel - 2 * dims["hidden"] + dims["vocab"] * dims["hidden"] == total
