"""Retrieval metrics on hand-computed rankings."""

from __future__ import annotations

import numpy as np
import pytest

from imagine.metrics import average_precision, category_map, precision_at_k, recall_at_k


def test_average_precision_of_hand_computed_list() -> None:
    # Relevant at ranks 1 and 3: precisions 1/1 and 2/3.
    assert average_precision([1, 0, 1], 2) == pytest.approx((1 + 2 / 3) / 2)


def test_average_precision_perfect_and_worst_rankings() -> None:
    assert average_precision([True, True, False, False], 2) == pytest.approx(1.0)
    assert average_precision([False, False, True, True], 2) == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_average_precision_counts_unreached_relevant_items_as_misses() -> None:
    # Both hits at the top, but the gallery holds 4 relevant items: two are never retrieved.
    assert average_precision([1, 1, 0], 4) == pytest.approx((1 + 1) / 4)


def test_average_precision_without_relevant_items_is_zero() -> None:
    assert average_precision([0, 0, 0], 0) == 0.0
    assert average_precision([0, 0, 0], 3) == 0.0
    assert average_precision([], 2) == 0.0


def test_average_precision_accepts_numpy_arrays() -> None:
    assert average_precision(np.array([0, 1, 0, 1]), 2) == pytest.approx((1 / 2 + 2 / 4) / 2)


def test_precision_at_k() -> None:
    ranked = [1, 0, 1, 1, 0]
    assert precision_at_k(ranked, 1) == pytest.approx(1.0)
    assert precision_at_k(ranked, 2) == pytest.approx(0.5)
    assert precision_at_k(ranked, 4) == pytest.approx(0.75)
    # A list shorter than k: the missing ranks are not relevant.
    assert precision_at_k([1, 1], 4) == pytest.approx(0.5)
    assert precision_at_k(ranked, 0) == 0.0


def test_category_map_on_small_score_matrix() -> None:
    gallery = ["cat", "dog", "cat", "dog"]
    scores = np.array(
        [
            # "cat" query ranks gallery 0, 1, 2, 3: relevant at ranks 1 and 3.
            [0.9, 0.8, 0.7, 0.1],
            # "dog" query ranks gallery 1, 3, 0, 2: relevant at ranks 1 and 2.
            [0.2, 0.9, 0.1, 0.8],
        ]
    )
    result = category_map(scores, gallery, ["cat", "dog"])
    assert set(result) == {"cat", "dog"}
    assert result["cat"] == pytest.approx((1 + 2 / 3) / 2)
    assert result["dog"] == pytest.approx(1.0)


def test_category_map_of_a_label_absent_from_the_gallery_is_zero() -> None:
    scores = np.array([[0.5, 0.4]])
    assert category_map(scores, ["cat", "dog"], ["bird"]) == {"bird": 0.0}


def test_recall_at_k() -> None:
    scores = np.array(
        [
            [0.9, 0.1, 0.0],  # target 0 at rank 1
            [0.9, 0.5, 0.1],  # target 1 at rank 2
            [0.9, 0.5, 0.1],  # target 2 at rank 3
            [0.1, 0.2, 0.3],  # target 0 at rank 3
        ]
    )
    result = recall_at_k(scores, [0, 1, 2, 0], [1, 2, 3])
    assert result == {
        1: pytest.approx(0.25),
        2: pytest.approx(0.5),
        3: pytest.approx(1.0),
    }
