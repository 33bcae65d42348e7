"""Peak memory of the language-model loss per token and vocabulary entry, next to the plan's `logits + loss` row.

    python -m benchmarks.lm_loss_peak [--tokens 2048] [--vocab 32000] [--dtype bfloat16]
    python -m benchmarks.lm_loss_peak --activations [--tokens 2048]
    python -m benchmarks.lm_loss_peak --dora

`--activations` measures the activation model the same way: a 512-wide Llama (8 heads, 4 key/value heads, MLP
1,536, a 256-entry vocabulary so the loss is negligible) with 2 and with 6 layers, without and with gradient
checkpointing; the slope over layers is one layer's saved bytes per token, the checkpointed run's excess over
the plain run's constant part is the recomputation's working set. `--dora` measures DoRA's weight-norm transient
(input width squared, independent of tokens) on the same model with 4,096- and 8,192-wide MLPs at 64 tokens.

A one-layer Llama with a 64-wide hidden state, so the loss dominates everything else, runs forward + backward the
way the Trainer does (accelerate's bf16 autocast and float32 outputs, the outputs dropped before backward), each
loss for two steps in one fresh process. Peak RSS growth over the second step, divided by tokens x vocabulary, is
the loss's peak in bytes per entry (it also holds the embedding's gradient, ~0.06 at this width); every allocation
above 64 KiB is mapped and unmapped directly (MALLOC_MMAP_THRESHOLD_), so freed tensors leave RSS at once and RSS
follows the live tensor bytes as the CUDA allocator's `max_memory_allocated` would. The autograd graph and the
tensors' lifetimes are the same on a GPU; what this cannot see is the caching allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

LOSSES = ("standard", "chunked")
HIDDEN = 64


def measure(tokens: int, vocab: int, dtype: str) -> dict[str, float]:
    """Runs in the child process: per loss, bytes of peak RSS growth per token x vocabulary entry over one step."""
    import torch
    from accelerate.utils import convert_outputs_to_fp32
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.training_memory import _release_and_reset_peak, _status_kb
    from peftkit.tasks.lm_loss import EfficientLMLoss

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=vocab, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(True)  # a trainable tensor upstream of the head, as an adapter is
    forward = model.forward
    if dtype != "float32":  # what accelerate does to the model's forward under mixed precision
        forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=getattr(torch, dtype))(forward))
    ids = torch.randint(vocab, (1, tokens), generator=torch.Generator().manual_seed(0))

    def step(efficient: EfficientLMLoss | None) -> None:
        if efficient is None:
            outputs = forward(input_ids=ids, labels=ids)
            loss = outputs.loss
            del outputs  # the Trainer drops the outputs (and their logits) before backward
        else:
            loss = efficient.loss(model, {"input_ids": ids, "labels": ids})[0]
        loss.backward()

    measured = {}
    for loss_choice in LOSSES:
        efficient = EfficientLMLoss.for_model(model, loss_choice)
        step(efficient)  # first step: lazy initializations, and the embedding's gradient exists from here on
        _release_and_reset_peak()
        before = _status_kb("VmRSS")
        step(efficient)
        measured[loss_choice] = (_status_kb("VmHWM") - before) * 1024 / (tokens * vocab)
    return measured


ACTIVATION_SHAPE = {"hidden": 512, "heads": 8, "head_dim": 64, "kv_heads": 4, "intermediate": 1536, "gated_mlp": 1}
VIRTUAL_TOKENS = 64
ADAPTERS = {  # setting -> (adapter method, LoRA dropout)
    "LoRA all-linear": ("lora", 0.0), "LoRA all-linear, dropout 0.05": ("lora", 0.05),
    "LoRA q, v": ("lora-qv", 0.0), "full fine-tuning": ("none", 0.0),
    "DoRA all-linear": ("dora", 0.0), "DoRA all-linear, dropout 0.05": ("dora", 0.05),
    "IA3 (peft's Llama targets)": ("ia3", 0.0), f"prompt tuning, {VIRTUAL_TOKENS} virtual tokens": ("prompt_tuning", 0.0),
}


def measure_activations(setting: str, layers: int, checkpointing: bool, tokens: int, intermediate: int) -> dict:
    """Child process: peak RSS growth of one bf16 step (bytes), the adapted modules' widths and summed rank."""
    import torch
    from accelerate.utils import convert_outputs_to_fp32
    from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.training_memory import _release_and_reset_peak, _status_kb

    torch.manual_seed(0)
    shape = ACTIVATION_SHAPE
    config = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], vocab_size=256,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    method, dropout = ADAPTERS[setting]
    model.requires_grad_(method == "none")
    if method == "ia3":
        model = get_peft_model(model, IA3Config(task_type="CAUSAL_LM"))
    elif method == "prompt_tuning":
        model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS))
    elif method != "none":
        targets = ["q_proj", "v_proj"] if method == "lora-qv" else "all-linear"
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets,
                                                 use_dora=method == "dora"))
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.train()
    forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
    ids = torch.randint(256, (1, tokens), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        outputs = forward(input_ids=ids, labels=ids)
        loss = outputs.loss
        del outputs
        loss.backward()

    step()  # gradients of trained weights exist from here on, as in training
    _release_and_reset_peak()
    before = _status_kb("VmRSS")
    step()
    lora = [module for module in model.modules() if hasattr(module, "lora_A") and "default" in module.lora_A]
    ia3 = [module for module in model.modules() if hasattr(module, "ia3_l") and "default" in module.ia3_l]
    return {"peak": (_status_kb("VmHWM") - before) * 1024, "adapted": [[m.in_features, m.out_features] for m in lora],
            "adapter_ranks": sum(m.r["default"] for m in lora),
            "ia3_outputs": sum(m.out_features for m in ia3 if not m.is_feedforward),
            "ia3_feedforward_inputs": sum(m.in_features for m in ia3 if m.is_feedforward)}


def planned_activations(setting: str, tokens: int, measured: dict, layers: int) -> tuple[float, float]:
    """The plan's (saved bytes per token and layer, working set per token) for the measured model, whose adapted
    modules the child reported (LoRA/DoRA (input, output) widths, IA3 widths)."""
    from peftkit.plan.memory import activations
    from peftkit.plan.shapes import ParameterCounts
    from peftkit.recipe.load import validate_recipe

    method, dropout = ADAPTERS[setting]
    per_layer = {}
    for checkpointing in (False, True):
        recipe = validate_recipe({
            "model": {"name": "x"}, "data": {"train": {"path": "x.jsonl"}, "max_length": tokens},
            "adapter": {"method": method} if method in ("none", "ia3") else
                       {"method": method, "num_virtual_tokens": VIRTUAL_TOKENS} if method == "prompt_tuning" else
                       {"method": "lora", "dropout": dropout, "use_dora": method == "dora"},
            "training": {"eval_strategy": "no", "batch_size": 1, "gradient_checkpointing": checkpointing}})
        adapted = measured["adapted"]
        dora = adapted if method == "dora" else []
        counts = ParameterCounts(frozen_bytes={}, trainable=[], largest_layer_bytes=0, largest_outer_bytes=0,
                                 adapter_inputs=sum(i for i, _ in adapted), adapter_ranks=measured["adapter_ranks"],
                                 logits_width=0, dims={**ACTIVATION_SHAPE, "layers": layers},
                                 dora_outputs=sum(o for _, o in dora), dora_weight_numel=sum(i * o for i, o in dora),
                                 dora_widest=max(map(tuple, dora), default=(0, 0)),
                                 ia3_outputs=measured["ia3_outputs"],
                                 ia3_feedforward_inputs=measured["ia3_feedforward_inputs"])
        per_layer[checkpointing] = activations(recipe, counts, "bf16")
    saved, _, _ = per_layer[False]
    _, working, _ = per_layer[True]
    positions = tokens + (VIRTUAL_TOKENS if method == "prompt_tuning" else 0)
    edge = 2 * 2 * ACTIVATION_SHAPE["hidden"] * positions  # the plain run's input/output hidden states
    return (saved - edge) / (layers * tokens), working / tokens


def activation_child(setting: str, layers: int, checkpointing: bool, tokens: int, env: dict,
                     intermediate: int = ACTIVATION_SHAPE["intermediate"]) -> dict:
    command = [sys.executable, "-m", "benchmarks.lm_loss_peak", "--child-activations", setting, "--layers", str(layers),
               "--tokens", str(tokens), "--intermediate", str(intermediate)] + (["--checkpointing"] if checkpointing else [])
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def activation_table(tokens: int, env: dict) -> None:
    def child(setting: str, layers: int, checkpointing: bool) -> dict:
        return activation_child(setting, layers, checkpointing, tokens, env)

    print(f"{tokens} tokens, bf16, {ACTIVATION_SHAPE}: bytes per token")
    print("| setting | saved per layer: measured | plan | recomputation working set: measured | plan |")
    print("|---|---|---|---|---|")
    for setting in ADAPTERS:
        two, six = child(setting, 2, False), child(setting, 6, False)
        two_checkpointed, six_checkpointed = child(setting, 2, True), child(setting, 6, True)
        per_layer = (six["peak"] - two["peak"]) / 4
        if ADAPTERS[setting][0] == "none":  # the trained weights' bf16 gradients grow with layers too
            per_layer -= 2 * sum(n for n in layer_parameter_counts())
        constant = two["peak"] - 2 * per_layer
        checkpointed_per_layer = (six_checkpointed["peak"] - two_checkpointed["peak"]) / 4
        working = two_checkpointed["peak"] - 2 * checkpointed_per_layer - constant
        plan_saved, plan_working = planned_activations(setting, tokens, six, 6)
        print(f"| {setting} | {per_layer / tokens:,.0f} | {plan_saved:,.0f} | {working / tokens:,.0f} | {plan_working:,.0f} |")


def dora_table(env: dict, tokens: int = 64) -> None:
    """DoRA's weight-norm transient, which grows with the square of a module's input width, not with tokens: a
    checkpointed step of the 2-layer Llama above with wide MLPs, DoRA's peak less LoRA's, next to the plan's."""
    from peftkit.plan.memory import dora_norm_transient
    from peftkit.plan.shapes import ParameterCounts

    print(f"{tokens} tokens, bf16, checkpointed, 2 layers, hidden {ACTIVATION_SHAPE['hidden']}: DoRA peak - LoRA peak")
    print("| MLP width | measured | plan: weight-norm transient | plan / measured |\n|---|---|---|---|")
    for intermediate in (4096, 8192):
        lora, dora = (activation_child(setting, 2, True, tokens, env, intermediate)
                      for setting in ("LoRA all-linear", "DoRA all-linear"))
        widest = max(map(tuple, dora["adapted"]))
        counts = ParameterCounts(frozen_bytes={}, trainable=[], largest_layer_bytes=0, largest_outer_bytes=0,
                                 adapter_inputs=0, adapter_ranks=0, logits_width=0, dora_widest=widest)
        measured, planned = dora["peak"] - lora["peak"], dora_norm_transient(counts, 2)
        print(f"| {intermediate:,} | {measured / 2**20:.1f} MiB | {planned / 2**20:.1f} MiB | {planned / measured:.2f} |")


def layer_parameter_counts() -> list[int]:
    shape = ACTIVATION_SHAPE
    h, kv, i = shape["hidden"], shape["kv_heads"] * shape["head_dim"], shape["intermediate"]
    return [h * h, h * kv, h * kv, h * h, h * i, h * i, i * h, h, h]


def planned(loss_choice: str, tokens: int, vocab: int, dtype: str) -> float:
    """The plan's `logits + loss` row for the same model and tokens, per token x vocabulary entry."""
    import torch

    from peftkit.plan.memory import loss_row
    from peftkit.plan.shapes import ParameterCounts
    from peftkit.recipe.load import validate_recipe

    recipe = validate_recipe({"model": {"name": "x"}, "data": {"train": {"path": "x.jsonl"}, "max_length": tokens},
                              "training": {"eval_strategy": "no", "lm_loss": loss_choice}})
    counts = ParameterCounts(frozen_bytes={}, trainable=[], largest_layer_bytes=0, largest_outer_bytes=0,
                             adapter_inputs=0, adapter_ranks=0, logits_width=vocab, dims={"hidden": HIDDEN})
    element = getattr(torch, dtype).itemsize
    return loss_row(recipe, counts, tokens, element, 0).bytes / (tokens * vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--activations", action="store_true", help="measure the activation model instead")
    parser.add_argument("--dora", action="store_true", help="measure DoRA's weight-norm transient instead")
    parser.add_argument("--intermediate", type=int, default=ACTIVATION_SHAPE["intermediate"], help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-activations", choices=ADAPTERS, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.tokens, args.vocab, args.dtype)))
        return
    if args.child_activations:
        print(json.dumps(measure_activations(args.child_activations, args.layers, args.checkpointing, args.tokens,
                                             args.intermediate)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if args.activations:
        activation_table(args.tokens, env)
        return
    if args.dora:
        dora_table(env)
        return
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.lm_loss_peak", "--child", "--tokens", str(args.tokens),
         "--vocab", str(args.vocab), "--dtype", args.dtype],
        env=env, capture_output=True, text=True, check=True,
    )
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"{args.tokens} tokens x {args.vocab} vocabulary, {args.dtype}: bytes per token x vocabulary entry")
    print("| loss | measured peak | plan | plan / measured |\n|---|---|---|---|")
    for loss_choice in LOSSES:
        plan = planned(loss_choice, args.tokens, args.vocab, args.dtype)
        print(f"| {loss_choice} | {measured[loss_choice]:.2f} | {plan:.2f} | {plan / measured[loss_choice]:.2f} |")


if __name__ == "__main__":
    main()
