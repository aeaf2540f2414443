"""Weight resolution and fusion of per-path similarity scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imagine.fusion import DEFAULT_WEIGHTS, PATH_VECTORS, FusionError, fuse, resolve_weights

BOTH = {"text", "generated"}


def test_defaults_are_normalised_to_sum_to_one() -> None:
    weights = resolve_weights(BOTH, {"text": 3.0, "generated": 1.0})
    assert weights == {"text": pytest.approx(0.75), "generated": pytest.approx(0.25)}
    assert sum(weights.values()) == pytest.approx(1.0)


def test_default_weights_rank_by_text_only() -> None:
    assert resolve_weights({"text"}, DEFAULT_WEIGHTS) == {"text": pytest.approx(1.0)}


def test_defaults_of_unavailable_paths_are_dropped() -> None:
    # No generator loaded: only the text path is in play, and it gets all the weight.
    assert resolve_weights({"text"}, {"text": 0.6, "generated": 0.4}) == {
        "text": pytest.approx(1.0)
    }


def test_override_reweights_a_path() -> None:
    weights = resolve_weights(BOTH, {"text": 1.0, "generated": 1.0}, {"generated": 3.0})
    assert weights == {"text": pytest.approx(0.25), "generated": pytest.approx(0.75)}


def test_override_adds_an_available_path_without_default() -> None:
    weights = resolve_weights(BOTH, {"text": 1.0}, {"generated": 1.0})
    assert weights == {"text": pytest.approx(0.5), "generated": pytest.approx(0.5)}


def test_override_zero_switches_a_path_off() -> None:
    weights = resolve_weights(BOTH, {"text": 0.5, "generated": 0.5}, {"text": 0.0})
    assert weights == {"generated": pytest.approx(1.0)}
    assert "text" not in weights


def test_unknown_path_is_refused_and_known_paths_are_listed() -> None:
    with pytest.raises(FusionError, match=r"unknown path 'sketch'") as exc:
        resolve_weights(BOTH, {"text": 1.0}, {"sketch": 1.0})
    for path in PATH_VECTORS:
        assert path in str(exc.value)


def test_unavailable_path_is_refused() -> None:
    with pytest.raises(FusionError, match=r"path 'generated' is not available"):
        resolve_weights({"text"}, {"text": 1.0}, {"generated": 0.5})


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, -math.inf])
def test_negative_or_non_finite_weight_is_refused(bad: float) -> None:
    with pytest.raises(FusionError, match=r"weight of path 'text' must be a finite number >= 0"):
        resolve_weights(BOTH, {"text": 1.0, "generated": 1.0}, {"text": bad})


def test_all_zero_weights_are_refused() -> None:
    with pytest.raises(FusionError, match="every path has weight 0"):
        resolve_weights(BOTH, {"text": 1.0, "generated": 1.0}, {"text": 0.0, "generated": 0.0})
    with pytest.raises(FusionError, match="every path has weight 0"):
        resolve_weights({"text"}, {"generated": 1.0})


def test_fusion_error_is_a_value_error() -> None:
    # Services map ValueError to INVALID_ARGUMENT; a FusionError must be one.
    assert issubclass(FusionError, ValueError)


def test_fuse_is_the_weighted_sum() -> None:
    text = np.array([0.9, 0.1, 0.5])
    generated = np.array([0.2, 0.8, 0.5])
    fused = fuse({"text": text, "generated": generated}, {"text": 0.7, "generated": 0.3})
    np.testing.assert_allclose(fused, 0.7 * text + 0.3 * generated, rtol=1e-6)
    assert fused.shape == (3,)


def test_fuse_ignores_paths_without_weight() -> None:
    fused = fuse({"text": np.array([0.4, 0.6]), "caption": np.array([9.0, 9.0])}, {"text": 1.0})
    np.testing.assert_allclose(fused, [0.4, 0.6], rtol=1e-6)


def test_fuse_changes_the_ranking_with_the_weights() -> None:
    scores = {"text": np.array([0.9, 0.2]), "generated": np.array([0.1, 0.9])}
    assert int(np.argmax(fuse(scores, {"text": 0.8, "generated": 0.2}))) == 0
    assert int(np.argmax(fuse(scores, {"text": 0.2, "generated": 0.8}))) == 1


def test_fuse_without_weights_raises() -> None:
    with pytest.raises(FusionError, match="no path to fuse"):
        fuse({"text": np.array([1.0])}, {})
