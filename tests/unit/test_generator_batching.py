"""Queries batched together by the Generator deployment each keep their own seed, and the
shared denoising loop lets queries join and leave it between UNet passes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from imagine.models.generator import DenoisingLoop, Generator, load_generator


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


# -- the shared denoising loop (continuous batching) -------------------------------------------
def _wait_for(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


@pytest.fixture
def loop(generator: Generator) -> Iterator[DenoisingLoop]:
    loop = DenoisingLoop(generator, max_jobs=4)
    yield loop
    loop.close()


def _on_pass(
    generator: Generator, monkeypatch: pytest.MonkeyPatch, n: int, action: Callable[[], None]
) -> None:
    """Run ``action`` in the loop's thread just before its ``n``-th UNet pass (then the pass)."""
    real, calls = generator.advance, {"n": 0}

    def advance(jobs: list) -> None:
        calls["n"] += 1
        if calls["n"] == n:
            action()
        real(jobs)

    monkeypatch.setattr(generator, "advance", advance)


def test_a_query_joins_the_running_loop_and_gets_its_images_alone(
    generator: Generator, loop: DenoisingLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    # other K, steps and guidance than the running query: it still shares its passes
    joined: list = []
    _on_pass(generator, monkeypatch, 3, lambda: joined.append(loop.submit("a shoe", 3, 4, 1.0, 9)))
    bag = loop.submit("a bag", 2, 20, 2.0, 5).result(timeout=60)
    shoe = joined[0].result(timeout=60)
    monkeypatch.undo()

    assert loop.passes == 20  # the shoe's 4 steps rode on the bag's passes 4-7
    assert loop.job_steps == 20 + 4
    for got, (prompt, k, steps, guidance, seed) in (
        (bag, ("a bag", 2, 20, 2.0, 5)),
        (shoe, ("a shoe", 3, 4, 1.0, 9)),
    ):
        alone = generator.generate([prompt], k, steps, guidance, seed)[0]
        assert len(got) == k
        # float rounding of the shared passes only (this random UNet amplifies rounding over
        # many more steps; the trained one gave identical pixels over 20)
        for x, y in zip(_pixels(got), _pixels(alone), strict=True):
            assert np.abs(x.astype(int) - y.astype(int)).max() <= 1


def test_at_most_max_jobs_at_once_the_rest_wait_in_order(generator: Generator) -> None:
    loop = DenoisingLoop(generator, max_jobs=1)
    try:
        futures = [loop.submit(f"a coat {i}", 1, 3, 2.0, i) for i in range(3)]
        results = [f.result(timeout=60) for f in futures]
    finally:
        loop.close()
    assert loop.passes == loop.job_steps == 9  # one query per pass
    assert all(len(r) == 1 for r in results)


def test_a_cancelled_query_leaves_the_loop(
    generator: Generator, loop: DenoisingLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    futures: list = []
    _on_pass(generator, monkeypatch, 2, lambda: futures[0].cancel())
    futures.append(loop.submit("a dress", 2, 1000, 2.0, 1))
    _wait_for(lambda: futures[0].cancelled())
    loop.submit("a sandal", 1, 2, 2.0, 1).result(timeout=60)
    passes = loop.passes
    time.sleep(0.3)

    assert passes < 10  # the dress left after 2 of its 1000 steps
    assert loop.passes == passes  # nothing left to denoise


def test_a_failing_pass_fails_its_queries_not_the_loop(
    generator: Generator, loop: DenoisingLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fault() -> None:  # an injected fault: the first UNet pass raises
        raise RuntimeError("out of memory")

    _on_pass(generator, monkeypatch, 1, fault)
    with pytest.raises(RuntimeError, match="out of memory"):
        loop.submit("a bag", 1, 3, 2.0, 1).result(timeout=60)
    assert len(loop.submit("a bag", 1, 3, 2.0, 1).result(timeout=60)) == 1


def test_bad_calls_and_a_closed_loop_are_clear_errors(generator: Generator) -> None:
    loop = DenoisingLoop(generator, max_jobs=2)
    with pytest.raises(ValueError, match="at least 1"):
        loop.submit("a bag", 0, 3, 2.0, 1)
    loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        loop.submit("a bag", 1, 3, 2.0, 1)
    with pytest.raises(ValueError, match="max_jobs"):
        DenoisingLoop(generator, max_jobs=0)
