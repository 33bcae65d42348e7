"""The README.md of a merged model: what it was made from, how well it did, and how it was checked."""

from __future__ import annotations

from pathlib import Path

from peftkit.deploy.adapter_folder import AdapterSource
from peftkit.deploy.verification import MergeResult
from peftkit.evaluation.model_card import metric_table
from peftkit.recipe.schema import Recipe
from peftkit.references import hub_id
from peftkit.run_folder import read_metrics
from peftkit.tasks import get_task


def model_card(recipe: Recipe, run_dir: Path, adapter: AdapterSource, result: MergeResult) -> str:
    metrics = read_metrics(run_dir)
    auto_class = get_task(adapter.task).AUTO_CLASS.__name__
    adapter_section = recipe.adapter
    quant = recipe.quantization
    method = f"LoRA (r={adapter_section.r}, alpha={adapter_section.alpha:g}, targets: {adapter_section.target_modules})"
    if quant.bits:
        method = f"QLoRA: {method} on a {quant.bits}-bit ({quant.quant_type}) base"
    lines = [
        "---",
        f"base_model: {hub_id(recipe.model.name, recipe.model.hub_id) or recipe.model.name}",
        "library_name: transformers",
        "tags: [peftkit, merged-adapter]",
        "---",
        "",
        f"# {recipe.name} (merged)",
        "",
        f"The {adapter.task} adapter of peftkit run `{run_dir.name}`, merged into its base model. It loads with plain "
        "transformers; neither peft nor peftkit is needed.",
        "",
        "```python",
        f"from transformers import {auto_class}, AutoTokenizer",
        f'model = {auto_class}.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
        "## How it was made",
        "",
        f"- Base: `{recipe.model.name}`" + (f" (revision {recipe.model.revision})" if recipe.model.revision else ""),
        f"- Method: {method}",
        f"- Merged onto: the {result.onto} base weights, saved as {result.dtype}",
        f"- Task: {adapter.task}" + (f", labels {adapter.info['labels']}" if "labels" in adapter.info else ""),
        "- Data: " + ", ".join(
            f"{split} `{source.path}`" + (f" ({metrics['examples'][split]} examples)" if split in metrics.get("examples", {}) else "")
            for split, source in recipe.data if source is not None and hasattr(source, "path")
        ),
        "",
        "## Metrics of the run (adapter before merging)",
        "",
        *metric_table(metrics),
        "## Merge verification",
        "",
        f"On {result.verification.rows} samples of the run's data, merged vs adapter-attached outputs: max |logit difference| "
        f"{result.verification.max_abs_diff:.3g} (tolerance {result.tolerance:g}), predictions agree on "
        f"{result.verification.agreement:.2%}.",
    ]
    if result.vs_trained is not None:
        lines += [
            "",
            f"Against the model as trained (adapter on the {quant.bits}-bit base): max |logit difference| "
            f"{result.vs_trained.max_abs_diff:.3g}, predictions agree on {result.vs_trained.agreement:.2%}.",
        ]
    return "\n".join(lines) + "\n"
