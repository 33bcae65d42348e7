"""The support matrix: tiny random-init models of common architectures x every task x method x quantization cell.

Each cell trains through `peftkit.training.run.train` (in-process) for one step, then checks what users rely on:
the adapter reloaded in plain peft gives the same outputs as peftkit's reload, `peftkit eval` reproduces the
run's test metrics, and `peftkit merge` verifies. A cell ends in one of:
- ok: all of the above hold
- refused: peftkit stopped with a UserError (exit 2 at the CLI) naming the reason, before training
- bitsandbytes-cpu: an error raised inside bitsandbytes' CPU kernels (measured, with its message)
Anything else fails the test. `docs/support-matrix.md` is rendered from the outcomes (`render`).
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from peftkit.run_folder import ADAPTER_DIR, METRICS_FILE
from tests.conftest import _word_level_tokenizer, number_rows, qa_rows, sentiment_rows, write_jsonl

# Tiny configs (hidden <= 64, 2 layers); the checkpoint is each family's pretrained form (causal LM, masked LM,
# or encoder-decoder), as real checkpoints are, so every task head meets the loading report a user would see.
DECODER, ENCODER, ENCODER_DECODER = "decoder", "encoder", "encoder-decoder"
_ATTENTION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "gpt2": (DECODER, dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    "gpt_neox": (DECODER, dict(model_type="gpt_neox", max_position_embeddings=128, **_ATTENTION)),
    "opt": (DECODER, dict(model_type="opt", hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=128)),
    "llama": (DECODER, dict(model_type="llama", num_key_value_heads=2, max_position_embeddings=128, **_ATTENTION)),
    "qwen2": (DECODER, dict(model_type="qwen2", num_key_value_heads=2, max_position_embeddings=128, **_ATTENTION)),
    "qwen3": (DECODER, dict(model_type="qwen3", num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                            **_ATTENTION)),
    "mistral": (DECODER, dict(model_type="mistral", num_key_value_heads=2, max_position_embeddings=128, **_ATTENTION)),
    "gemma": (DECODER, dict(model_type="gemma", num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                            **_ATTENTION)),
    "gemma2": (DECODER, dict(model_type="gemma2", num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                             **_ATTENTION)),
    "phi3": (DECODER, dict(model_type="phi3", num_key_value_heads=4, max_position_embeddings=128, **_ATTENTION)),
    "falcon": (DECODER, dict(model_type="falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=4)),
    "bloom": (DECODER, dict(model_type="bloom", hidden_size=64, n_layer=2, n_head=4)),
    "bert": (ENCODER, dict(model_type="bert", max_position_embeddings=130, **_ATTENTION)),
    "roberta": (ENCODER, dict(model_type="roberta", max_position_embeddings=130, **_ATTENTION)),
    "deberta-v2": (ENCODER, dict(model_type="deberta-v2", max_position_embeddings=130, **_ATTENTION)),
    "distilbert": (ENCODER, dict(model_type="distilbert", dim=64, hidden_dim=128, n_layers=2, n_heads=4,
                                 max_position_embeddings=130)),
    "electra": (ENCODER, dict(model_type="electra", embedding_size=32, max_position_embeddings=130, **_ATTENTION)),
    "modernbert": (ENCODER, dict(model_type="modernbert", max_position_embeddings=130, global_attn_every_n_layers=2,
                                 local_attention=16, **_ATTENTION)),
    "t5": (ENCODER_DECODER, dict(model_type="t5", d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                                 num_heads=4)),
    "mt5": (ENCODER_DECODER, dict(model_type="mt5", d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                                  num_heads=4)),
    "bart": (ENCODER_DECODER, dict(model_type="bart", d_model=64, encoder_layers=2, decoder_layers=2,
                                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                   decoder_ffn_dim=128, max_position_embeddings=128)),
    "marian": (ENCODER_DECODER, dict(model_type="marian", d_model=64, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                     decoder_ffn_dim=128, max_position_embeddings=128)),
}
TASKS = {
    DECODER: ("classification", "causal_lm", "extractive_qa"),
    ENCODER: ("classification", "extractive_qa", "features", "causal_lm"),
    ENCODER_DECODER: ("classification", "translation", "features"),
}
METHODS = ("lora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning")
# Classification (the task with the most head variants: fresh layers, poolers, suffix-clashing names) also runs
# LoRA's variants, full fine-tuning and 8-bit; every task runs the 4-bit QLoRA cell.
CLASSIFICATION_EXTRA = ("dora", "adalora", "none")
QUANTIZED = ((4, "lora"),)
CLASSIFICATION_QUANTIZED = ((8, "lora"),)


@dataclass
class Cell:
    architecture: str
    task: str
    method: str
    bits: int | None
    status: str = ""  # ok / refused / bitsandbytes-cpu / schema
    detail: str = ""

    @property
    def column(self) -> str:
        return f"{self.method}" + (f" {self.bits}-bit" if self.bits else "")


def cells_for(architecture: str) -> list[Cell]:
    family = ARCHITECTURES[architecture][0]
    cells = []
    for task in TASKS[family]:
        classification = task == "classification"
        methods = ("none",) if task == "features" else METHODS + (CLASSIFICATION_EXTRA if classification else ())
        cells += [Cell(architecture, task, method, None) for method in methods]
        if task != "features":
            quantized = QUANTIZED + (CLASSIFICATION_QUANTIZED if classification else ())
            cells += [Cell(architecture, task, method, bits) for bits, method in quantized]
    return cells


def build_checkpoint(architecture: str, directory: Path) -> Path:
    from tokenizers import processors
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    family, fields = ARCHITECTURES[architecture]
    tokenizer = _word_level_tokenizer(directory)
    if family == ENCODER_DECODER:  # sources end with </s>, so generation learns to stop
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", tokenizer.eos_token_id)]
        )
        tokenizer.save_pretrained(directory)
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    if family == ENCODER_DECODER:
        special["decoder_start_token_id"] = tokenizer.pad_token_id
    config = AutoConfig.for_model(vocab_size=len(tokenizer), **special, **fields)
    auto_class = {DECODER: AutoModelForCausalLM, ENCODER: AutoModelForMaskedLM,
                  ENCODER_DECODER: AutoModelForSeq2SeqLM}[family]
    torch.manual_seed(0)
    auto_class.from_config(config).save_pretrained(directory)
    return directory


def write_data(directory: Path) -> dict[str, dict[str, Path]]:
    def split(name, rows):
        return write_jsonl(directory / name, rows)

    sentiment = sentiment_rows(24, seed=1)
    return {
        "classification": {"train": split("cls-train.jsonl", sentiment[:16]), "test": split("cls-test.jsonl", sentiment[16:])},
        "features": {"train": split("cls-train.jsonl", sentiment[:16]), "test": split("cls-test.jsonl", sentiment[16:])},
        "causal_lm": {"train": split("cls-train.jsonl", sentiment[:16]), "test": split("cls-test.jsonl", sentiment[16:])},
        "extractive_qa": {"train": split("qa-train.jsonl", qa_rows(8, seed=1)), "test": split("qa-test.jsonl", qa_rows(4, seed=2))},
        "translation": {"train": split("mt-train.jsonl", number_rows(8, seed=1)), "test": split("mt-test.jsonl", number_rows(4, seed=2))},
    }


TASK_SECTIONS = {
    "classification": {"type": "classification"},
    "features": {"type": "features"},
    "causal_lm": {"type": "causal_lm", "prompt": "{text}", "response": "{label}", "chat_template": "plain"},
    "extractive_qa": {"type": "extractive_qa", "doc_stride": 8},
    "translation": {"type": "translation"},
}


def recipe_for(cell: Cell, model_dir: Path, files: dict[str, Path], run_dir: Path) -> dict:
    adapter: dict = {"method": "lora" if cell.method == "dora" else cell.method}
    if adapter["method"] in ("lora", "adalora"):
        adapter.update(r=4, alpha=8, dropout=0.0)
    if cell.method == "dora":
        adapter["use_dora"] = True
    if cell.method in ("prompt_tuning", "prefix_tuning", "p_tuning"):
        adapter["num_virtual_tokens"] = 4
    recipe = {
        "model": {"name": str(model_dir)},
        "task": TASK_SECTIONS[cell.task],
        "data": {name: {"path": str(path)} for name, path in files.items()} | {"max_length": 32},
        "adapter": adapter,
        "training": {"max_steps": 1, "batch_size": 4, "learning_rate": 1e-2, "eval_strategy": "no",
                     "save_strategy": "no", "logging_steps": 1, "seed": 0},
        "generation": {"max_new_tokens": 3},
        "evaluation": {"splits": ["test"], "worst_examples": 0},
        "output": {"dir": str(run_dir), "tensorboard": False},
    }
    if cell.bits:
        recipe["quantization"] = {"bits": cell.bits}
    return recipe


def is_bitsandbytes_error(exc: BaseException) -> bool:
    """Raised from inside bitsandbytes (its CPU kernels), judged from the traceback, not from the cell's kind."""
    return any("/bitsandbytes/" in frame.filename for frame in traceback.extract_tb(exc.__traceback__))


def run_cell(cell: Cell, model_dir: Path, files: dict[str, Path], work: Path) -> Cell:
    from pydantic import ValidationError

    from peftkit.errors import UserError
    from peftkit.recipe.load import validate_recipe
    from peftkit.training.run import train

    try:
        recipe = validate_recipe(recipe_for(cell, model_dir, files, work / "run"))
    except (UserError, ValidationError) as exc:
        cell.status, cell.detail = "schema", _first_line(exc, model_dir, cell.architecture)
        return cell
    try:
        run_dir = train(recipe)
        _check_reloads(run_dir, cell, model_dir, work)
    except UserError as exc:
        cell.status, cell.detail = "refused", _first_line(exc, model_dir, cell.architecture)
    except Exception as exc:  # noqa: BLE001 - every other outcome is recorded, and fails the test
        kind = "bitsandbytes-cpu" if cell.bits and is_bitsandbytes_error(exc) else "failed"
        cell.status, cell.detail = kind, f"{type(exc).__name__}: {_first_line(exc, model_dir, cell.architecture)}"
        if kind == "failed":
            cell.detail += "\n" + "".join(traceback.format_exception(exc)[-6:])
    else:
        cell.status = "ok"
    # Reasons name the model; the temporary folder would make the rendered matrix differ on every run.
    cell.detail = cell.detail.replace(str(model_dir), cell.architecture)
    return cell


def _first_line(exc: BaseException, model_dir: Path, architecture: str) -> str:
    """The reason: a UserError's message, or the first problem of an invalid recipe (without its 'invalid' header).
    The temporary model folder is replaced by the architecture before the reason is cut to length, so the rendered
    matrix does not depend on where pytest puts its temporary files (xdist workers nest them one level deeper)."""
    lines = [line.strip().replace(str(model_dir), architecture) for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    return lines[0][:240] if lines else type(exc).__name__


def _check_reloads(run_dir: Path, cell: Cell, model_dir: Path, work: Path) -> None:
    """Plain-peft reload = peftkit reload; `peftkit eval` = the run's test metrics; `peftkit merge` verifies."""
    from peftkit.deploy.merge import VIRTUAL_TOKEN_METHODS, merge_run
    from peftkit.saved_run import evaluate_run

    trained = json.loads((run_dir / METRICS_FILE).read_text())["test"]
    _, evaluated = evaluate_run(run_dir)
    assert _comparable(evaluated) == _comparable(trained), f"{cell}: eval {evaluated} != training {trained}"
    if cell.task == "features" or cell.method == "none":
        return
    if not cell.bits:
        _check_plain_peft_reload(run_dir, cell, model_dir)
    if cell.method not in VIRTUAL_TOKEN_METHODS:
        result = merge_run(run_dir, work / "merged")
        assert result.verification.max_abs_diff <= result.tolerance


def _comparable(metrics: dict) -> dict:
    return {key: round(value, 6) for key, value in metrics.items() if isinstance(value, float)}


def _check_plain_peft_reload(run_dir: Path, cell: Cell, model_dir: Path) -> None:
    """The adapter folder alone, through transformers + peft, gives peftkit's outputs: nothing the model needs is
    left random (two reloads draw different random weights for anything the adapter does not hold)."""
    from peft import PeftModel

    from peftkit.saved_run import load_run
    from peftkit.tasks import get_task

    run = load_run(run_dir)
    task = get_task(cell.task)
    rows = task.inference_rows(run.recipe, _test_rows(run))
    torch.manual_seed(1)
    peftkit_model = run.predictor.model.eval()
    torch.manual_seed(2)
    base = task.AUTO_CLASS.from_pretrained(str(model_dir), **task.model_kwargs(run.info))
    plain = PeftModel.from_pretrained(base, str(run_dir / ADAPTER_DIR)).eval()
    ours = task.forward_logits(peftkit_model, run.tokenizer, rows, infos=[run.info] * len(rows))
    theirs = task.forward_logits(plain, run.tokenizer, rows, infos=[run.info] * len(rows))
    for a, b in zip(ours, theirs):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), f"{cell}: plain peft reload differs from peftkit's"


def _test_rows(run):
    from peftkit.data.sources import load_splits

    return load_splits(run.recipe.data)["test"]


def render(cells: list[Cell]) -> str:
    """docs/support-matrix.md from the outcomes: one table per task, architectures x method/quantization."""
    counts = {status: sum(c.status == status for c in cells)
              for status in ("ok", "refused", "bitsandbytes-cpu", "schema", "failed")}
    architectures = list(dict.fromkeys(c.architecture for c in cells))
    lines = [
        "# Support matrix",
        "",
        "Generated by `tests/test_support_matrix.py` (do not edit; `PEFTKIT_WRITE_MATRIX=1 pytest "
        "tests/test_support_matrix.py` rewrites it, and the test fails when this file is stale).",
        "",
        f"{len(architectures)} architectures, tiny random-init models (hidden <= 64, 2 layers) saved in their "
        "pretrained form (causal LM, masked LM, encoder-decoder). Each cell trains 1 step through `peftkit train`, "
        "then the adapter reloaded in plain peft must give peftkit's outputs (full-precision cells), `peftkit eval` "
        "must reproduce the test metrics, and `peftkit merge` must verify (weight-update methods).",
        "",
        f"Cells: **{counts['ok']} ok**, {counts['refused']} refused before training with a reason, "
        f"{counts['bitsandbytes-cpu']} failing inside bitsandbytes' CPU kernels (GPU-only in practice), "
        f"{counts['schema']} rejected by the recipe schema"
        + (f", **{counts['failed']} failing** (a bug: see the reasons)." if counts["failed"] else "."),
        "",
        "Legend: ✅ ok · ⛔ refused before training (reason below) · 🖥️ fails inside bitsandbytes on CPU · "
        "— rejected by the recipe schema · ❌ failing",
        "",
    ]
    mark = {"ok": "✅", "refused": "⛔", "bitsandbytes-cpu": "🖥️", "schema": "—", "failed": "❌"}
    notes: dict[str, int] = {}
    for task in dict.fromkeys(c.task for c in cells):
        task_cells = [c for c in cells if c.task == task]
        columns = list(dict.fromkeys(c.column for c in task_cells))
        lines += [f"## {task}", "", "| architecture | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for architecture in architectures:
            row = {c.column: c for c in task_cells if c.architecture == architecture}
            if not row:
                continue
            entries = []
            for column in columns:
                cell = row.get(column)
                if cell is None:
                    entries.append(" ")
                    continue
                entry = mark[cell.status]
                if cell.status in ("refused", "bitsandbytes-cpu", "failed"):
                    entry += f" [{notes.setdefault(cell.detail.splitlines()[0], len(notes) + 1)}]"
                entries.append(entry)
            lines.append(f"| {architecture} | " + " | ".join(entries) + " |")
        lines.append("")
    lines += ["## Reasons", ""]
    lines += [f"{number}. {detail}" for detail, number in notes.items()]
    return "\n".join(lines) + "\n"
