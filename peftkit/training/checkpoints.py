"""Finding checkpoints in a run folder. A checkpoint is complete once its trainer state is written (last)."""

from __future__ import annotations

from pathlib import Path

from peftkit.run_folder import CHECKPOINTS

TRAINER_STATE = "trainer_state.json"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest step first."""
    folder = run_dir / CHECKPOINTS
    found = [path for path in folder.glob("checkpoint-*") if (path / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda path: int(path.name.rsplit("-", 1)[-1]))


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = complete_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None
