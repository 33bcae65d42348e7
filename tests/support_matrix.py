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

import gc
import json
import os
import traceback
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from peftkit.run_folder import ADAPTER_DIR, METRICS_FILE
from tests.conftest import _word_level_tokenizer, number_rows, qa_rows, sentiment_rows, write_jsonl
from tests.test_preference import pair_rows

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
    # The LM head is `output_projection`, tied to the input embeddings: not found by the name `lm_head`.
    "biogpt": (DECODER, dict(model_type="biogpt", max_position_embeddings=128, **_ATTENTION)),
    # Mixture of experts: a router and fused 3-D expert weights, which peft adapts as parameters, not linear layers.
    "mixtral": (DECODER, dict(model_type="mixtral", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                              max_position_embeddings=128, **_ATTENTION)),
    "bert": (ENCODER, dict(model_type="bert", max_position_embeddings=130, **_ATTENTION)),
    "roberta": (ENCODER, dict(model_type="roberta", max_position_embeddings=130, **_ATTENTION)),
    "deberta-v2": (ENCODER, dict(model_type="deberta-v2", max_position_embeddings=130, **_ATTENTION)),
    # No gradient checkpointing in transformers: a quantized base's default (checkpointing on) is refused.
    "albert": (ENCODER, dict(model_type="albert", embedding_size=32, max_position_embeddings=130, **_ATTENTION)),
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
    # NLLB's architecture: builds its decoder inputs from labels only inside its forward.
    "m2m_100": (ENCODER_DECODER, dict(model_type="m2m_100", d_model=64, encoder_layers=2, decoder_layers=2,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                      decoder_ffn_dim=128, max_position_embeddings=128)),
    "marian": (ENCODER_DECODER, dict(model_type="marian", d_model=64, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                     decoder_ffn_dim=128, max_position_embeddings=128)),
}
# Every task the schema offers, per family: a family's impossible tasks (causal_lm and preference on an
# encoder) are kept so the refusal is tested too.
TASKS = {
    DECODER: ("classification", "causal_lm", "extractive_qa", "preference"),
    ENCODER: ("classification", "extractive_qa", "features", "causal_lm", "preference"),
    ENCODER_DECODER: ("classification", "translation", "summarization", "features"),
}
# Every value of adapter.method (LoRA's DoRA variant as its own column) x every quantization the schema offers.
METHODS = ("lora", "dora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "none")
BITS = (None, 8, 4)


@dataclass
class Cell:
    architecture: str
    task: str
    method: str
    bits: int | None
    status: str = ""  # ok / refused / bitsandbytes-cpu / schema
    detail: str = ""
    quantized_layers: int = 0  # bitsandbytes layers of a trained k-bit cell (from the run's metrics.json)

    @property
    def column(self) -> str:
        return f"{self.method}" + (f" {self.bits}-bit" if self.bits else "")


# The architectures split into test files of about equal time: pytest-xdist's `--dist loadfile` keeps a file on one
# worker, so one file would run the whole matrix on one core.
CHUNKS = (
    ("gpt2", "gpt_neox", "opt", "llama", "bert", "t5", "m2m_100"),
    ("qwen2", "qwen3", "mistral", "roberta", "deberta-v2", "mt5"),
    ("gemma", "gemma2", "phi3", "distilbert", "electra", "bart", "biogpt"),
    ("falcon", "bloom", "mixtral", "albert", "modernbert", "marian"),
)
assert sorted(sum(CHUNKS, ())) == sorted(ARCHITECTURES), "every architecture in exactly one chunk"


def cells_for(architecture: str) -> list[Cell]:
    """Every task x method x quantization cell; the schema decides which of them are runnable."""
    family = ARCHITECTURES[architecture][0]
    return [Cell(architecture, task, method, bits) for task in TASKS[family] for bits in BITS for method in METHODS]


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
        "summarization": {"train": split("mt-train.jsonl", number_rows(8, seed=1)), "test": split("mt-test.jsonl", number_rows(4, seed=2))},
        "preference": {"train": split("pairs-train.jsonl", pair_rows(8, seed=1)), "test": split("pairs-test.jsonl", pair_rows(4, seed=2))},
    }


TASK_SECTIONS = {
    "classification": {"type": "classification"},
    "features": {"type": "features"},
    "causal_lm": {"type": "causal_lm", "prompt": "{text}", "response": "{label}", "chat_template": "plain"},
    "extractive_qa": {"type": "extractive_qa", "doc_stride": 8},
    "translation": {"type": "translation"},
    "summarization": {"type": "summarization", "source_column": "source", "target_column": "target"},
    "preference": {"type": "preference", "beta": 0.5, "chat_template": "plain", "compare_generations": 1},
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
        "training": {"max_steps": 1, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0, "eval_strategy": "no",
                     "save_strategy": "no", "logging_steps": 1, "seed": 0},
        "generation": {"max_new_tokens": 3},
        "evaluation": {"splits": ["test"], "worst_examples": 0},
        "output": {"dir": str(run_dir), "tensorboard": False},
    }
    if cell.bits:
        recipe["quantization"] = {"bits": cell.bits}
    return recipe


def is_bitsandbytes_error(exc: BaseException) -> bool:
    """Raised from inside bitsandbytes' compute (its CPU kernels), judged from the traceback, not from the cell's kind.
    The innermost bitsandbytes frame decides: an assertion in its layers (`nn/modules.py`) is a model bitsandbytes
    was handed wrongly (BioGPT's tied, quantized LM head), not a kernel limit, and fails the cell."""
    frames = [frame.filename for frame in traceback.extract_tb(exc.__traceback__) if "/bitsandbytes/" in frame.filename]
    return bool(frames) and "/bitsandbytes/nn/" not in frames[-1]


def run_cell(cell: Cell, model_dir: Path, files: dict[str, Path], work: Path) -> Cell:
    from pydantic import ValidationError

    from peftkit.errors import UserError
    from peftkit.recipe.load import validate_recipe
    from peftkit.training.run import FirstStepFailed, train

    try:
        recipe = validate_recipe(recipe_for(cell, model_dir, files, work / "run"))
    except (UserError, ValidationError) as exc:
        cell.status, cell.detail = "schema", _first_line(exc, model_dir, cell.architecture)
        return cell
    try:
        try:
            run_dir = train(recipe)
        except FirstStepFailed as refusal:  # what users see for an unknown failure; the matrix wants its cause
            raise refusal.__cause__ from None
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
    return lines[0][:400] if lines else type(exc).__name__


def _check_reloads(run_dir: Path, cell: Cell, model_dir: Path, work: Path) -> None:
    """Plain-peft reload = peftkit reload; `peftkit eval` = the run's test metrics; `peftkit merge` verifies."""
    from peftkit.deploy.merge import VIRTUAL_TOKEN_METHODS, merge_run
    from peftkit.saved_run import evaluate_run

    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    cell.quantized_layers = metrics["parameters"].get("quantized_layers", 0)
    trained = metrics["test"]
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
    """docs/support-matrix.md from the outcomes: per task, one table per quantization (architectures x methods)."""
    counts = {status: sum(c.status == status for c in cells)
              for status in ("ok", "refused", "bitsandbytes-cpu", "schema", "failed")}
    architectures = list(dict.fromkeys(c.architecture for c in cells))
    lines = [
        "# Support matrix",
        "",
        "Generated by `tests/test_support_matrix*.py` (do not edit; `PEFTKIT_WRITE_MATRIX=1 pytest "
        "tests/test_support_matrix*.py` rewrites it, and the tests fail when this file is stale).",
        "",
        f"{len(architectures)} architectures, tiny random-init models (hidden <= 64, 2 layers) saved in their "
        "pretrained form (causal LM, masked LM, encoder-decoder), x every task x every `adapter.method` (DoRA as its "
        "own column) x {no quantization, 8-bit, 4-bit}. Each cell trains 1 step through `peftkit train`; then the "
        "adapter reloaded in plain peft must give peftkit's outputs (full-precision cells), `peftkit eval` must "
        "reproduce the test metrics (to 6 decimals), and `peftkit merge` must verify (weight-update methods).",
        "",
        f"Cells: **{counts['ok']} ok**, {counts['refused']} refused before training with a reason, "
        f"{counts['bitsandbytes-cpu']} failing inside bitsandbytes' CPU kernels (measured; GPU kernels differ), "
        f"{counts['schema']} rejected by the recipe schema"
        + (f", **{counts['failed']} failing** (a bug: see the reasons)." if counts["failed"] else "."),
        "",
        "Legend: ✅ ok · ⛔ refused before training (reason below) · 🖥️ fails inside bitsandbytes on CPU · "
        "— rejected by the recipe schema (reason below) · ❌ failing",
        "",
    ]
    mark = {"ok": "✅", "refused": "⛔", "bitsandbytes-cpu": "🖥️", "schema": "—", "failed": "❌"}
    notes: dict[str, int] = {}
    for task in dict.fromkeys(c.task for c in cells):
        lines += [f"## {task}", ""]
        for bits in BITS:
            group = [c for c in cells if c.task == task and c.bits == bits]
            lines += [f"### {f'{bits}-bit base' if bits else 'full-precision base'}", "",
                      "| architecture | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
            for architecture in architectures:
                row = {c.method: c for c in group if c.architecture == architecture}
                if not row:
                    continue
                entries = []
                for method in METHODS:
                    cell = row[method]
                    entry = mark[cell.status]
                    if cell.status != "ok":
                        entry += f" [{notes.setdefault(cell.detail.splitlines()[0], len(notes) + 1)}]"
                    entries.append(entry)
                lines.append(f"| {architecture} | " + " | ".join(entries) + " |")
            lines.append("")
    lines += [
        "## Layers quantized",
        "",
        "bitsandbytes layers in the trained k-bit cells (the range over tasks and methods: task heads stay in full "
        "precision). A model whose linear layers transformers does not convert is refused rather than trained "
        "unquantized.",
        "",
        "| architecture | 8-bit | 4-bit |",
        "|---|---|---|",
    ]
    for architecture in architectures:
        ranges = []
        for bits in (8, 4):
            counted = sorted({c.quantized_layers for c in cells
                              if c.architecture == architecture and c.bits == bits and c.status == "ok"})
            ranges.append("none trained" if not counted else str(counted[0]) if len(counted) == 1
                          else f"{counted[0]}–{counted[-1]}")
        lines.append(f"| {architecture} | " + " | ".join(ranges) + " |")
    lines += ["", "## Reasons", ""]
    lines += [f"{number}. {detail}" for detail, number in notes.items()]
    return "\n".join(lines) + "\n"


def run_architecture(architecture: str, root: Path) -> list[Cell]:
    """Every cell of one architecture, on one checkpoint and one set of data files written under `root`."""
    (root / "model").mkdir()
    (root / "data").mkdir()
    model_dir = build_checkpoint(architecture, root / "model")
    files = write_data(root / "data")
    # Each training run starts with a full garbage collection (accelerate's free_memory): with the imported libraries
    # frozen out of the collector's sight it scans only what the cells create (measured: ~1.8 s less per cell).
    gc.collect()
    gc.freeze()
    try:
        return [run_cell(cell, model_dir, files[cell.task], root / f"cell-{i}") for i, cell in enumerate(cells_for(architecture))]
    finally:
        gc.unfreeze()


def chunk_test(chunk: int):
    """The matrix test of `CHUNKS[chunk]`, for a test file to bind to a `test_` name."""
    import pytest

    @pytest.mark.slow
    @pytest.mark.parametrize("architecture", CHUNKS[chunk])
    def test_every_cell_is_green_or_refused(architecture, tmp_path_factory, monkeypatch):
        from peftkit.evaluation import plots

        # Report pictures are a fifth of a tiny cell's time and not what the matrix checks.
        monkeypatch.setattr(plots, "save_figure", lambda figure, path: plots.plt.close(figure))
        cells = run_architecture(architecture, tmp_path_factory.mktemp(f"matrix-{architecture}"))
        outcomes = _outcomes_dir(tmp_path_factory)
        _record(outcomes, architecture, cells)
        failed = [f"{cell.task} / {cell.column}: {cell.detail}" for cell in cells if cell.status == "failed"]
        assert not failed, "\n\n".join(failed)
        check_doc_when_complete(outcomes)

    return test_every_cell_is_green_or_refused


DOC = Path(__file__).resolve().parents[1] / "docs" / "support-matrix.md"


def _outcomes_dir(tmp_path_factory) -> Path:
    """A folder that every pytest-xdist worker of this session sees (workers get `<session temp>/popen-gwN`)."""
    base = tmp_path_factory.getbasetemp()
    directory = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "support-matrix-outcomes"
    directory.mkdir(exist_ok=True)
    return directory


def _record(directory: Path, architecture: str, cells: list[Cell]) -> None:
    partial = directory / f".{architecture}.json"
    partial.write_text(json.dumps([dataclasses.asdict(cell) for cell in cells]))
    partial.replace(directory / f"{architecture}.json")  # whole files only: another worker may be reading


def check_doc_when_complete(directory: Path) -> None:
    """Once this session has every architecture's outcomes (whichever test, on whichever worker, completes them),
    `docs/support-matrix.md` must equal their rendering; PEFTKIT_WRITE_MATRIX=1 rewrites it instead."""
    recorded = {path.stem: path for path in directory.glob("*.json") if not path.name.startswith(".")}
    if set(recorded) != set(ARCHITECTURES):
        return
    rendered = render([Cell(**fields) for architecture in ARCHITECTURES
                       for fields in json.loads(recorded[architecture].read_text())])
    if os.environ.get("PEFTKIT_WRITE_MATRIX"):
        DOC.write_text(rendered, encoding="utf-8")
    assert DOC.read_text(encoding="utf-8") == rendered, (
        "docs/support-matrix.md is stale: rerun with PEFTKIT_WRITE_MATRIX=1 pytest tests/test_support_matrix*.py"
    )
