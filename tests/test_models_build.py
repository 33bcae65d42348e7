"""The one model builder: fresh modules found from the loading report, unloaded backbones and non-causal models refused."""

from __future__ import annotations

import pytest
import torch

from peftkit.errors import UserError
from peftkit.recipe.load import validate_recipe
from tests.support_matrix import build_checkpoint


def _recipe(model_dir, task: str = "classification", **sections):
    return validate_recipe({
        "model": {"name": str(model_dir)}, "task": {"type": task, **({"prompt": "{text}", "response": "{label}"} if task == "causal_lm" else {})},
        "data": {"train": {"path": "unused.jsonl"}}, "training": {"eval_strategy": "no"}, **sections,
    })


@pytest.fixture(scope="module")
def distilbert_dir(tmp_path_factory):
    """A masked-LM checkpoint: its classification model adds `pre_classifier` and `classifier`, both fresh."""
    return build_checkpoint("distilbert", tmp_path_factory.mktemp("distilbert"))


def test_fresh_modules_are_kept_out_of_quantization_and_trained_next_to_all_linear_lora(distilbert_dir):
    from peftkit.adapters import attach_adapter
    from peftkit.models.build import FRESH_MODULES
    from peftkit.tasks import classification

    recipe = _recipe(distilbert_dir, quantization={"bits": 8})
    model = classification.load_model(recipe, {"labels": ["a", "b"]})
    assert getattr(model, FRESH_MODULES) == ["classifier", "pre_classifier"]
    assert type(model.pre_classifier) is torch.nn.Linear  # a random layer is trained, so never quantized
    assert type(model.distilbert.transformer.layer[0].attention.q_lin).__name__ == "Linear8bitLt"
    # "classifier" also names "pre_classifier" for peft; LoRA must not also wrap the module saved whole.
    peft_model = attach_adapter(model, recipe, classification.PEFT_TASK_TYPE, classification.head_modules(model))
    saved = peft_model.peft_config["default"].modules_to_save
    assert {"classifier", "pre_classifier"} <= set(saved)
    assert peft_model.base_model.model.pre_classifier.modules_to_save["default"].weight.requires_grad


def test_a_backbone_the_checkpoint_does_not_fill_is_refused_with_both_prefixes(tmp_path):
    from peftkit.tasks import extractive_qa

    model_dir = build_checkpoint("llama", tmp_path / "llama")
    with pytest.raises(UserError, match=r"expects the backbone under `transformer\.`.*`model\.`"):
        extractive_qa.load_model(_recipe(model_dir, "extractive_qa"), {})


def test_causal_lm_refuses_a_bidirectional_encoder(distilbert_dir, tiny_bert_dir):
    from peftkit.adapters import check_adapter_fits_model
    from peftkit.models.load import load_config

    recipe = _recipe(tiny_bert_dir, "causal_lm")
    with pytest.raises(UserError, match="not a causal"):
        check_adapter_fits_model(recipe, load_config(recipe.model), "CAUSAL_LM")


def test_feature_extraction_adapters_map_to_no_deployable_task():
    from peftkit.tasks import task_for_peft_type

    assert task_for_peft_type("FEATURE_EXTRACTION") is None
    assert task_for_peft_type("SEQ_CLS") == "classification"


def test_ia3_all_linear_falls_back_to_the_models_linear_layers(distilbert_dir):
    from peftkit.adapters import attach_adapter
    from peftkit.tasks import classification

    recipe = _recipe(distilbert_dir, adapter={"method": "ia3"})
    model = classification.load_model(recipe, {"labels": ["a", "b"]})
    peft_model = attach_adapter(model, recipe, classification.PEFT_TASK_TYPE, classification.head_modules(model))
    targets = peft_model.peft_config["default"].target_modules
    assert {"q_lin", "v_lin", "lin2"} <= set(targets)
    assert any("ia3_l" in name for name, _ in peft_model.named_parameters())


def test_a_quantized_base_with_no_layer_quantized_is_refused_and_quantized_ones_are_counted(tmp_path, distilbert_dir):
    """Falcon's linear layers are `FalconLinear`, a subclass that transformers' bitsandbytes integration skips: a
    4-bit recipe would silently train in full precision."""
    from peftkit.adapters import count_parameters
    from peftkit.models.build import quantized_layer_count
    from peftkit.tasks import classification

    falcon_dir = build_checkpoint("falcon", tmp_path / "falcon")
    with pytest.raises(UserError, match=r"quantization.bits: 4: no layer of .* would be quantized: its linear layers "
                                        r"are `FalconLinear`.*Remove quantization.bits"):
        classification.load_model(_recipe(falcon_dir, quantization={"bits": 4}), {"labels": ["a", "b"]})
    model = classification.load_model(_recipe(distilbert_dir, quantization={"bits": 4}), {"labels": ["a", "b"]})
    # 2 layers x (q, k, v, out, 2 feed-forward) linear layers; the fresh head stays in full precision.
    assert quantized_layer_count(model) == count_parameters(model)["quantized_layers"] == 12
    assert "quantized_layers" not in count_parameters(classification.load_model(_recipe(distilbert_dir), {"labels": ["a", "b"]}))


def test_dropout_overrides_reach_the_built_model_and_only_name_dropouts_of_its_config(distilbert_dir):
    from peftkit.models.build import build_model
    from peftkit.tasks import classification
    from transformers import AutoModelForSequenceClassification

    recipe = _recipe(distilbert_dir, model={"name": str(distilbert_dir), "dropout_overrides": {"attention_dropout": 0.0}})
    model = classification.load_model(recipe, {"labels": ["a", "b"]})
    assert model.config.attention_dropout == 0.0 and model.config.dropout == 0.1  # only the named key changes
    assert model.distilbert.transformer.layer[0].attention.dropout.p == 0.0
    meta = build_model(recipe.model, recipe.quantization, AutoModelForSequenceClassification, meta=True)
    assert meta.config.attention_dropout == 0.0  # the planner sees the same model

    with pytest.raises(UserError, match=r"dropout_overrides\.attention_probs_dropout_prob: DistilBertConfig .* "
                       r"its dropout keys are attention_dropout, dropout, qa_dropout, seq_classif_dropout"):
        classification.load_model(
            _recipe(distilbert_dir, model={"name": str(distilbert_dir), "dropout_overrides": {"attention_probs_dropout_prob": 0}}),
            {"labels": ["a", "b"]},
        )
    for overrides, message in [({"rope_theta": 0.5}, "not dropout probabilities"), ({"dropout": 1.0}, "below 1")]:
        with pytest.raises(UserError, match=message):
            _recipe(distilbert_dir, model={"name": str(distilbert_dir), "dropout_overrides": overrides})


@pytest.mark.parametrize("architecture", ["bert", "roberta", "distilbert", "gpt2", "opt", "bart", "marian", "t5", "llama"])
def test_position_limit_is_where_the_model_stops_reading(architecture, tmp_path):
    """Absolute position tables (RoBERTa's starts after its padding row, OPT's and BART's hide an offset) read exactly
    `position_limit` tokens and fail at one more; relative and rotary positions have no limit."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    from peftkit.models.build import position_limit
    from tests.support_matrix import ARCHITECTURES, DECODER, ENCODER

    family = ARCHITECTURES[architecture][0]
    auto_class = {DECODER: AutoModelForCausalLM, ENCODER: AutoModelForMaskedLM}.get(family, AutoModelForSeq2SeqLM)
    model = auto_class.from_pretrained(build_checkpoint(architecture, tmp_path)).eval()
    limit = position_limit(model)

    def reads(tokens: int) -> bool:
        ids = torch.full((1, tokens), 5)
        extra = {"decoder_input_ids": ids} if family not in (DECODER, ENCODER) else {}
        try:
            with torch.no_grad():
                model(input_ids=ids, **extra)
            return True
        except (IndexError, RuntimeError):
            return False

    if architecture in ("t5", "llama"):
        assert limit is None and reads(300)
    else:
        assert limit is not None and reads(limit) and not reads(limit + 1)


def test_training_refuses_rows_longer_than_the_position_table(tmp_path, tiny_bert_dir, sentiment_files):
    """A row longer than BERT's table crashed in its forward pass with a shape error; prompt tuning's virtual tokens
    count too (512 tokens + 20 virtual crashed MiniLM). Short rows under a large max_length still train."""
    from tests.conftest import classification_recipe, run_cli_in_process, write_jsonl, write_recipe

    long_rows = [{"text": " ".join(["good"] * 150), "label": "positive"}, {"text": "bad", "label": "negative"}] * 4
    files = {**sentiment_files, "train": write_jsonl(tmp_path / "long.jsonl", long_rows)}
    recipe = classification_recipe(tiny_bert_dir, files, tmp_path / "run", data={"max_length": 200})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = run_cli_in_process("train", str(path))
    assert result.returncode == 2 and "data.max_length: rows of up to 150 tokens are more than" in result.stderr, result.stderr
    assert "set data.max_length to 128 or less" in result.stderr and not (tmp_path / "run").exists()
    result = run_cli_in_process("train", str(path), "data.max_length=125", "adapter.method=prompt_tuning",
                                "adapter.num_virtual_tokens=10")
    assert result.returncode == 2 and "up to 125 tokens after the 10 virtual tokens" in result.stderr, result.stderr
    assert "set data.max_length to 118 or less" in result.stderr and not (tmp_path / "run").exists()


def test_an_encoder_decoder_reports_each_sides_position_limit():
    """Two warm-started BERTs may differ: the inputs meet the encoder's table, the targets the decoder's."""
    from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel

    from peftkit.models.build import position_limit

    def bert(positions: int, **decoder) -> BertConfig:
        return BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          max_position_embeddings=positions, vocab_size=100, **decoder)

    model = EncoderDecoderModel(EncoderDecoderConfig.from_encoder_decoder_configs(
        bert(128), bert(64, is_decoder=True, add_cross_attention=True)))
    assert (position_limit(model, "encoder"), position_limit(model, "decoder"), position_limit(model)) == (128, 64, 64)
