"""What long, expensive runs need and transformers' `Trainer` lacks, written once for every trainer class.

`PeftkitTraining` is a mixin put in front of any `Trainer` subclass (the plain one for supervised tasks, TRL's
DPO/ORPO/KTO trainers for preference tuning), so every task gets the same behaviour from one place:

- Checkpoints are written to a staging folder and renamed into place, so a kill at any moment leaves
  either the previous or the new checkpoint complete, never a half-written latest one.
- Non-finite losses and exploding gradient norms stop the run (naming the step and the last good
  checkpoint) or skip the step, instead of training on and saving a broken adapter.
- SIGTERM (what clusters send before pre-emption) saves a checkpoint at the next step and stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import threading
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from peftkit.errors import UserError, out_of_space
from peftkit.run_folder import TRAINER_STATE, last_complete_checkpoint, write_text_atomic
from peftkit.training.checkpoints import last_good_checkpoint
from peftkit.tasks.lm_loss import EfficientLMLoss

STAGING = ".staging"
# In a checkpoint saved on SIGTERM at a step whose evaluation was skipped to save in time: resuming runs it first.
EVALUATION_PENDING = "evaluation_pending"


# Optimizer steps in a row with a gradient norm of exactly 0 before training counts as dead (no parameter can
# change again: e.g. a learning rate that saturated every activation). A live run never has an exact 0 norm.
DEAD_STEPS = 5


class TrainingDiverged(UserError):
    """Loss or gradients became non-finite or exploded; the message names the step and the last checkpoint."""


class CheckpointNotSaved(UserError):
    """Writing a checkpoint failed (disk full, quota); the message names the last complete checkpoint."""


class PeftkitTraining:
    """Mixin over a `transformers.Trainer` subclass: `class X(PeftkitTraining, SomeTrainer)`.

    It only overrides Trainer hooks and calls `super()`, so the trainer it is mixed into keeps its own loss,
    batching and logging (TRL's trainers override `training_step` and `_save_checkpoint` themselves).
    """

    def __init__(self, *args, on_nonfinite: str = "stop", abort_grad_norm: float | None = None,
                 lm_loss: str = "standard", loraplus_lr_ratio: float | None = None, **kwargs):
        trained_dtypes = {name: param.dtype for name, param in kwargs["model"].named_parameters() if param.requires_grad}
        super().__init__(*args, **kwargs)
        # TRL's trainers cast a k-bit model's adapter weights to bf16 (the QLoRA paper's choice); the adapter is saved
        # so and reloads into peft's fp32 layers, which then compute other outputs than the model that was trained
        # and evaluated. Trained weights keep the dtype peftkit prepared them in (mixed precision autocasts them).
        for name, param in self.model.named_parameters():
            if name in trained_dtypes and param.dtype != trained_dtypes[name]:
                param.data = param.data.to(trained_dtypes[name])
        self.efficient_loss = EfficientLMLoss.for_model(self.model, lm_loss)
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.on_nonfinite = on_nonfinite
        self.abort_grad_norm = abort_grad_norm
        self.skipped_steps: list[int] = []
        self.overflow_steps: list[int] = []  # fp16: steps whose update the gradient scaler skipped
        self._nonfinite_loss: float | None = None  # first non-finite loss since the last optimizer step
        self._zero_norm_steps = 0  # optimizer steps in a row whose gradient norm was exactly 0
        self.add_callback(ScalerSkipCallback(self))
        self.add_callback(PendingEvaluationCallback(self))
        self.resumed_from: Path | None = None

    def create_optimizer(self, model=None):
        """LoRA+ (`adapter.loraplus_lr_ratio`): peft's parameter groups (B matrices at the higher rate) with the
        optimizer class and settings the Trainer would have built for `training.optimizer`."""
        if self.optimizer is None and self.loraplus_lr_ratio is not None:
            from peft.optimizers import create_loraplus_optimizer

            trained = self.model if model is None else model
            optimizer_class, settings = self.get_optimizer_cls_and_kwargs(self.args, trained)
            self.optimizer = create_loraplus_optimizer(
                trained, optimizer_class, loraplus_lr_ratio=self.loraplus_lr_ratio,
                loraplus_weight_decay=self.args.weight_decay, **settings,
            )
        return super().create_optimizer(model)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self.resumed_from = Path(resume_from_checkpoint) if resume_from_checkpoint else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def run_pending_evaluation(self) -> None:
        """Resumed from a checkpoint whose due evaluation SIGTERM skipped: run it now, at that step and before any
        RNG state is restored, so best-checkpoint selection and early stopping see what an uninterrupted run saw."""
        checkpoint = self.resumed_from
        if checkpoint is None or not (checkpoint / EVALUATION_PENDING).is_file() or self.eval_dataset is None:
            return
        # Evaluating draws from the RNG (each DataLoader iteration takes a seed), and in an uninterrupted run the
        # checkpoint's RNG state is taken after it: evaluate from the saved state and save the state it leaves,
        # which the Trainer then restores when training continues.
        self._load_rng_state(str(checkpoint))
        metrics = self.evaluate()
        self._save_rng_state(str(checkpoint))
        if self._determine_best_metric(metrics, trial=None):
            self.state.best_model_checkpoint = str(checkpoint)
        self._barrier()  # every rank has read the marker before it goes
        if self.args.should_save:
            # The checkpoint's state now holds the evaluation (a later resume from it must not repeat it).
            write_text_atomic(checkpoint / TRAINER_STATE, json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n")
            (checkpoint / EVALUATION_PENDING).unlink()

    def _get_eval_sampler(self, eval_dataset):
        # Under `train_sampling_strategy: group_by_length` transformers length-groups evaluation and prediction
        # batches too, and predictions then come back in that shuffled order while the tasks pair them with rows in
        # dataset order (seen: SST-2 dev accuracy 0.50 instead of 0.86). Evaluation keeps the dataset's order.
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_eval_sampler(eval_dataset)
        return torch.utils.data.SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """A language model's loss from its hidden states (`training.lm_loss`), scaled as the Trainer scales
        a model's own token-sum loss; every other model's loss is the Trainer's."""
        computed = None
        # Outside training the placeholder logits must not reach compute_metrics.
        logits_unused = model.training or self.compute_metrics is None
        if self.efficient_loss is not None and "labels" in inputs and logits_unused:
            computed = self.efficient_loss.loss(model, inputs, num_items_in_batch if self.model_accepts_loss_kwargs else None)
        if computed is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = computed
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # gradients are averaged over ranks; the divisor is global
        return (loss, outputs) if return_outputs else loss

    # --- numeric guards -------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._nonfinite_loss is None and not torch.isfinite(loss.detach()).all():
            self._nonfinite_loss = loss.item()
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm (the one clipping used), checked right before the optimizer step.

        It is the global norm under every strategy (DDP all-reduces gradients, FSDP reduces its shards' norms,
        DeepSpeed reports its engine's), where the local `p.grad` would be empty or partial.
        """
        grad_norm = super()._get_grad_norm(model, grad_norm)
        self._guard_step(None if grad_norm is None else float(grad_norm))
        return grad_norm

    def _guard_step(self, grad_norm: float | None) -> None:
        """Stop or skip the step on a bad loss or gradient norm, stop dead training; every rank decides the same."""
        problem = None
        if self._nonfinite_loss is not None:
            problem = f"the loss became {self._nonfinite_loss}"
        elif grad_norm is not None and not math.isfinite(grad_norm):
            problem = f"the gradient norm became {grad_norm}"
        elif self.abort_grad_norm is not None and grad_norm is not None and grad_norm > self.abort_grad_norm:
            problem = f"the gradient norm {grad_norm:.3g} exceeded training.abort_grad_norm={self.abort_grad_norm}"
        # The norm is the global one, so every rank counts the same; skipping such steps would change nothing.
        self._zero_norm_steps = self._zero_norm_steps + 1 if grad_norm == 0.0 else 0
        dead = problem is None and self._zero_norm_steps >= DEAD_STEPS
        if dead:
            problem = (
                f"the gradient norm was exactly 0 for {DEAD_STEPS} steps in a row, so no parameter can change any "
                "more (training is dead, e.g. a learning rate that saturated the model)"
            )
        weights_broke_the_loss = self._nonfinite_loss is not None
        self._nonfinite_loss = None
        # A rank that stopped alone would leave the others waiting in their next collective.
        if not any_rank(problem is not None):
            return
        step = self.state.global_step + 1
        if self.on_nonfinite == "skip" and not dead:
            # Parameters whose grad is None are left untouched by torch optimizers: the step is skipped.
            self.model.zero_grad(set_to_none=True)
            self.skipped_steps.append(step)
            return
        # A non-finite loss at this step comes from the weights the previous step wrote: a checkpoint of those
        # is not good even when its numbers are finite. Otherwise the newest checkpoint with finite weights is.
        last = last_good_checkpoint(Path(self.args.output_dir).parent, before_step=step - 1 if weights_broke_the_loss else step)
        hint = "" if dead else ", or set training.on_nonfinite: skip to skip such steps"
        raise TrainingDiverged(
            f"training stopped at step {step}: {problem or 'the loss became non-finite on another rank'}. "
            f"Last good checkpoint: {last or 'none'}. Lower training.learning_rate or enable gradient clipping "
            f"(training.max_grad_norm){hint}; to resume from the last good checkpoint, delete the checkpoints after it "
            "and pass --resume."
        )

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
        failure = None
        try:
            with self._without_tokenizer():
                super()._save_checkpoint(model, trial)
        except Exception as error:  # disk full, quota: earlier checkpoints are intact, this one is only staged
            if not out_of_space(error, run_dir):
                raise
            failure = error
        finally:
            self.args.output_dir = output_dir
        if any_rank(failure is not None):
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)  # frees the space the partial save took
            last = last_complete_checkpoint(run_dir.parent)
            raise CheckpointNotSaved(
                f"could not write checkpoint {name} under {run_dir}: {failure or 'a save failed on another rank'}. "
                f"Last complete checkpoint: {last or 'none'} (earlier checkpoints are intact). Free space, then "
                "continue with `peftkit train RECIPE --resume`"
            ) from None
        best = self.state.best_model_checkpoint
        best_was_staged = best is not None and Path(best).parent.name == STAGING
        if best_was_staged:  # on every rank: each one loads the best checkpoint at the end
            self.state.best_model_checkpoint = str(run_dir / Path(best).name)
        self._barrier()
        if self.args.should_save:
            if best_was_staged:
                self.state.save_to_json(str(staging / name / TRAINER_STATE))
            self._move_into_place(staging / name, run_dir / name)
        self._barrier()

    @contextlib.contextmanager
    def _without_tokenizer(self):
        """Resuming never reads the tokenizer and the run keeps one copy in adapter/, yet `Trainer._save` writes it
        into every checkpoint (from `processing_class`, else from the collator): 73% of a small adapter's checkpoint."""
        collator = self.data_collator
        processing_class, collator_tokenizer = self.processing_class, getattr(collator, "tokenizer", None)
        self.processing_class = None
        if collator_tokenizer is not None:
            collator.tokenizer = None
        try:
            yield
        finally:
            self.processing_class = processing_class
            if collator_tokenizer is not None:
                collator.tokenizer = collator_tokenizer

    def _move_into_place(self, staged: Path, final: Path) -> None:
        """Rename: the checkpoint appears complete or not at all; then apply retention."""
        if final.exists():  # re-saving the same step (e.g. SIGTERM right after a scheduled save)
            shutil.rmtree(final)
        os.replace(staged, final)
        shutil.rmtree(staged.parent)  # with what a trainer class wrote beside the checkpoint (TRL's model card)
        rotate_checkpoints(
            output_dir=str(final.parent),
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
        )

    def _barrier(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


class PeftkitTrainer(PeftkitTraining, Trainer):
    """The supervised trainer of every task that trains with a plain loss."""


def with_peftkit_training(trainer_class: type) -> type:
    """`trainer_class` (a Trainer subclass, e.g. TRL's DPOTrainer) with peftkit's checkpoints, guards and SIGTERM save."""
    if trainer_class is Trainer:
        return PeftkitTrainer
    return type(f"Peftkit{trainer_class.__name__}", (PeftkitTraining, trainer_class), {"__doc__": trainer_class.__doc__})


class ScalerSkipCallback(TrainerCallback):
    """Notes the steps the fp16 gradient scaler skipped, right after each optimizer step."""

    def __init__(self, trainer: PeftkitTraining):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._record_scaler_skip()


class PendingEvaluationCallback(TrainerCallback):
    """At the start of a resumed run (model, optimizer and state loaded), the evaluation a SIGTERM skipped."""

    def __init__(self, trainer: PeftkitTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.run_pending_evaluation()


class PreemptionCallback(TrainerCallback):
    """On SIGTERM, save a checkpoint after the current step and stop training.

    Used as a context manager around the whole run, so a SIGTERM while the model loads is caught too
    and the previous handler is restored afterwards.
    """

    def __init__(self):
        self.received = False
        self.skipped_evaluation = False
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
        # Ranks must agree on the step to stop at, or the others would hang in the next collective.
        self.received = any_rank(self.received)
        if self.received:
            # Save first: the grace period before SIGKILL (~30 s) does not cover an evaluation pass. The resumed
            # run evaluates first (EVALUATION_PENDING in the checkpoint).
            self.skipped_evaluation = self.skipped_evaluation or control.should_evaluate
            control.should_evaluate = False
            control.should_save = True
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.received:  # the step that stopped training saved already; no epoch-end evaluation or second save
            self.skipped_evaluation = self.skipped_evaluation or control.should_evaluate
            control.should_evaluate = False
            control.should_save = False
            if self.skipped_evaluation and args.should_save:
                # The epoch-end evaluation comes after the step's save: mark the checkpoint that save wrote.
                mark_evaluation_pending(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_save(self, args, state, control, **kwargs):
        if self.received and self.skipped_evaluation and args.should_save:
            mark_evaluation_pending(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def mark_evaluation_pending(checkpoint: Path) -> None:
    if checkpoint.is_dir():
        (checkpoint / EVALUATION_PENDING).write_text("")


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (a collective: every rank must call it)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    tensor = torch.tensor([float(flag)])
    if torch.distributed.get_backend() == "nccl":
        tensor = tensor.cuda()
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())
