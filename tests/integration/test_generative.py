"""Generate-embed-fuse over real gRPC with tiny models: Generator, VisionEncoder and Aggregator
deployments next to the encoders, fused search, the generated-query cache, explain."""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from PIL import Image

from imagine.client import state_name
from imagine.models.generator import resolve_precision
from tests.conftest import Stack, make_gallery, start_stack

pytestmark = pytest.mark.integration
N = 40
TINY = {
    "IMAGINE_VISION_MODEL": "config:tiny-vision",
    "IMAGINE_GENERATOR_MODEL": "config:tiny-generator",
    "IMAGINE_AGGREGATOR_MODEL": "config:tiny-aggregator",
    "IMAGINE_DEFAULT_STEPS": "4",
}


@pytest.fixture(scope="module")
def gen_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("gen-stack"), TINY)
    yield stack
    assert stack.stop() == 0, stack.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def collection(gen_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> str:
    gallery = make_gallery(tmp_path_factory.mktemp("g"), N)
    with gen_stack.client() as c:
        job = c.wait_job(c.create_ingest_job(str(gallery), "gen").id, timeout_s=300)
        assert state_name(job.state) == "SUCCEEDED", job
        col = c.describe_collection("gen")
        assert {v.name: v.size for v in col.vectors} == {"image": 32, "visual": 16}
        assert "+" in col.model_version  # dual encoder + vision encoder
    return "gen"


def test_fused_search_reports_every_path_and_fuses_them(gen_stack: Stack, collection: str) -> None:
    with gen_stack.client() as c:
        resp = c.search(
            "a photo of a bag", collection=collection, top_k=N, mode="fused", explain=True
        )
    assert set(resp.weights) == {"text", "generated"}
    assert abs(sum(resp.weights.values()) - 1) < 1e-6
    assert len(resp.generated_images) == 4
    assert Image.open(io.BytesIO(resp.generated_images[0])).size == (28, 28)
    assert {"encode_text", "generate", "encode_generated", "aggregate", "search"} <= set(
        resp.timings_ms
    )
    for h in resp.hits:
        fused = sum(resp.weights[p] * h.path_scores[p] for p in resp.weights)
        assert abs(h.score - fused) < 1e-4
    scores = [h.score for h in resp.hits]
    assert scores == sorted(scores, reverse=True)


def test_generated_query_is_cached_and_seeded(gen_stack: Stack, collection: str) -> None:
    with gen_stack.client() as c:
        first = c.search(
            "a warm coat", collection=collection, mode="generated", seed=7, explain=True
        )
        again = c.search(
            "  A warm   COAT ", collection=collection, mode="generated", seed=7, explain=True
        )
        other = c.search(
            "a warm coat", collection=collection, mode="generated", seed=8, explain=True
        )
    assert not first.cache_hit and again.cache_hit and not other.cache_hit
    assert [h.id for h in first.hits] == [h.id for h in again.hits]
    assert first.generated_images == again.generated_images
    assert first.generated_images != other.generated_images


def test_mean_and_attention_aggregation_and_weight_overrides(
    gen_stack: Stack, collection: str
) -> None:
    with gen_stack.client() as c:
        text_only = c.search("a shoe", collection=collection, top_k=5, mode="text")
        forced = c.search(
            "a shoe", collection=collection, top_k=5, mode="fused", weights={"generated": 0.0}
        )
        mean = c.search(
            "a shoe", collection=collection, top_k=5, mode="generated", aggregation="mean"
        )
        own = c.search("a shoe", collection=collection, top_k=5, mode="generated")
        named = c.search(
            "a shoe", collection=collection, top_k=5, mode="generated", aggregation="attention"
        )
    assert [h.id for h in forced.hits] == [h.id for h in text_only.hits]
    assert dict(forced.weights) == {"text": 1.0}
    assert set(mean.hits[0].path_scores) == {"generated"}
    # the stack serves an attention aggregator: asked for by name it is the default one
    # (a mean-pooling aggregator refuses it: tests/e2e/test_demo.py)
    assert named.cache_hit and not own.cache_hit
    assert [(h.id, h.score) for h in named.hits] == [(h.id, h.score) for h in own.hits]


def test_generate_rpc_returns_deterministic_pngs(gen_stack: Stack) -> None:
    with gen_stack.client() as c:
        a, version = c.generate("a sneaker", num_images=3, steps=3, seed=1)
        b, _ = c.generate("a sneaker", num_images=3, steps=3, seed=1)
    assert len(a) == 3 and a == b
    # served in the precision IMAGINE_GENERATOR_PRECISION=auto picks for this machine, named
    # in the version (another precision gives other images)
    bf16 = resolve_precision("auto", "cpu") == "bfloat16"
    assert version.startswith("tiny-generator-random0")
    assert version.endswith("+bfloat16") == bf16


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"num_generated": 17}, "num_generated"),
        ({"steps": 101}, "steps"),
        ({"guidance": 50.0}, "guidance"),
        ({"weights": {"nope": 1.0}}, "unknown path"),
    ],
)
def test_bad_generative_parameters_are_invalid_argument(
    gen_stack: Stack, collection: str, kwargs: dict, words: str
) -> None:
    with gen_stack.client() as c, pytest.raises(grpc.RpcError) as err:
        c.search("a bag", collection=collection, mode="fused", **kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()


def test_concurrent_fused_queries_share_generator_batches(
    gen_stack: Stack, collection: str
) -> None:
    """16 distinct concurrent queries all succeed; the generator served them in shared loops."""
    texts = [f"a product number {i}" for i in range(16)]
    with gen_stack.client() as c, ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda t: c.search(t, collection=collection, mode="fused"), texts))
    assert all(len(r.hits) == 10 and not r.cache_hit for r in results)
