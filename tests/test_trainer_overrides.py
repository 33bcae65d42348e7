"""Pins what `PeftkitTrainer` relies on in transformers' private `Trainer` API, so that an upgrade that renames,
re-signs or stops calling `_save_checkpoint` / `_get_grad_norm` fails here, loudly, instead of silently dropping
crash-safe checkpoints or the gradient guards. A tiny torch model, a few CPU steps."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from peftkit.training.checkpoints import TRAINER_STATE
from peftkit.training.trainer import STAGING, PeftkitTrainer


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_private_methods_keep_the_signatures_the_overrides_call():
    assert _parameters(Trainer._save_checkpoint) == ["self", "model", "trial"]
    assert _parameters(Trainer._get_grad_norm)[:3] == ["self", "model", "grad_norm"]
    assert inspect.signature(Trainer._get_grad_norm).parameters["grad_norm"].default is None
    assert _parameters(Trainer._get_output_dir) == ["self", "trial"]
    assert {"output_dir", "save_total_limit", "best_model_checkpoint"} <= set(_parameters(rotate_checkpoints))
    assert PREFIX_CHECKPOINT_DIR == "checkpoint"


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x, labels=None):
        prediction = self.linear(x).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(prediction, labels), "logits": prediction}


class Recording(PeftkitTrainer):
    """Records every call of the private hooks, with what the Trainer passed and returned."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grad_norms: list[float] = []
        self.saves: list[list[str]] = []

    def _get_grad_norm(self, model, grad_norm=None):
        norm = super()._get_grad_norm(model, grad_norm)
        self.grad_norms.append(float(norm))
        return norm

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        self.saves.append(sorted(p.name for p in Path(self.args.output_dir).iterdir()))


def test_the_trainer_calls_the_overridden_hooks_once_per_step(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 4)
    data = Dataset.from_dict({"x": x.tolist(), "labels": (x.sum(-1) * 3).tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path / "checkpoints"), max_steps=3, per_device_train_batch_size=8, learning_rate=0.1,
        max_grad_norm=1.0, save_strategy="steps", save_steps=1, save_total_limit=2, logging_steps=1, report_to=[],
        use_cpu=True, disable_tqdm=True,
    )
    trainer = Recording(model=Regression(), args=args, train_dataset=data)
    trainer.train()
    # One gradient norm per optimizer step, the one the Trainer logs (before clipping).
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(trainer.grad_norms) == 3 and len(logged) == 3
    assert trainer.grad_norms == pytest.approx([float(value) for value in logged], rel=1e-5)
    assert all(norm > 0 for norm in trainer.grad_norms)
    # One save per step, each staged and renamed into place; retention keeps the last two, no staging left behind.
    assert len(trainer.saves) == 3
    assert trainer.saves[-1] == [f"{PREFIX_CHECKPOINT_DIR}-2", f"{PREFIX_CHECKPOINT_DIR}-3"]
    assert not (tmp_path / "checkpoints" / STAGING).exists()
    assert (tmp_path / "checkpoints" / f"{PREFIX_CHECKPOINT_DIR}-3" / TRAINER_STATE).is_file()
