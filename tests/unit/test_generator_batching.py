"""Queries batched together by the Generator deployment each keep their own seed."""

from __future__ import annotations

import numpy as np
import pytest

from imagine.models.generator import Generator, load_generator


@pytest.fixture(scope="module")
def generator() -> Generator:
    return load_generator("config:tiny-generator", device="cpu")


def _pixels(images: list) -> list[np.ndarray]:
    return [np.asarray(img) for img in images]


def test_per_prompt_seeds_give_each_query_its_own_images(generator: Generator) -> None:
    alone = generator.generate(["a bag"], num_images=2, steps=3, seed=5)[0]
    batched = generator.generate(["a shoe", "a bag"], num_images=2, steps=3, seed=[9, 5])
    # Batched BLAS kernels round differently: at most one grey level apart.
    for x, y in zip(_pixels(alone), _pixels(batched[1]), strict=True):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
    other = generator.generate(["a bag"], num_images=2, steps=3, seed=6)[0]
    pairs = zip(_pixels(alone), _pixels(other), strict=True)
    assert any(not np.array_equal(x, y) for x, y in pairs)


def test_seed_count_must_match_prompts(generator: Generator) -> None:
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        generator.generate(["a", "b", "c"], num_images=1, steps=2, seed=[1, 2])
