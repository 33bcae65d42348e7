"""The recipe schema: the single source of truth for every option peftkit reads.

Each key has a type, a default and a one-line description; docs (`docs/recipe.md`), error messages
and `peftkit validate` are generated from these classes. Cross-field rules live in validators here
so that impossible combinations fail before any model or data is loaded.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSection(Section):
    name: str = Field(
        description="Base model: a hub id, a local folder, or `package:<module>/<subdir>` for a model "
        "shipped inside an installed Python package."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the (unquantized) base weights; `auto` uses the checkpoint's dtype."
    )
    trust_remote_code: bool = Field(
        False, description="Allow the model repository to run its own Python code. Off unless you trust it."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel; unset lets transformers choose."
    )
    allow_pickle_weights: bool = Field(
        False,
        description="Also accept pickle (.bin) weights, read with torch.load(weights_only=True); safetensors otherwise.",
    )


class ClassificationTask(Section):
    type: Literal["classification"] = Field("classification", description="Text classification.")
    text_column: str = Field("text", description="Column holding the text (first text of a pair).")
    text_pair_column: str | None = Field(None, description="Column holding the second text of a sentence pair.")
    label_column: str = Field("label", description="Column holding the label (string or integer).")
    labels: list[str] | None = Field(
        None,
        description="Label names in id order; unset sorts the labels found in the training data.",
    )


Task = Annotated[Union[ClassificationTask], Field(discriminator="type")]


class DataSource(Section):
    path: str = Field(
        description="Local file (.json, .jsonl, .csv, .tsv, .parquet), `package:<module>/<file>`, "
        "or a hub dataset name."
    )
    format: Literal["auto", "json", "jsonl", "csv", "tsv", "parquet", "hub"] = Field(
        "auto", description="File format; `auto` uses the file extension, or `hub` when no such file exists."
    )
    split: str | None = Field(None, description="Hub split to load (defaults to the section's own name).")
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    rename: dict[str, str] = Field(
        default_factory=dict, description="Columns to rename after loading, `{old: new}`."
    )
    limit: int | None = Field(None, gt=0, description="Keep at most this many rows (after shuffling with `seed`).")
    seed: int = Field(0, description="Seed of the shuffle applied before `limit`.")


class DataSection(Section):
    train: DataSource = Field(description="Training data.")
    validation: DataSource | None = Field(None, description="Validation data, used for periodic evaluation.")
    test: DataSource | None = Field(None, description="Held-out test data, evaluated once at the end.")
    validation_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Split this fraction off the training data when no validation source is set."
    )
    max_length: int = Field(256, gt=0, description="Maximum tokens per example; longer inputs are truncated.")


class AdapterSection(Section):
    method: Literal["lora", "none"] = Field("lora", description="Adapter method; `none` is full fine-tuning.")
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="Modules that get adapters: `all-linear` or a list of module names."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases are trained.")
    modules_to_save: list[str] | None = Field(
        None, description="Extra modules trained fully and saved with the adapter (the task head is added for you)."
    )


class QuantizationSection(Section):
    bits: Literal[4, 8] | None = Field(None, description="Quantize the frozen base to 4 or 8 bits; unset keeps it.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too.")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the 4-bit layers compute in."
    )
    storage_dtype: Literal["uint8", "float32", "bfloat16", "float16"] = Field(
        "uint8", description="Dtype that stores packed 4-bit weights; ZeRO-3/FSDP need it equal to compute_dtype."
    )


class DistributedSection(Section):
    strategy: Literal["auto", "ddp", "deepspeed", "fsdp"] = Field(
        "auto", description="Sharding: `auto` is DDP when launched on several processes, else one process."
    )
    zero_stage: Literal[1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory (DeepSpeed/FSDP).")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (ZeRO-3/FSDP).")


class TrainingSection(Section):
    epochs: float = Field(3.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(16, gt=0, description="Examples per device per forward pass.")
    eval_batch_size: int | None = Field(None, gt=0, description="Evaluation batch size; unset uses twice batch_size.")
    gradient_accumulation: int = Field(1, gt=0, description="Forward passes per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "polynomial"] = Field(
        "linear", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.06, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm (0 disables clipping).")
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd"] = (
        Field("adamw_torch", description="Optimizer (transformers names).")
    )
    seed: int = Field(42, description="Seed for model init, data order and dropout.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Mixed precision; `auto` is bf16 on GPUs that support it, else fp32."
    )
    eval_strategy: Literal["steps", "epoch", "no"] = Field("epoch", description="When to evaluate on validation.")
    eval_steps: int = Field(100, gt=0, description="Steps between evaluations when eval_strategy is `steps`.")
    save_strategy: Literal["steps", "epoch", "no"] = Field("epoch", description="When to save a checkpoint.")
    save_steps: int = Field(100, gt=0, description="Steps between checkpoints when save_strategy is `steps`.")
    keep_last: int = Field(2, gt=0, description="Checkpoints kept on disk (the best one is never deleted).")
    logging_steps: int = Field(10, gt=0, description="Steps between logged training losses.")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after this many evaluations without improvement of metric_for_best."
    )
    metric_for_best: str | None = Field(
        None, description="Validation metric that selects the best checkpoint; unset uses the task's default."
    )
    resume: bool = Field(False, description="Continue from the last complete checkpoint in the run folder.")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="On a NaN/inf loss or gradient: stop naming the step and last checkpoint, or skip the step."
    )
    abort_grad_norm: float | None = Field(
        None, gt=0, description="Treat a gradient norm above this as divergence (handled like on_nonfinite)."
    )

    @model_validator(mode="after")
    def _cadence_fits(self) -> TrainingSection:
        if self.early_stopping_patience and self.eval_strategy == "no":
            raise ValueError("early_stopping_patience needs eval_strategy `steps` or `epoch`, not `no`")
        return self


class EvaluationSection(Section):
    splits: list[Literal["validation", "test"]] = Field(
        default_factory=lambda: ["validation", "test"],
        description="Splits scored at the end of training (those the data section defines).",
    )
    worst_examples: int = Field(10, ge=0, description="Worst predictions listed in the report.")


class OutputSection(Section):
    dir: str | None = Field(None, description="Run folder; unset is `runs/<recipe name>`.")
    overwrite: bool = Field(False, description="Replace an existing run folder instead of refusing.")
    tensorboard: bool = Field(True, description="Write TensorBoard logs to `<run>/tensorboard`.")


class Recipe(Section):
    name: str = Field("run", description="Recipe name; defaults to the YAML file's name.")
    model: ModelSection = Field(description="The base model.")
    task: Task = Field(default_factory=ClassificationTask, description="The downstream task and its options.")
    data: DataSection = Field(description="Where the data comes from.")
    adapter: AdapterSection = Field(default_factory=AdapterSection, description="Parameter-efficient method.")
    quantization: QuantizationSection = Field(
        default_factory=QuantizationSection, description="Quantization of the frozen base."
    )
    distributed: DistributedSection = Field(default_factory=DistributedSection, description="Sharding strategy.")
    training: TrainingSection = Field(default_factory=TrainingSection, description="Optimization settings.")
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection, description="Final evaluation.")
    output: OutputSection = Field(default_factory=OutputSection, description="Where results go.")

    @model_validator(mode="after")
    def _combinations_are_possible(self) -> Recipe:
        if self.quantization.bits and self.adapter.method == "none":
            raise ValueError(
                "quantization.bits needs an adapter: a quantized base cannot be fully fine-tuned; "
                "set adapter.method: lora (QLoRA) or remove quantization.bits"
            )
        if self.training.eval_strategy != "no" and self.data.validation is None and not self.data.validation_fraction:
            raise ValueError(
                "training.eval_strategy needs validation data: set data.validation, data.validation_fraction, "
                "or training.eval_strategy: no"
            )
        if self.training.save_strategy == "no" and self.training.eval_strategy != "no":
            raise ValueError("training.save_strategy: no cannot keep the best checkpoint; use `steps` or `epoch`")
        if (
            self.training.eval_strategy != "no"
            and self.training.save_strategy != self.training.eval_strategy
        ):
            raise ValueError(
                "training.save_strategy must equal training.eval_strategy so that the best checkpoint is saved "
                f"(got save_strategy={self.training.save_strategy}, eval_strategy={self.training.eval_strategy})"
            )
        if self.training.eval_strategy == "steps" and self.training.save_steps % self.training.eval_steps:
            raise ValueError("training.save_steps must be a multiple of training.eval_steps")
        return self
