"""The training stages' learning-rate schedule: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import itertools

import pytest

from trainer.schedule import warmup_cosine


def test_warm_up_is_linear_then_the_rate_decays_to_its_floor_and_stays() -> None:
    lrs = [warmup_cosine(1e-3, step, warmup=10, total=110, floor=0.05) for step in range(130)]
    assert lrs[:10] == pytest.approx([1e-4 * (i + 1) for i in range(10)])
    assert lrs[10] == pytest.approx(1e-3)  # the peak, right after warm-up
    assert lrs[60] == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5))  # half-way down the cosine
    decay = lrs[10:111]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert lrs[110:] == pytest.approx([5e-5] * 20)  # the floor, held after the last step


def test_without_warm_up_or_floor_the_rate_ends_at_zero() -> None:
    assert warmup_cosine(0.1, 0, warmup=0, total=50) == pytest.approx(0.1)
    assert warmup_cosine(0.1, 50, warmup=0, total=50) == pytest.approx(0.0, abs=1e-12)
