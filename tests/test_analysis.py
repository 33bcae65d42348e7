"""Error-analysis tables shared by task reports."""

from __future__ import annotations

from peftkit.evaluation.analysis import length_bucket_table, lowest_scoring_table, markdown_cell


def test_length_buckets_are_quartiles_with_mean_scores():
    lengths = [1, 2, 3, 4, 5, 6, 7, 8]
    scores = [0, 0, 1, 1, 0, 1, 1, 1]
    rows = length_bucket_table(lengths, scores, "accuracy").splitlines()[2:]
    # quartile edges of 1..8 round to 1, 3 (2.75), 4 (4.5), 6 (6.25), 8
    assert rows == [
        "| 1–3 | 3 | 0.3333 |",
        "| 4 | 1 | 1.0000 |",
        "| 5–6 | 2 | 0.5000 |",
        "| 7–8 | 2 | 1.0000 |",
    ]


def test_equal_lengths_make_one_bucket():
    assert length_bucket_table([5, 5, 5], [1.0, 0.0, 0.5], "F1").splitlines()[2:] == ["| 5 | 3 | 0.5000 |"]


def test_lowest_scoring_rows_in_order():
    records = [{"x": "a", "s": 3.0}, {"x": "b|c", "s": 1.0}, {"x": "d", "s": 2.0}]
    table = lowest_scoring_table(records, {"input": lambda r: r["x"], "score": lambda r: r["s"]}, "s", 2)
    assert table.splitlines()[0] == "Lowest-scoring examples (s), 2 of 3:"
    assert table.splitlines()[-2:] == ["| b\\|c | 1.00 |", "| d | 2.00 |"]
    assert lowest_scoring_table(records, {}, "s", 0) == ""


def test_cells_are_flat_and_short():
    assert markdown_cell("a\nb") == "a b"
    assert markdown_cell(["x", "y"]) == "x / y"
    assert len(markdown_cell("w" * 500)) == 160
