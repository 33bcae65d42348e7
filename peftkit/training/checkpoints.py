"""Finding checkpoints in a run folder and checking what each save wrote.

A checkpoint is complete once its trainer state is written (last).
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import torch
from peft.utils import CONFIG_NAME
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from peftkit.errors import UserError
from peftkit.run_folder import TRAINER_STATE, checkpoint_step, complete_checkpoints, safetensors_problem

log = logging.getLogger("peftkit")


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why resuming from `checkpoint` would fail (a truncated or unreadable file), or None when it can be used.

    Cheap: a safetensors file must be as long as its header says; a torch archive (optimizer, scheduler, RNG and
    DeepSpeed states) must end with its zip directory, which a truncated file lacks.
    """
    try:
        json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"{TRAINER_STATE} is unreadable ({error})"
    # The Trainer resumes without a missing optimizer or RNG state, silently: not the run that was interrupted.
    required = {
        "weights (*.safetensors)": any(checkpoint.glob("*.safetensors")),
        "optimizer state": any(checkpoint.glob("optimizer*")) or any(checkpoint.glob("global_step*")),  # FSDP, DeepSpeed
        "RNG state": any(checkpoint.glob("rng_state*.pth")),
    }
    missing = [what for what, present in required.items() if not present]
    if missing:
        return f"has no {', no '.join(missing)}"
    for file in sorted(checkpoint.rglob("*")):
        if file.suffix == ".safetensors":
            problem = safetensors_problem(file)
        elif file.suffix in (".pt", ".pth", ".bin"):
            problem = None if zipfile.is_zipfile(file) else "is not a complete torch archive (truncated?)"
        else:
            continue
        if problem:
            return f"{file.relative_to(checkpoint)} {problem}"
    return None


def usable_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint that passes `checkpoint_problem`; damaged newer ones are named in a warning.

    None when the run has no complete checkpoint (it starts from the beginning); an error when it has some and
    every one is damaged (starting over silently would discard the run's progress).
    """
    checkpoints = complete_checkpoints(run_dir)
    damaged = []
    for checkpoint in reversed(checkpoints):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            if damaged:
                log.warning("skipping damaged checkpoint(s) %s; resuming from %s", "; ".join(damaged), checkpoint.name)
            return checkpoint
        damaged.append(f"{checkpoint.name}: {problem}")
    if damaged:
        raise UserError(
            f"--resume: every checkpoint of `{run_dir}` is damaged ({'; '.join(damaged)}); start a new run "
            "(another output.dir) or set output.overwrite"
        )
    return None


def last_good_checkpoint(run_dir: Path, before_step: int) -> Path | None:
    """The newest complete checkpoint saved before `before_step` whose weights are all finite (after a divergence)."""
    from safetensors.torch import load_file

    for checkpoint in reversed(complete_checkpoints(run_dir)):
        if checkpoint_step(checkpoint) >= before_step or checkpoint_problem(checkpoint):
            continue
        files = list(checkpoint.glob("*.safetensors"))
        if files and all(bool(torch.isfinite(t).all()) for f in files for t in load_file(str(f)).values()):
            return checkpoint
    return None


class UnusableWeightsError(RuntimeError):
    """Saved weights that cannot serve: none, a truncated file, or empty tensors (under ZeRO-3: partitions written
    instead of gathered weights)."""


def check_saved_weights(folder: Path) -> None:
    """Fail loudly unless `folder` holds complete safetensors weights and none of their tensors is empty."""
    from safetensors import safe_open

    pruned = _modules_pruned_to_rank_zero(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnusableWeightsError(f"no *.safetensors weights were saved in {folder}")
    for file in files:
        problem = safetensors_problem(file)
        if problem:
            raise UnusableWeightsError(f"{file} {problem}: restore it (or train again)")
        with safe_open(str(file), framework="pt") as weights:
            names = list(weights.keys())
            empty = [name for name in names if 0 in weights.get_slice(name).get_shape() and not _pruned(name, pruned)]
        if not names or empty:
            raise UnusableWeightsError(
                f"{file} holds {'no tensors' if not names else f'empty tensors {empty[:5]}'}: the weights were not "
                "gathered from their shards before saving (ZeRO-3 needs stage3_gather_16bit_weights_on_model_save)"
            )


def _modules_pruned_to_rank_zero(folder: Path) -> list[str]:
    """AdaLoRA may prune a module to rank 0 (its saved `rank_pattern` keeps nothing); its factors are then empty."""
    config = folder / CONFIG_NAME
    pattern = json.loads(config.read_text()).get("rank_pattern") if config.is_file() else None
    return [name.removesuffix(".lora_E") for name, kept in (pattern or {}).items() if isinstance(kept, list) and not any(kept)]


def _pruned(tensor_name: str, pruned_modules: list[str]) -> bool:
    module = tensor_name.rsplit(".", 1)[0]  # drop lora_A / lora_B / lora_E
    return any(module.endswith(name) or name.endswith(module) for name in pruned_modules)


class CheckSavedWeights(TrainerCallback):
    """After every checkpoint save, check the weights it holds (on the process that wrote them)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            check_saved_weights(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
