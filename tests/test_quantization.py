"""Quantization of the frozen base: which layers bitsandbytes replaces and which stay in full precision."""

from __future__ import annotations

import pytest
import torch

from peftkit.recipe.load import validate_recipe


def recipe_for(model_dir, **quantization):
    return validate_recipe({"model": {"name": str(model_dir)}, "data": {"train": {"path": "t.jsonl"}},
                            "training": {"eval_strategy": "no"}, "quantization": quantization})


def _build(recipe, auto_class, **kwargs):
    from peftkit.models.build import build_model

    return build_model(recipe.model, recipe.quantization, auto_class, **kwargs)


@pytest.mark.parametrize("bits,layer_class", [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_heads_and_lm_head_stay_unquantized(bits, layer_class, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    classifier = _build(recipe_for(tiny_llama_dir, bits=bits), AutoModelForSequenceClassification,
                        keep_unquantized=["score"], model_kwargs={"num_labels": 3})
    assert type(classifier.model.layers[0].self_attn.q_proj).__name__ == layer_class
    assert type(classifier.score) is torch.nn.Linear and classifier.score.weight.dtype == torch.float32
    # A task that names its own head must not lose transformers' protection of the LM output layer.
    decoder = _build(recipe_for(tiny_llama_dir, bits=bits), AutoModelForCausalLM, keep_unquantized=["score"])
    assert type(decoder.lm_head) is torch.nn.Linear
    assert type(decoder.model.layers[1].mlp.down_proj).__name__ == layer_class


@pytest.mark.parametrize("model_type", ["longt5", "switch_transformers"])
def test_layers_whose_dtype_the_model_casts_to_stay_unquantized(model_type, tmp_path):
    """LongT5 and SwitchTransformers cast the feed-forward's activations to `wo.weight.dtype` (as T5 does, without
    T5's `_keep_in_fp32_modules`): a 4-bit `wo` is uint8 storage, and the forward failed ("Float can't be cast to
    Byte"). `wo` now stays in full precision, read from the model's code; the rest is quantized."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.for_model(model_type, vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                  num_decoder_layers=1, num_heads=2, num_experts=2, pad_token_id=0,
                                  decoder_start_token_id=0)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(tmp_path)
    model = _build(recipe_for(tmp_path, bits=4), AutoModelForSeq2SeqLM)
    layers = {name.split(".")[-1]: type(module).__name__ for name, module in model.named_modules()
              if name.endswith((".wo", ".wi", ".q"))}
    assert layers == {"wo": "Linear", "wi": "Linear4bit", "q": "Linear4bit"}
    ids = torch.tensor([[5, 6, 7, 1]])
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("tied", [True, False])
def test_output_layers_stay_unquantized_whatever_their_name(tied, tmp_path):
    """transformers keeps the output embeddings unquantized only when given no skip list; peftkit always gives one.
    BioGPT's head is `output_projection`: tied to the input embeddings and quantized, the first step failed inside
    bitsandbytes (the tied weight is not 4-bit data); untied, it was quantized silently."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("biogpt", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=tied)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = _build(recipe_for(tmp_path, bits=4), AutoModelForCausalLM, keep_unquantized=["lm_head"])
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    assert any(type(module).__name__ == "Linear4bit" for module in model.modules())
    ids = torch.tensor([[5, 6, 7, 1]])
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_four_bit_settings_reach_bitsandbytes(tiny_llama_dir):
    from peftkit.models.quantization import build_quantization_config

    config = build_quantization_config(
        recipe_for(tiny_llama_dir, bits=4, quant_type="fp4", double_quant=False, compute_dtype="bfloat16").quantization, ["score"]
    )
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == ("fp4", False)
    assert config.bnb_4bit_compute_dtype == torch.bfloat16 and config.load_in_4bit
    assert config.llm_int8_skip_modules == ["lm_head", "score"]
    assert build_quantization_config(recipe_for(tiny_llama_dir).quantization) is None


def test_t5_classification_head_stays_unquantized_trains_and_is_saved(tiny_t5_dir, tmp_path):
    """T5/BART call their head `classification_head`: kept out of 4-bit, trained fully, saved with the adapter."""
    from safetensors.torch import load_file

    from peftkit.adapters import attach_adapter
    from peftkit.tasks import classification

    recipe = validate_recipe({
        "model": {"name": str(tiny_t5_dir)}, "data": {"train": {"path": "t.jsonl"}}, "training": {"eval_strategy": "no"},
        "quantization": {"bits": 4}, "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
    })
    model = classification.load_model(recipe, {"labels": ["a", "b"]})
    assert type(model.transformer.encoder.block[0].layer[0].SelfAttention.q).__name__ == "Linear4bit"
    assert type(model.classification_head.out_proj) is torch.nn.Linear
    assert classification.head_modules(model) == ["classification_head"]
    model = attach_adapter(model, recipe, classification.PEFT_TASK_TYPE, classification.head_modules(model))
    head = model.base_model.model.classification_head.modules_to_save["default"].out_proj.weight
    before = head.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    eos = model.config.eos_token_id  # T5's head reads the end-of-sequence position
    model(input_ids=torch.tensor([[7, 8, 9, eos], [10, 11, 12, eos]]), labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    assert not torch.equal(head.detach(), before)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert torch.equal(saved["base_model.model.classification_head.out_proj.weight"], head.detach())


def _quantized_state_hash(model) -> str:
    """Hash of every 4-bit weight as stored and of its quantization state (scales, nested scales, code)."""
    import hashlib

    from bitsandbytes.nn import Linear4bit

    digest = hashlib.sha256()
    for name, module in sorted(model.named_modules(), key=lambda item: item[0]):
        if isinstance(module, Linear4bit):
            digest.update(name.encode() + module.weight.data.contiguous().view(torch.uint8).numpy().tobytes())
            for key, value in sorted(module.weight.quant_state.as_dict(packed=True).items()):
                digest.update(key.encode() + value.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_frozen_4bit_base_is_bit_identical_after_evaluation_and_saving(tiny_llama_dir):
    """bitsandbytes repacks a 4-bit weight (bf16 scales, double quantization undone) at its first eval-mode
    forward on CPUs with AVX512-BF16 and re-quantizes the scales at each save: the frozen base drifted during a
    run with periodic evaluation, and a resumed run started from another base. peftkit keeps the layout fixed."""
    from bitsandbytes.functional import has_avx512bf16
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    model = _build(recipe_for(tiny_llama_dir, bits=4), AutoModelForCausalLM)
    inputs = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])

    def evaluate_and_save():
        model.eval()
        with torch.no_grad():
            logits = model(inputs).logits
        model.state_dict()  # what every checkpoint save runs (Linear4bit._save_to_state_dict)
        model.train()
        return logits

    before = _quantized_state_hash(model)
    first = evaluate_and_save()
    assert _quantized_state_hash(model) == before
    torch.testing.assert_close(evaluate_and_save(), first, rtol=0, atol=0)
    assert _quantized_state_hash(model) == before
    if has_avx512bf16():  # the hash sees the repack: with bitsandbytes' default the state changes
        for module in model.modules():
            if isinstance(module, Linear4bit):
                module.support_avx512bf16_for_cpu = True
        evaluate_and_save()
        assert _quantized_state_hash(model) != before


@pytest.mark.parametrize("model_dtype,precision,upcast,kept", [
    ("bfloat16", "bf16", False, torch.bfloat16), ("float32", "bf16", False, torch.bfloat16),
    ("bfloat16", "bf16", True, torch.float32), ("bfloat16", "fp32", False, torch.float32),
])
def test_kbit_preparation_keeps_frozen_embeddings_and_lm_head_in_bf16_under_bf16_training(
    model_dtype, precision, upcast, kept, tiny_llama_dir
):
    """Under bf16 training the frozen embeddings and LM head are bf16 whatever the loaded dtype (autocast computes the
    head in bf16 anyway); norms and trained heads get float32 as in peft's preparation, fp32 training upcasts all."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from peftkit.adapters import attach_adapter

    recipe = validate_recipe({
        "model": {"name": str(tiny_llama_dir), "dtype": model_dtype}, "data": {"train": {"path": "t.jsonl"}},
        "training": {"eval_strategy": "no", "precision": precision},
        "quantization": {"bits": 4, "compute_dtype": "bfloat16", "upcast_embeddings": upcast},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
    })
    decoder = attach_adapter(_build(recipe, AutoModelForCausalLM), recipe, "CAUSAL_LM").get_base_model()
    assert decoder.model.embed_tokens.weight.dtype == kept and decoder.lm_head.weight.dtype == kept
    assert decoder.model.norm.weight.dtype == torch.float32
    assert decoder.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert decoder.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    frozen = [name for name, param in decoder.named_parameters() if not param.requires_grad]
    assert "model.embed_tokens.weight" in frozen and "lm_head.weight" in frozen

    classifier = _build(recipe, AutoModelForSequenceClassification, keep_unquantized=["score"], model_kwargs={"num_labels": 2})
    classifier = attach_adapter(classifier, recipe, "SEQ_CLS", ["score"]).get_base_model()
    assert classifier.model.embed_tokens.weight.dtype == kept
    assert classifier.score.modules_to_save["default"].weight.dtype == torch.float32  # trained: float32 master weights
    assert classifier.score.modules_to_save["default"].weight.requires_grad


def test_a_model_without_gradient_checkpointing_is_told_to_turn_it_off(tmp_path_factory, sentiment_files, tmp_path):
    """A quantized base turns gradient checkpointing on by default, which transformers does not implement for ALBERT
    (or MPNet): exit 2 naming the class and the fix before training, not the Trainer's traceback; the fix trains."""
    from transformers import AlbertConfig, AlbertModel

    from tests.conftest import _tiny_checkpoint, classification_recipe, run_cli_in_process, write_recipe

    albert = _tiny_checkpoint(tmp_path_factory, "tiny-albert", AlbertModel, AlbertConfig, embedding_size=32,
                              hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                              max_position_embeddings=128)
    recipe = classification_recipe(albert, sentiment_files, tmp_path / "run", quantization={"bits": 4},
                                   training={"max_steps": 1, "eval_strategy": "no", "save_strategy": "no"})
    result = run_cli_in_process("train", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert result.returncode == 2, result.stderr[-2000:]
    assert ("training.gradient_checkpointing is on by default for a quantized base, but transformers has no gradient "
            "checkpointing for AlbertForSequenceClassification") in result.stderr
    assert "set training.gradient_checkpointing: false" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
    recipe["training"].update(gradient_checkpointing=False)
    result = run_cli_in_process("train", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert result.returncode == 0, result.stderr[-2000:]
