"""Retrieval metrics: average precision, category mAP, precision@k, recall@k."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def average_precision(ranked_relevance: Sequence[bool] | np.ndarray, num_relevant: int) -> float:
    """AP of one ranked list: mean of precision at each relevant rank, over all relevant items.

    ``num_relevant`` counts every relevant item in the gallery, so relevant items the list never
    reaches count as misses.
    """
    rel = np.asarray(ranked_relevance, dtype=bool)
    if num_relevant <= 0:
        return 0.0
    hits = np.cumsum(rel)
    ranks = np.arange(1, len(rel) + 1)
    return float((hits[rel] / ranks[rel]).sum() / num_relevant)


def precision_at_k(ranked_relevance: Sequence[bool] | np.ndarray, k: int) -> float:
    rel = np.asarray(ranked_relevance, dtype=bool)[:k]
    return float(rel.sum() / k) if k > 0 else 0.0


def category_map(
    scores: np.ndarray, gallery_labels: Sequence[str], query_labels: Sequence[str]
) -> dict[str, float]:
    """Per-query AP over the whole gallery (one query per category), keyed by query label.

    ``scores`` is (num_queries, num_gallery); higher is better.
    """
    labels = np.asarray(gallery_labels)
    out = {}
    for qi, qlabel in enumerate(query_labels):
        order = np.argsort(-scores[qi], kind="stable")
        rel = labels[order] == qlabel
        out[qlabel] = average_precision(rel, int((labels == qlabel).sum()))
    return out


def recall_at_k(scores: np.ndarray, targets: Sequence[int], ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries whose target index is in the top k (one target per query)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    tgt = np.asarray(targets)[:, None]
    rank = (order == tgt).argmax(axis=1)
    return {k: float((rank < k).mean()) for k in ks}
