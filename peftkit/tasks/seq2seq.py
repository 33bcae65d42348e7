"""What translation and summarization share: an encoder-decoder model that learns source -> target and
generates at evaluation (settings from the recipe's `generation` section). A common module, not a task: the two
task modules import the shared half of the contract by name and add their predictions, metrics and reports.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq

from peftkit.data.sources import require_columns, split_origin
from peftkit.data.truncation import warn_cut
from peftkit.errors import UserError
from peftkit.evaluation.analysis import length_bucket_table, lowest_scoring_table, word_count
from peftkit.models.build import build_model
from peftkit.recipe.schema import Recipe
from peftkit.tasks import generation as decoding_path
from peftkit.tasks import languages
from peftkit.tasks.generation import Decoding
from peftkit.tasks.lm_loss import decoder_inputs_from_labels

log = logging.getLogger("peftkit")

PEFT_TASK_TYPE = "SEQ_2_SEQ_LM"
DEFAULT_METRIC = "loss"  # periodic evaluation is teacher-forced; the final evaluation generates
LOSS_SUMS_OVER_ITEMS = False  # the Trainer is not handed num_items_in_batch: the model averages over each batch's tokens


def source_text(value: Any) -> str:
    """A document given as a list of sentences (SciTLDR) reads as one text."""
    return " ".join(map(str, value)) if isinstance(value, list) else ("" if value is None else str(value))


def references(value: Any) -> list[str]:
    """Every non-empty reference of a row; a list column holds several (SciTLDR's TLDRs)."""
    values = value if isinstance(value, list) else [value]
    return [str(v) for v in values if v is not None and str(v).strip()]


def prepare(recipe: Recipe, splits: dict, tokenizer, info: dict | None = None) -> tuple[dict, dict]:
    """Tokenize sources (with the task's prefix) and first references.

    Training rows with an empty source or reference are dropped; evaluation rows are kept (row i of the
    tokenized split stays row i of the data) and those without a reference are left out of the scores.
    Both are counted in a warning.
    """
    import datasets

    task = recipe.task
    language_info = languages.apply(tokenizer, task.source_lang, task.target_lang, recipe.model.name)
    tokenized = {}
    for split, dataset in splits.items():
        source = split_origin(recipe.data, split)
        labelled = info is None or task.target_column in dataset.column_names
        columns = [task.source_column] + ([task.target_column] if labelled else [])
        require_columns(dataset, columns, split, source, "task.source_column/task.target_column")
        sources = [source_text(v) for v in dataset[task.source_column]]
        targets = [references(v) for v in dataset[task.target_column]] if labelled else None
        empty = [i for i, text in enumerate(sources) if not text.strip() or (labelled and not targets[i])]
        if empty:
            log.warning(
                "data.%s: %d of %d rows of `%s` have an empty %r or %r; they are %s",
                split, len(empty), len(dataset), source, task.source_column, task.target_column,
                "dropped" if split == "train" else "not scored",
            )
        if split == "train":
            keep = sorted(set(range(len(dataset))) - set(empty))
            if not keep:
                raise UserError(f"data.train: every row of `{source}` has an empty source or reference")
            sources, targets = [sources[i] for i in keep], [targets[i] for i in keep]
        prefixed = [task.source_prefix + text for text in sources]
        encoded = tokenizer(prefixed, truncation=True, max_length=recipe.data.max_length)
        columns = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        warn_cut(split, "sources", encoded["input_ids"], "data.max_length", recipe.data.max_length,
                 lambda rows: tokenizer([prefixed[i] for i in rows])["input_ids"])
        if labelled:
            first = [refs[0] if refs else "" for refs in targets]
            columns["labels"] = tokenizer(text_target=first, truncation=True, max_length=task.max_target_length)["input_ids"]
            # a cut reference still ends with the end token: the model learns to stop where the cut is
            warn_cut(split, "references", columns["labels"], "task.max_target_length", task.max_target_length,
                     lambda rows: tokenizer(text_target=[first[i] for i in rows])["input_ids"])
        tokenized[split] = datasets.Dataset.from_dict(columns)
    # Deployment encodes sources as training did: same prefix, same truncation.
    return tokenized, {"source_prefix": task.source_prefix, "max_length": recipe.data.max_length, **language_info}


def load_model(recipe: Recipe, info: dict):
    return build_model(recipe.model, recipe.quantization, AutoModelForSeq2SeqLM)


def head_modules(model) -> list[str]:
    return []  # the LM head is tied to the embeddings; nothing new to train fully


def collator(tokenizer, recipe: Recipe):
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)


def compute_metrics(info: dict, validation):
    return None


def generate(trainer, tokenized, recipe: Recipe) -> list[str]:
    """Decode every example with the recipe's generation settings, batch by batch, with a progress bar."""
    model, tokenizer = trainer.model, trainer.processing_class
    decoding = Decoding.from_settings(recipe.generation)
    batch_size = trainer.args.per_device_eval_batch_size
    start_tokens = languages.decoder_start(tokenizer, recipe.task.target_lang)
    model.eval()
    outputs = []
    inputs = tokenized.select_columns(["input_ids", "attention_mask"])
    for start in tqdm(range(0, len(inputs), batch_size), desc="generating", unit="batch"):
        batch = tokenizer.pad(inputs[start : start + batch_size], return_tensors="pt").to(trainer.args.device)
        answers = decoding_path.generate(model, tokenizer, batch, 1, recipe.generation.max_new_tokens, decoding,
                                         start_tokens=start_tokens)
        outputs += [answer["text"].strip() for answer in answers]
    return outputs


def generate_records(trainer, tokenized, raw, recipe: Recipe, example_scores: Callable[[str, list[str]], dict]) -> list[dict]:
    """One record per example: source, prediction, and (when the row has references) references and scores."""
    task = recipe.task
    labelled = task.target_column in raw.column_names
    records = []
    for row, predicted in zip(raw, generate(trainer, tokenized, recipe)):
        record = {"source": source_text(row[task.source_column]), "predicted": predicted}
        gold = references(row[task.target_column]) if labelled else []
        if gold:
            record["references"] = gold
            record.update({name: round(value, 4) for name, value in example_scores(predicted, gold).items()})
        records.append(record)
    return records


def error_analysis(records: list[dict], score_name: str, worst: int) -> str:
    """Score by source length and the lowest-scoring generations (source, reference, prediction, score)."""
    lines = [
        f"Sentence-level {score_name} by source length:",
        "",
        length_bucket_table([word_count(r["source"]) for r in records], [r[score_name] for r in records], score_name),
        "",
        lowest_scoring_table(
            records,
            {
                "source": lambda r: r["source"],
                "reference": lambda r: r["references"],
                "prediction": lambda r: r["predicted"],
                score_name: lambda r: r[score_name],
            },
            score_name,
            worst,
        ),
    ]
    return "\n".join(lines)


# --- inference for deployment (peftkit.deploy): attach adapters, generate, compare logits ---

AUTO_CLASS = AutoModelForSeq2SeqLM
GENERATES = True
INPUT_FIELDS = {"text": True}
WINDOWS_LONG_INPUTS = False
COMPLETES_PROMPTS = False


def model_kwargs(info: dict) -> dict:
    return {}


def inference_rows(recipe: Recipe, dataset) -> list[dict]:
    """Sources as inference inputs, with the first reference as `target` (merge verification teacher-forces it)."""
    task = recipe.task
    rows = []
    for row in dataset:
        gold = references(row[task.target_column]) if task.target_column in row else []
        rows.append({"text": source_text(row[task.source_column]), **({"target": gold[0]} if gold else {})})
    return rows


def _sources(tokenizer, rows: list[dict], infos: list[dict], device):
    """Each source with its adapter's prefix and truncation, padded into one batch."""
    encoded = []
    for row, info in zip(rows, infos):
        languages.use(tokenizer, info)
        encoded.append(
            tokenizer(info.get("source_prefix", "") + row["text"], truncation=True, max_length=info.get("max_length"))
        )
    return tokenizer.pad(encoded, return_tensors="pt").to(device)


def forward_logits(model, tokenizer, rows: list[dict], adapter_names: list[str] | None = None,
                   infos: list[dict] | None = None) -> list[torch.Tensor]:
    """Decoder logits teacher-forced on the row's `target` (else its source text), one `[target tokens, vocab]` per row.

    The decoder is causal and padded on the right, so each row's logits do not depend on the batch.
    """
    infos = infos or [{}] * len(rows)
    inputs = _sources(tokenizer, rows, infos, model.device)
    targets = []
    for row, info in zip(rows, infos):
        languages.use(tokenizer, info)
        targets.append(tokenizer(text_target=row.get("target", row["text"])))
    targets = tokenizer.pad(targets, return_tensors="pt")
    decoder_input_ids = decoder_inputs_from_labels(model, targets["input_ids"]).to(model.device)
    with torch.inference_mode():
        logits = model(
            **inputs, decoder_input_ids=decoder_input_ids, **({"adapter_names": adapter_names} if adapter_names else {})
        ).logits
    lengths = targets["attention_mask"].sum(dim=1).tolist()
    return [row_logits[:length].float().cpu() for row_logits, length in zip(logits, lengths)]


def infer(
    model, tokenizer, rows: list[dict], infos: list[dict], adapter_names: list[str] | None = None,
    max_new_tokens: list[int] | int = decoding_path.DEFAULT_MAX_NEW_TOKENS, decoding: Decoding = Decoding(), streamer=None,
) -> list[dict]:
    """Output text of each source (`peftkit.tasks.generation`); `max_new_tokens` may differ per row. Adapters
    trained on different target languages generate in one call per language."""
    by_language: dict[str | None, list[int]] = {}
    for i, info in enumerate(infos):
        by_language.setdefault(info.get("target_lang"), []).append(i)
    answers: list[dict | None] = [None] * len(rows)
    for language, indices in by_language.items():
        inputs = _sources(tokenizer, _pick(rows, indices), _pick(infos, indices), model.device)
        generated = decoding_path.generate(
            model, tokenizer, inputs, 1, _pick(max_new_tokens, indices), decoding, _pick(adapter_names, indices),
            streamer, start_tokens=languages.decoder_start(tokenizer, language),
        )
        for i, answer in zip(indices, generated):
            answers[i] = answer
    return answers


def _pick(values, indices: list[int]):
    """The given rows of a per-row list; a value shared by all rows (or None) as it is."""
    return [values[i] for i in indices] if isinstance(values, list) else values
