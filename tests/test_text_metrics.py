"""Metric functions against hand-computed values."""

from __future__ import annotations

import math

import pytest

from peftkit.evaluation.text_metrics import bleu_and_chrf, exact_match, normalize_answer, rouge, sentence_chrf, token_f1


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The  Eiffel Tower!", "eiffel tower"),
        ("an apple, a pear", "apple pear"),
        ("Theory of the Anthem", "theory of anthem"),  # articles only as whole words
        ("U.S.-based", "usbased"),
        ("  ", ""),
        ("A", ""),
    ],
)
def test_squad_normalisation(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_takes_the_best_gold():
    assert exact_match("the Denver Broncos", ["Broncos", "Denver Broncos"]) == 100.0
    assert exact_match("Denver", ["Broncos", "Denver Broncos"]) == 0.0


def test_token_f1_hand_computed():
    # prediction {denver, broncos, team} vs gold {denver, broncos}: P = 2/3, R = 1, F1 = 0.8
    assert token_f1("Denver Broncos team", ["Denver Broncos"]) == pytest.approx(80.0)
    # "a" is an article, so the prediction is [b, b]; only one b matches gold [b, c]: P = R = 1/2
    assert token_f1("a b b", ["b c"]) == pytest.approx(50.0)
    assert token_f1("cat", ["dog"]) == 0.0


def test_unanswerable_questions_follow_squad_v2():
    assert exact_match("", []) == 100.0
    assert token_f1("", [""]) == 100.0
    assert token_f1("something", []) == 0.0
    assert token_f1("", ["Denver"]) == 0.0


def test_bleu_and_chrf_on_known_pairs():
    perfect = bleu_and_chrf(["the cat sat on the mat"], [["the cat sat on the mat"]])
    assert perfect == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}
    # 6 hypothesis words, 7 reference words; matched n-grams 6/6, 4/5, 2/4, 1/3; brevity penalty exp(1 - 7/6).
    scores = bleu_and_chrf(["the cat sat on the mat"], [["the cat sat on a the mat"]])
    precisions = [6 / 6, 4 / 5, 2 / 4, 1 / 3]
    expected = 100 * math.exp(1 - 7 / 6) * math.exp(sum(math.log(p) for p in precisions) / 4)
    assert scores["bleu"] == pytest.approx(expected, rel=1e-6)
    one_off = bleu_and_chrf(["a b c d e"], [["a b c d f"]])
    expected = 100 * math.exp((math.log(4 / 5) + math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2)) / 4)
    assert one_off["bleu"] == pytest.approx(expected, rel=1e-6)
    assert sentence_chrf("", ["anything"]) == 0.0


def test_bleu_accepts_a_varying_number_of_references():
    scores = bleu_and_chrf(["a b c d", "e f g h"], [["a b c d", "x"], ["e f g h"]])
    assert scores["bleu"] == pytest.approx(100.0)


def test_rouge_hand_computed():
    scores = rouge("the cat sat", ["the cat sat on the mat"])
    # unigrams: 3 matched of 3 predicted and 6 reference tokens: P = 1, R = 0.5, F = 2/3
    assert scores["rouge1"] == pytest.approx(100 * 2 / 3)
    # bigrams: 2 of 2 predicted, 2 of 5 reference: F = 2 * 1 * 0.4 / 1.4
    assert scores["rouge2"] == pytest.approx(100 * 0.8 / 1.4)
    assert scores["rougeL"] == pytest.approx(100 * 2 / 3)
    # the best reference counts: "a dog ran" shares 2 of 3 tokens (P = R = 2/3), the other only "the"
    assert rouge("the dog ran", ["the cat sat on the mat", "a dog ran"])["rouge1"] == pytest.approx(100 * 2 / 3)


def test_rouge_lsum_splits_sentences():
    # Two sentences in swapped order: summary-level LCS (Lsum) matches everything, plain LCS (L) only half.
    scores = rouge("Dogs bark loudly. Cats sleep all day.", ["Cats sleep all day. Dogs bark loudly."])
    assert scores["rougeLsum"] == pytest.approx(100.0)
    assert scores["rougeL"] < 70
