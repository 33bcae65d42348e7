"""Finding checkpoints in a run folder and checking what each save wrote.

A checkpoint is complete once its trainer state is written (last).
"""

from __future__ import annotations

from pathlib import Path

from peft.utils import CONFIG_NAME
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from peftkit.run_folder import CHECKPOINTS

from transformers.trainer import TRAINER_STATE_NAME as TRAINER_STATE


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest step first."""
    folder = run_dir / CHECKPOINTS
    found = [path for path in folder.glob("checkpoint-*") if (path / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda path: int(path.name.rsplit("-", 1)[-1]))


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = complete_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


class EmptyWeightsError(RuntimeError):
    """A save produced empty tensors: under ZeRO-3 that means partitions were written instead of gathered weights."""


def check_saved_weights(folder: Path) -> None:
    """Fail loudly unless `folder` holds safetensors weights and none of their tensors is empty."""
    from safetensors import safe_open

    pruned = _modules_pruned_to_rank_zero(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise EmptyWeightsError(f"no *.safetensors weights were saved in {folder}")
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            names = list(weights.keys())
            empty = [name for name in names if 0 in weights.get_slice(name).get_shape() and not _pruned(name, pruned)]
        if not names or empty:
            raise EmptyWeightsError(
                f"{file} holds {'no tensors' if not names else f'empty tensors {empty[:5]}'}: the weights were not "
                "gathered from their shards before saving (ZeRO-3 needs stage3_gather_16bit_weights_on_model_save)"
            )


def _modules_pruned_to_rank_zero(folder: Path) -> list[str]:
    """AdaLoRA may prune a module to rank 0 (its saved `rank_pattern` keeps nothing); its factors are then empty."""
    import json

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
