"""The memory-efficient language-model loss equals transformers' loss and gradients, or steps aside."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, Gemma2Config, Gemma2ForCausalLM

from peftkit.errors import UserError
from peftkit.tasks import lm_loss
from peftkit.tasks.lm_loss import EfficientLMLoss, chunked_linear_cross_entropy


def _batch(vocab: int, rows: int = 3, length: int = 11, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (rows, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompt tokens
    labels[-1, -3:] = -100  # padding
    return {"input_ids": input_ids, "attention_mask": (labels[:, :] != -200).long(), "labels": labels}


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def assert_same_loss_and_gradients(model, batch: dict, num_items_in_batch=None, kernel: str = "chunked",
                                   placeholder_logits: bool = True) -> None:
    model.eval()  # dropout off (T5 has some), so both forwards are the same function; gradients still flow
    parameters = _trainable(model)
    reference = model(**batch, **({"num_items_in_batch": num_items_in_batch} if num_items_in_batch else {})).loss
    expected = torch.autograd.grad(reference, list(parameters.values()))
    computed = EfficientLMLoss.for_model(model, kernel).loss(model, batch, num_items_in_batch)
    assert computed is not None
    loss, outputs = computed
    gradients = torch.autograd.grad(loss, list(parameters.values()))
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for name, want, got in zip(parameters, expected, gradients):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    if placeholder_logits:
        assert outputs.logits.stride()[-1] == 0  # the vocabulary-wide logits were never allocated


def test_chunked_kernel_matches_cross_entropy_across_chunks(monkeypatch):
    monkeypatch.setattr(lm_loss, "MIN_CHUNK", 8)
    # chunk logits about the size of the hidden states: 150 tokens in chunks of 64 (and a remainder)
    assert lm_loss.chunk_tokens(150, 50, 16) == 64 and lm_loss.chunk_tokens(2048, 49152, 576) == 32
    torch.manual_seed(0)
    hidden = torch.randn(150, 16, requires_grad=True)
    weight, bias = torch.randn(50, 16, requires_grad=True), torch.randn(50, requires_grad=True)
    targets = torch.randint(0, 50, (150,))
    reference = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, bias), targets, reduction="sum")
    loss = chunked_linear_cross_entropy(hidden, weight, bias, targets)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for want, got in zip(torch.autograd.grad(2 * reference, (hidden, weight, bias)),
                         torch.autograd.grad(2 * loss, (hidden, weight, bias))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("items", [None, 17])
def test_causal_lm_lora_loss_and_gradients_equal_the_standard_loss(tiny_llama_dir, items):
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                           LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"))
    for name, parameter in model.named_parameters():  # B = 0 at init would make most gradients trivially zero
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    batch = _batch(model.config.vocab_size)
    assert_same_loss_and_gradients(model, batch, None if items is None else torch.tensor(items))


def test_packed_rows_and_a_fully_trained_head(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)  # full fine-tuning: the head's weight gets gradients
    batch = _batch(model.config.vocab_size, rows=1, length=24)
    del batch["attention_mask"]
    batch["position_ids"] = torch.tensor([list(range(10)) + list(range(14))])
    batch["labels"][0, 10] = -100  # an example's first token is never predicted from the previous example
    assert_same_loss_and_gradients(model, batch)


def test_prompt_tuning_virtual_tokens_are_not_labelled(tiny_llama_dir):
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                           PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"))
    assert_same_loss_and_gradients(model, _batch(model.config.vocab_size))


def test_seq2seq_loss_builds_decoder_inputs_from_labels(tiny_t5_dir):
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir),
                           LoraConfig(r=4, target_modules=["q", "v", "wo"], lora_dropout=0.0, task_type="SEQ_2_SEQ_LM"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    batch = _batch(model.config.vocab_size, length=9)
    batch["labels"] = batch["labels"][:, 3:].contiguous()  # targets of their own length
    assert_same_loss_and_gradients(model, batch)


@pytest.mark.parametrize("model_type", ["m2m_100", "blenderbot"])
def test_seq2seq_models_that_shift_labels_only_inside_their_forward(model_type):
    """M2M100 (NLLB) and Blenderbot have no `prepare_decoder_input_ids_from_labels`: their decoder inputs are built
    from the config as their own forward builds them (this crashed training before)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, vocab_size=48, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=1,
                                  decoder_start_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config)
    assert not hasattr(model, "prepare_decoder_input_ids_from_labels")
    batch = _batch(config.vocab_size, length=9)
    batch["labels"] = batch["labels"][:, 3:].contiguous()
    # Blenderbot adds its final_logits_bias after the head, which allocates the logits again (without the float32
    # softmax and gradients the loss would keep); the loss is still the head's, as the first batch checks.
    assert_same_loss_and_gradients(model, batch, placeholder_logits=model_type != "blenderbot")


def test_logits_changed_after_the_head_keep_the_standard_loss_or_refuse(caplog):
    config = Gemma2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=8, final_logit_softcapping=2.0)
    model = Gemma2ForCausalLM(config)
    batch = _batch(40)
    assert EfficientLMLoss.for_model(model, "auto").loss(model, batch) is None  # the Trainer's own loss is used
    assert "soft-capping" in caplog.text
    with pytest.raises(UserError, match="training.lm_loss: chunked cannot"):
        EfficientLMLoss.for_model(model, "chunked").loss(model, batch)
    assert EfficientLMLoss.for_model(model, "standard") is None


def test_gpu_kernels_are_refused_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(UserError, match="CUDA GPUs only"):
        lm_loss.check_kernel_available("liger")
