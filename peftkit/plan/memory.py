"""Per-GPU training memory of a recipe: exact tensor bytes from `shapes`, an analytic activation model, and
a fixed runtime allowance. See docs/plan.md for the formulas, their sources and measured accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from peftkit.errors import UserError
from peftkit.plan.shapes import ParameterCounts
from peftkit.recipe.schema import Recipe
from peftkit.recipe.resolved import resolve_gradient_checkpointing, resolve_precision
from peftkit.tasks import get_task
from peftkit.tasks.base import trains_with_own_trainer
from peftkit.tasks.lm_loss import chunk_tokens

GiB = 2**30

# What `torch.cuda.max_memory_allocated` never sees but the GPU still holds: the CUDA context, cuBLAS/cuDNN
# workspaces and NCCL buffers (fixed), and allocator fragmentation (a share of what is allocated).
RUNTIME_FIXED_BYTES = 1 * GiB
FRAGMENTATION_SHARE = 0.05
PLAN_ERROR = 0.10  # between the median errors on docs/plan.md's published table without/with cache-holding counters

BNB_OPTIMIZER_BLOCK = 256  # elements per absmax of a blockwise 8-bit optimizer state
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps smaller tensors' states in float32
BNB_QMAP_BYTES = 2 * 256 * 4  # the two float32 quantization maps, shared by all tensors of one optimizer
DEEPSPEED_MAX_LIVE_PARAMETERS = 10**9  # DeepSpeed's stage3_max_live_parameters default
DEEPSPEED_REDUCE_BUCKET_SIZE = 5 * 10**8  # DeepSpeed's reduce_bucket_size default (elements); peftkit leaves it
ADAM_STEP_BYTES = 4  # torch AdamW's float32 `step` counter per tensor (kept on the host unless fused)


@dataclass(frozen=True)
class Row:
    component: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    """One GPU's predicted memory, component by component."""

    rows: list[Row]
    gpus: int
    gpu_memory: int | None  # bytes per GPU, None when unknown
    host_bytes: int = 0  # what offloading moves to CPU RAM (per process)
    settings: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(row.bytes for row in self.rows)

    @property
    def allocated(self) -> int:
        """What torch's allocator holds at peak: the total without the runtime allowance."""
        return sum(row.bytes for row in self.rows if row.component != RUNTIME_ROW)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total <= self.gpu_memory


RUNTIME_ROW = "runtime + fragmentation"
TRANSIENT_ROWS = ("activations", "logits + loss", "reference forward")  # freed when backward ends


def optimizer_state_bytes(trainable: list[tuple[int, torch.dtype]], optimizer: str) -> int:
    """Bytes of the state tensors `optimizer` (a transformers optimizer name) creates for these parameters."""
    if optimizer == "sgd":
        return 0  # transformers builds SGD without momentum: no state
    if optimizer == "adafactor":
        raise UserError("training.optimizer: `peftkit plan` does not model adafactor's factored states yet; "
                        "plan with training.optimizer=adamw_torch for an upper bound")
    if optimizer.endswith("8bit"):
        total = 0
        for numel, _ in trainable:
            if numel < BNB_MIN_8BIT_SIZE:
                total += 2 * numel * 4
            else:
                total += 2 * numel + 2 * math.ceil(numel / BNB_OPTIMIZER_BLOCK) * 4
        return total + (BNB_QMAP_BYTES if any(n >= BNB_MIN_8BIT_SIZE for n, _ in trainable) else 0)
    if optimizer == "paged_adamw_32bit":
        return sum(2 * numel * 4 for numel, _ in trainable)
    # adamw_torch: exp_avg and exp_avg_sq like the parameter, plus a float32 step counter per tensor
    return sum(2 * numel * dtype.itemsize + ADAM_STEP_BYTES for numel, dtype in trainable)


def planning_precision(recipe: Recipe) -> str:
    """`auto` plans for a bf16-capable GPU, as training resolves it there."""
    return resolve_precision(recipe.training.precision, for_gpu=True)


def sharding(recipe: Recipe, gpus: int) -> str:
    """`none` (one process or DDP replicas), `zero1`, `zero2`, `zero3` or `fsdp`."""
    dist = recipe.distributed
    if gpus <= 1 and dist.strategy in ("auto", "ddp"):
        return "none"
    if dist.strategy == "deepspeed":
        return f"zero{dist.zero_stage}"
    if dist.strategy == "fsdp":
        return "fsdp"
    return "ddp"


def estimate(recipe: Recipe, counts: ParameterCounts, gpus: int = 1, gpu_memory: int | None = None) -> MemoryPlan:
    """Predict one GPU's peak training memory for `recipe` on `gpus` GPUs."""
    precision = planning_precision(recipe)
    mixed = precision in ("bf16", "fp16")
    mode = sharding(recipe, gpus)
    world = max(gpus, 1)
    dist = recipe.distributed
    deepspeed = mode.startswith("zero")
    params_sharded = mode in ("zero3", "fsdp")
    grads_sharded = mode in ("zero2", "zero3", "fsdp")
    optimizer_sharded = deepspeed or mode == "fsdp"
    offload_params = dist.offload_params and params_sharded
    offload_optimizer = (dist.offload_optimizer or (mode == "fsdp" and dist.offload_params)) and optimizer_sharded
    rows: list[Row] = []
    host = 0

    # Frozen base: DeepSpeed casts float weights to the 16-bit training dtype; quantized ones keep their storage.
    # A quantized weight's state (absmax, scales) is not a parameter: every GPU keeps all of it, offloaded or not.
    frozen_share = 1 / world if params_sharded else 1
    for kind, size in sorted(counts.frozen_bytes.items()):
        if deepspeed and mixed and kind in ("float32", "bfloat16", "float16"):
            size = size * 2 // getattr(torch, kind).itemsize
        state = counts.quant_state_bytes.get(kind, 0)
        size = int((size - state) * frozen_share)
        note = f"sharded 1/{world}" if params_sharded else ""
        if offload_params:
            host += size
            size, note = 0, "offloaded to CPU"
        if state and (params_sharded or offload_params):
            note += f"; + {format_bytes(state)} quantization state, whole on every GPU"
        rows.append(Row(f"base weights ({kind})", size + state, note))

    trainable_numel = counts.trainable_numel
    # ZeRO and FSDP split every tensor into `world` equal (rounded-up) pieces
    partition_numel = sum(math.ceil(numel / world) for numel, _ in counts.trainable)
    trainable_dtype_bytes = counts.trainable_bytes
    if deepspeed and mixed:
        trainable_dtype_bytes = trainable_numel * 2
    element = trainable_dtype_bytes / max(trainable_numel, 1)
    weights = int(partition_numel * element) if params_sharded else trainable_dtype_bytes
    if offload_params:
        host += weights
        weights = 0
    label = "trainable weights" if recipe.adapter.method == "none" else "adapter weights"
    rows.append(Row(label, weights, f"{trainable_numel:,} parameters"))

    grads = partition_numel * element if grads_sharded else trainable_dtype_bytes
    grad_note = f"sharded 1/{world}" if grads_sharded else ""
    if deepspeed:
        fp32_partition = partition_numel * 4  # ZeRO's fp32 gradient partition fed to the optimizer
        if offload_optimizer:
            host += fp32_partition
        else:
            grads += fp32_partition
        grad_note = (grad_note + "; " if grad_note else "") + "+ fp32 partition"
    if mode == "ddp":
        grads += trainable_dtype_bytes  # DDP's gradient buckets hold a second copy
        grad_note = "+ DDP buckets"
    if offload_params and mode == "fsdp":
        host += int(grads)
        grads, grad_note = 0, "offloaded to CPU"
    rows.append(Row("gradients", int(grads), grad_note))

    if deepspeed:
        # DeepSpeed steps one flat float32 partition per rank and keeps it as the master copy
        states = optimizer_state_bytes([(partition_numel, torch.float32)], recipe.training.optimizer)
        states += partition_numel * 4
    elif mode == "fsdp":
        states = optimizer_state_bytes([(math.ceil(n / world), d) for n, d in counts.trainable], recipe.training.optimizer)
    else:
        states = optimizer_state_bytes(counts.trainable, recipe.training.optimizer)
    optimizer_note = recipe.training.optimizer + (f", sharded 1/{world}" if optimizer_sharded else "")
    if "paged" in recipe.training.optimizer:
        optimizer_note += ", paged (evictable to CPU under pressure)"
    if offload_optimizer:
        host += int(states)
        states, optimizer_note = 0, "offloaded to CPU"
    rows.append(Row("optimizer states", int(states), optimizer_note))

    if params_sharded:
        # The embeddings and LM head are gathered whole too, and are often larger than a layer (Llama-3's
        # 128k-vocabulary head); at most one of them is live next to one layer.
        layer, outer, whole = counts.largest_layer_bytes, counts.largest_outer_bytes, counts.unsharded_bytes
        if mixed and recipe.quantization.bits is None:
            # DeepSpeed casts float weights to 16-bit; FSDP2's mixed-precision policy gathers them in 16-bit
            layer, outer, whole = (size * 2 // counts.element_bytes for size in (layer, outer, whole))
        gathered = layer + max(layer, outer)
        note = "current + prefetched layer" if layer >= outer else "a layer + the embeddings or LM head"
        if mode == "fsdp" and not dist.fsdp_reshard_after_forward:
            # Each unit stays gathered from its forward to its backward: when backward starts, all of them are.
            gathered, note = whole, "the whole model (distributed.fsdp_reshard_after_forward: false)"
        rows.append(Row("gathered layers", gathered, note + ", unsharded"))
    if deepspeed and dist.zero_stage in (2, 3):
        # With contiguous gradients (peftkit's setting and DeepSpeed's default) ZeRO-2/3 copy gradients into one bucket
        # of `reduce_bucket_size` elements of the gradient dtype before reducing them, however few parameters train.
        bucket = DEEPSPEED_REDUCE_BUCKET_SIZE * (2 if mixed else 4)
        rows.append(Row("gradient bucket", bucket, f"DeepSpeed reduce_bucket_size ({DEEPSPEED_REDUCE_BUCKET_SIZE:.0e})"))
    if offload_params and deepspeed:
        # ZeRO-3 keeps fetched parameters on the GPU until `stage3_max_live_parameters` (DeepSpeed's default 1e9)
        # are live, so offloading does not bring a large model's GPU share down to one layer.
        live = min(DEEPSPEED_MAX_LIVE_PARAMETERS, counts.frozen_numel) * 2
        rows.append(Row("live offloaded parameters", live, "ZeRO-3 stage3_max_live_parameters (1e9) in 16-bit"))

    tokens = micro_batch_sequences(recipe) * sequence_length(recipe)
    saved, working, activation_note = activations(recipe, counts, precision)
    rows.append(Row("activations", saved + working, activation_note))
    if counts.logits_width:
        element = 2 if mixed else 4
        rows.append(loss_row(recipe, counts, tokens, element, working))
        passes = reference_passes(recipe)
        if passes:
            # The reference forward runs without gradients while the policy's activations are held: its logits
            # and their float32 log-probabilities are live on top (the weights are the base's: adapter disabled).
            rows.append(
                Row("reference forward", tokens * counts.logits_width * (element + 4),
                    f"{passes} no-grad pass(es) of the base with the adapter disabled, {tokens:,} tokens")
            )
    if recipe.training.optimizer == "adamw_torch" and not offload_optimizer:
        # torch's AdamW steps every parameter of one device and dtype at once (foreach, its CUDA default) and makes
        # one parameter-sized intermediate (the square root of exp_avg_sq). The step runs after backward has freed
        # the activations and the loss, so it raises the peak only by what it needs beyond them.
        stepped = partition_numel * 4 if deepspeed else int(states - ADAM_STEP_BYTES * len(counts.trainable)) // 2
        transient = sum(row.bytes for row in rows if row.component in TRANSIENT_ROWS)
        rows.append(Row("optimizer step", max(stepped - transient, 0),
                        f"foreach AdamW intermediate {format_bytes(stepped)}, beyond the freed activations"))
    allocated = sum(row.bytes for row in rows)
    rows.append(
        Row(RUNTIME_ROW, RUNTIME_FIXED_BYTES + int(FRAGMENTATION_SHARE * allocated),
            f"{RUNTIME_FIXED_BYTES / GiB:.1f} GiB CUDA context/workspaces + {FRAGMENTATION_SHARE:.0%} of allocated")
    )
    return MemoryPlan(
        rows=rows,
        gpus=world,
        gpu_memory=gpu_memory,
        host_bytes=host,
        settings={"precision": precision, "sharding": mode, "tokens_per_micro_batch": tokens},
    )


def micro_batch_sequences(recipe: Recipe) -> int:
    """Sequences in one forward pass: a task with its own Trainer says how many each batch row puts through."""
    task = get_task(recipe.task.type)
    return recipe.training.batch_size * (task.sequences_per_row(recipe) if trains_with_own_trainer(task) else 1)


def sequence_length(recipe: Recipe) -> int:
    """Positions per sequence the model computes: prompt tuning and P-tuning prepend their virtual tokens to every
    sequence (their activations and logits are computed like the text's)."""
    virtual = recipe.adapter.num_virtual_tokens if recipe.adapter.method in ("prompt_tuning", "p_tuning") else 0
    return recipe.data.max_length + virtual


def reference_passes(recipe: Recipe) -> int:
    """No-grad reference forwards per step: only a task with its own Trainer runs any, and it says how many."""
    task = get_task(recipe.task.type)
    return task.reference_passes(recipe) if trains_with_own_trainer(task) else 0


# Peak bytes per logit (token x vocabulary entry) of each loss, measured (`benchmarks/lm_loss_peak.py`); see `loss_row`
STANDARD_LOSS_BYTES = 12
CHUNK_LOSS_BYTES = 12


def loss_row(recipe: Recipe, counts: ParameterCounts, tokens: int, element: int, layer_working_set: int) -> Row:
    """What the language-model loss adds to the peak.

    Standard (transformers' loss): 12 bytes per token and vocabulary entry at its peak, the start of backward: the
    float32 log-softmax it saved, the gradient of it and the float32 gradient of the logits. The logits themselves
    (and their float32 copies: transformers' upcast, accelerate's float32 outputs) are freed by then, and the forward
    peaks lower (about 10 bytes). Measured on CPU as peak RSS growth per token x vocabulary entry with
    transformers 5 (`docs/plan.md`): 12.0 in bf16 with and without autocast, and in float32.
    Chunked (the fused kernels are assumed alike): 12 bytes per entry of one chunk, in bf16 and float32 alike (the
    previous chunk's float32 logits and cast gradient are still referenced while the next chunk's logits and their
    upcast are made), plus the labelled hidden rows and their gradient; every token is assumed labelled
    (response-only masks make it smaller).
    The loss runs before the layers' backward: its peak and the layer recomputation's working set (part of the
    activations row) are not live together, so the row is what the loss needs beyond that working set."""
    vocab, hidden = counts.logits_width, counts.dims.get("hidden", 0)
    # A task trained by its own Trainer class (TRL's preference trainers) computes its loss from the logits, and
    # training hands it `standard` for that reason (training/run.py): the plan counts the same.
    if recipe.training.lm_loss == "standard" or trains_with_own_trainer(get_task(recipe.task.type)):
        peak = tokens * vocab * STANDARD_LOSS_BYTES
        note = f"{tokens:,} tokens x {vocab:,} vocabulary"
    else:
        chunk = min(tokens, chunk_tokens(tokens, vocab, hidden))
        peak = chunk * vocab * CHUNK_LOSS_BYTES + 2 * tokens * hidden * element
        note = f"chunked: {chunk:,} of {tokens:,} tokens x {vocab:,} vocabulary at a time"
    if layer_working_set:
        note += f"; peak {format_bytes(peak)}, less the layer backward's {format_bytes(layer_working_set)} it precedes"
    return Row("logits + loss", max(peak - layer_working_set, 0), note)


def activations(recipe: Recipe, counts: ParameterCounts, precision: str) -> tuple[int, int, str]:
    """Saved activations at the start of backward, and one layer's backward working set (recomputation under
    checkpointing; 0 without, where every layer's tensors are saved).

    Per token and layer (element size `a`, hidden `h`, key/value width `kv`, MLP width `i`), measured on CPU by
    autograd's live bytes (`python -m benchmarks.lm_loss_peak --activations`): two RMS/LayerNorms keep their
    float32 input (4h each; with frozen norm weights the normalized copy is not kept); attention keeps q, k, v
    and its output (2ah + 2a*kv) plus a float32 logsumexp per head (eager attention instead keeps the
    heads x seq float32 probabilities and their cast); a gated MLP keeps gate, activation and up (3ai; the
    activation's input only, ai, ungated). Frozen linear layers keep no input. Each adapted module keeps its own
    copy of its input (the adapter's float32 weights make autocast cast the input again: a per input element;
    with dropout the dropped copy's cast and a 1-byte mask, a + 1) and its low-rank activation (a per rank).
    Full fine-tuning keeps the inputs of the linear layers whose input is not already kept: a(h + i).
    Gradient checkpointing keeps only each layer's input (ah) and recomputes one layer at a time; that
    recomputation and its backward peak at about one layer's saved bytes (measured 0.9-1.2x).
    A k-bit base adds its largest weight, dequantized to the activations' dtype, to that working set. DoRA and IA3
    keep more per adapted module (below); prompt tuning's virtual tokens lengthen every sequence (`sequence_length`).
    """
    dims = counts.dims
    element = 2 if precision in ("bf16", "fp16") else 4
    h, kv, i, heads = dims["hidden"], dims["kv_heads"] * dims["head_dim"], dims["intermediate"], dims["heads"]
    layers, seq = dims["layers"], sequence_length(recipe)
    tokens = micro_batch_sequences(recipe) * seq
    per_token_layer = 2 * 4 * h + 2 * element * h + 2 * element * kv
    per_token_layer += (3 if dims["gated_mlp"] else 1) * element * i
    attention = recipe.model.attn_implementation or "sdpa"
    if attention == "eager":
        per_token_layer += heads * seq * (4 + element)
    else:
        per_token_layer += 4 * heads
    if recipe.adapter.method == "none":
        per_token_layer += element * (h + i)
    elif layers:
        copy = element + 1 if recipe.adapter.dropout > 0 else element
        per_token_layer += copy * counts.adapter_inputs // layers
    per_token_layer += element * counts.adapter_ranks // max(layers, 1)
    # DoRA (peft's `DoraLinearLayer.forward`) also keeps each module's base output and scaled adapter output for the
    # magnitude's gradient, and with dropout it recomputes the base output from the dropped input (which peft has cast
    # to the float32 adapter's dtype): the weight is cast to match, and autocast saves a 16-bit copy of it.
    per_token_layer += 2 * element * counts.dora_outputs // max(layers, 1)
    # IA3 (peft's `ia3.Linear.forward`) keeps what it scales for its vector's gradient: a module's output, or for a
    # feed-forward module its input, cast to the float32 vector's dtype first.
    per_token_layer += (element * counts.ia3_outputs + 4 * counts.ia3_feedforward_inputs) // max(layers, 1)
    dora_weights = element * counts.dora_weight_numel if recipe.adapter.dropout > 0 else 0
    if resolve_gradient_checkpointing(recipe):  # unset means on for a quantized base
        saved, working = tokens * layers * element * h, tokens * per_token_layer + dora_weights // max(layers, 1)
        note = f"checkpointed, {attention} attention"
    else:
        saved, working = tokens * (layers * per_token_layer + 2 * element * h) + dora_weights, 0
        note = f"{attention} attention"
    # bitsandbytes computes a k-bit layer (4-bit forward and backward, 8-bit backward) with its weight dequantized whole
    # to the activations' dtype, one weight at a time: the largest such copy is live inside the layer's backward.
    dequantized = counts.largest_quantized_numel * element
    if dequantized:
        working += dequantized
        note += f", + {format_bytes(dequantized)} dequantized weight"
    norm = dora_norm_transient(counts, element)
    if norm:
        working += norm
        note += f", + {format_bytes(norm)} DoRA weight norm"
    return int(saved), int(working), f"{tokens:,} tokens/micro-batch, {note}"


def dora_norm_transient(counts: ParameterCounts, element: int) -> int:
    """What one DoRA module's forward allocates, and frees, to compute its weight norm, for the widest-input module.

    peft builds the adapter's dense weight as `lora_B(lora_A(eye))` (`DoraLinearLayer.get_lora_weight`): a float32
    identity of input x input elements, under mixed precision cast again for the float32 adapter, then input x output
    tensors for the product, its scaled sum with the (dequantized) weight and the weight itself: ~3 of them in the
    activations' dtype. Independent of the tokens, so it dominates on wide MLPs: 1.5 GiB for Llama-3-8B's down_proj
    (14,336 inputs) in bf16. Measured on CPU (`python -m benchmarks.lm_loss_peak --dora`)."""
    inputs, outputs = counts.dora_widest
    identity = inputs * inputs * (4 + (element if element < 4 else 0))
    return identity + 3 * inputs * outputs * element


def format_bytes(size: float) -> str:
    return f"{size / GiB:.2f} GiB"


def format_plan(plan: MemoryPlan) -> str:
    """The per-GPU breakdown as an aligned text table with the verdict underneath."""
    settings = plan.settings
    lines = [
        f"per GPU ({plan.gpus} GPU{'s' if plan.gpus > 1 else ''}, {settings['precision']}, "
        f"sharding: {settings['sharding']}, {settings['tokens_per_micro_batch']:,} tokens per micro-batch)",
    ]
    width = max(len(row.component) for row in plan.rows)
    for row in plan.rows:
        lines.append(f"  {row.component:<{width}}  {format_bytes(row.bytes):>11}  {row.note}".rstrip())
    lines.append(f"  {'total':<{width}}  {format_bytes(plan.total):>11}")
    if plan.host_bytes:
        lines.append(f"  CPU RAM for offloaded tensors: {format_bytes(plan.host_bytes)} per process")
    if plan.fits is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"{verdict} in {format_bytes(plan.gpu_memory)} per GPU "
                     f"({format_bytes(abs(plan.gpu_memory - plan.total))} {'spare' if plan.fits else 'over'})")
        if abs(plan.total - plan.gpu_memory) <= PLAN_ERROR * plan.gpu_memory:
            lines.append(f"  borderline: within the planner's error (~{PLAN_ERROR:.0%}, docs/plan.md) of the GPU's "
                         "memory; runs this close have been published both ways, so measure one step first")
    return "\n".join(lines)
