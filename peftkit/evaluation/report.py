"""`report.md`: what was trained, how training went, and each split's metrics with the task's error analysis."""

from __future__ import annotations

from pathlib import Path

from peftkit.recipe.schema import Recipe
from peftkit.run_folder import REPORT_FILE, write_text_atomic


def write_report(run_dir: Path, recipe: Recipe, summary: dict, split_sections: dict[str, str], has_loss_plot: bool) -> None:
    parameters = summary["parameters"]
    lines = [
        f"# Run report: {run_dir.name}",
        "",
        f"- recipe: {recipe.name}",
        f"- model: `{recipe.model.name}`" + (" (trust_remote_code ON)" if recipe.model.trust_remote_code else ""),
        f"- task: {recipe.task.type}",
        f"- adapter: {recipe.adapter.method}"
        + (f" (r={recipe.adapter.r}, alpha={recipe.adapter.alpha})" if recipe.adapter.method == "lora" else ""),
        f"- quantization: {recipe.quantization.bits or 'none'}" + (" bit" if recipe.quantization.bits else ""),
        f"- trainable parameters: {parameters['trainable']:,} of {parameters['total']:,} "
        f"({100 * parameters['trainable'] / max(parameters['total'], 1):.2f}%)",
        f"- examples: " + ", ".join(f"{split} {count}" for split, count in summary["examples"].items()),
    ]
    # A mixed split's rows per source: weights are relative, so the counts are what tells the mixture actually used.
    for split, sources in summary.get("sources", {}).items():
        lines.append(f"- {split} rows by source: " + ", ".join(
            f"`{source['path']}` {source['rows']:,} (weight {source['weight']:g})" for source in sources
        ))
    train = summary.get("train", {})
    if train:
        # A fit without gradient steps (features: logistic regression) has no step count or training loss.
        parts = [f"{train['global_step']} steps" if train.get("global_step") else None,
                 f"{train['train_runtime']:.1f} s" if "train_runtime" in train else None,
                 f"final training loss {train['train_loss']:.4f}" if "train_loss" in train else None]
        lines.append("- training: " + ", ".join(part for part in parts if part))
    if summary.get("skipped_steps"):
        lines.append(f"- steps skipped for non-finite or exploding gradients: {summary['skipped_steps']}")
    if summary.get("fp16_overflow_steps"):
        overflows = summary["fp16_overflow_steps"]
        lines.append(f"- fp16 overflow: the gradient scaler skipped {len(overflows)} step(s) and lowered its scale: {overflows}")
    if summary.get("best_checkpoint"):
        lines.append(f"- best checkpoint: `{summary['best_checkpoint']}` ({summary['best_metric_name']} = {summary['best_metric']:.4f})")
    if has_loss_plot:
        lines += ["", "## Loss", "", "![loss curves](plots/loss.png)"]
    for split, section in split_sections.items():
        lines += ["", f"## {split.capitalize()} results", "", section]
    write_text_atomic(run_dir / REPORT_FILE, "\n".join(lines) + "\n")
