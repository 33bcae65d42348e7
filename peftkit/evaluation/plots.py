"""PNG pictures of a run: loss curves and confusion matrices (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_losses(log_history: list[dict], path: Path) -> bool:
    """Training and validation loss against the optimizer step; False when nothing was logged."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    validation = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not validation:
        return False
    figure, axes = plt.subplots(figsize=(6, 4))
    for points, label, style in ((train, "training", "-"), (validation, "validation", "o-")):
        if points:
            axes.plot(*zip(*points), style, label=label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.legend()
    axes.grid(alpha=0.3)
    save_figure(figure, path)
    return True


def plot_confusion_matrix(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    size = max(3.5, 0.6 * len(labels) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    image = axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("gold")
    axes.set_title(title)
    peak = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            axes.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    figure.colorbar(image, ax=axes, fraction=0.046)
    save_figure(figure, path)


def save_figure(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
