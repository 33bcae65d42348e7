"""`peftkit merge`: fold a run's adapter into a full-precision copy of its base and write a standalone model.

Read top to bottom: read the run -> load the base in full precision (the original weights, or the 4-bit
weights dequantized) -> attach the adapter -> merge -> verify on the run's own data -> write safetensors
shards, tokenizer, generation config and a model card. The adapter is never merged into quantized weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoTokenizer

from peftkit.data.sources import load_splits
from peftkit.deploy.adapter_folder import AdapterSource, find_adapter
from peftkit.deploy.model_card import model_card
from peftkit.deploy.verification import MergeResult, compare_outputs
from peftkit.errors import UserError
from peftkit.models.build import quantized_layer_count
from peftkit.models.quantization import torch_dtype
from peftkit.recipe.schema import QuantizationSection, Recipe
from peftkit.run_folder import MODEL_CARD, check_replaceable, read_recipe
from peftkit.tasks import get_task

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Largest |merged - attached| logit accepted without --force. fp32 only reorders the arithmetic; half precision
# rounds every weight and activation (measured on MiniLM: see docs/deploy.md).
TOLERANCES = {"float32": 1e-4, "bfloat16": 0.25, "float16": 0.05}
ONTO = ("original", "dequantized")
# For adapters trained on a quantized base: merging onto the dequantized weights reproduces the trained model's
# outputs far more closely than onto the original weights (docs/deploy.md has the measurement).
DEFAULT_ONTO_QUANTIZED = "dequantized"
VERIFY_SPLITS = ("test", "validation", "train")
VIRTUAL_TOKEN_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning")


def merge_run(
    run_dir: str | Path, out_dir: str | Path, dtype: str = "fp32", onto: str | None = None,
    max_shard_size: str = "5GB", samples: int = 64, tolerance: float | None = None, force: bool = False,
    overwrite: bool = False,
) -> MergeResult:
    """Merge, verify and write; raises UserError (writing nothing) when the merged outputs drift past `tolerance`."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    recipe = read_recipe(run_dir)
    adapter = find_adapter("run", str(run_dir))
    task = get_task(adapter.task)
    dtype_name = DTYPES[dtype]
    onto = _check_onto(onto, recipe)
    tolerance = TOLERANCES[dtype_name] if tolerance is None else tolerance
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise UserError(f"--out: `{out_dir}` already exists and is not empty; pass --overwrite or choose another folder")
        if not (out_dir / "config.json").is_file():
            raise UserError(
                f"--out: `{out_dir}` holds files but no config.json; --overwrite replaces only a model folder (what "
                "`peftkit merge` writes), it would delete everything in this one. Choose another folder"
            )
        check_replaceable(out_dir, "--out", {"the run folder": str(run_dir), "the base model": recipe.model.name})

    tokenizer = AutoTokenizer.from_pretrained(adapter.path)
    rows = _verification_rows(recipe, task, samples)
    attached = PeftModel.from_pretrained(full_precision_base(recipe, task, adapter, onto), str(adapter.path)).eval()
    infos = [adapter.info] * len(rows)
    reference = task.forward_logits(attached, tokenizer, rows, infos=infos)
    trained = task.forward_logits(trained_model(recipe, task, adapter), tokenizer, rows, infos=infos) if recipe.quantization.bits else None

    _unwrap_saved_modules(attached)
    merged = attached.merge_and_unload().to(torch_dtype(dtype_name)).eval()
    merged_outputs = task.forward_logits(merged, tokenizer, rows, infos=infos)
    result = MergeResult(
        out_dir, dtype_name, onto, compare_outputs(reference, merged_outputs),
        compare_outputs(trained, merged_outputs) if trained is not None else None, tolerance,
    )
    if result.verification.max_abs_diff > tolerance and not force:
        raise UserError(
            f"merge verification failed: merged and adapter-attached outputs differ by up to "
            f"{result.verification.max_abs_diff:.3g} (tolerance {tolerance:g} for {dtype_name}; predictions agree on "
            f"{result.verification.agreement:.1%} of {len(rows)} samples). Nothing was written; pass --force to write "
            "it anyway, --tolerance to accept a larger difference, or a wider --dtype"
        )
    _write(merged, tokenizer, out_dir, max_shard_size, model_card(recipe, run_dir, adapter, result))
    return result


def _unwrap_saved_modules(attached: PeftModel) -> None:
    """Put each fully trained module (task heads, fresh layers) in place of its peft wrapper before merging: peft's
    IA3 unload otherwise tries to unwrap a whole wrapped head as if it were one layer (T5's classification head)."""
    from peft.utils import ModulesToSaveWrapper

    for name, module in list(attached.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            setattr(attached.get_submodule(parent_name), child, module.modules_to_save[module.active_adapter])


def _check_onto(onto: str | None, recipe: Recipe) -> str:
    if recipe.adapter.method == "none":
        raise UserError("this run fine-tuned the whole model (adapter.method: none); its adapter/ folder is already a full model")
    if recipe.adapter.method in VIRTUAL_TOKEN_METHODS:
        raise UserError(
            f"this run trained {recipe.adapter.method}: learned virtual tokens that enter every forward pass, not a "
            "weight update, so there is nothing to fold into the base; deploy the adapter with `peftkit serve` or "
            "`peftkit predict`, or train with lora to get a mergeable adapter"
        )
    if recipe.quantization.bits is None:
        if onto == "dequantized":
            raise UserError("--onto dequantized needs a run trained on a quantized base; this base was not quantized")
        return "original"
    return onto or DEFAULT_ONTO_QUANTIZED


def full_precision_base(recipe: Recipe, task, adapter: AdapterSource, onto: str):
    """The base in float32: its original weights, or the quantized weights the adapter was trained on, dequantized."""
    if onto == "dequantized":
        base = task.load_model(recipe, adapter.info)
        # transformers' dequantize fails on a model with no quantized layer (training refuses such a base now, but
        # adapters trained before may exist); then the original weights are the ones the adapter was trained on.
        if quantized_layer_count(base):
            base = base.dequantize(dtype=torch.float32)
            # transformers leaves the loaded-in-k-bit flags set on the now float32 model, and peft's IA3 refuses to
            # merge into a model so flagged.
            base.is_loaded_in_4bit = base.is_loaded_in_8bit = False
            return base
    full = recipe.model_copy(update={
        "model": recipe.model.model_copy(update={"dtype": "float32"}), "quantization": QuantizationSection(),
    })
    return task.load_model(full, adapter.info)


def trained_model(recipe: Recipe, task, adapter: AdapterSource) -> PeftModel:
    """The model as trained: the adapter on the (quantized) base the recipe loads."""
    return PeftModel.from_pretrained(task.load_model(recipe, adapter.info), str(adapter.path)).eval()


def _verification_rows(recipe: Recipe, task, samples: int) -> list[dict]:
    """The first `samples` rows of the run's held-out data (test, else validation, else train)."""
    splits = load_splits(recipe.data)
    split = next(name for name in VERIFY_SPLITS if name in splits)
    return task.inference_rows(recipe, splits[split].select(range(min(samples, len(splits[split])))))


def _write(model, tokenizer, out_dir: Path, max_shard_size: str, card: str) -> None:
    """Write into a sibling temporary folder and rename it, so `out_dir` is never half-written."""
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(staging)
    if model.can_generate():
        model.generation_config.save_pretrained(staging)
    (staging / MODEL_CARD).write_text(card, encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)

