"""What a fit step hands to evaluation: the object predictions come from, and facts for the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FitResult:
    predictor: Any  # what the task's `predict` receives: the HF Trainer, or a task's own fitted object
    parameters: dict[str, int]
    train_metrics: dict[str, Any]
    best_checkpoint: str | None = None
    best_metric_name: str | None = None
    best_metric: float | None = None
    log_history: list[dict] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # further facts for metrics.json
