"""The support matrix, part 4 of 4 (see `tests/test_support_matrix.py`)."""

from tests.support_matrix import chunk_test

test_every_cell_is_green_or_refused = chunk_test(3)
