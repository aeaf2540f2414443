"""The query service's fused ranking over a real embedded index: each path's candidates as its
vector arrives, the last one's and the ranking in one hop, and a failing path's own error.

The encoders and the generator are stand-ins that return fixed vectors (the models are tested
elsewhere; tests/integration/test_generative.py runs all of it over gRPC). The text encoder and
the index's candidate fetch fail on purpose in two tests: faults the real services do not
produce on demand."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Coroutine, Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imagine.index import IndexUnavailable, Point, QdrantIndex, point_id
from protos.gen.imagine.v1 import retrieval_service_pb2 as ret_pb
from services.query import GenerativeInfo, QueryEngine, SamplingDefaults

pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")

RNG = np.random.default_rng(7)
N = 300
IMAGE = RNG.standard_normal((N, 8)).astype(np.float32)
VISUAL = RNG.standard_normal((N, 6)).astype(np.float32)
TEXT_QUERY = RNG.standard_normal(8).astype(np.float32)
GENERATED_QUERY = RNG.standard_normal(6).astype(np.float32)


class TextEncoder:
    def __init__(self) -> None:
        self.error = ""  # the message of the error to raise (a new one each call)

    async def text(self, texts: list[str]) -> list[np.ndarray]:
        await asyncio.sleep(0.01)  # the generated path's pool is fetched meanwhile
        if self.error:
            raise RuntimeError(self.error)
        return [TEXT_QUERY for _ in texts]

    async def images(self, images: list[bytes]) -> list[np.ndarray | str]:
        raise AssertionError("no image query here")

    async def visual(self, images: list[object]) -> list[np.ndarray | str]:
        return [GENERATED_QUERY for _ in images]


class Generative:
    info = GenerativeInfo("gen-v1", "agg-v1", fusion_weight=0.3, aggregator_mode="mean")

    def __init__(self) -> None:
        self.calls = 0

    async def generate(
        self, prompt: str, k: int, steps: int, guidance: float, seed: int
    ) -> list[Image.Image]:
        self.calls += 1
        return [Image.new("L", (4, 4)) for _ in range(k)]

    async def aggregate(self, embeddings: np.ndarray, mode: str) -> np.ndarray:
        mean = embeddings.mean(axis=0)
        return mean / np.linalg.norm(mean)


@pytest.fixture
def index() -> Iterator[QdrantIndex]:
    ix = QdrantIndex.embedded(":memory:")
    ix.ensure_collection("g", {"image": 8, "visual": 6}, "m1")
    ix.upsert(
        "g",
        [
            Point(point_id(f"p{i}"), {"image": IMAGE[i], "visual": VISUAL[i]}, {"n": i})
            for i in range(N)
        ],
    )
    yield ix
    ix.close()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _request(**kw: object) -> ret_pb.SearchRequest:
    return ret_pb.SearchRequest(
        collection="g", text="a shoe", top_k=10, mode=ret_pb.SEARCH_MODE_FUSED, seed=3, **kw
    )


def test_fused_hits_are_the_exhaustive_fused_top_and_a_cached_query_ranks_the_same(
    index: QdrantIndex,
) -> None:
    encoders, generative = TextEncoder(), Generative()
    engine = QueryEngine(encoders, index, "m1", generative, SamplingDefaults(), cache_size=8)

    first = asyncio.run(engine.search(_request()))
    again = asyncio.run(engine.search(_request()))

    generated = _unit(GENERATED_QUERY)  # the mean of K equal embeddings
    fused = 0.7 * _unit(IMAGE) @ _unit(TEXT_QUERY) + 0.3 * _unit(VISUAL) @ generated
    want = [point_id(f"p{i}") for i in np.argsort(-fused)[:10]]
    assert [h.id for h in first.hits] == want
    assert [h.score for h in first.hits] == pytest.approx(sorted(fused)[::-1][:10], abs=1e-5)
    for h in first.hits:  # every path's score, and the fused one their weighted sum
        i = h.payload["n"]
        assert h.path_scores["text"] == pytest.approx(_unit(IMAGE[i]) @ _unit(TEXT_QUERY), abs=1e-5)
        assert h.path_scores["generated"] == pytest.approx(_unit(VISUAL[i]) @ generated, abs=1e-5)
    assert not first.cache_hit and again.cache_hit and generative.calls == 1
    assert [h.id for h in again.hits] == want
    assert [h.score for h in again.hits] == pytest.approx([h.score for h in first.hits])


def _failing_generated_pool(index: QdrantIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    """The generated path's candidate fetch fails (an index node lost mid-query)."""
    candidates = index.candidates

    def fetch(name: str, path: str, *args: object, **kw: object) -> object:
        if path == "generated":
            raise IndexUnavailable("qdrant shard lost")
        return candidates(name, path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(index, "candidates", fetch)


def test_a_failing_pool_fetch_is_the_query_error(
    index: QdrantIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = QueryEngine(TextEncoder(), index, "m1", Generative(), SamplingDefaults(), 8)
    asyncio.run(engine.search(_request()))  # caches the generated vector: fetched first
    _failing_generated_pool(index, monkeypatch)
    with pytest.raises(IndexUnavailable, match="shard lost"):
        asyncio.run(engine.search(_request()))


def test_when_two_paths_fail_the_first_error_is_raised_and_none_is_left_unread(
    index: QdrantIndex, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    encoders = TextEncoder()
    engine = QueryEngine(encoders, index, "m1", Generative(), SamplingDefaults(), 8)
    asyncio.run(engine.search(_request()))
    _failing_generated_pool(index, monkeypatch)  # fails at once (cached vector) ...
    encoders.error = "text encoder replica died"  # ... and this 10 ms later
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        assert _error_of(engine.search(_request())) == "text encoder replica died"
        gc.collect()  # an unread task's error is logged when the task is collected
    assert "exception was never retrieved" not in caplog.text


def _error_of(search: Coroutine[Any, Any, Any]) -> str:
    """The query's error message; nothing of the failed query (its traceback's frames hold
    its tasks) outlives this call."""
    try:
        asyncio.run(search)
    except RuntimeError as exc:
        return str(exc)
    raise AssertionError("the query did not fail")
