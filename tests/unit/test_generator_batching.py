"""Queries batched together by the Generator deployment each keep their own seed, and the
shared denoising loop lets queries join and leave it between UNet passes."""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from imagine.models.generator import (
    DenoisingLoop,
    GenerateCall,
    Generator,
    RowWorkers,
    load_generator,
)


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
    """Equal up to float rounding of batched kernels, which 20 steps of this random UNet
    amplify: on an AVX2-only CPU, 3 grey levels in one pixel and 0.07 on average (at most 1 on
    an AVX-512 one). Another seed or prompt differs by more than 5 on average."""
    diffs = [np.abs(x.astype(int) - y.astype(int)) for x, y in zip(a, b, strict=True)]
    return all(d.max() <= 4 and d.mean() < 0.25 for d in diffs)


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

    def fault(jobs: list, workers: object = None) -> None:  # an injected fault: the pass raises
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


# -- the Generator deployment's driver: passes on a thread of their own -------------------------
def _drive_while_held(
    loop: DenoisingLoop,
    held: threading.Event,
    release: threading.Event,
    first: GenerateCall,
    later: list[GenerateCall],
) -> list[Any]:
    """Submit ``first`` and let the deployment's driver run the passes on a thread of their
    own; once a pass is ``held`` there (until ``release``), submit ``later`` from the event
    loop. Every query's images."""
    from services.deployments import Generator as GeneratorDeployment

    async def scenario() -> list[Any]:
        with ThreadPoolExecutor(1) as thread:
            futures = [asyncio.wrap_future(loop.submit(*first))]
            driver = asyncio.create_task(GeneratorDeployment.func_or_class._drive(loop, thread))
            assert await asyncio.to_thread(held.wait, 30), "no pass was held"
            futures += [asyncio.wrap_future(loop.submit(*call)) for call in later]
            release.set()
            images = await asyncio.wait_for(asyncio.gather(*futures), 60)
            await driver
            return images

    return asyncio.run(scenario())


def test_queries_sent_during_a_pass_join_the_next_one(
    generator: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica's event loop takes queries in while a pass runs on the pass thread, and
    they share the very next pass (on the event loop itself, a burst of 16 spread over 7)."""
    loop = DenoisingLoop(generator, max_jobs=4)
    in_pass, release = threading.Event(), threading.Event()
    advance = generator.advance

    def first_pass_held(jobs: Any, workers: Any = None) -> None:
        if not in_pass.is_set():
            in_pass.set()
            assert release.wait(30), "the event loop never got to run during the pass"
        advance(jobs, workers)

    monkeypatch.setattr(generator, "advance", first_pass_held)
    later: list[GenerateCall] = [("a shoe", 1, 3, 2.0, 2), ("a shoe", 1, 3, 2.0, 3)]
    images = _drive_while_held(loop, in_pass, release, ("a bag", 1, 3, 2.0, 1), later)

    assert [len(i) for i in images] == [1, 1, 1]
    assert loop.passes == 4 and loop.job_steps == 3 + 2 * 3
    assert not loop.busy


def test_a_query_sent_during_the_last_pass_is_not_left_behind(
    generator: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver decides whether to stop on the event loop, where queries are submitted: one
    that arrives after the last pass took its queries in still gets its images."""
    loop = DenoisingLoop(generator, max_jobs=4)
    ended, release = threading.Event(), threading.Event()
    run_pass = loop.run_pass

    def last_pass_held() -> bool:
        more = run_pass()
        if not more and not ended.is_set():
            ended.set()
            assert release.wait(30)
        return more

    monkeypatch.setattr(loop, "run_pass", last_pass_held)
    images = _drive_while_held(
        loop, ended, release, ("a bag", 1, 2, 2.0, 1), [("a shoe", 1, 2, 2.0, 2)]
    )

    assert [len(i) for i in images] == [1, 1]
    assert loop.passes == 4


# -- a large pass split into row chunks on threads of one intra-op thread each -----------------
@pytest.fixture
def workers() -> Iterator[RowWorkers]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield RowWorkers(2, min_rows=8)
    torch.set_num_threads(before)


def _team_size() -> int:
    """The calling thread's OpenMP team size, asked of the OpenMP runtime torch ships with."""
    runtime = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libgomp.so.1"))
    return int(runtime.omp_get_max_threads())


def test_a_large_pass_runs_as_row_chunks_on_single_threaded_workers(
    generator: Generator, workers: RowWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert torch.get_num_threads() == 2 and _team_size() == 2  # the caller keeps its team
    pipeline = generator.pipeline
    ran: list[tuple[str, int, int]] = []
    real = pipeline.unet_eps

    def spy(*inputs: torch.Tensor) -> torch.Tensor:
        ran.append((threading.current_thread().name, _team_size(), len(inputs[0])))
        return real(*inputs)

    monkeypatch.setattr(pipeline, "unet_eps", spy)
    states, mask = generator.text.encode(["a bag", "a shoe", "a coat"])
    empty = generator.text.encode([""])
    rows = [  # 6 samples, each at its own timestep and guidance
        generator.initial_noise(3, 2, seed=1),
        torch.tensor([900, 900, 500, 500, 100, 100]),
        states.repeat_interleave(2, dim=0),
        mask.repeat_interleave(2, dim=0),
        torch.tensor([2.0, 2.0, 1.0, 1.0, 3.0, 3.0]),
    ]
    alone = pipeline.guided_eps(*rows, *empty)  # 6 + 4 unconditional rows on this thread
    split = pipeline.guided_eps(*rows, *empty, workers=workers)

    me = threading.current_thread().name
    assert ran[0] == (me, 2, 10)
    assert sorted(ran[1:]) == [("unet-rows_0", 1, 5), ("unet-rows_1", 1, 5)]
    torch.testing.assert_close(split, alone, rtol=1e-4, atol=1e-4)
    ran.clear()
    pipeline.guided_eps(*(r[:2] for r in rows), *empty, workers=workers)  # 2 + 2 rows
    assert ran == [(me, 1, 4)]  # fewer than min_rows: not split, and no team either
    assert torch.get_num_threads() == 2 and _team_size() == 2  # the caller's count is back


def test_the_loop_with_split_passes_gives_each_query_its_images(
    generator: Generator, workers: RowWorkers
) -> None:
    loop = DenoisingLoop(generator, max_jobs=4, workers=workers)
    bag, shoe = loop.submit("a bag", 2, 20, 2.0, 5), loop.submit("a shoe", 3, 4, 1.0, 9)
    _drain(loop)

    assert _close(_pixels(bag.result(0)), _pixels(generator.generate(["a bag"], 2, 20, 2.0, 5)[0]))
    assert _close(_pixels(shoe.result(0)), _pixels(generator.generate(["a shoe"], 3, 4, 1.0, 9)[0]))


def test_fewer_rows_than_threads_make_one_chunk_per_row() -> None:
    chunks: list[int] = []

    def double(x: torch.Tensor) -> torch.Tensor:
        chunks.append(len(x))
        return 2 * x

    out = RowWorkers(4, min_rows=2).run(double, torch.arange(3.0))
    assert sorted(chunks) == [1, 1, 1]  # no empty chunk for the fourth thread
    assert out.tolist() == [0.0, 2.0, 4.0]


def _os_threads() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def test_a_split_pass_leaves_no_thread_behind(
    generator: Generator, workers: RowWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A thread that ran OpenMP code counts for libgomp until it exits; with more such threads
    # than cores, the caller's team sleeps at its barriers instead of spinning (~1.8x slower).
    # The check is on the OS threads that ran chunks: other code in the process (a gRPC or
    # Ray thread of an earlier test) may start threads of its own meanwhile.
    pipeline = generator.pipeline
    real = pipeline.unet_eps
    ran_on: set[int] = set()

    def spy(*inputs: torch.Tensor) -> torch.Tensor:
        ran_on.add(threading.get_native_id())
        return real(*inputs)

    monkeypatch.setattr(pipeline, "unet_eps", spy)
    loop = DenoisingLoop(generator, max_jobs=4, workers=workers)
    loop.submit("a bag", 2, 2, 2.0, 5)
    _drain(loop)  # warm: the caller's own OpenMP team exists now
    me = threading.get_native_id()
    assert ran_on == {me}  # 4 rows a pass: not split
    bag, shoe = loop.submit("a bag", 2, 3, 2.0, 6), loop.submit("a shoe", 2, 3, 2.0, 7)
    _drain(loop)  # 8 rows a pass: split
    assert bag.result(0) and shoe.result(0)
    chunk_threads = ran_on - {me}
    assert len(chunk_threads) >= 2  # the split pass ran on threads of its own...
    assert not chunk_threads & _os_threads()  # ...which have all exited
    assert not [t for t in threading.enumerate() if t.name.startswith("unet-rows")]
    seen: list[int] = []  # a new thread still takes the caller's thread count
    probe = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    probe.start()
    probe.join()
    assert seen == [2] and torch.get_num_threads() == 2 and _team_size() == 2


def test_a_failing_chunk_fails_the_pass_after_every_thread_ended() -> None:
    def fail_on_the_second_half(x: torch.Tensor) -> torch.Tensor:
        if x[0] >= 2:
            raise RuntimeError("chunk failed")
        return x

    with pytest.raises(RuntimeError, match="chunk failed"):
        RowWorkers(2, min_rows=2).run(fail_on_the_second_half, torch.arange(4.0))
    assert not [t for t in threading.enumerate() if t.name.startswith("unet-rows")]


def test_a_failing_small_pass_gives_the_caller_its_threads_back(workers: RowWorkers) -> None:
    def fail(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"pass failed on {torch.get_num_threads()} thread(s)")

    with pytest.raises(RuntimeError, match=r"on 1 thread\(s\)"):
        workers.run(fail, torch.arange(4.0))  # fewer than min_rows: one intra-op thread
    assert torch.get_num_threads() == 2 and _team_size() == 2


def test_row_workers_need_a_thread_and_a_positive_threshold() -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        RowWorkers(0)
    with pytest.raises(ValueError, match="min_rows"):
        RowWorkers(2, min_rows=0)
    with pytest.raises(ValueError, match="small_threads"):
        RowWorkers(2, small_threads=0)


def test_a_small_pass_can_run_on_a_team_when_asked(workers: RowWorkers) -> None:
    teams: list[int] = []

    def spy(x: torch.Tensor) -> torch.Tensor:
        teams.append(_team_size())
        return x

    RowWorkers(2, min_rows=8, small_threads=2).run(spy, torch.arange(4.0))
    workers.run(spy, torch.arange(4.0))  # the default: one thread
    assert teams == [2, 1]
