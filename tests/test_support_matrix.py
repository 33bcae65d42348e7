"""The support matrix (see `tests/support_matrix.py`): every cell green or refused with a reason, and
`docs/support-matrix.md` rendered from the outcomes is current."""

from __future__ import annotations

import os

import pytest

from tests.conftest import REPO_ROOT
from tests.support_matrix import ARCHITECTURES, build_checkpoint, cells_for, render, run_cell, write_data

DOC = REPO_ROOT / "docs" / "support-matrix.md"
OUTCOMES: dict[str, list] = {}


@pytest.fixture(scope="module")
def matrix_data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("matrix-data"))


@pytest.fixture
def without_pictures(monkeypatch):
    """Report pictures are a fifth of a tiny cell's time and not what the matrix checks."""
    from peftkit.evaluation import plots

    monkeypatch.setattr(plots, "save_figure", lambda figure, path: plots.plt.close(figure))


@pytest.mark.slow
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_every_cell_is_green_or_refused(architecture, matrix_data, tmp_path_factory, without_pictures):
    model_dir = build_checkpoint(architecture, tmp_path_factory.mktemp(f"matrix-{architecture}"))
    cells = []
    for i, cell in enumerate(cells_for(architecture)):
        work = tmp_path_factory.mktemp(f"{architecture}-{i}")
        cells.append(run_cell(cell, model_dir, matrix_data[cell.task], work))
    OUTCOMES[architecture] = cells
    failed = [f"{cell.task} / {cell.column}: {cell.detail}" for cell in cells if cell.status == "failed"]
    assert not failed, "\n\n".join(failed)


@pytest.mark.slow
def test_support_matrix_doc_is_current():
    if set(OUTCOMES) != set(ARCHITECTURES):
        pytest.skip("needs every architecture's outcomes from this session (run the whole file)")
    rendered = render([cell for architecture in ARCHITECTURES for cell in OUTCOMES[architecture]])
    if os.environ.get("PEFTKIT_WRITE_MATRIX"):
        DOC.write_text(rendered, encoding="utf-8")
    assert DOC.read_text(encoding="utf-8") == rendered, (
        "docs/support-matrix.md is stale: rerun with PEFTKIT_WRITE_MATRIX=1 pytest tests/test_support_matrix.py"
    )
