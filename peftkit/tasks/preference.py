"""Preference tuning of a decoder's adapter (DPO and its loss variants, ORPO, KTO) on TRL's trainers.

TRL computes the losses, batches chosen + rejected together and tokenizes with the chat template; peftkit's
checkpoints, numeric guards and SIGTERM save are mixed into TRL's trainer class (`training.trainer`), so a
preference run writes the same run folder, resumes the same way and deploys like an SFT adapter.

The reference model is the base with the adapter disabled (TRL's PEFT path): no second copy of the weights.

Evaluation scores every validation/test pair with the policy and with the base (adapter disabled, i.e. before
training): preference accuracy and mean margin of the per-token log-likelihood of chosen over rejected, and for
losses with a reference model the implicit reward beta * log(pi / pi_ref); a few prompts are answered by both
models side by side.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from peftkit.data import formats
from peftkit.data.chat import chat_text, use_chat_template
from peftkit.data.sources import in_file_order, split_origin
from peftkit.errors import UserError
from peftkit.evaluation.analysis import markdown_cell
from peftkit.recipe.schema import Recipe
from peftkit.tasks import decoder
from peftkit.tasks.base import TrainerSetup

# Deployment is that of any causal LM adapter: a preference-tuned adapter is served, merged and attached the same way.
from peftkit.tasks.decoder import (  # noqa: F401  (the decoder half of this task's contract)
    AUTO_CLASS,
    COMPLETES_PROMPTS,
    GENERATES,
    INPUT_FIELDS,
    WINDOWS_LONG_INPUTS,
    forward_logits,
    head_modules,
    infer,
    load_model,
    model_kwargs,
)

log = logging.getLogger("peftkit")

PEFT_TASK_TYPE = "CAUSAL_LM"
DEFAULT_METRIC = "loss"
LOSS_SUMS_OVER_ITEMS = False  # TRL's losses are means over the batch's pairs
# DPO-family losses TRL's DPOTrainer computes (`DPOConfig.loss_type`); `dpo` is its `sigmoid`, `sigmoid_norm` the
# same on log-ratios averaged over each response's tokens (length-normalized DPO).
DPO_LOSSES = {"dpo": "sigmoid", "sigmoid_norm": "sigmoid_norm", "ipo": "ipo", "hinge": "hinge", "robust": "robust",
              "sppo_hard": "sppo_hard", "nca_pair": "nca_pair", "bco_pair": "bco_pair", "apo_zero": "apo_zero",
              "apo_down": "apo_down"}
REFERENCE_FREE = ("orpo",)  # losses without a reference model: no implicit reward to report


def trainer_setup(recipe: Recipe) -> TrainerSetup:
    """TRL's trainer and config class for the recipe's loss (`training.run` mixes peftkit's behaviour into it)."""
    # TRL trainers ping the hub's telemetry endpoint at start; a fine-tuning run sends nothing unless asked.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    task, data = recipe.task, recipe.data
    common = {"beta": task.beta, "max_length": data.max_length, "dataset_num_proc": data.num_proc}
    if task.loss == "kto":
        from trl import KTOConfig, KTOTrainer

        return TrainerSetup(KTOTrainer, KTOConfig, common)
    if task.loss == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return TrainerSetup(ORPOTrainer, ORPOConfig, common)
    from trl import DPOConfig, DPOTrainer

    return TrainerSetup(DPOTrainer, DPOConfig, {**common, "loss_type": [DPO_LOSSES[task.loss]]})


def adopt_trainer(trainer, recipe: Recipe) -> None:
    """After TRL built the trainer: refuse what its setup cannot train, and keep the reference = the base with the
    adapter disabled.

    Given a model that already carries an adapter, TRL copies it into a second adapter named `ref` (for re-training
    a pretrained adapter). A fresh LoRA adds nothing to the base (B = 0), so that copy would only cost memory and a
    slower reference forward; it is removed unless the initialization rewrote the base (PiSSA, OLoRA, LoftQ), where
    the initial adapter is the reference.
    """
    if getattr(trainer, "aux_loss_enabled", False) and recipe.adapter.method == "prefix_tuning":
        # TRL adds a mixture-of-experts model's load-balancing loss over the attention mask, which peft's prefix
        # lengthens by its virtual tokens while the router only sees the real ones: the shapes disagree.
        raise UserError(
            f"adapter.method: prefix tuning cannot train the mixture-of-experts model `{recipe.model.name}` on "
            "preference pairs: TRL's router load-balancing loss does not follow peft's key/value prefix; use lora, "
            "ia3 or prompt_tuning"
        )
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}) and recipe.adapter.init in ("default", "gaussian"):
        model.delete_adapter("ref")
        model.set_adapter("default")


def before_save(trainer) -> None:
    """The saved adapter folder holds the trained adapter only, not TRL's frozen `ref` copy."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")


def sequences_per_row(recipe: Recipe) -> int:
    """DPO-family and ORPO batch a pair's chosen and rejected completions together; KTO's rows are single."""
    return 1 if recipe.task.loss == "kto" else 2


def reference_passes(recipe: Recipe) -> int:
    """DPO-family: one reference forward; KTO: two (its mismatched KL batch too); ORPO has no reference."""
    if recipe.task.loss in REFERENCE_FREE:
        return 0
    return 2 if recipe.task.loss == "kto" else 1


# ---- data ---------------------------------------------------------------------------------------------------


def detect_format(recipe: Recipe, dataset, origin: str, split: str) -> str:
    if recipe.task.format != "auto":
        return recipe.task.format
    return formats.detect(dataset.column_names, formats.PREFERENCE_FORMATS, origin, f"data.{split}")


def prepare(recipe: Recipe, splits: dict, tokenizer, info: dict | None = None) -> tuple[dict, dict]:
    """Every split as TRL's conversational preference rows (`prompt`/`chosen`/`rejected` message lists, or
    `prompt`/`completion`/`label` for KTO's unpaired form); TRL tokenizes them with the chat template."""
    task = recipe.task
    use_chat_template(tokenizer, task, recipe.model.name)
    prepared, found = {}, {}
    for split, dataset in splits.items():
        origin = split_origin(recipe.data, split)
        data_format = detect_format(recipe, dataset, origin, split)
        formats.check_rows(dataset, data_format, formats.PREFERENCE_FORMATS, recipe.data, split)
        if data_format == "unpaired" and task.loss != "kto":
            raise UserError(
                f"data.{split}: `{origin}` holds unpaired rows (prompt, completion, label), which only task.loss: kto "
                f"trains on; use task.loss: kto, or give chosen/rejected pairs for {task.loss}"
            )
        found[split] = data_format
        # Row numbers name the file's rows unless rows/limit selected (and shuffled) some, sources were mixed or
        # validation_fraction carved the split (counting them again here would read the data once more per batch).
        where = f"`{origin}` row" if in_file_order(recipe.data, split) else f"`{origin}` (rows as selected by data.{split}) row"
        prepared[split] = dataset.map(
            _preference_rows, batched=True, with_indices=True, remove_columns=dataset.column_names,
            fn_kwargs={"data_format": data_format, "where": where, "system_prompt": task.system_prompt,
                       "skip_bad_rows": recipe.data.skip_bad_rows, "max_prompt_length": task.max_prompt_length,
                       "tokenizer": tokenizer if task.max_prompt_length else None},
            num_proc=recipe.data.num_proc, desc=f"Reading preference pairs of data.{split}",
        )
        skipped = len(dataset) - len(prepared[split])
        if skipped:
            log.warning("data.%s: skipped %d of %d rows that are not valid preference pairs (data.skip_bad_rows; %s)",
                        split, skipped, len(dataset), origin)
        if not len(prepared[split]):
            raise UserError(f"data.{split}: no row of `{origin}` is a valid preference pair")
    if task.loss == "kto" and found.get("train") != "unpaired":
        # KTO reads its training rows in order (each row's KL completion comes from its batch neighbours), and TRL's
        # unpairing puts every chosen row before every rejected one: shuffled, batches mix desirable and undesirable.
        from trl.data_utils import unpair_preference_dataset

        prepared["train"] = unpair_preference_dataset(prepared["train"]).shuffle(seed=recipe.training.seed)
    return prepared, {"loss": task.loss, "beta": task.beta, "formats": found}


def _preference_rows(batch: dict, indices: list[int], data_format: str, where: str, system_prompt: str | None,
                     skip_bad_rows: bool, max_prompt_length: int | None, tokenizer) -> dict:
    out: dict[str, list] = {name: [] for name in (("prompt", "completion", "label") if data_format == "unpaired"
                                                  else ("prompt", "chosen", "rejected"))}
    for index, values in zip(indices, zip(*batch.values())):
        try:
            row = formats.preference_row(dict(zip(batch, values)), data_format, f"{where} {index + 1}")
        except UserError:
            if skip_bad_rows:
                continue
            raise
        if system_prompt and row["prompt"][0]["role"] != "system":
            row["prompt"] = [{"role": "system", "content": system_prompt}, *row["prompt"]]
        if max_prompt_length:
            row["prompt"] = keep_prompt_end(row["prompt"], tokenizer, max_prompt_length)
        for key, value in row.items():
            out.setdefault(key, []).append(value)
    return out


def keep_prompt_end(prompt: list[dict], tokenizer, max_tokens: int) -> list[dict]:
    """The prompt without its earliest turns while it renders to more than `max_tokens` tokens.

    TRL truncates a sequence at its end and drops a pair whose prompt alone fills `max_length`, so a long dialogue
    would be lost or lose its responses; the responses answer the latest turns, which are kept. Whole turns are
    removed, never part of one, so the chat template renders a well-formed dialogue: a leading system message
    stays, the kept turns start with a user turn, and the last user turn stays even when it alone is longer.
    """
    head = prompt[:1] if prompt[0]["role"] == "system" else []
    turns = prompt[len(head):]

    def length(messages: list[dict]) -> int:
        text = chat_text(tokenizer, head + messages, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    starts = [0, *(i for i, message in enumerate(turns) if message["role"] == "user" and i > 0)]
    for start in starts[:-1]:
        if length(turns[start:]) <= max_tokens:
            return head + turns[start:]
    return head + turns[starts[-1]:]


def collator(tokenizer, recipe: Recipe):
    return None  # TRL's trainers bring their own (chosen and rejected padded into one batch)


def compute_metrics(info: dict, validation):
    return None  # TRL logs eval rewards/accuracies itself; pairs are scored once at the end by `predict`


# ---- evaluation -----------------------------------------------------------------------------------------------


def _completion_ids(tokenizer, prompt: list[dict], completion: list[dict], max_length: int) -> tuple[list[int], int] | None:
    """Token ids of prompt + completion (truncated at the end, as TRL does) and where the completion starts;
    None when the prompt alone fills max_length."""
    prompt_ids = tokenizer(chat_text(tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(chat_text(tokenizer, prompt + completion), add_special_tokens=False)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), min(len(prompt_ids), len(full_ids)))
    if start >= max_length - 1:
        return None
    return full_ids[:max_length], start


@torch.no_grad()
def completion_logps(model, tokenizer, sequences: list[tuple[list[int], int]], batch_size: int) -> list[tuple[float, int]]:
    """Summed log-probability and token count of each sequence's completion tokens."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = []
    for begin in range(0, len(sequences), batch_size):
        batch = sequences[begin : begin + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch], device=device)
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=device)
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
        token_logps = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        for row, (ids, start) in enumerate(batch):
            span = token_logps[row, start - 1 : len(ids) - 1]
            results.append((float(span.sum()), span.numel()))
    return results


def _text(messages: list[dict]) -> str:
    return "\n".join(message["content"] for message in messages)


def predict(trainer, tokenized, raw, recipe: Recipe, info: dict) -> list[dict]:
    """One record per pair (or unpaired row): log-likelihoods of the responses under the policy and under the base
    (adapter disabled); the first `task.compare_generations` prompts also get both models' generated answers."""
    model, tokenizer = trainer.model, trainer.processing_class
    model.eval()
    paired = "chosen" in tokenized.column_names
    responses = ("chosen", "rejected") if paired else ("completion",)
    records, sequences = [], []
    for row in tokenized:
        encoded = [_completion_ids(tokenizer, row["prompt"], row[name], recipe.data.max_length) for name in responses]
        if any(item is None for item in encoded):
            continue  # the prompt alone fills data.max_length, as TRL drops it in training
        record = {"prompt": _text(row["prompt"][-1:]), **{name: _text(row[name]) for name in responses}}
        if not paired:
            record["label"] = row["label"]
        records.append((record, row["prompt"]))
        sequences += encoded
    if not records:
        raise UserError("no evaluation pair fits data.max_length; raise data.max_length")
    batch_size = recipe.training.eval_batch_size or 2 * recipe.training.batch_size
    policy = completion_logps(model, tokenizer, sequences, batch_size)
    with _adapter_disabled(model):
        base = completion_logps(model, tokenizer, sequences, batch_size)
    for index, (record, _) in enumerate(records):
        for offset, name in enumerate(responses):
            (logp, tokens), (base_logp, _) = policy[index * len(responses) + offset], base[index * len(responses) + offset]
            record.update({f"{name}_logp": round(logp, 4), f"{name}_tokens": tokens, f"base_{name}_logp": round(base_logp, 4)})
    compared = records[: recipe.task.compare_generations]
    if compared:
        prompts = [prompt for _, prompt in compared]
        generated = decoder.generate(model, tokenizer, prompts, recipe, batch_size)
        with _adapter_disabled(model):
            base_generated = decoder.generate(model, tokenizer, prompts, recipe, batch_size)
        for (record, _), answer, base_answer in zip(compared, generated, base_generated):
            record.update(generated=answer, base_generated=base_answer)
    return [record for record, _ in records]


def _adapter_disabled(model):
    """The base model: the adapter switched off (a model without one is its own base)."""
    import contextlib

    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def _per_token(record: dict, name: str, prefix: str = "") -> float:
    return record[f"{prefix}{name}_logp"] / max(record[f"{name}_tokens"], 1)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)


def score(records: list[dict], info: dict) -> dict[str, Any]:
    """Before (base) and after (policy): preference accuracy = share of pairs whose chosen response has the higher
    per-token log-likelihood, margin = its mean difference; implicit reward beta * log(pi / pi_ref) when the loss
    has a reference."""
    if not records:
        return {"pairs": 0}
    if "label" in records[0]:  # unpaired rows: how much likelier desirable completions are than undesirable ones
        metrics: dict[str, Any] = {"rows": len(records)}
        for prefix, name in (("", "margin"), ("base_", "base_margin")):
            good = _mean(_per_token(r, "completion", prefix) for r in records if r["label"])
            bad = _mean(_per_token(r, "completion", prefix) for r in records if not r["label"])
            metrics[name] = good - bad
        return metrics
    metrics = {"pairs": len(records)}
    for prefix, name in (("", ""), ("base_", "base_")):
        margins = [_per_token(r, "chosen", prefix) - _per_token(r, "rejected", prefix) for r in records]
        metrics[f"{name}preference_accuracy"] = _mean(margin > 0 for margin in margins)
        metrics[f"{name}margin"] = _mean(margins)
    if info["loss"] not in REFERENCE_FREE:
        beta = info["beta"]
        chosen = [beta * (r["chosen_logp"] - r["base_chosen_logp"]) for r in records]
        rejected = [beta * (r["rejected_logp"] - r["base_rejected_logp"]) for r in records]
        metrics["reward_accuracy"] = _mean(c > r for c, r in zip(chosen, rejected))
        metrics["reward_margin"] = _mean(c - r for c, r in zip(chosen, rejected))
        metrics["chosen_reward"], metrics["rejected_reward"] = _mean(chosen), _mean(rejected)
    return metrics


def report(records: list[dict], metrics: dict, split: str, run_dir: Path, worst: int) -> str:
    """Before/after table, responses of the tuned model and the base side by side, and the pairs it gets most wrong."""
    if "pairs" not in metrics or not metrics["pairs"]:
        return "| rows | margin (after) | margin (base) |\n|---|---|---|\n" + (
            f"| {metrics.get('rows', 0)} | {metrics.get('margin', 0):.4f} | {metrics.get('base_margin', 0):.4f} |")
    lines = [
        "| | base (before) | tuned (after) |", "|---|---|---|",
        f"| preference accuracy (per-token log-likelihood) | {metrics['base_preference_accuracy']:.4f} "
        f"| {metrics['preference_accuracy']:.4f} |",
        f"| mean margin (nats/token, chosen - rejected) | {metrics['base_margin']:.4f} | {metrics['margin']:.4f} |",
        "",
        f"{metrics['pairs']} pairs.",
    ]
    if "reward_accuracy" in metrics:
        lines += ["", f"Implicit reward beta*log(pi/pi_ref): accuracy {metrics['reward_accuracy']:.4f}, mean margin "
                      f"{metrics['reward_margin']:.4f} (chosen {metrics['chosen_reward']:.4f}, rejected "
                      f"{metrics['rejected_reward']:.4f})."]
    compared = [record for record in records if "generated" in record]
    if compared:
        lines += ["", "Responses side by side:", "", "| prompt | base | tuned |", "|---|---|---|"]
        lines += [f"| {markdown_cell(r['prompt'])} | {markdown_cell(r['base_generated'])} | {markdown_cell(r['generated'])} |"
                  for r in compared]
    if worst:
        hardest = sorted(records, key=lambda r: _per_token(r, "chosen") - _per_token(r, "rejected"))[:worst]
        lines += ["", f"Pairs the tuned model prefers most wrongly, {len(hardest)} of {len(records)}:", "",
                  "| prompt | chosen | rejected | margin |", "|---|---|---|---|"]
        lines += [f"| {markdown_cell(r['prompt'])} | {markdown_cell(r['chosen'])} | {markdown_cell(r['rejected'])} "
                  f"| {_per_token(r, 'chosen') - _per_token(r, 'rejected'):.3f} |" for r in hardest]
    return "\n".join(lines)


def inference_rows(recipe: Recipe, dataset) -> list[dict]:
    """Each pair's prompt and chosen response as plain text (merge verification compares logits on them)."""
    data_format = detect_format(recipe, dataset, "merge verification data", "test")
    rows = []
    for index, raw in enumerate(dataset):
        row = formats.preference_row(raw, data_format, f"row {index + 1}")
        rows.append({"prompt": _text(row["prompt"] + row.get("chosen", row.get("completion", [])))})
    return rows
