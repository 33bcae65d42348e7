"""The one supervised trainer: transformers' `Trainer` plus what long, expensive runs need and it lacks.

- Checkpoints are written to a staging folder and renamed into place, so a kill at any moment leaves
  either the previous or the new checkpoint complete, never a half-written latest one.
- Non-finite losses and exploding gradient norms stop the run (naming the step and the last good
  checkpoint) or skip the step, instead of training on and saving a broken adapter.
- fp16 steps the loss scaler skipped (overflowing gradients; it then lowers the scale) are counted for the report.
- SIGTERM (what clusters send before pre-emption) saves a checkpoint at the next step and stops.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import threading
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from peftkit.errors import UserError
from peftkit.training.checkpoints import TRAINER_STATE, last_complete_checkpoint

STAGING = ".staging"


class TrainingDiverged(UserError):
    """Loss or gradients became non-finite or exploded; the message names the step and the last checkpoint."""


class PeftkitTrainer(Trainer):
    def __init__(self, *args, on_nonfinite: str = "stop", abort_grad_norm: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_nonfinite = on_nonfinite
        self.abort_grad_norm = abort_grad_norm
        self.skipped_steps: list[int] = []
        self.overflow_steps: list[int] = []  # fp16: steps whose update the gradient scaler skipped
        self._skip_this_step = False

    # --- numeric guards -------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss.detach()).all():
            self._bad_step(f"the loss became {loss.item()}")
        return loss

    def _bad_step(self, what: str) -> None:
        step = self.state.global_step + 1
        if self.on_nonfinite == "skip":
            self._skip_this_step = True
            return
        last = last_complete_checkpoint(Path(self.args.output_dir).parent)
        raise TrainingDiverged(
            f"training stopped at step {step}: {what}. Last good checkpoint: {last or 'none yet'}. "
            "Lower training.learning_rate, enable gradient clipping (training.max_grad_norm), or set "
            "training.on_nonfinite: skip to skip such steps; resume with --resume."
        )

    def _check_gradients(self) -> None:
        """Called before each optimizer step: skip (drop the gradients) or stop on bad gradients."""
        grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if grads and not self._skip_this_step:
            norm = torch.nn.utils.get_total_norm(grads).item()
            if not math.isfinite(norm):
                self._bad_step(f"the gradient norm became {norm}")
            elif self.abort_grad_norm is not None and norm > self.abort_grad_norm:
                self._bad_step(f"the gradient norm {norm:.3g} exceeded training.abort_grad_norm={self.abort_grad_norm}")
        if self._skip_this_step:
            # Parameters whose grad is None are left untouched by torch optimizers: the step is skipped.
            self.model.zero_grad(set_to_none=True)
            self.skipped_steps.append(self.state.global_step + 1)
            self._skip_this_step = False

    def _record_scaler_skip(self) -> None:
        """Called after each optimizer step. accelerate reports a step its GradScaler skipped (inf/NaN gradients
        under fp16); the scale is lowered and training goes on, which is right, but the user should know."""
        if self.accelerator.optimizer_step_was_skipped:
            self.overflow_steps.append(self.state.global_step + 1)

    # --- crash-safe checkpoints -----------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / STAGING
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self._barrier()
        output_dir = self.args.output_dir
        self.args.output_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = output_dir
        self._barrier()
        if self.args.should_save:
            self._move_into_place(staging / name, run_dir / name)
        self._barrier()

    def _move_into_place(self, staged: Path, final: Path) -> None:
        """Fix paths recorded while staging, then rename: the checkpoint appears complete or not at all."""
        best = self.state.best_model_checkpoint
        if best and Path(best).parent.name == STAGING:
            self.state.best_model_checkpoint = str(final.parent / Path(best).name)
            self.state.save_to_json(str(staged / TRAINER_STATE))
        if final.exists():  # re-saving the same step (e.g. SIGTERM right after a scheduled save)
            shutil.rmtree(final)
        os.replace(staged, final)
        staged.parent.rmdir()
        rotate_checkpoints(
            output_dir=str(final.parent),
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
        )

    def _barrier(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


class GradientGuardCallback(TrainerCallback):
    """Runs the trainer's gradient check between clipping and the optimizer step, and notes scaler-skipped steps."""

    def __init__(self, trainer: PeftkitTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._check_gradients()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._record_scaler_skip()


class PreemptionCallback(TrainerCallback):
    """On SIGTERM, save a checkpoint after the current step and stop training.

    Used as a context manager around the whole run, so a SIGTERM while the model loads is caught too
    and the previous handler is restored afterwards.
    """

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self) -> PreemptionCallback:
        if threading.current_thread() is threading.main_thread():  # signals can only be handled there
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame):
        self.received = True

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_received():
            control.should_save = True
            control.should_training_stop = True

    def _any_rank_received(self) -> bool:
        """Ranks must agree on the step to stop at, or the others would hang in the next collective."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.received
        flag = torch.tensor([float(self.received)])
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.received = bool(flag.item())
        return self.received
