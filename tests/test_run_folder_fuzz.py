"""Property-based: any state a run folder can be left in (kills, a full disk, hand edits, truncated files) either
resumes from the newest checkpoint that is intact or gives the one user-error type, and reading it changes nothing."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from peftkit.errors import UserError
from peftkit.recipe.load import validate_recipe
from peftkit.run_folder import check_run_folder, complete_checkpoints, recipe_as_yaml
from peftkit.training.checkpoints import checkpoint_problem, usable_checkpoint

CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "rng_state.pth")
DAMAGE = st.sampled_from(["none", "missing", "truncated", "empty", "garbage"])
CHECKPOINT = st.fixed_dictionaries({name: DAMAGE for name in CHECKPOINT_FILES})
RECIPE_FILE = st.sampled_from(["same", "changed", "missing", "corrupt", "duplicate", "list", "garbage"])


def _recipe(run_dir: Path, rank: int = 8):
    return validate_recipe({"model": {"name": "m"}, "data": {"train": {"path": "t.jsonl"}}, "adapter": {"r": rank},
                            "training": {"eval_strategy": "no"}, "output": {"dir": str(run_dir)}})


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """One intact checkpoint's files, small but real (safetensors, torch archives, trainer state)."""
    folder = tmp_path_factory.mktemp("template")
    save_file({"lora_A": torch.ones(2, 4), "lora_B": torch.zeros(4, 2)}, str(folder / "adapter_model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.ones(3)}}}, folder / "optimizer.pt")
    torch.save({"python": [1, 2, 3]}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 1, "log_history": []}))
    return folder


def _damage(path: Path, how: str) -> None:
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"\x00\xffnot what it should be" * 3)


def _write_recipe(run_dir: Path, kind: str) -> None:
    path = run_dir / "recipe.yaml"
    text = {
        "same": recipe_as_yaml(_recipe(run_dir)),
        "changed": recipe_as_yaml(_recipe(run_dir, rank=4)),
        "corrupt": "model: [",
        "duplicate": recipe_as_yaml(_recipe(run_dir)) + "adapter: {r: 8}\n",
        "list": "- a\n- b\n",
        "garbage": "\udcff",
    }.get(kind)
    if text is not None:
        path.write_bytes(text.encode("utf-8", "surrogateescape"))


def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    checkpoints=st.dictionaries(st.integers(1, 40), CHECKPOINT, max_size=4),
    recipe_file=RECIPE_FILE,
    finished=st.booleans(),
    staging=st.booleans(),
    stray_names=st.lists(st.sampled_from(["checkpoint-x", "checkpoint-", "checkpoint-07a", "notes.txt"]), max_size=2),
)
def test_any_run_folder_state_resumes_from_an_intact_checkpoint_or_is_refused(
    template, checkpoints, recipe_file, finished, staging, stray_names
):
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        (run_dir / "checkpoints").mkdir(parents=True)
        for step, damage in checkpoints.items():
            checkpoint = run_dir / "checkpoints" / f"checkpoint-{step}"
            shutil.copytree(template, checkpoint)
            for name, how in damage.items():
                _damage(checkpoint / name, how)
        if staging:
            shutil.copytree(template, run_dir / "checkpoints" / ".staging" / "checkpoint-99")
        for name in stray_names:
            (run_dir / "checkpoints" / name).mkdir(exist_ok=True)
        _write_recipe(run_dir, recipe_file)
        if finished:
            (run_dir / "manifest.json").write_text("{}")
        before = _snapshot(run_dir)

        try:
            check_run_folder(_recipe(run_dir), resume=True)
            chosen = usable_checkpoint(run_dir)
        except UserError as error:
            assert str(error)  # one message, no other exception type
            chosen = "refused"
        assert _snapshot(run_dir) == before  # looking never changes the folder

        complete = complete_checkpoints(run_dir)
        intact = [c for c in complete if checkpoint_problem(c) is None]
        assert ".staging" not in {c.parent.name for c in complete}
        if recipe_file in ("changed", "corrupt", "duplicate", "list", "garbage") or (finished and not complete):
            assert chosen == "refused"
        elif chosen != "refused":
            assert chosen == (intact[-1] if intact else None)
            assert complete == [] or intact  # a run with checkpoints never silently starts over
        else:
            assert complete and not intact  # refused only because every checkpoint is damaged
        for checkpoint in intact:  # what passes the check really loads
            torch.load(checkpoint / "optimizer.pt", weights_only=True)
            json.loads((checkpoint / "trainer_state.json").read_text())
