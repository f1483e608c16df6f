"""MAP@12 exactly as the H&M competition defines it, on hand-computed cases (no Spark)."""

from __future__ import annotations

import pytest

from recsys.evaluation.metrics import average_precision_at_k

FILLER = [f"x{i}" for i in range(20)]


def test_hits_at_ranks_one_and_three() -> None:
    # P(1) = 1, P(3) = 2/3; two articles bought: (1 + 2/3) / 2
    predicted = ["a", "x0", "b", *FILLER[1:10]]
    assert average_precision_at_k({"a", "b"}, predicted) == pytest.approx((1 + 2 / 3) / 2)


def test_fewer_than_twelve_relevant_divides_by_what_was_bought() -> None:
    # one article bought, found at rank 3: P(3) = 1/3, divided by min(1, 12) = 1
    assert average_precision_at_k({"c"}, ["x0", "x1", "c", *FILLER[2:11]]) == pytest.approx(1 / 3)


def test_more_than_twelve_relevant_divides_by_twelve() -> None:
    bought = [f"r{i}" for i in range(15)]
    assert average_precision_at_k(bought, bought[:12]) == pytest.approx(1.0)
    # half of them found, at ranks 1..6: (1 + 1 + ... ) 6 terms of 1 / 12
    assert average_precision_at_k(bought, bought[:6] + FILLER[:6]) == pytest.approx(6 / 12)


def test_only_the_first_twelve_count_and_a_repeat_counts_once() -> None:
    assert average_precision_at_k({"z"}, [*FILLER[:12], "z"]) == 0.0
    assert average_precision_at_k({"z"}, [*FILLER[:12], "z"], k=13) == pytest.approx(1 / 13)
    # "a" twice: the second copy takes a slot but scores nothing
    assert average_precision_at_k({"a", "b"}, ["a", "a", "b"]) == pytest.approx((1 + 2 / 3) / 2)


def test_no_purchase_scores_zero_and_no_hit_scores_zero() -> None:
    assert average_precision_at_k(set(), ["a", "b"]) == 0.0
    assert average_precision_at_k({"d", "e"}, FILLER[:12]) == 0.0
