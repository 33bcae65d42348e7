"""Experiment trackers (`training.report_to`): TensorBoard, MLflow, Weights & Biases.

During training each tracker is transformers' own callback; peftkit opens the tracker's run itself, so that after
training the final validation/test metrics and the report's plots go to the same run before it is closed.
MLflow and W&B are optional extras (`pip install 'peftkit[mlflow]'` / `'peftkit[wandb]'`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

from transformers import TrainerCallback

from peftkit.errors import UserError
from peftkit.recipe.schema import Recipe
from peftkit.run_folder import MLFLOW_DIR, TENSORBOARD_DIR

log = logging.getLogger("peftkit")


class Tracker(Protocol):
    """One experiment tracker: a Trainer callback for the training curves, then the run's final results."""

    def callback(self) -> TrainerCallback: ...

    def log_results(self, metrics: dict[str, float], pictures: list[Path], step: int) -> None:
        """Final metrics (`test/accuracy`, ...) and the report's pictures; then the tracker's run is closed."""


class TensorBoard:
    def __init__(self, recipe: Recipe, run_dir: Path):
        self.log_dir = run_dir / TENSORBOARD_DIR

    def callback(self) -> TrainerCallback:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        return TensorBoardCallback(SummaryWriter(log_dir=str(self.log_dir)))

    def log_results(self, metrics: dict[str, float], pictures: list[Path], step: int) -> None:
        from matplotlib.image import imread
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(self.log_dir)) as writer:
            for name, value in metrics.items():
                writer.add_scalar(f"final/{name}", value, step)
            for picture in pictures:
                writer.add_image(f"report/{picture.stem}", imread(picture)[..., :3], step, dataformats="HWC")


class MLflow:
    """Logs to `$MLFLOW_TRACKING_URI` when set, else to a file store in the run folder (`<run>/mlruns`)."""

    def __init__(self, recipe: Recipe, run_dir: Path):
        mlflow = _import_extra("mlflow", "mlflow")
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks before using a folder
            mlflow.set_tracking_uri((run_dir / MLFLOW_DIR).resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "peftkit"))
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=recipe.name)
        log.info("mlflow: run %s at %s", self.run.info.run_id, mlflow.get_tracking_uri())

    def callback(self) -> TrainerCallback:
        from transformers.integrations import MLflowCallback

        return MLflowCallback()  # finds the active run and leaves closing it to log_results

    def log_results(self, metrics: dict[str, float], pictures: list[Path], step: int) -> None:
        # MLflow metric names cannot hold `/` on every store: `test/accuracy` is logged as `test_accuracy`.
        self.mlflow.log_metrics({name.replace("/", "_"): value for name, value in metrics.items()}, step=step,
                                run_id=self.run.info.run_id)
        for picture in pictures:
            self.mlflow.log_artifact(str(picture), artifact_path="report", run_id=self.run.info.run_id)
        self.mlflow.end_run()


class WandB:
    """Online with `WANDB_API_KEY` (or a `wandb login`); without them offline into the run folder (`wandb sync`)."""

    def __init__(self, recipe: Recipe, run_dir: Path):
        wandb = _import_extra("wandb", "wandb")
        if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY"):
            os.environ["WANDB_MODE"] = "offline"
            log.info("wandb: no WANDB_API_KEY, logging offline to %s (upload with `wandb sync`)", run_dir / "wandb")
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "peftkit"), name=recipe.name, dir=str(run_dir),
                              config=recipe.model_dump(mode="json"))

    def callback(self) -> TrainerCallback:
        from transformers.integrations import WandbCallback

        return WandbCallback()  # logs into the run opened above

    def log_results(self, metrics: dict[str, float], pictures: list[Path], step: int) -> None:
        self.run.log({**metrics, **{f"report/{p.stem}": self.wandb.Image(str(p)) for p in pictures}})
        for name, value in metrics.items():
            self.run.summary[name] = value
        self.run.finish()


TRACKERS: dict[str, type] = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


def open_trackers(recipe: Recipe, run_dir: Path) -> list[Tracker]:
    """The recipe's trackers, each with its run open (main process only: one run per training run)."""
    return [TRACKERS[name](recipe, run_dir) for name in recipe.training.report_to]


def final_metrics(split_metrics: dict[str, dict]) -> dict[str, float]:
    """`{split: {metric: value}}` -> `{"split/metric": value}` for the numeric metrics."""
    return {
        f"{split}/{name}": float(value)
        for split, metrics in split_metrics.items()
        for name, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _import_extra(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError:
        raise UserError(
            f"training.report_to: {module} is not installed; pip install 'peftkit[{extra}]' (or {module}), or remove "
            f"{module} from training.report_to"
        ) from None
