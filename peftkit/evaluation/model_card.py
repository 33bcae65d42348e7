"""The model card (README.md) of a run's adapter folder: the base's hub id, data, metrics and recipe, with the hub
metadata that links it to its base. The merged model's card (deploy/model_card.py) shares the metric table."""

from __future__ import annotations

from pathlib import Path

from peftkit.recipe.schema import Recipe
from peftkit.references import hub_id
from peftkit.run_folder import read_metrics, recipe_as_yaml


def adapter_card(recipe: Recipe, run_dir: Path) -> str:
    """The adapter folder's README.md (replacing peft's empty template): base, data, recipe and metrics, with hub
    metadata (`base_model`, `library_name: peft`) so that the hub links it to its base."""
    from huggingface_hub import ModelCard, ModelCardData

    metrics = read_metrics(run_dir)
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
        *metric_table(metrics),
        "## Recipe",
        "",
        "```yaml",
        recipe_as_yaml(recipe).rstrip(),
        "```",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"))


def metric_table(metrics: dict) -> list[str]:
    """Headline (scalar) metrics of every evaluated split."""
    rows = []
    for split in ("validation", "test"):
        values = {k: v for k, v in metrics.get(split, {}).items() if isinstance(v, (int, float))}
        if values:
            rows.append(f"| {split} | " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()) + " |")
    if not rows:
        return ["No evaluation metrics were recorded.", ""]
    return ["| split | metrics |", "|---|---|", *rows, ""]
