"""Queries batched together by the Generator deployment each keep their own seed, and the
shared denoising loop lets queries join and leave it between UNet passes."""

from __future__ import annotations

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
def _drain(loop: DenoisingLoop) -> None:
    while loop.run_pass():
        pass


def _close(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    """Equal up to float rounding of batched kernels: at most one grey level."""
    return all(np.abs(x.astype(int) - y.astype(int)).max() <= 1 for x, y in zip(a, b, strict=True))


def test_a_query_joins_the_running_loop_and_gets_its_images_alone(generator: Generator) -> None:
    loop = DenoisingLoop(generator, max_jobs=4)
    bag = loop.submit("a bag", 2, 20, 2.0, 5)
    for _ in range(3):
        assert loop.run_pass()
    # other K, steps and guidance than the running query: it still shares its passes
    shoe = loop.submit("a shoe", 3, 4, 1.0, 9)
    _drain(loop)

    assert loop.passes == 20  # the shoe's 4 steps rode on the bag's passes 4-7
    assert loop.job_steps == 20 + 4
    assert not loop.busy
    # (this random UNet amplifies rounding over many more steps; the trained one gave identical
    # pixels over 20)
    assert _close(_pixels(bag.result(0)), _pixels(generator.generate(["a bag"], 2, 20, 2.0, 5)[0]))
    assert _close(_pixels(shoe.result(0)), _pixels(generator.generate(["a shoe"], 3, 4, 1.0, 9)[0]))
    assert len(shoe.result(0)) == 3


def test_at_most_max_jobs_at_once_the_rest_wait_in_order(generator: Generator) -> None:
    loop = DenoisingLoop(generator, max_jobs=2)
    futures = [loop.submit(f"a coat {i}", 1, 3, 2.0, i) for i in range(3)]
    for _ in range(3):
        loop.run_pass()

    assert [f.done() for f in futures] == [True, True, False]  # the third waited its turn
    _drain(loop)
    assert loop.passes == 6 and loop.job_steps == 9
    assert all(len(f.result(0)) == 1 for f in futures)


def test_a_cancelled_query_leaves_the_loop(generator: Generator) -> None:
    loop = DenoisingLoop(generator, max_jobs=4)
    abandoned = loop.submit("a dress", 2, 1000, 2.0, 1)
    loop.run_pass()
    sandal = loop.submit("a sandal", 1, 2, 2.0, 1)
    never_started = loop.submit("a boot", 1, 2, 2.0, 1)
    assert abandoned.cancel() and never_started.cancel()
    _drain(loop)

    assert loop.passes == 3  # the dress left after 1 of its 1000 steps; the boot never ran
    assert len(sandal.result(0)) == 1


def test_a_failing_pass_fails_its_queries_not_the_loop(
    generator: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = DenoisingLoop(generator, max_jobs=4)
    real = generator.advance

    def fault(jobs: list) -> None:  # an injected fault: the UNet pass raises
        raise RuntimeError("out of memory")

    first = loop.submit("a bag", 1, 3, 2.0, 1)
    monkeypatch.setattr(generator, "advance", fault)
    loop.run_pass()
    monkeypatch.setattr(generator, "advance", real)
    second = loop.submit("a bag", 1, 3, 2.0, 1)
    _drain(loop)

    with pytest.raises(RuntimeError, match="out of memory"):
        first.result(0)
    assert len(second.result(0)) == 1


def test_bad_calls_are_clear_errors_and_fail_ends_every_query(generator: Generator) -> None:
    loop = DenoisingLoop(generator, max_jobs=1)
    with pytest.raises(ValueError, match="at least 1"):
        loop.submit("a bag", 0, 3, 2.0, 1)
    with pytest.raises(ValueError, match="max_jobs"):
        DenoisingLoop(generator, max_jobs=0)
    running, waiting = loop.submit("a bag", 1, 3, 2.0, 1), loop.submit("a bag", 1, 3, 2.0, 2)
    loop.run_pass()
    loop.fail(RuntimeError("shutting down"))

    assert not loop.busy
    for future in (running, waiting):
        with pytest.raises(RuntimeError, match="shutting down"):
            future.result(0)
