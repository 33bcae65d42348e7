"""The README.md of a merged model: what it was made from, how well it did, and how it was checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from peftkit.recipe.schema import Recipe
from peftkit.references import hub_id
from peftkit.tasks import get_task

if TYPE_CHECKING:
    from peftkit.deploy.adapter_folder import AdapterSource
    from peftkit.deploy.merge import MergeResult


def model_card(recipe: Recipe, run_dir: Path, adapter: AdapterSource, result: MergeResult) -> str:
    metrics = _read_json(run_dir / "metrics.json")
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
        *_metric_table(metrics),
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


def _metric_table(metrics: dict) -> list[str]:
    """Headline (scalar) metrics of every evaluated split."""
    rows = []
    for split in ("validation", "test"):
        values = {k: v for k, v in metrics.get(split, {}).items() if isinstance(v, (int, float))}
        if values:
            rows.append(f"| {split} | " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()) + " |")
    if not rows:
        return ["No evaluation metrics were recorded.", ""]
    return ["| split | metrics |", "|---|---|", *rows, ""]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def adapter_card(recipe: Recipe, run_dir: Path) -> str:
    """The adapter folder's README.md (replacing peft's empty template): base, data, recipe and metrics, with hub
    metadata (`base_model`, `library_name: peft`) so that the hub links it to its base."""
    from huggingface_hub import ModelCard, ModelCardData

    from peftkit.run_folder import recipe_as_yaml

    metrics = _read_json(run_dir / "metrics.json")
    base = hub_id(recipe.model.name, recipe.model.hub_id)
    full = recipe.adapter.method == "none"
    data = ModelCardData(
        base_model=base, library_name="transformers" if full else "peft",
        tags=["peftkit", recipe.task.type, recipe.adapter.method], model_name=run_dir.name,
    )
    load = (
        ["from transformers import AutoModel", 'model = AutoModel.from_pretrained("path/to/this/folder")'] if full else
        ["from peft import AutoPeftModel", 'model = AutoPeftModel.from_pretrained("path/to/this/folder")']
    )
    body = [
        f"# {run_dir.name}",
        "",
        f"{'Full fine-tuning' if full else recipe.adapter.method + ' adapter'} of `{base or recipe.model.name}` for "
        f"{recipe.task.type}, trained with peftkit (recipe `{recipe.name}`).",
        "",
        "```python",
        *load,
        "```",
        "",
        "## Base model",
        "",
        f"- hub id: `{base}`" if base else f"- local model `{recipe.model.name}` (set model.hub_id to record its hub id)",
        *([f"- revision: {recipe.model.revision}"] if recipe.model.revision else []),
        "",
        "## Data",
        "",
        *(f"- {split}: `{source.path}`" + (f", {metrics['examples'][split]} examples"
                                          if split in metrics.get("examples", {}) else "")
          for split, source in recipe.data if source is not None and hasattr(source, "path")),
        "",
        "## Metrics",
        "",
        *_metric_table(metrics),
        "## Recipe",
        "",
        "```yaml",
        recipe_as_yaml(recipe).rstrip(),
        "```",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"))
