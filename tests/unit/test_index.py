"""QdrantIndex on qdrant-client's local mode: in memory and on a folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from imagine.fusion import PATH_VECTORS
from imagine.index import (
    AliasError,
    CollectionNotFound,
    IndexUnavailable,
    ModelVersionMismatch,
    Point,
    QdrantIndex,
    point_id,
)

pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")


@pytest.fixture(params=["memory", "disk"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QdrantIndex]:
    location = ":memory:" if request.param == "memory" else tmp_path / "qdrant"
    ix = QdrantIndex.embedded(location)
    yield ix
    ix.close()


def _point(uri: str, etag: str = "e", label: str = "a", **vectors: list[float]) -> Point:
    return Point(point_id(uri), dict(vectors), {"etag": etag, "label": label, "uri": uri})


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- point ids ---------------------------------------------------------------------------------
def test_point_id_is_deterministic_per_uri_and_distinct_across_uris() -> None:
    a = point_id("s3://bucket/a.png")
    assert a == point_id("s3://bucket/a.png")
    assert a != point_id("s3://bucket/b.png")
    assert a != point_id("s3://other/a.png")
    assert len({point_id(f"s3://b/{i}.png") for i in range(100)}) == 100


# -- collections -------------------------------------------------------------------------------
def test_ensure_collection_creates_named_vectors_and_records_model_version(
    index: QdrantIndex,
) -> None:
    index.ensure_collection("gallery", {"image": 4, "visual": 3}, "model-v1")

    info = index.describe("gallery")
    assert info.name == "gallery"
    assert info.model_version == "model-v1"
    assert info.vectors == {"image": 4, "visual": 3}
    assert info.points_count == 0


def test_ensure_collection_again_with_same_version_keeps_the_points(index: QdrantIndex) -> None:
    index.ensure_collection("gallery", {"image": 2}, "model-v1")
    index.upsert("gallery", [_point("s3://b/a.png", image=[1.0, 0.0])])

    index.ensure_collection("gallery", {"image": 2}, "model-v1")

    assert index.describe("gallery").points_count == 1


def test_ensure_collection_with_another_model_version_raises(index: QdrantIndex) -> None:
    index.ensure_collection("gallery", {"image": 2}, "model-v1")

    with pytest.raises(ModelVersionMismatch, match="model-v1") as exc:
        index.ensure_collection("gallery", {"image": 2}, "model-v2")
    assert "model-v2" in str(exc.value)
    assert index.describe("gallery").model_version == "model-v1"


def test_ensure_collection_missing_a_vector_name_raises(index: QdrantIndex) -> None:
    index.ensure_collection("gallery", {"image": 2}, "model-v1")

    with pytest.raises(ModelVersionMismatch, match="visual"):
        index.ensure_collection("gallery", {"image": 2, "visual": 2}, "model-v1")


def test_describe_list_and_delete(index: QdrantIndex) -> None:
    index.ensure_collection("zeta", {"image": 2}, "m1")
    index.ensure_collection("alpha", {"image": 2}, "m2")
    index.upsert("alpha", [_point("s3://b/1", image=[1, 0]), _point("s3://b/2", image=[0, 1])])

    listed = index.list_collections()
    assert [c.name for c in listed] == ["alpha", "zeta"]
    assert [c.points_count for c in listed] == [2, 0]
    assert [c.model_version for c in listed] == ["m2", "m1"]

    assert index.delete_collection("alpha") is True
    assert index.delete_collection("alpha") is False
    assert [c.name for c in index.list_collections()] == ["zeta"]
    with pytest.raises(CollectionNotFound, match="alpha"):
        index.describe("alpha")


def test_unknown_collection_raises_collection_not_found(index: QdrantIndex) -> None:
    with pytest.raises(CollectionNotFound, match="'nope' not found"):
        index.describe("nope")
    with pytest.raises(CollectionNotFound):
        index.get_etags("nope", [point_id("s3://b/a")])
    with pytest.raises(CollectionNotFound):
        index.upsert("nope", [_point("s3://b/a", image=[1.0, 0.0])])
    with pytest.raises(CollectionNotFound):
        index.search("nope", {"text": np.array([1.0, 0.0])}, {"text": 1.0}, limit=3)
    assert index.list_collections() == []


# -- points ------------------------------------------------------------------------------------
def test_upsert_of_the_same_id_twice_keeps_one_point(index: QdrantIndex) -> None:
    index.ensure_collection("g", {"image": 2}, "m")
    index.upsert("g", [_point("s3://b/a.png", etag="old", image=[1.0, 0.0])])
    index.upsert("g", [_point("s3://b/a.png", etag="new", image=[0.0, 1.0])])

    assert index.describe("g").points_count == 1
    assert index.get_etags("g", [point_id("s3://b/a.png")]) == {point_id("s3://b/a.png"): "new"}
    [hit] = index.search("g", {"text": np.array([0.0, 1.0])}, {"text": 1.0}, limit=5)
    assert hit.score == pytest.approx(1.0, abs=1e-5)


def test_get_etags_returns_present_ids_only(index: QdrantIndex) -> None:
    index.ensure_collection("g", {"image": 2}, "m")
    index.upsert(
        "g",
        [
            _point("s3://b/a", etag="etag-a", image=[1, 0]),
            _point("s3://b/b", etag="etag-b", image=[0, 1]),
        ],
    )
    ids = [point_id("s3://b/a"), point_id("s3://b/b"), point_id("s3://b/missing")]

    assert index.get_etags("g", ids) == {
        point_id("s3://b/a"): "etag-a",
        point_id("s3://b/b"): "etag-b",
    }
    assert index.get_etags("g", [point_id("s3://b/missing")]) == {}
    assert index.get_etags("g", []) == {}


# -- search ------------------------------------------------------------------------------------
def test_single_path_search_ranks_by_cosine_not_dot_product(index: QdrantIndex) -> None:
    index.ensure_collection("g", {"image": 2}, "m")
    index.upsert(
        "g",
        [
            _point("s3://b/long", image=[10.0, 10.0]),  # dot 10, cosine 0.707
            _point("s3://b/aligned", image=[1.0, 0.1]),  # dot 1, cosine 0.995
            _point("s3://b/opposite", image=[-1.0, 0.0]),  # cosine -1
        ],
    )
    query = np.array([2.0, 0.0])

    hits = index.search("g", {"text": query}, {"text": 1.0}, limit=3)

    assert [h.payload["uri"] for h in hits] == ["s3://b/aligned", "s3://b/long", "s3://b/opposite"]
    assert [h.score for h in hits] == pytest.approx(
        [_cos(query, np.array(v)) for v in ([1.0, 0.1], [10.0, 10.0], [-1.0, 0.0])], abs=1e-5
    )
    assert all(h.path_scores == {"text": h.score} for h in hits)
    assert hits[0].id == point_id("s3://b/aligned")


def test_single_path_search_honours_limit_and_label_filter(index: QdrantIndex) -> None:
    index.ensure_collection("g", {"image": 2}, "m")
    rng = np.random.default_rng(0)
    index.upsert(
        "g",
        [
            _point(f"s3://b/{i}", label="sneaker" if i % 3 == 0 else "bag", image=list(v))
            for i, v in enumerate(rng.normal(size=(12, 2)))
        ],
    )

    hits = index.search(
        "g", {"text": np.array([1.0, 0.0])}, {"text": 1.0}, limit=10, filters={"label": "sneaker"}
    )

    assert len(hits) == 4
    assert {h.payload["label"] for h in hits} == {"sneaker"}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert len(index.search("g", {"text": np.array([1.0, 0.0])}, {"text": 1.0}, limit=5)) == 5


def _fill_two_paths(index: QdrantIndex, n: int = 30) -> dict[str, dict[str, np.ndarray]]:
    assert PATH_VECTORS["text"] == "image" and PATH_VECTORS["generated"] == "visual"
    index.ensure_collection("g", {"image": 8, "visual": 6}, "m")
    rng = np.random.default_rng(42)
    vectors = {}
    points = []
    for i in range(n):
        uri = f"s3://b/{i}.png"
        vecs = {"image": rng.normal(size=8), "visual": rng.normal(size=6)}
        vectors[point_id(uri)] = vecs
        points.append(
            _point(
                uri, label="even" if i % 2 == 0 else "odd", **{k: list(v) for k, v in vecs.items()}
            )
        )
    index.upsert("g", points)
    return vectors


def test_multi_path_search_fuses_exact_cosines_by_weight(index: QdrantIndex) -> None:
    vectors = _fill_two_paths(index)
    rng = np.random.default_rng(7)
    queries = {"text": rng.normal(size=8), "generated": rng.normal(size=6)}
    weights = {"text": 0.7, "generated": 0.3}

    hits = index.search("g", queries, weights, limit=5)

    assert len(hits) == 5
    for hit in hits:
        exact = {
            "text": _cos(queries["text"], vectors[hit.id]["image"]),
            "generated": _cos(queries["generated"], vectors[hit.id]["visual"]),
        }
        assert hit.path_scores == pytest.approx(exact, abs=1e-5)
        assert hit.score == pytest.approx(
            0.7 * hit.path_scores["text"] + 0.3 * hit.path_scores["generated"], abs=1e-5
        )
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    # With every point among the candidates, the top 5 is the brute-force top 5.
    brute = {
        pid: 0.7 * _cos(queries["text"], v["image"]) + 0.3 * _cos(queries["generated"], v["visual"])
        for pid, v in vectors.items()
    }
    expected = sorted(brute, key=brute.__getitem__, reverse=True)[:5]
    assert [h.id for h in hits] == expected


def test_multi_path_search_is_exact_over_the_union_of_small_candidate_pools(
    index: QdrantIndex,
) -> None:
    """Candidates of one path that another did not return get that path's exact score too:
    the hits are the exact fused top-k of the union of every path's candidates."""
    rng = np.random.default_rng(11)
    index.ensure_collection("g", {"image": 8, "visual": 6}, "m")
    vectors = {}
    for i in range(300):
        v = {"image": rng.normal(size=8), "visual": rng.normal(size=6)}
        uri = f"s3://b/{i}"
        vectors[point_id(uri)] = v
        index.upsert("g", [_point(uri, **{k: list(x) for k, x in v.items()})])
    queries = {"text": rng.normal(size=8), "generated": rng.normal(size=6)}
    weights = {"text": 0.6, "generated": 0.4}

    hits = index.search("g", queries, weights, limit=5, candidates=10)

    per_path = {
        p: {pid: _cos(queries[p], v[name]) for pid, v in vectors.items()}
        for p, name in (("text", "image"), ("generated", "visual"))
    }
    # the heaviest path brings max(candidates, 2 * limit) = 10, a lighter one in proportion
    pools = {"text": 10, "generated": 7}  # ceil(10 * 0.4 / 0.6)
    union = set()
    for path, scores in per_path.items():
        union |= set(sorted(scores, key=scores.__getitem__, reverse=True)[: pools[path]])
    fused = {pid: sum(w * per_path[p][pid] for p, w in weights.items()) for pid in union}
    assert [h.id for h in hits] == sorted(union, key=fused.__getitem__, reverse=True)[:5]
    for hit in hits:
        assert hit.path_scores == pytest.approx({p: per_path[p][hit.id] for p in weights}, abs=1e-5)
        assert hit.payload["uri"].startswith("s3://b/")


def test_pools_fetched_one_path_at_a_time_rank_as_one_search(index: QdrantIndex) -> None:
    """What the query service does when one path's vector is known first (a cached generated
    query while the text is encoded): each path's candidates on their own, then one ranking;
    the hits equal a search of both paths at once, and each pool carries the other path's
    vectors so a candidate only one path found is still scored exactly on both."""
    vectors = _fill_two_paths(index)
    rng = np.random.default_rng(5)
    queries = {"text": rng.normal(size=8), "generated": rng.normal(size=6)}
    weights = {"text": 0.7, "generated": 0.3}

    pools = {
        p: index.candidates("g", p, queries[p], weights, limit=3, candidates=8) for p in weights
    }
    hits = index.rank("g", pools, queries, weights, limit=3)

    assert len(pools["text"].scores) == 8 and len(pools["generated"].scores) == 4  # by weight
    for pid in pools["text"].scores:
        assert set(pools["text"].vectors[pid]) == {"visual"}
    assert hits == index.search("g", queries, weights, limit=3, candidates=8)
    for hit in hits:
        exact = {
            "text": _cos(queries["text"], vectors[hit.id]["image"]),
            "generated": _cos(queries["generated"], vectors[hit.id]["visual"]),
        }
        assert hit.path_scores == pytest.approx(exact, abs=1e-5)


def test_multi_path_search_scores_a_missing_vector_as_zero(index: QdrantIndex) -> None:
    index.ensure_collection("g", {"image": 2, "visual": 2}, "m")
    index.upsert(
        "g",
        [
            _point("s3://b/both", image=[1.0, 0.0], visual=[1.0, 0.0]),
            _point("s3://b/image-only", image=[1.0, 0.1]),
        ],
    )
    queries = {"text": np.array([1.0, 0.0]), "generated": np.array([1.0, 0.0])}
    hits = index.search("g", queries, {"text": 0.5, "generated": 0.5}, limit=2)
    assert [h.payload["uri"] for h in hits] == ["s3://b/both", "s3://b/image-only"]
    assert hits[1].path_scores["generated"] == 0.0
    assert hits[1].score == pytest.approx(0.5 * _cos(np.array([1.0, 0.0]), np.array([1.0, 0.1])))


@pytest.mark.filterwarnings("ignore:Failed to obtain server version")
def test_unreachable_server_raises_index_unavailable() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ix = QdrantIndex.remote(f"http://127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(IndexUnavailable, match="index unreachable"):
        ix.get_etags("g", [point_id("s3://b/a")])
    with pytest.raises(IndexUnavailable):
        ix.ensure_collection("g", {"image": 2}, "m")


def test_multi_path_search_weights_change_the_ranking(index: QdrantIndex) -> None:
    index.ensure_collection("g", {"image": 2, "visual": 2}, "m")
    index.upsert(
        "g",
        [
            _point("s3://b/text-match", image=[1.0, 0.0], visual=[0.0, 1.0]),
            _point("s3://b/visual-match", image=[0.0, 1.0], visual=[1.0, 0.0]),
        ],
    )
    queries = {"text": np.array([1.0, 0.0]), "generated": np.array([1.0, 0.0])}

    text_heavy = index.search("g", queries, {"text": 0.9, "generated": 0.1}, limit=2)
    visual_heavy = index.search("g", queries, {"text": 0.1, "generated": 0.9}, limit=2)

    assert text_heavy[0].payload["uri"] == "s3://b/text-match"
    assert visual_heavy[0].payload["uri"] == "s3://b/visual-match"
    assert text_heavy[0].score == pytest.approx(0.9, abs=1e-5)


def test_multi_path_search_honours_label_filter(index: QdrantIndex) -> None:
    _fill_two_paths(index)
    rng = np.random.default_rng(3)
    queries = {"text": rng.normal(size=8), "generated": rng.normal(size=6)}

    hits = index.search(
        "g", queries, {"text": 0.5, "generated": 0.5}, limit=50, filters={"label": "odd"}
    )

    assert len(hits) == 15
    assert {h.payload["label"] for h in hits} == {"odd"}


def test_multi_path_search_of_empty_collection_is_empty(index: QdrantIndex) -> None:
    index.ensure_collection("g", {"image": 2, "visual": 2}, "m")
    queries = {"text": np.array([1.0, 0.0]), "generated": np.array([1.0, 0.0])}
    assert index.search("g", queries, {"text": 0.5, "generated": 0.5}, limit=3) == []


# -- on disk -----------------------------------------------------------------------------------
def test_on_disk_index_keeps_points_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "qdrant"
    ix = QdrantIndex.embedded(path)
    ix.ensure_collection("g", {"image": 2}, "model-v1")
    ix.upsert(
        "g",
        [
            _point("s3://b/a", etag="etag-a", image=[1.0, 0.0]),
            _point("s3://b/b", etag="etag-b", image=[0.0, 1.0]),
        ],
    )
    ix.close()

    reopened = QdrantIndex.embedded(path)
    try:
        info = reopened.describe("g")
        assert (info.model_version, info.points_count, info.vectors) == (
            "model-v1",
            2,
            {"image": 2},
        )
        assert reopened.get_etags("g", [point_id("s3://b/a")]) == {point_id("s3://b/a"): "etag-a"}
        [top, _] = reopened.search("g", {"text": np.array([0.0, 1.0])}, {"text": 1.0}, limit=2)
        assert top.payload["uri"] == "s3://b/b"
        with pytest.raises(ModelVersionMismatch):
            reopened.ensure_collection("g", {"image": 2}, "model-v2")
    finally:
        reopened.close()


def test_on_disk_index_commits_survive_a_killed_process(tmp_path: Path) -> None:
    """The embedded index runs its SQLite in WAL mode without an fsync per point; a process
    killed right after an upsert (SIGKILL, OOM) must still leave every point on disk."""
    import sqlite3
    import subprocess
    import sys

    path = tmp_path / "qdrant"
    code = f"""
import os, signal
from imagine.index import Point, QdrantIndex, point_id
ix = QdrantIndex.embedded({str(path)!r})
ix.ensure_collection("g", {{"image": 2}}, "model-v1")
ix.upsert("g", [Point(point_id(f"s3://b/{{i}}"), {{"image": [1.0, float(i)]}}, {{"etag": "e"}})
                for i in range(50)])
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    [db] = path.glob("collection/g/*.sqlite")
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened = QdrantIndex.embedded(path)
    try:
        assert reopened.describe("g").points_count == 50
    finally:
        reopened.close()


# -- aliases -----------------------------------------------------------------------------------
def test_an_alias_serves_search_and_switches_collections_atomically(index: QdrantIndex) -> None:
    for name, vec in (("fashion-v1", [1.0, 0.0]), ("fashion-v2", [0.0, 1.0])):
        index.ensure_collection(name, {"image": 2}, name.replace("fashion", "model"))
        index.upsert(name, [_point(f"s3://b/{name}", image=vec)])
    query = {"text": np.array([1.0, 0.0])}

    index.set_alias("fashion", "fashion-v1")
    [hit] = index.search("fashion", query, {"text": 1.0}, limit=1)
    assert hit.payload["uri"] == "s3://b/fashion-v1"
    info = index.describe("fashion")
    assert (info.name, info.model_version, info.aliases) == ("fashion-v1", "model-v1", ["fashion"])
    # ensure_collection through the alias checks the collection behind it, creates nothing
    index.ensure_collection("fashion", {"image": 2}, "model-v1")
    assert {c.name for c in index.list_collections()} == {"fashion-v1", "fashion-v2"}

    index.set_alias("fashion", "fashion-v2")  # the upgrade: one switch
    [hit] = index.search("fashion", query, {"text": 1.0}, limit=1)
    assert hit.payload["uri"] == "s3://b/fashion-v2"
    assert index.aliases() == {"fashion": "fashion-v2"}
    assert index.describe("fashion-v1").aliases == []

    assert index.delete_alias("fashion") is True
    assert index.delete_alias("fashion") is False
    with pytest.raises(CollectionNotFound):
        index.search("fashion", query, {"text": 1.0}, limit=1)


def test_aliases_cannot_shadow_or_dangle(index: QdrantIndex) -> None:
    index.ensure_collection("a", {"image": 2}, "m")
    index.ensure_collection("b", {"image": 2}, "m")
    with pytest.raises(AliasError, match="is a collection"):
        index.set_alias("b", "a")
    with pytest.raises(CollectionNotFound):
        index.set_alias("x", "missing")
    index.set_alias("x", "a")
    with pytest.raises(AliasError, match="is an alias"):
        index.delete_collection("x")
    assert index.delete_collection("a") is True  # its aliases go with it
    assert index.aliases() == {}


def test_collections_are_created_with_the_configured_layout() -> None:
    """On a Qdrant cluster each new collection gets the configured shards and copies. Local
    mode ignores both, so a spy around a real local client records what the server would get."""
    from qdrant_client import QdrantClient

    created: list[dict[str, object]] = []

    class Spy:
        def __init__(self, client: QdrantClient) -> None:
            self._client = client

        def __getattr__(self, name: str) -> object:
            return getattr(self._client, name)

        def create_collection(self, *args: object, **kwargs: object) -> object:
            created.append(kwargs)
            return self._client.create_collection(*args, **kwargs)  # type: ignore[arg-type]

    ix = QdrantIndex(
        Spy(QdrantClient(":memory:")), layout={"shard_number": 3, "replication_factor": 2}
    )
    ix.ensure_collection("g", {"image": 2}, "m")
    ix.ensure_collection("g", {"image": 2}, "m")  # exists: not created again
    assert [(c["shard_number"], c["replication_factor"]) for c in created] == [(3, 2)]
    assert QdrantIndex.embedded(":memory:")._layout == {}  # embedded: nothing to lay out


def test_two_paths_over_one_vector_of_a_text_gallery(index: QdrantIndex) -> None:
    """A text gallery: the image path and the caption path both search the ``text`` vector
    (``using``); each hit carries the exact cosine of each query and the fused score."""
    rng = np.random.default_rng(5)
    index.ensure_collection("t", {"text": 8}, "m")
    texts = {}
    for i in range(60):
        v = rng.normal(size=8)
        texts[point_id(f"t/{i}")] = v
        index.upsert("t", [_point(f"t/{i}", text=list(v))])
    queries = {"image": rng.normal(size=8), "caption": rng.normal(size=8)}
    weights = {"image": 0.5, "caption": 0.5}

    hits = index.search(
        "t", queries, weights, limit=60, candidates=10, using={"image": "text", "caption": "text"}
    )

    exact = {pid: {p: _cos(queries[p], v) for p in queries} for pid, v in texts.items()}
    fused = {pid: 0.5 * s["image"] + 0.5 * s["caption"] for pid, s in exact.items()}
    top = sorted(fused, key=fused.__getitem__, reverse=True)[:5]
    assert [h.id for h in hits[:5]] == top
    for hit in hits:
        assert hit.path_scores == pytest.approx(exact[hit.id], abs=1e-5)
        assert hit.score == pytest.approx(fused[hit.id], abs=1e-5)
    with pytest.raises(Exception):  # noqa: B017 - without the mapping there is no image vector
        index.search("t", queries, weights, limit=5)
