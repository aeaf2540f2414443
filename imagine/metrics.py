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


def recall_at_k_relevant(
    scores: np.ndarray, relevant: np.ndarray, ks: Sequence[int]
) -> dict[int, float]:
    """Fraction of queries with at least one relevant item in the top k.

    ``relevant`` is a boolean (num_queries, num_gallery) matrix: a query may have many relevant
    items (e.g. several texts that say the same thing).
    """
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(np.asarray(relevant, dtype=bool), order, axis=1)
    return {k: float(ranked[:, :k].any(axis=1).mean()) for k in ks}


def _ngrams(words: Sequence[str], n: int) -> dict[tuple[str, ...], int]:
    out: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        g = tuple(words[i : i + n])
        out[g] = out.get(g, 0) + 1
    return out


def corpus_bleu(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4
) -> float:
    """Corpus BLEU (Papineni et al. 2002): clipped n-gram precisions (n = 1..max_n) against
    every reference of a hypothesis, geometric mean, brevity penalty against the closest
    reference length. Whitespace tokens, lower case; no smoothing."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    matched = [0] * max_n
    total = [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references, strict=True):
        h = hyp.lower().split()
        rs = [r.lower().split() for r in refs]
        hyp_len += len(h)
        ref_len += min((len(r) for r in rs), key=lambda n: (abs(n - len(h)), n), default=0)
        for n in range(1, max_n + 1):
            counts = _ngrams(h, n)
            best: dict[tuple[str, ...], int] = {}
            for r in rs:
                for g, c in _ngrams(r, n).items():
                    best[g] = max(best.get(g, 0), c)
            matched[n - 1] += sum(min(c, best.get(g, 0)) for g, c in counts.items())
            total[n - 1] += max(len(h) - n + 1, 0)
    if min(matched) == 0:
        return 0.0
    log_p = sum(np.log(m / t) for m, t in zip(matched, total, strict=True)) / max_n
    bp = 1.0 if hyp_len > ref_len else float(np.exp(1 - ref_len / max(hyp_len, 1)))
    return float(bp * np.exp(log_p))
