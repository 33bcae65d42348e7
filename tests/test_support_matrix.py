"""The support matrix (see `tests/support_matrix.py`), part 1 of 4: every cell green or refused with a reason.
The parts are separate files so that pytest-xdist's `--dist loadfile` runs them on different workers; the part that
completes a session's outcomes checks that `docs/support-matrix.md` is their current rendering."""

from tests.support_matrix import chunk_test

test_every_cell_is_green_or_refused = chunk_test(0)
