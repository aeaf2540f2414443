"""Score fusion: the one place that combines the similarity paths into a ranking score.

CLE-TIR fuses ``score = (1 - l) * <text, image> + l * <generated, visual>``; with more paths
(captions) the weights generalise to a convex combination. Paths a candidate was not scored on
count as 0 similarity only if the path has weight; weights are renormalised to sum to 1 over
the paths that are in play.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# path name -> the named vector of the gallery it compares against
PATH_VECTORS = {
    "text": "image",  # a text query's joint vector against the images' joint vectors
    "image": "image",  # an image query's joint vector against the same
    "generated": "visual",  # aggregated generated images against the vision-only vectors
    "caption": "caption",  # the query against the text vectors of generated captions
    "visual": "visual",  # an image query's vision-only vector against the gallery's
}
DEFAULT_WEIGHTS = {"text": 1.0}


class FusionError(ValueError):
    """Bad weights: unknown paths, negative values or nothing to fuse."""


def resolve_weights(
    available: set[str],
    defaults: Mapping[str, float],
    overrides: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The normalised weights of the paths in play.

    ``available`` is the set of paths this query can compute; overrides may switch a path off
    (weight 0) or re-weight it, but cannot name a path that does not exist or is unavailable.
    """
    weights = {p: float(w) for p, w in defaults.items() if p in available}
    for path, w in (overrides or {}).items():
        if path not in PATH_VECTORS:
            raise FusionError(f"unknown path {path!r}; known: {', '.join(PATH_VECTORS)}")
        if path not in available:
            raise FusionError(f"path {path!r} is not available for this query and model")
        if not np.isfinite(w) or w < 0:
            raise FusionError(f"weight of path {path!r} must be a finite number >= 0, got {w}")
        weights[path] = float(w)
    weights = {p: w for p, w in weights.items() if w > 0}
    total = sum(weights.values())
    if total <= 0:
        raise FusionError("every path has weight 0: nothing to rank by")
    return {p: w / total for p, w in weights.items()}


def fuse(path_scores: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """Weighted sum of per-path similarity arrays (all of one shape)."""
    out: np.ndarray | None = None
    for path, w in weights.items():
        term = w * np.asarray(path_scores[path], dtype=np.float32)
        out = term if out is None else out + term
    if out is None:
        raise FusionError("no path to fuse")
    return out
