"""The vector-index port and its Qdrant adapter.

One port (:class:`VectorIndex`), one Qdrant adapter built two ways: embedded (qdrant-client local
mode on a folder, owned by one process) or by URL (a Qdrant server). Other processes reach an
embedded index through the owner's gRPC ``IndexService`` (``services``/``workers`` adapters).

A collection holds one gallery for one model version, with named vectors (``image``, and later
``visual``, ``caption``, ``text``) and payload. Point ids derive from the object identity, so
ingesting the same object twice writes the same point.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from imagine.fusion import PATH_VECTORS, fuse

_NAMESPACE = uuid.UUID("6f1f2d7e-5b7a-4c59-9d1e-2a3b4c5d6e7f")
INDEXED_FIELDS = ("label", "etag", "job_id", "source")


def point_id(object_uri: str) -> str:
    """The point id of an object: a UUID derived from its identity (``s3://bucket/key``)."""
    return str(uuid.uuid5(_NAMESPACE, object_uri))


class IndexError_(RuntimeError):
    """Base class of index errors."""


class CollectionNotFound(IndexError_):
    pass


class ModelVersionMismatch(IndexError_):
    """Vectors of another model version would be mixed into a collection."""


class IndexUnavailable(IndexError_):
    """The index cannot be reached (retry later)."""


class _Translated:
    """A qdrant-client whose failures to reach the server raise :class:`IndexUnavailable`
    (connection refused or reset, timeouts, HTTP 5xx/429, gRPC UNAVAILABLE), so callers can tell
    "retry later" from a bad request without knowing qdrant-client's exception types."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except Exception as exc:
                reason = _unavailable_reason(exc)
                if reason is None:
                    raise
                raise IndexUnavailable(f"index unreachable ({name}): {reason}") from exc

        return call


def _unavailable_reason(exc: Exception) -> str | None:
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    if isinstance(exc, UnexpectedResponse):
        code = int(exc.status_code or 0)
        return f"HTTP {code}" if code >= 500 or code == 429 else None
    if isinstance(exc, ResponseHandlingException | ConnectionError | TimeoutError):
        return f"{type(exc.__cause__ or exc).__name__}: {exc}"
    try:
        import grpc
    except ImportError:  # pragma: no cover - grpcio is a dependency of qdrant-client
        return None
    if isinstance(exc, grpc.RpcError) and exc.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ):
        return f"gRPC {exc.code().name}"
    return None


@dataclass
class Point:
    id: str
    vectors: dict[str, Sequence[float]]
    payload: dict[str, Any]


@dataclass
class Hit:
    id: str
    score: float
    path_scores: dict[str, float]
    payload: dict[str, Any]


@dataclass
class Pool:
    """One path's candidates: their scores on that path, and for each the vectors the other
    paths compare against (:meth:`QdrantIndex.candidates`)."""

    path: str
    scores: dict[str, float]
    vectors: dict[str, dict[str, np.ndarray]]


@dataclass
class _PoolPlan:
    path: str
    vector: str  # the named vector this path searches
    query: np.ndarray  # unit length
    size: int
    others: list[str]  # the named vectors the other paths compare against

    def read(self, points: Sequence[Any]) -> Pool:
        scores: dict[str, float] = {}
        vectors: dict[str, dict[str, np.ndarray]] = {}
        for pt in points:
            pid = str(pt.id)
            scores[pid] = float(pt.score)
            got = pt.vector if isinstance(pt.vector, dict) else {}
            vectors[pid] = {
                k: np.asarray(v, dtype=np.float32) for k, v in got.items() if v is not None
            }
        return Pool(self.path, scores, vectors)


@dataclass
class CollectionInfo:
    name: str
    model_version: str
    points_count: int
    vectors: dict[str, int] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)  # alias names that point at it


class AliasError(IndexError_):
    """An alias that would shadow a collection, or point at no collection."""


class PointStore(Protocol):
    """What ingestion needs of an index: collections to write into, etags, upserts."""

    def ensure_collection(self, name: str, vectors: Mapping[str, int], model_version: str) -> None:
        """Create the collection if missing; refuse one filled by another model version."""

    def get_etags(self, name: str, ids: Sequence[str]) -> dict[str, str]: ...

    def upsert(self, name: str, points: Sequence[Point]) -> None: ...

    def source_ids(
        self, name: str, source: str, page_token: str | None, page_size: int
    ) -> tuple[list[str], str | None]:
        """A page of the ids of the points ingested from ``source``; and the next token."""
        ...

    def delete(self, name: str, ids: Sequence[str]) -> None: ...


class VectorIndex(PointStore, Protocol):
    def describe(self, name: str) -> CollectionInfo: ...

    def list_collections(self) -> list[CollectionInfo]: ...

    def delete_collection(self, name: str) -> bool: ...

    def aliases(self) -> dict[str, str]: ...

    def set_alias(self, alias: str, collection: str) -> None: ...

    def delete_alias(self, alias: str) -> bool: ...

    def search(
        self,
        name: str,
        queries: Mapping[str, np.ndarray],
        weights: Mapping[str, float],
        limit: int,
        filters: Mapping[str, str] | None = None,
        candidates: int = 50,
        using: Mapping[str, str] | None = None,
    ) -> list[Hit]:
        """Fused search: ``queries`` maps a path to its query vector; each path searches the
        named vector ``PATH_VECTORS`` gives it, or ``using`` (e.g. a text gallery's ``text``)."""
        ...

    def candidates(
        self,
        name: str,
        path: str,
        query: np.ndarray,
        weights: Mapping[str, float],
        limit: int,
        filters: Mapping[str, str] | None = None,
        candidates: int = 50,
        using: Mapping[str, str] | None = None,
    ) -> Pool:
        """One path's part of :meth:`search`, for a caller that has that path's query first."""
        ...

    def rank(
        self,
        name: str,
        pools: Mapping[str, Pool],
        queries: Mapping[str, np.ndarray],
        weights: Mapping[str, float],
        limit: int,
        using: Mapping[str, str] | None = None,
    ) -> list[Hit]:
        """The rest of :meth:`search`: the fused top ``limit`` of the pools' union."""
        ...


class QdrantIndex:
    """The Qdrant adapter: ``QdrantIndex.embedded(path)`` or ``QdrantIndex.remote(url)``."""

    def __init__(
        self, client: Any, payload_indexes: bool = True, layout: Mapping[str, int] | None = None
    ) -> None:
        self._client = client
        self._layout = dict(layout or {})  # shard_number / replication_factor of new collections
        self._payload_indexes = payload_indexes  # local mode filters by scanning instead
        # qdrant-client local mode is not thread-safe; a server client is, but a lock is cheap.
        self._lock = threading.RLock()

    @classmethod
    def embedded(cls, path: Path | str) -> QdrantIndex:
        from qdrant_client import QdrantClient

        if str(path) == ":memory:":
            return cls(QdrantClient(location=":memory:"), payload_indexes=False)
        Path(path).mkdir(parents=True, exist_ok=True)
        index = cls(QdrantClient(path=str(path)), payload_indexes=False)
        index._tune_local_storage()
        return index

    def _tune_local_storage(self) -> None:
        """Local mode keeps each collection in SQLite and commits every point on its own; in
        the default rollback-journal mode each commit is an fsync (~640 points/s here). In WAL
        mode with synchronous=NORMAL a commit survives a crash of the process (SIGKILL, OOM);
        only the last commits before a power loss may be lost. Measured: 2,850 points/s."""
        if isinstance(self._client, _Translated):  # a server: its storage is its own
            return
        local = getattr(self._client, "_client", None)
        for collection in getattr(local, "collections", {}).values():
            persistence = getattr(collection, "storage", None)
            conn = getattr(persistence, "storage", None)
            if persistence is None or conn is None:
                continue
            if not getattr(persistence, "_imagine_tuned", False):
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                persistence._imagine_tuned = True

    @classmethod
    def remote(
        cls,
        url: str,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        shard_number: int | None = None,
        replication_factor: int | None = None,
    ) -> QdrantIndex:
        from qdrant_client import QdrantClient

        client = QdrantClient(url=url, api_key=api_key, timeout=max(1, int(timeout_s)))
        layout = {"shard_number": shard_number, "replication_factor": replication_factor}
        return cls(_Translated(client), layout={k: v for k, v in layout.items() if v})

    @classmethod
    def from_settings(cls, qdrant: Any, embedded_path: Path | str) -> QdrantIndex:
        """The server named by ``qdrant.url`` (a ``QdrantSettings``), else embedded."""
        if qdrant.url:
            return cls.remote(
                qdrant.url,
                qdrant.api_key,
                qdrant.timeout_s,
                qdrant.shard_number,
                qdrant.replication_factor,
            )
        return cls.embedded(embedded_path)

    def close(self) -> None:
        with self._lock:
            self._client.close()

    # -- collections ----------------------------------------------------------------------------
    def ensure_collection(self, name: str, vectors: Mapping[str, int], model_version: str) -> None:
        from qdrant_client import models

        with self._lock:
            name = self._aliases().get(name, name)
            if self._is_collection(name):
                info = self.describe(name)
                if info.model_version != model_version:
                    raise ModelVersionMismatch(
                        f"collection {name!r} holds vectors of model {info.model_version}, "
                        f"not {model_version}; ingest into a new collection"
                    )
                missing = {k: v for k, v in vectors.items() if k not in info.vectors}
                if missing:
                    raise ModelVersionMismatch(
                        f"collection {name!r} has no vectors named {sorted(missing)}"
                    )
                return
            self._client.create_collection(
                name,
                vectors_config={
                    # Vectors are stored at unit length (upsert), so the dot product is the
                    # cosine, without re-normalising the gallery per query (local mode does).
                    k: models.VectorParams(size=int(v), distance=models.Distance.DOT)
                    for k, v in vectors.items()
                },
                metadata={"model_version": model_version},
                **self._layout,
            )
            for fld in INDEXED_FIELDS if self._payload_indexes else ():
                self._client.create_payload_index(name, fld, models.PayloadSchemaType.KEYWORD)
            self._tune_local_storage()

    def describe(self, name: str) -> CollectionInfo:
        """The collection ``name`` names (directly or through an alias)."""
        with self._lock:
            name = self._require(name)
            info = self._client.get_collection(name)
            count = self._client.count(name, exact=True).count
            aliases = sorted(a for a, c in self._aliases().items() if c == name)
        params = info.config.params.vectors or {}
        return CollectionInfo(
            name=name,
            model_version=str((info.config.metadata or {}).get("model_version", "")),
            points_count=int(count),
            vectors={k: int(v.size) for k, v in params.items()},
            aliases=aliases,
        )

    def list_collections(self) -> list[CollectionInfo]:
        with self._lock:
            names = sorted(c.name for c in self._client.get_collections().collections)
        return [self.describe(n) for n in names]

    def delete_collection(self, name: str) -> bool:
        """Delete a collection (by its own name, not an alias) and the aliases pointing at it."""
        from qdrant_client import models

        with self._lock:
            if not self._is_collection(name):
                if name in self._aliases():
                    raise AliasError(
                        f"{name!r} is an alias; delete the alias, or the collection by its name"
                    )
                return False
            ops = [
                models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=a))
                for a, c in self._aliases().items()
                if c == name
            ]
            if ops:
                self._client.update_collection_aliases(change_aliases_operations=ops)
            return bool(self._client.delete_collection(name))

    # -- aliases: a stable name for clients while the collection behind it changes ----------
    def _aliases(self) -> dict[str, str]:
        return {a.alias_name: a.collection_name for a in self._client.get_aliases().aliases}

    def aliases(self) -> dict[str, str]:
        """alias -> collection."""
        with self._lock:
            return self._aliases()

    def set_alias(self, alias: str, collection: str) -> None:
        """Point ``alias`` at ``collection``, atomically replacing where it pointed before."""
        from qdrant_client import models

        with self._lock:
            if self._is_collection(alias):
                raise AliasError(f"{alias!r} is a collection; an alias cannot shadow it")
            if not self._is_collection(collection):
                raise CollectionNotFound(f"collection {collection!r} not found")
            ops: list[Any] = []
            if alias in self._aliases():
                ops.append(
                    models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))
                )
            ops.append(
                models.CreateAliasOperation(
                    create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)
                )
            )
            self._client.update_collection_aliases(change_aliases_operations=ops)

    def delete_alias(self, alias: str) -> bool:
        from qdrant_client import models

        with self._lock:
            if alias not in self._aliases():
                return False
            op = models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))
            self._client.update_collection_aliases(change_aliases_operations=[op])
            return True

    # -- points ---------------------------------------------------------------------------------
    def get_etags(self, name: str, ids: Sequence[str]) -> dict[str, str]:
        if not ids:
            return {}
        with self._lock:
            name = self._require(name)
            records = self._client.retrieve(
                name, ids=list(ids), with_payload=["etag"], with_vectors=False
            )
        return {str(r.id): str((r.payload or {}).get("etag", "")) for r in records}

    def upsert(self, name: str, points: Sequence[Point]) -> None:
        from qdrant_client import models

        if not points:
            return
        structs = [
            models.PointStruct(
                id=p.id,
                vector={
                    k: _unit(np.asarray(v, dtype=np.float32)).tolist() for k, v in p.vectors.items()
                },
                payload=p.payload,
            )
            for p in points
        ]
        with self._lock:
            name = self._require(name)
            self._client.upsert(name, points=structs, wait=True)

    def source_ids(
        self, name: str, source: str, page_token: str | None, page_size: int
    ) -> tuple[list[str], str | None]:
        from qdrant_client import models

        flt = models.Filter(
            must=[models.FieldCondition(key="source", match=models.MatchValue(value=source))]
        )
        with self._lock:
            name = self._require(name)
            records, nxt = self._client.scroll(
                name,
                scroll_filter=flt,
                limit=page_size,
                offset=page_token or None,
                with_payload=False,
                with_vectors=False,
            )
        return [str(r.id) for r in records], (str(nxt) if nxt is not None else None)

    def delete(self, name: str, ids: Sequence[str]) -> None:
        from qdrant_client import models

        if not ids:
            return
        with self._lock:
            name = self._require(name)
            self._client.delete(
                name, points_selector=models.PointIdsList(points=list(ids)), wait=True
            )

    def search(
        self,
        name: str,
        queries: Mapping[str, np.ndarray],
        weights: Mapping[str, float],
        limit: int,
        filters: Mapping[str, str] | None = None,
        candidates: int = 50,
        using: Mapping[str, str] | None = None,
    ) -> list[Hit]:
        """The top ``limit`` points by the fused score of the weighted paths: every path's
        candidates in one batched request (:meth:`candidates`), ranked by :meth:`rank`."""
        paths = [p for p in weights if weights[p] > 0]
        if len(paths) != 1:
            plan = [
                self._pool_plan(p, weights, limit, candidates, using, queries[p]) for p in paths
            ]
            with self._lock:
                name = self._require(name)
                responses = self._client.query_batch_points(
                    name, requests=[_pool_request(plan_, _filter(filters)) for plan_ in plan]
                )
            pools = {p.path: p.read(r.points) for p, r in zip(plan, responses, strict=True)}
            return self.rank(name, pools, queries, weights, limit, using)
        (path,) = paths
        vector = {**PATH_VECTORS, **(using or {})}[path]
        with self._lock:
            name = self._require(name)
            res = self._client.query_points(
                name,
                query=_unit(np.asarray(queries[path], dtype=np.float32)).tolist(),
                using=vector,
                query_filter=_filter(filters),
                limit=limit,
                with_payload=True,
            )
        return [
            Hit(str(p.id), float(p.score), {path: float(p.score)}, p.payload or {})
            for p in res.points
        ]

    def candidates(
        self,
        name: str,
        path: str,
        query: np.ndarray,
        weights: Mapping[str, float],
        limit: int,
        filters: Mapping[str, str] | None = None,
        candidates: int = 50,
        using: Mapping[str, str] | None = None,
    ) -> Pool:
        """One path's candidates for a fused top ``limit``, each with the vectors the other
        weighted paths compare against, so :meth:`rank` scores every candidate exactly without
        another request. The heaviest path brings ``max(candidates, 2 * limit)``, a lighter one
        fewer in proportion to its weight (never fewer than ``limit``): a path weighted 0.1
        moves a fused score by 0.1 at most. A caller may fetch each path's pool as soon as its
        query vector is known (a cached generated query at once, while the text is encoded)."""
        plan = self._pool_plan(path, weights, limit, candidates, using, query)
        with self._lock:
            name = self._require(name)
            # the batch's request through query_points: ~0.2 ms less client work than a batch
            # of one
            r = _pool_request(plan, _filter(filters))
            res = self._client.query_points(
                name,
                query=r.query,
                using=r.using,
                query_filter=r.filter,
                limit=r.limit,
                with_payload=r.with_payload,
                with_vectors=r.with_vector,
            )
        return plan.read(res.points)

    def rank(
        self,
        name: str,
        pools: Mapping[str, Pool],
        queries: Mapping[str, np.ndarray],
        weights: Mapping[str, float],
        limit: int,
        using: Mapping[str, str] | None = None,
    ) -> list[Hit]:
        """The union of the paths' candidates ranked by the exact fused score; payloads are
        fetched for the hits only. A candidate's score on a path that did not return it comes
        from the vector its pool carries; a point without that vector scores 0 there."""
        vector_of = {**PATH_VECTORS, **(using or {})}
        paths = [p for p in weights if weights[p] > 0]
        ids = list(dict.fromkeys(pid for p in paths for pid in pools[p].scores))
        if not ids:
            return []
        per_path: dict[str, np.ndarray] = {}
        for p in paths:
            query = _unit(np.asarray(queries[p], dtype=np.float32))
            own = pools[p].scores
            column = np.zeros(len(ids), dtype=np.float32)
            rows, carried = [], []
            for i, pid in enumerate(ids):
                if pid in own:
                    column[i] = own[pid]
                elif (vec := _carried(pools, pid, vector_of[p])) is not None:
                    rows.append(i)
                    carried.append(vec)
            if carried:  # the others' candidates, scored on this path in one product
                vectors = np.stack(carried).astype(np.float32, copy=False)
                norms = np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
                column[rows] = (vectors @ query) / norms
            per_path[p] = column
        fused = fuse(per_path, {p: weights[p] for p in paths})
        order = np.argsort(-fused, kind="stable")[:limit]
        top = [ids[i] for i in order]
        with self._lock:
            name = self._require(name)
            records = self._client.retrieve(name, ids=top, with_payload=True, with_vectors=False)
        payloads = {str(r.id): r.payload or {} for r in records}
        return [
            Hit(
                ids[i],
                float(fused[i]),
                {p: float(per_path[p][i]) for p in paths},
                payloads.get(ids[i], {}),
            )
            for i in order
        ]

    @staticmethod
    def _pool_plan(
        path: str,
        weights: Mapping[str, float],
        limit: int,
        candidates: int,
        using: Mapping[str, str] | None,
        query: np.ndarray,
    ) -> _PoolPlan:
        vector_of = {**PATH_VECTORS, **(using or {})}
        paths = [p for p in weights if weights[p] > 0]
        heaviest = max(weights[p] for p in paths)
        size = max(limit, math.ceil(max(candidates, 2 * limit) * weights[path] / heaviest))
        others = sorted({vector_of[q] for q in paths if q != path})
        unit = _unit(np.asarray(query, dtype=np.float32))
        return _PoolPlan(path, vector_of[path], unit, size, others)

    def _is_collection(self, name: str) -> bool:
        """A collection of that very name (local mode's ``collection_exists`` also says yes
        for an alias)."""
        return name in {c.name for c in self._client.get_collections().collections}

    def _require(self, name: str) -> str:
        """The collection's own name (resolving an alias); CollectionNotFound if there is none."""
        if self._is_collection(name):
            return name
        target = self._aliases().get(name)
        if target is None or not self._is_collection(target):
            raise CollectionNotFound(f"collection {name!r} not found")
        return target


def _unit(vector: np.ndarray) -> np.ndarray:
    """The vector scaled to length 1 (a zero vector stays zero)."""
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def _carried(pools: Mapping[str, Pool], pid: str, vector: str) -> np.ndarray | None:
    """The named vector of a candidate, as any path's pool carried it (None: the point has none)."""
    for pool in pools.values():
        vec = pool.vectors.get(pid, {}).get(vector)
        if vec is not None:
            return vec
    return None


def _pool_request(plan: _PoolPlan, flt: Any) -> Any:
    from qdrant_client import models

    return models.QueryRequest(
        query=plan.query.tolist(),
        using=plan.vector,
        filter=flt,
        limit=plan.size,
        with_payload=False,
        with_vector=plan.others or False,
    )


def _filter(filters: Mapping[str, str] | None) -> Any:
    if not filters:
        return None
    from qdrant_client import models

    return models.Filter(
        must=[
            models.FieldCondition(key=k, match=models.MatchValue(value=v))
            for k, v in filters.items()
        ]
    )


def chunked(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
