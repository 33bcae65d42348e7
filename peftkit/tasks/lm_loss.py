"""Language-model loss without the `tokens x vocab` float32 logits.

transformers computes a decoder's loss from logits over the whole vocabulary for every token, upcast to float32,
and keeps them (plus their softmax and gradient) until backward: 16 bytes x tokens x vocab, more than the rest of a
LoRA step on 128k-vocabulary models. Here the language-model head is bypassed while the model runs: the head's
forward receives the final hidden states, computes the cross-entropy itself, chunk by chunk over the tokens that
have a label, and returns a zero-stride placeholder of the logits' shape. Running inside the head's own forward
keeps whatever its hooks do (DeepSpeed ZeRO-3 gathers the head's weight there) in force.

Kernels (`training.lm_loss`):
- `chunked`: plain PyTorch, any device. The gradient is computed eagerly per chunk in the forward pass (the loss
  is the last op before backward, so nothing is recomputed), as Liger's fused kernel does.
- `liger`: Liger-Kernel's fused linear cross-entropy (Triton; CUDA only).
- `cut_cross_entropy`: Apple's Cut Cross-Entropy (Triton; CUDA only).

A model whose logits are changed after the head (final-logit soft-capping, a logits bias or scale) would be
trained on the wrong loss, so the first batch checks that the model's logits equal the head applied to the
hidden states it received; `auto` otherwise keeps the standard loss (and says so), an explicit kernel refuses.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch import nn

from peftkit.errors import UserError

log = logging.getLogger("peftkit")

IGNORE_INDEX = -100
MIN_CHUNK = 64
GPU_KERNELS = ("liger", "cut_cross_entropy")
PROBE_TOKENS = 16


def decoder_inputs_from_labels(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The decoder inputs an encoder-decoder builds from its labels: the start token, then the labels shifted right
    (ignored positions as padding). Most models expose it as `prepare_decoder_input_ids_from_labels`; M2M100 (NLLB)
    and Blenderbot shift only inside their forward, from their config, which is done here the same way."""
    if hasattr(model, "prepare_decoder_input_ids_from_labels"):
        return model.prepare_decoder_input_ids_from_labels(labels=labels)
    start, pad = model.config.decoder_start_token_id, model.config.pad_token_id
    if start is None or pad is None:
        raise UserError(
            f"model.name: the model's config has no {'decoder_start_token_id' if start is None else 'pad_token_id'}, "
            "which an encoder-decoder needs to build its decoder inputs; set it in the model's config.json"
        )
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad)


def chunk_tokens(tokens: int, vocab_size: int, hidden_size: int) -> int:
    """Tokens per chunk such that one chunk's logits hold about as many elements as all the hidden states
    (Liger's rule): the loss then never needs more than a few copies of the hidden states' memory."""
    chunk = math.ceil(tokens / math.ceil(vocab_size / hidden_size))
    return max(MIN_CHUNK, 1 << max(chunk - 1, 0).bit_length())


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(hidden @ weight.T + bias, targets); every target is a real label."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, grads_needed):
        need_hidden, need_weight, need_bias = grads_needed
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = nn.functional.linear(h, weight, bias).float()  # what transformers' loss upcasts
            total += (torch.logsumexp(logits, dim=-1) - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            grad_logits = logits.softmax(dim=-1)  # d(loss)/d(logits) = softmax - one_hot
            grad_logits[torch.arange(len(t), device=t.device), t] -= 1
            grad_logits = grad_logits.to(h.dtype)
            if need_hidden:
                grad_hidden[start : start + chunk] = grad_logits @ weight.to(h.dtype)
            if need_weight:
                grad_weight += (grad_logits.T @ h).float()
            if need_bias:
                grad_bias += grad_logits.float().sum(0)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.grads_needed = grads_needed
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        grads = [
            (next(saved) * grad_output).to(dtype) if needed else None
            for needed, dtype in zip(ctx.grads_needed, ctx.dtypes)
        ]
        return (*grads, None, None, None)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `linear(hidden, weight, bias)` against `targets` (rows already masked out)."""
    grads_needed = (
        torch.is_grad_enabled() and hidden.requires_grad,
        torch.is_grad_enabled() and weight.requires_grad,
        torch.is_grad_enabled() and bias is not None and bias.requires_grad,
    )
    chunk = chunk_tokens(hidden.shape[0], weight.shape[0], weight.shape[1])
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, grads_needed)


def _liger(hidden, weight, bias, targets):
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets, bias)


def _cut_cross_entropy(hidden, weight, bias, targets):
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, targets, bias=bias, reduction="sum")


KERNELS = {"chunked": chunked_linear_cross_entropy, "liger": _liger, "cut_cross_entropy": _cut_cross_entropy}


def check_kernel_available(kernel: str) -> None:
    """GPU kernels need CUDA and their package; a clear error before any model is loaded."""
    if kernel not in GPU_KERNELS:
        return
    package = {"liger": "liger_kernel", "cut_cross_entropy": "cut_cross_entropy"}[kernel]
    install = {"liger": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy"}[kernel]
    if not torch.cuda.is_available():
        raise UserError(f"training.lm_loss: {kernel} runs on CUDA GPUs only; use chunked (any device) or auto")
    try:
        __import__(package)
    except ImportError:
        raise UserError(f"training.lm_loss: {kernel} needs `pip install {install}`; or use chunked") from None


def _plain_linear(head: nn.Module) -> nn.Linear | None:
    """The head as a plain Linear: peft's ModulesToSaveWrapper trains a copy, which is the one in use."""
    active = getattr(head, "modules_to_save", None)
    if active is not None:
        head = active[head.active_adapter] if isinstance(head.active_adapter, str) else None
    return head if type(head) is nn.Linear else None


class EfficientLMLoss:
    """Computes a language model's token loss through its bypassed head; see the module docstring."""

    def __init__(self, model: nn.Module, kernel: str, explicit: bool):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.base = base
        self.kernel = kernel
        self.explicit = explicit
        self.head = base.get_output_embeddings()
        self.shift = not base.config.is_encoder_decoder  # decoders predict the next token; seq2seq the same position
        self.checked: bool | None = None
        self._pending: dict | None = None

    @staticmethod
    def for_model(model: nn.Module, choice: str) -> EfficientLMLoss | None:
        """The efficient loss for a model with a language-model head, or None (standard loss)."""
        if choice == "standard":
            return None
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        linear = _plain_linear(head) if isinstance(head, nn.Module) else None
        if linear is None:
            if choice != "auto":
                raise UserError(
                    f"training.lm_loss: {choice} needs a plain linear language-model head; this model's head is "
                    f"{type(head).__name__} (adapters on the head, or no LM head); use training.lm_loss: standard"
                )
            return None
        return EfficientLMLoss(model, "chunked" if choice == "auto" else choice, explicit=choice != "auto")

    # --- the bypass -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _bypassed_head(self, compute):
        """While active, the head's forward calls `compute(hidden, head)` and returns zero-stride logits.

        The Linear in use is patched (not a peft wrapper around it), so hooks registered on it still run.
        """
        linear = _plain_linear(self.head)

        def forward(hidden):
            compute(hidden, linear)
            return hidden.new_zeros(()).expand(*hidden.shape[:-1], linear.out_features)

        linear.forward = forward
        try:
            yield
        finally:
            del linear.forward

    def _decoder_inputs(self, inputs: dict, labels: torch.Tensor) -> dict:
        if self.shift or "decoder_input_ids" in inputs:
            return inputs
        # Without labels the model cannot build its decoder inputs; it builds them from labels this way.
        return {**inputs, "decoder_input_ids": decoder_inputs_from_labels(self.base, labels)}

    # --- the loss -------------------------------------------------------------------------------------
    def loss(self, model, inputs: dict, num_items_in_batch=None):
        """(loss, outputs) of the batch, reduced as transformers does: sum / num_items_in_batch, else a mean."""
        labels = inputs["labels"]
        inputs = self._decoder_inputs({k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}, labels)
        if self.checked is None:
            self._check_head_output(model, inputs)
        if not self.checked:
            return None
        result = {}

        def compute(hidden, linear):
            targets = labels
            if self.shift:
                if hidden.shape[1] > targets.shape[1]:  # virtual tokens (prompt tuning) are prepended
                    targets = nn.functional.pad(targets, (hidden.shape[1] - targets.shape[1], 0), value=IGNORE_INDEX)
                targets = nn.functional.pad(targets, (0, 1), value=IGNORE_INDEX)[..., 1:]
            targets = targets.reshape(-1).to(hidden.device)
            rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
            flat = hidden.reshape(-1, hidden.shape[-1])
            result["sum"] = KERNELS[self.kernel](flat.index_select(0, rows), linear.weight, linear.bias, targets[rows])
            result["count"] = rows.numel()

        with self._bypassed_head(compute):
            outputs = model(**inputs)
        if num_items_in_batch is not None:
            loss = result["sum"] / torch.as_tensor(num_items_in_batch).to(result["sum"].device)
        else:
            loss = result["sum"] / result["count"]  # 0/0 = nan, as transformers' mean over no label
        return loss, outputs

    @torch.no_grad()
    def _check_head_output(self, model, inputs: dict) -> None:
        """Does the model hand the head's output on unchanged? Checked on the first tokens of the first batch."""
        probe = {
            key: value[:1, :PROBE_TOKENS] if torch.is_tensor(value) and value.dim() == 2 else value
            for key, value in inputs.items()
        }
        training = model.training
        model.eval()
        seen = {}
        try:
            reference = model(**probe).logits
            # Applied inside the head's forward, where ZeRO-3 / FSDP have gathered its weight.
            with self._bypassed_head(lambda hidden, linear: seen.update(
                    logits=nn.functional.linear(hidden, linear.weight, linear.bias))):
                placeholder = model(**probe).logits
            self.checked = placeholder.shape == reference.shape and torch.allclose(
                seen["logits"].to(reference.dtype), reference, rtol=1e-5, atol=1e-6)
        finally:
            model.train(training)
        if self.checked:
            log.info("training.lm_loss: %s cross-entropy (the full-vocabulary logits are never materialized)", self.kernel)
            return
        problem = (
            f"the logits of {type(self.base).__name__} are not its head's output (soft-capping, a logits bias or "
            "scale is applied after the head)"
        )
        if self.explicit:
            raise UserError(f"training.lm_loss: {self.kernel} cannot compute this model's loss: {problem}; "
                            "use training.lm_loss: standard")
        log.warning("training.lm_loss: auto keeps the standard loss: %s", problem)
