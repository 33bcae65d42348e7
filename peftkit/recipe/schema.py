"""The recipe schema: the single source of truth for every option peftkit reads.

Each key has a type, a default and a one-line description; docs (`docs/recipe.md`), error messages
and `peftkit validate` are generated from these classes. Cross-field rules live in validators here
so that impossible combinations fail before any model or data is loaded.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import importlib
from typing import Annotated, Any, Literal, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, never silently ignored."""

    # inf/NaN numbers pass `gt`/`ge` bounds and only fail deep in training (infinite epochs, an inf norm): refused.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


def aliases_of(model: type[BaseModel]) -> dict[str, str]:
    """`{alias: key}`: the Hugging Face / peft names (`validation_alias`) a section accepts for its keys."""
    found = {}
    for name, field in model.model_fields.items():
        for choice in getattr(field.validation_alias, "choices", ()):
            if choice != name:
                found[choice] = name
    return found


def check_pass_through(
    options: dict[str, Any], target: str, section_name: str, key: str, section: type[BaseModel]
) -> None:
    """Options handed unchanged to a library dataclass (`module:Class`) must be fields of it, and not ones the
    recipe already models (those have one place: the section's own key)."""
    if not options:
        return
    module, _, name = target.partition(":")
    fields = dataclasses.fields(getattr(importlib.import_module(module), name))
    modelled = {**{field: field for field in section.model_fields}, **aliases_of(section)}
    for option in options:
        if option in modelled:
            raise ValueError(f"{key}.{option} is a recipe key: set {section_name}.{modelled[option]} instead")
        if option not in {field.name for field in fields}:
            raise ValueError(f"{key}.{option} is not an option of {module}'s {name}{_successor_hint(option, fields)}")


def _successor_hint(option: str, fields) -> str:
    """Where an unknown option went: a field of a close name, or a field that now takes it as a value (transformers
    5 turned `group_by_length: true` into `train_sampling_strategy: group_by_length`)."""
    close = difflib.get_close_matches(option, sorted(field.name for field in fields), n=1)
    if close:
        return f"; did you mean `{close[0]}`?"
    successors = [field.name for field in fields if option in field.metadata.get("choices", ())]
    return f"; it is now a value: `{successors[0]}: {option}`" if successors else ""


class ModelSection(Section):
    name: str = Field(
        description="Base model: a hub id, a local folder, or `package:<module>/<subdir>` for a model "
        "shipped inside an installed Python package.",
        validation_alias=AliasChoices("name", "model_name_or_path", "base_model"),
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    hub_id: str | None = Field(
        None,
        description="Hub id of the base when `name` is a local folder, recorded as the adapter's "
        "`base_model_name_or_path` and in its model card so that others can load it (packaged models know theirs).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None,
        description="Dtype of the (unquantized) base weights; `auto` uses the checkpoint's dtype; unset is `auto` on "
        "a GPU (a float32 copy of a bfloat16 checkpoint doubles its memory) and float32 on CPU.",
        validation_alias=AliasChoices("dtype", "torch_dtype"),
    )

    def resolved_dtype(self, on_gpu: bool) -> str:
        """The dtype the base is loaded in (`auto`: the checkpoint's)."""
        return self.dtype or ("auto" if on_gpu else "float32")
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
    dropout_overrides: dict[str, float] = Field(
        default_factory=dict,
        description="Dropout probabilities of the base's config to change for training, e.g. "
        "`{attention_probs_dropout_prob: 0.0}` (BERT; `attention_dropout`, `attn_pdrop`... elsewhere). On a CPU, "
        "attention dropout makes PyTorch's attention take its slow path (MiniLM LoRA steps 1.5-1.8x longer, "
        "docs/tasks.md). Only dropout keys: inference uses none, so a deployed adapter behaves the same.",
    )

    @field_validator("dropout_overrides")
    @classmethod
    def _only_dropout_keys(cls, overrides: dict[str, float]) -> dict[str, float]:
        # Other config values (rope scaling, ...) would change inference, which rebuilds the base from its own config.
        others = [key for key in overrides if "drop" not in key]
        if others:
            raise ValueError(f"{others} are not dropout probabilities; only keys naming a dropout can be overridden")
        outside = {key: value for key, value in overrides.items() if not 0 <= value < 1}
        if outside:
            raise ValueError(f"{outside}: a dropout probability is at least 0 and below 1")
        return overrides


class ClassificationTask(Section):
    type: Literal["classification"] = Field("classification", description="Text classification.")
    text_column: str = Field("text", description="Column holding the text (first text of a pair).")
    text_pair_column: str | None = Field(None, description="Column holding the second text of a sentence pair.")
    label_column: str = Field("label", description="Column holding the label (string or integer).")
    labels: list[str] | None = Field(
        None,
        description="Label names in id order (integer labels index into them); unset takes a hub dataset's "
        "`ClassLabel` names, else sorts the labels found in the training data.",
    )


class ExtractiveQATask(Section):
    type: Literal["extractive_qa"] = Field("extractive_qa", description="Extractive question answering (SQuAD style).")
    question_column: str = Field("question", description="Column holding the question.")
    context_column: str = Field("context", description="Column holding the passage the answer is a span of.")
    answers_column: str = Field(
        "answers",
        description="Column holding the gold answers: `{text: [...], answer_start: [...]}`, a list of "
        "`{text, answer_start}`, or plain answer text (located in the context).",
    )
    doc_stride: int = Field(
        64, gt=0, description="Tokens shared by consecutive windows when a context is longer than data.max_length."
    )
    max_answer_tokens: int = Field(30, gt=0, description="Longest answer span, in tokens, considered at prediction.")
    allow_unanswerable: bool = Field(
        False, description="Questions may have no answer (SQuAD v2); the model then learns to predict the empty answer."
    )
    null_score_threshold: float = Field(
        0.0, description="With allow_unanswerable: answer empty when the no-answer score beats the best span by this."
    )


class _Seq2SeqTask(Section):
    source_prefix: str = Field("", description="Text put before every source (e.g. T5's `translate English to French: `).")
    max_target_length: int = Field(128, gt=0, description="Maximum tokens of a training target; longer ones are truncated.")
    source_lang: str | None = Field(
        None, description="Language code of the sources for multilingual models whose tokenizer marks languages "
        "(NLLB `eng_Latn`, mBART / mBART-50 `en_XX`, M2M100 `en`); required by them, refused by other tokenizers.",
    )
    target_lang: str | None = Field(
        None, description="Language code of the targets for the same models: targets are tagged with it and "
        "generation starts with it, as the model was pre-trained.",
    )


class TranslationTask(_Seq2SeqTask):
    type: Literal["translation"] = Field("translation", description="Translation with an encoder-decoder model.")
    source_column: str = Field(
        "source", description="Column holding the source sentence (a language code for line-aligned language files and "
        "the WMT / OPUS `translation: {en: ..., de: ...}` rows).",
    )
    target_column: str = Field("target", description="Column holding the reference translation.")


class SummarizationTask(_Seq2SeqTask):
    type: Literal["summarization"] = Field("summarization", description="Summarization with an encoder-decoder model.")
    source_column: str = Field(
        "document", description="Column holding the document (a list of sentences is joined with spaces)."
    )
    target_column: str = Field(
        "summary", description="Column holding the summary (a list means several references; training uses the first)."
    )


class FeaturesTask(ClassificationTask):
    type: Literal["features"] = Field(
        "features",
        description="Classification baseline: frozen model -> pooled embeddings (cached in the run folder) -> "
        "scikit-learn logistic regression. Needs adapter.method: none.",
    )
    pooling: Literal["auto", "mean", "cls", "last"] = Field(
        "auto", description="How token states become one vector: `auto` is `last` for decoder-only models, else `mean`."
    )
    regularization: float = Field(
        1.0, gt=0, description="Inverse L2 strength `C` of the logistic regression (smaller = stronger)."
    )
    max_iterations: int = Field(2000, gt=0, description="Solver iterations of the logistic regression.")


class CausalLMTask(Section):
    type: Literal["causal_lm"] = Field(
        "causal_lm",
        description="Instruction / chat SFT of a decoder; loss on responses only. Downstream tasks are learned "
        "generatively and scored on generated text (see response_metric).",
    )
    format: Literal["auto", "template", "messages", "sharegpt", "alpaca", "prompt_completion", "text"] = Field(
        "auto",
        description="Row format: `messages` (OpenAI `[{role, content}]`), `sharegpt` (`conversations` of `{from, value}`), "
        "`alpaca` (`instruction`, `input`, `output`), `prompt_completion` (strings or message lists), `text` (raw text "
        "for continued pre-training: loss on every token, long texts cut into data.max_length pieces), `template` "
        "(`prompt`/`response` templates over any columns). `auto` uses `template` when the templates are changed, "
        "else detects the format from the columns.",
    )
    messages_column: str | None = Field(
        None,
        description="Column of chat messages (`[{role, content}, ...]`); every assistant turn is trained. "
        "When set, `prompt`/`response` are not used.",
    )
    prompt: str = Field(
        "{prompt}",
        description="User turn as a template over the row's columns: `{column}`, nested `{column[0][key]}`.",
    )
    response: str = Field("{response}", description="Assistant turn (the trained target), a template like `prompt`.")
    system_prompt: str | None = Field(None, description="System message put before every prompt.")
    chat_template: Literal["auto", "chatml", "plain"] = Field(
        "auto",
        description="`auto` uses the tokenizer's chat template; `chatml` or `plain` (prompt, newline, response, EOS) "
        "for tokenizers without one.",
    )
    packing: bool = Field(
        True,
        description="Padding-free batching: each batch is one row with position_ids restarting per example "
        "(no cross-example attention); false pads every example to the batch's longest.",
    )
    response_metric: Literal["none", "classification", "qa", "bleu", "rouge"] = Field(
        "none",
        description="Score generated responses: `classification` (accuracy/F1 on label strings), `qa` (EM/F1), "
        "`bleu` (BLEU/chrF), `rouge` (ROUGE-1/2/L); `none` reports response loss and perplexity only.",
    )
    labels: list[str] | None = Field(
        None,
        description="classification: label strings in id order; integer values in the response index into them.",
    )

    @model_validator(mode="after")
    def _labels_belong_to_classification(self) -> CausalLMTask:
        if self.labels and self.response_metric != "classification":
            raise ValueError("task.labels is only used with task.response_metric: classification")
        return self


class PreferenceTask(Section):
    type: Literal["preference"] = Field(
        "preference",
        description="Preference tuning of a decoder (DPO, its variants, ORPO, KTO) on TRL's trainers; the reference "
        "model is the base with the adapter disabled.",
    )
    loss: Literal["dpo", "sigmoid_norm", "ipo", "hinge", "robust", "sppo_hard", "nca_pair", "bco_pair", "apo_zero",
                  "apo_down", "orpo", "kto"] = Field(
        "dpo",
        description="`dpo` (sigmoid) and the DPO variants TRL's DPOTrainer computes (`sigmoid_norm`: DPO on "
        "per-token log-ratios, so a longer response gains nothing from its length; `ipo`, `hinge`, `robust`, ...); "
        "`orpo` (odds-ratio, no reference model); `kto` (pairs or unpaired prompt/completion/label rows).",
    )
    beta: float = Field(
        0.1, gt=0,
        description="DPO/KTO: strength of the pull towards the reference (higher = closer); ORPO: weight of the "
        "odds-ratio term (lambda).",
    )
    format: Literal["auto", "explicit", "implicit", "unpaired"] = Field(
        "auto",
        description="`explicit` (prompt, chosen, rejected), `implicit` (chosen/rejected whole dialogues sharing every "
        "turn but the last, e.g. Anthropic HH-RLHF text), `unpaired` (prompt, completion, label; KTO only); `auto` "
        "detects it from the columns. Each value may be a string or a list of {role, content} messages.",
    )
    system_prompt: str | None = Field(None, description="System message put before every prompt.")
    max_prompt_length: int | None = Field(
        None, gt=0,
        description="Tokens a prompt may keep: a longer dialogue loses its earliest turns (the system message and the "
        "last user turn always stay), so the pair trains on the end of the conversation, which the responses "
        "answer, instead of being dropped for filling data.max_length. None keeps whole prompts.",
    )
    chat_template: Literal["auto", "chatml", "plain"] = Field(
        "auto", description="`auto` uses the tokenizer's chat template; `chatml` or `plain` for tokenizers without one."
    )
    compare_generations: int = Field(
        3, ge=0, description="Evaluation prompts answered by the tuned model and the base, shown side by side in the report."
    )


Task = Annotated[
    Union[ClassificationTask, FeaturesTask, CausalLMTask, ExtractiveQATask, TranslationTask, SummarizationTask,
          PreferenceTask],
    Field(discriminator="type"),
]


class DataSource(Section):
    path: str = Field(
        description="Local file (.json, .jsonl, .csv, .tsv, .parquet), `package:<module>/<file>`, "
        "or a hub dataset name."
    )
    format: Literal["auto", "json", "jsonl", "csv", "tsv", "parquet", "label_text", "hub"] = Field(
        "auto",
        description="File format; `auto` uses the file extension, or `hub` when no such file exists. `label_text`: "
        "one example a line, `<label> <text>` (the SST/SentEval/TREC releases), read into columns `label` and `text`. "
        "CSV/TSV fields are text as written (`NA`, `null` stay text); only an empty field is missing.",
    )
    encoding: str = Field(
        "utf-8",
        description="Text encoding of a local file (e.g. `latin-1`, `cp1252`); an undecodable line is an error "
        "naming the line.",
    )
    split: str | None = Field(
        None, description="Hub split to load (defaults to the section's own name); a local file has none (refused).")
    subset: str | None = Field(None, description="Hub dataset configuration name (hub datasets only).")
    rename: dict[str, str] = Field(
        default_factory=dict, description="Columns to rename after loading, `{old: new}`."
    )
    languages: list[str] | None = Field(
        None,
        min_length=2,
        description="Line-aligned language files: read `<path>.<lang>` (or `.gz`) for each language into a column "
        "named by the language code (e.g. Multi30k's `train.en.gz`, `train.fr.gz` with path `.../train`).",
    )
    rows: str | None = Field(
        None,
        pattern=r"^\d*:\d*$",
        description="Keep the row range `start:end` (Python slice, applied before `limit`), e.g. to split by article.",
    )
    limit: int | None = Field(None, gt=0, description="Keep at most this many rows (after shuffling with `seed`).")
    seed: int = Field(0, ge=0, lt=2**32, description="Seed of the shuffle applied before `limit` (and of `weight`'s sample).")
    weight: float | None = Field(
        None, gt=0,
        description="When a split lists several sources: rows taken from this one = weight x its rows (after `rows`/"
        "`limit`): a whole part repeats them, a fraction samples them with `seed`; unset is 1. The mixture is "
        "shuffled with the first source's seed; metrics.json and report.md count the rows of each source.",
    )

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            return codecs.lookup(value).name
        except LookupError:
            raise ValueError(f"unknown text encoding `{value}`; use e.g. utf-8, latin-1 or cp1252") from None

    @model_validator(mode="after")
    def _languages_are_files(self) -> DataSource:
        if self.languages and self.format != "auto":
            raise ValueError("languages reads line-aligned text files; remove format (it must stay `auto`)")
        return self


# A split is one source, or several mixed (each with an optional weight).
Sources = Union[DataSource, Annotated[list[DataSource], Field(min_length=1)]]


SPLITS = ("train", "validation", "test")  # the data sections, in the order they are loaded


class DataSection(Section):
    train: Sources = Field(description="Training data: one source, or a list of sources mixed by `weight`.")
    validation: Sources | None = Field(None, description="Validation data, used for periodic evaluation.")
    test: Sources | None = Field(None, description="Held-out test data, evaluated once at the end.")
    validation_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Split this fraction off the training data when no validation source is set."
    )
    max_length: int = Field(
        256, gt=0, description="Maximum tokens per example; longer inputs are truncated. On a model with absolute "
        "positions (BERT, GPT-2, BART, ...) rows longer than its table are refused before training.",
        validation_alias=AliasChoices("max_length", "max_seq_length", "sequence_len"),
    )
    num_proc: int | None = Field(
        None, gt=0, description="Processes that tokenize (`datasets.map`); tokenized data is cached between runs."
    )
    skip_bad_rows: bool = Field(
        False,
        description="Classification and features: skip rows whose text or label is empty (or null); preference: skip rows that are not "
        "valid pairs (identical or empty responses, dialogues that differ before the last turn). Counted in a "
        "warning instead of stopping with an error that names the file and row.",
    )

    @property
    def carves_validation(self) -> bool:
        """Whether `validation_fraction` takes the validation rows out of train (no validation source is set)."""
        return self.validation is None and bool(self.validation_fraction)

    def sources_by_key(self) -> dict[str, DataSource]:
        """Every data source by its key path: `data.train`, or `data.train[1]` in a list of sources."""
        found = {}
        for split in SPLITS:
            spec = getattr(self, split)
            if isinstance(spec, list):
                found.update({f"data.{split}[{i}]": source for i, source in enumerate(spec)})
            elif spec is not None:
                found[f"data.{split}"] = spec
        return found


PROMPT_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning")
# The peft config class each method is configured with (names, so that validating a recipe does not import peft).
PEFT_CONFIG_CLASSES = {
    "lora": "LoraConfig",
    "adalora": "AdaLoraConfig",
    "ia3": "IA3Config",
    "prompt_tuning": "PromptTuningConfig",
    "prefix_tuning": "PrefixTuningConfig",
    "p_tuning": "PromptEncoderConfig",
}

# Which adapter options each method reads; changing one the chosen method ignores is an error, not a no-op.
ADAPTER_OPTION_METHODS: dict[str, tuple[str, ...]] = {
    "r": ("lora", "adalora"),
    "alpha": ("lora", "adalora"),
    "dropout": ("lora", "adalora"),
    "target_modules": ("lora", "adalora", "ia3"),
    "bias": ("lora", "adalora"),
    "modules_to_save": ("lora", "adalora", "ia3"),
    "use_dora": ("lora",),
    "use_rslora": ("lora",),
    "init": ("lora",),
    "loraplus_lr_ratio": ("lora",),
    "adalora_init_r": ("adalora",),
    "adalora_warmup": ("adalora",),
    "adalora_final": ("adalora",),
    "adalora_interval": ("adalora",),
    "num_virtual_tokens": PROMPT_METHODS,
}


class AdapterSection(Section):
    method: Literal["lora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "none"] = Field(
        "lora",
        description="Adapter method (all from peft): `lora`, `adalora` (LoRA whose ranks are re-allocated during "
        "training), `ia3` (learned activation scaling), `prompt_tuning`, `prefix_tuning`, `p_tuning` (learned "
        "virtual tokens), or `none` for full fine-tuning.",
    )
    r: int = Field(
        8, gt=0, description="LoRA rank; for AdaLoRA the average rank the budget is pruned down to.",
        validation_alias=AliasChoices("r", "lora_r"),
    )
    alpha: float = Field(
        16, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).",
        validation_alias=AliasChoices("alpha", "lora_alpha"),
    )
    dropout: float = Field(
        0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.",
        validation_alias=AliasChoices("dropout", "lora_dropout"),
    )
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="Modules that get adapters: `all-linear` or a list of module names. For IA3, `all-linear` means "
        "peft's default attention + feed-forward modules of the architecture.",
        validation_alias=AliasChoices("target_modules", "lora_target_modules"),
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases are trained.")
    modules_to_save: list[str] | None = Field(
        None, description="Extra modules trained fully and saved with the adapter (the task head is added for you)."
    )
    use_dora: bool = Field(False, description="DoRA: split each update into magnitude and direction (LoRA only).")
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(r), stabler at high ranks (LoRA only).")
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = Field(
        "default",
        description="LoRA initialization: `default` (B = 0), `gaussian`, `pissa` (principal singular vectors), "
        "`olora` (QR), `loftq` (compensates 4-bit quantization error; needs quantization.bits: 4).",
        validation_alias=AliasChoices("init", "init_lora_weights"),
    )
    loraplus_lr_ratio: float | None = Field(
        None, gt=0,
        description="LoRA+: the B matrices (and trained biases) learn at `training.learning_rate` x this ratio, the A "
        "matrices and the task head at `training.learning_rate` (peft's `create_loraplus_optimizer`; its paper uses "
        "16, with a learning rate about half of plain LoRA's); unset trains every weight at one rate.",
    )
    adalora_init_r: int = Field(
        12, gt=0, description="AdaLoRA: starting rank of every module before pruning to `r`.",
        validation_alias=AliasChoices("adalora_init_r", "init_r"),
    )
    adalora_warmup: float = Field(
        0.1, ge=0.0, lt=1.0, description="AdaLoRA: fraction of training steps before ranks start being pruned."
    )
    adalora_final: float = Field(
        0.2, ge=0.0, lt=1.0, description="AdaLoRA: fraction of training steps at the end with ranks frozen."
    )
    adalora_interval: int = Field(
        1, gt=0, description="AdaLoRA: optimizer steps between two rank re-allocations.",
        validation_alias=AliasChoices("adalora_interval", "deltaT"),
    )
    num_virtual_tokens: int = Field(
        20, gt=0, description="Prompt tuning / prefix tuning / P-tuning: number of learned virtual tokens."
    )
    peft_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Further options of the method's peft config, passed unchanged and checked against its fields "
        "(e.g. LoRA's `rank_pattern`, `alpha_pattern`, `layers_to_transform`, `exclude_modules`).",
    )

    @field_validator("init", mode="before")
    @classmethod
    def _peft_init_names(cls, value):
        # peft's `init_lora_weights: true` is its default initialization.
        return "default" if value is True else value

    @model_validator(mode="after")
    def _options_fit_method(self) -> AdapterSection:
        for option, methods in ADAPTER_OPTION_METHODS.items():
            # Compared with the default, not with what was set: a dumped recipe (run folder) lists every key.
            if self.method not in methods and getattr(self, option) != type(self).model_fields[option].default:
                raise ValueError(
                    f"adapter.{option} applies to method {' / '.join(methods)}, not `{self.method}`; "
                    f"remove it or choose one of those methods"
                )
        if self.method == "none" and self.peft_args:
            raise ValueError("adapter.peft_args needs an adapter method; remove it for adapter.method: none")
        if self.method != "none":
            config_class = f"peft:{PEFT_CONFIG_CLASSES[self.method]}"
            check_pass_through(self.peft_args, config_class, "adapter", "peft_args", type(self))
        if self.method == "adalora":
            if self.adalora_init_r < self.r:
                raise ValueError(
                    f"adapter.adalora_init_r ({self.adalora_init_r}) must be at least adapter.r ({self.r}): "
                    "AdaLoRA starts at adalora_init_r and prunes down to r"
                )
            if self.adalora_warmup + self.adalora_final >= 1:
                raise ValueError("adapter.adalora_warmup + adapter.adalora_final must be below 1 to leave steps for pruning")
        return self


class QuantizationSection(Section):
    bits: Literal[4, 8] | None = Field(
        None, description="Quantize the frozen base to 4 or 8 bits with bitsandbytes; unset (or `none`) keeps it."
    )
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type.",
        validation_alias=AliasChoices("quant_type", "bnb_4bit_quant_type"),
    )
    double_quant: bool = Field(
        True, description="Quantize the 4-bit quantization constants too.",
        validation_alias=AliasChoices("double_quant", "bnb_4bit_use_double_quant"),
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the 4-bit layers compute in.",
        validation_alias=AliasChoices("compute_dtype", "bnb_4bit_compute_dtype"),
    )
    storage_dtype: Literal["uint8", "float32", "bfloat16", "float16"] = Field(
        "uint8", description="Dtype that stores packed 4-bit weights; ZeRO-3/FSDP need it equal to compute_dtype.",
        validation_alias=AliasChoices("storage_dtype", "bnb_4bit_quant_storage"),
    )
    upcast_embeddings: bool = Field(
        False, description="Cast the frozen embeddings and LM head to float32 when preparing the k-bit base, as peft "
        "does; off keeps them in bf16 under bf16 training (its autocast runs the head's matmul in bf16 anyway), half "
        "their memory. fp32/fp16 training always casts them to float32.",
    )

    @field_validator("bits", mode="before")
    @classmethod
    def _none_means_unquantized(cls, value):
        return None if isinstance(value, str) and value.lower() == "none" else value

    @model_validator(mode="before")
    @classmethod
    def _bitsandbytes_flags(cls, data):
        """transformers' `load_in_4bit: true` / `load_in_8bit: true` are `bits: 4` / `bits: 8`."""
        if not isinstance(data, dict) or not ({"load_in_4bit", "load_in_8bit"} & set(data)):
            return data
        data = dict(data)
        flagged = [bits for bits in (4, 8) if data.pop(f"load_in_{bits}bit", False) is True]
        if len(flagged) > 1 or (flagged and data.get("bits") not in (None, "none", flagged[0])):
            raise ValueError(
                f"load_in_4bit / load_in_8bit and bits name different precisions ({flagged} vs bits: "
                f"{data.get('bits')}); keep only `bits: 4` or `bits: 8`"
            )
        if flagged:
            data["bits"] = flagged[0]
        return data


class DistributedSection(Section):
    strategy: Literal["auto", "ddp", "deepspeed", "fsdp"] = Field(
        "auto", description="Sharding: `auto` is DDP when launched on several processes, else one process. "
        "The recipe decides the strategy; the launcher (torchrun / accelerate launch) only decides the processes."
    )
    zero_stage: Literal[1, 2, 3] = Field(
        2, description="DeepSpeed ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters."
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory (DeepSpeed/FSDP).")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (ZeRO-3/FSDP).")
    fsdp_reshard_after_forward: bool = Field(
        True, description="FSDP: free gathered parameters after forward (full shard); false keeps them (ZeRO-2-like)."
    )

    @model_validator(mode="after")
    def _offload_fits_strategy(self) -> DistributedSection:
        if self.offload_params and not (self.strategy == "fsdp" or (self.strategy == "deepspeed" and self.zero_stage == 3)):
            raise ValueError(
                "distributed.offload_params needs sharded parameters: set distributed.strategy: fsdp, or "
                "distributed.strategy: deepspeed with distributed.zero_stage: 3"
            )
        if self.offload_optimizer and self.strategy not in ("deepspeed", "fsdp"):
            raise ValueError("distributed.offload_optimizer needs distributed.strategy: deepspeed or fsdp")
        if self.strategy == "fsdp" and self.offload_optimizer != self.offload_params:
            raise ValueError(
                "FSDP offloads parameters, gradients and optimizer states together: set distributed.offload_params "
                "and distributed.offload_optimizer to the same value"
            )
        return self

    @property
    def shards_parameters(self) -> bool:
        """ZeRO-3 and FSDP split every weight across ranks (quantized weights included)."""
        return self.strategy == "fsdp" or (self.strategy == "deepspeed" and self.zero_stage == 3)


class TrainingSection(Section):
    epochs: float = Field(
        3.0, gt=0, description="Passes over the training data (ignored when max_steps is set).",
        validation_alias=AliasChoices("epochs", "num_train_epochs"),
    )
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(
        16, gt=0, description="Examples per device per forward pass.",
        validation_alias=AliasChoices("batch_size", "per_device_train_batch_size", "micro_batch_size"),
    )
    eval_batch_size: int | None = Field(
        None, gt=0, description="Evaluation batch size; unset uses twice batch_size.",
        validation_alias=AliasChoices("eval_batch_size", "per_device_eval_batch_size"),
    )
    gradient_accumulation: int = Field(
        1, gt=0, description="Forward passes per optimizer step.",
        validation_alias=AliasChoices("gradient_accumulation", "gradient_accumulation_steps"),
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "polynomial"] = Field(
        "linear", description="Learning-rate schedule after warmup.",
        validation_alias=AliasChoices("scheduler", "lr_scheduler_type", "lr_scheduler"),
    )
    warmup_ratio: float = Field(0.06, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm (0 disables clipping).")
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd"] = (
        Field(
            "adamw_torch", description="Optimizer (transformers names).",
            validation_alias=AliasChoices("optimizer", "optim"),
        )
    )
    seed: int = Field(42, ge=0, lt=2**32, description="Seed for model init, data order and dropout (numpy takes 0 to 2**32-1).")
    gradient_checkpointing: bool | None = Field(
        None,
        description="Recompute activations in backward to save memory; unset turns it on for a quantized base "
        "(the QLoRA recipe) and off otherwise.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Mixed precision; `auto` is bf16 on GPUs that support it, else fp32 (on a CPU with native "
        "bf16, `bf16` can be faster: measure it, see docs/getting-started.md)."
    )
    lm_loss: Literal["auto", "standard", "chunked", "liger", "cut_cross_entropy"] = Field(
        "auto",
        description="Language-model loss (causal LM, seq2seq): `chunked` computes the cross-entropy from the hidden "
        "states in token chunks, never holding float32 logits over the whole vocabulary (any device); `liger` / "
        "`cut_cross_entropy` are fused CUDA kernels (packages liger-kernel / cut-cross-entropy); `standard` is "
        "transformers' loss; `auto` is chunked where the model's logits are its head's output, else standard.",
    )
    eval_strategy: Literal["steps", "epoch", "no"] = Field(
        "epoch", description="When to evaluate on validation.",
        validation_alias=AliasChoices("eval_strategy", "evaluation_strategy"),
    )
    eval_steps: int = Field(100, gt=0, description="Steps between evaluations when eval_strategy is `steps`.")
    save_strategy: Literal["steps", "epoch", "no"] = Field("epoch", description="When to save a checkpoint.")
    save_steps: int = Field(100, gt=0, description="Steps between checkpoints when save_strategy is `steps`.")
    keep_last: int = Field(
        2, gt=0, description="Checkpoints kept on disk (the best one is never deleted).",
        validation_alias=AliasChoices("keep_last", "save_total_limit"),
    )
    logging_steps: int = Field(10, gt=0, description="Steps between logged training losses.")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after this many evaluations without improvement of metric_for_best."
    )
    metric_for_best: str | None = Field(
        None, description="Validation metric that selects the best checkpoint; unset uses the task's default.",
        validation_alias=AliasChoices("metric_for_best", "metric_for_best_model"),
    )
    resume: bool = Field(False, description="Continue from the last complete checkpoint in the run folder.")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="On a NaN/inf loss or gradient: stop naming the step and last checkpoint, or skip the step."
    )
    abort_grad_norm: float | None = Field(
        None, gt=0, description="Treat a gradient norm above this as divergence (handled like on_nonfinite)."
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers that receive the training curves, the final metrics and the report's plots: "
        "`tensorboard` (`<run>/tensorboard`), `mlflow` ($MLFLOW_TRACKING_URI, else `<run>/mlruns`), `wandb` (online "
        "with WANDB_API_KEY, else offline in `<run>/wandb`); `[]` for none. mlflow and wandb are optional extras.",
    )
    trainer_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Further `transformers.TrainingArguments`, passed unchanged and checked against its fields "
        "(e.g. `neftune_noise_alpha`, `lr_scheduler_kwargs`, `train_sampling_strategy`, `torch_compile`).",
    )

    @field_validator("eval_strategy", "save_strategy", mode="before")
    @classmethod
    def _yaml_no_is_a_strategy(cls, value):
        # YAML 1.1 reads a bare `no` as false; `eval_strategy: no` means the strategy "no".
        return "no" if value is False else value

    @model_validator(mode="after")
    def _trainer_args_exist(self) -> TrainingSection:
        check_pass_through(self.trainer_args, "transformers:TrainingArguments", "training", "trainer_args", type(self))
        return self

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


class GenerationSection(Section):
    num_beams: int = Field(1, gt=0, description="Beam size when generating at evaluation (1 is greedy).")
    max_new_tokens: int = Field(64, gt=0, description="Most tokens generated per example.")
    length_penalty: float = Field(
        1.0,
        description="Beam search ranks by log-probability / length**length_penalty: larger favours longer outputs, "
        "0 ignores length (no effect when num_beams is 1).",
    )


class OutputSection(Section):
    dir: str | None = Field(
        None, description="Run folder; unset is `runs/<recipe name>`.",
        validation_alias=AliasChoices("dir", "output_dir"),
    )
    overwrite: bool = Field(
        False, description="Replace an existing run folder instead of refusing (only a peftkit run folder, and not one "
        "that holds the model or data the run reads).",
        validation_alias=AliasChoices("overwrite", "overwrite_output_dir"),
    )
    tensorboard: bool = Field(
        True, description="false leaves `tensorboard` out of training.report_to (the key of older recipes)."
    )


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
    generation: GenerationSection = Field(
        default_factory=GenerationSection, description="Decoding settings for tasks that generate text."
    )
    output: OutputSection = Field(default_factory=OutputSection, description="Where results go.")

    @model_validator(mode="after")
    def _tensorboard_switch(self) -> Recipe:
        if not self.output.tensorboard and "tensorboard" in self.training.report_to:
            self.training.report_to = [name for name in self.training.report_to if name != "tensorboard"]
        return self

    @model_validator(mode="after")
    def _combinations_are_possible(self) -> Recipe:
        if self.task.type == "features" and self.adapter.method != "none":
            raise ValueError(
                "task.type features keeps the model frozen and trains a logistic regression on its embeddings; "
                "set adapter.method: none"
            )
        if self.task.type == "features" and self.quantization.bits:
            # Checked before the adapter rules, whose alternative (an adapter) features cannot take.
            raise ValueError(
                "task.type features embeds with the frozen base in full precision (no adapter is trained, and "
                "quantization.bits is for k-bit adapter training); remove quantization.bits"
            )
        _check_adapter_fits(self.adapter, self.quantization, self.task.type)
        if self.distributed.shards_parameters and self.quantization.bits == 8:
            raise ValueError(
                "quantization.bits: 8 cannot be sharded by ZeRO-3/FSDP (int8 weights are not partitioned); "
                "use quantization.bits: 4 with storage_dtype equal to compute_dtype, or distributed.zero_stage: 2"
            )
        if (
            self.distributed.shards_parameters
            and self.quantization.bits == 4
            and self.quantization.storage_dtype != self.quantization.compute_dtype
        ):
            raise ValueError(
                "quantization.storage_dtype must equal quantization.compute_dtype under ZeRO-3/FSDP so the packed "
                "4-bit weights are partitioned across ranks instead of replicated on each "
                f"(got storage_dtype={self.quantization.storage_dtype}, compute_dtype={self.quantization.compute_dtype}); "
                f"set quantization.storage_dtype: {self.quantization.compute_dtype}"
            )
        if self.training.on_nonfinite == "skip" and self.distributed.strategy == "deepspeed":
            raise ValueError(
                "training.on_nonfinite: skip cannot be honoured under distributed.strategy: deepspeed (DeepSpeed "
                "applies the optimizer step inside backward, before the loss or gradient norm can be checked); "
                "use training.on_nonfinite: stop (the run stops before saving and names the last good checkpoint) "
                "or distributed.strategy: ddp or fsdp"
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


# (method, task type) pairs that cannot work, with the reason and what does.
UNSUPPORTED_METHOD_TASKS = {
    ("prefix_tuning", "classification"): "transformers' sequence-classification models accept no past_key_values, "
    "which prefix tuning injects; use prompt_tuning or p_tuning (virtual input tokens), or lora",
    **{
        (method, "extractive_qa"): "peft puts the learned virtual tokens before the input, so every start/end position "
        "the model scores is shifted by them while the answer positions are not; use lora, adalora or ia3"
        for method in ("prompt_tuning", "p_tuning")
    },
    ("adalora", "preference"): "TRL's preference trainers keep a frozen copy of the adapter as the reference model, "
    "and peft's AdaLoRA allows only one adapter per model; use lora (or use_dora: true) or ia3",
}


def _check_adapter_fits(adapter: AdapterSection, quantization: QuantizationSection, task_type: str) -> None:
    """Method x quantization x task combinations that cannot work, each with what would."""
    method, bits = adapter.method, quantization.bits
    if bits and method == "none":
        raise ValueError(
            "quantization.bits needs an adapter: a quantized base cannot be fully fine-tuned; "
            "set adapter.method: lora (QLoRA) or remove quantization.bits"
        )
    if adapter.init == "loftq" and bits != 4:
        raise ValueError(
            f"adapter.init: loftq initializes LoRA to cancel 4-bit quantization error and needs quantization.bits: 4 "
            f"(got {bits or 'none'}); set quantization.bits: 4, or use init: default (any base) or pissa / olora "
            "(unquantized base)"
        )
    if adapter.init in ("pissa", "olora") and bits:
        raise ValueError(
            f"adapter.init: {adapter.init} rewrites the base weights, which a {bits}-bit base cannot reproduce when the "
            "adapter is reloaded; use init: loftq (4-bit) or default with quantization, or remove quantization.bits"
        )
    reason = UNSUPPORTED_METHOD_TASKS.get((method, task_type))
    if reason:
        raise ValueError(f"adapter.method: {method} does not work for task {task_type}: {reason}")
