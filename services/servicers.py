"""The gRPC servicers: validate requests, call the deployments and the core, map errors.

Every RPC maps failures to a status code with a human message: INVALID_ARGUMENT for bad input,
NOT_FOUND for unknown collections and jobs, FAILED_PRECONDITION for a model mismatch,
UNAVAILABLE when a dependency is down. Unexpected errors are logged with a request id and the
client gets INTERNAL with that id, never a stack trace.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import json_format, struct_pb2

from imagine.config import LimitSettings, StorageSettings
from imagine.decoding import DecodeError, check_decoding
from imagine.fusion import FusionError
from imagine.index import (
    AliasError,
    CollectionInfo,
    CollectionNotFound,
    IndexUnavailable,
    ModelVersionMismatch,
    Point,
    VectorIndex,
)
from imagine.jobs import Job, JobNotFound, SqliteJobStore
from imagine.observability import current_request_id, redact
from imagine.storage import ObjectLinks
from protos.gen.imagine.v1 import (
    collection_service_pb2 as col_pb,
)
from protos.gen.imagine.v1 import (
    collection_service_pb2_grpc as col_grpc,
)
from protos.gen.imagine.v1 import (
    common_pb2,
)
from protos.gen.imagine.v1 import (
    index_service_pb2 as idx_pb,
)
from protos.gen.imagine.v1 import (
    index_service_pb2_grpc as idx_grpc,
)
from protos.gen.imagine.v1 import (
    ingestion_service_pb2 as ing_pb,
)
from protos.gen.imagine.v1 import (
    ingestion_service_pb2_grpc as ing_grpc,
)
from protos.gen.imagine.v1 import (
    model_service_pb2 as mod_pb,
)
from protos.gen.imagine.v1 import (
    model_service_pb2_grpc as mod_grpc,
)
from protos.gen.imagine.v1 import (
    retrieval_service_pb2 as ret_pb,
)
from protos.gen.imagine.v1 import (
    retrieval_service_pb2_grpc as ret_grpc,
)
from services.guard import GenerationSlots
from services.query import (
    MAX_GUIDANCE,
    BadRequest,
    Captions,
    Encoders,
    Generative,
    QueryEngine,
    SamplingDefaults,
    TooManyRequests,
    check_sampling,
    check_text,
    over_limit,
    png_bytes,
    wants_generation,
)

log = logging.getLogger("imagine.ingress")

COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_BATCH = 256
VECTOR_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MAX_VECTOR_SIZE = 65_536
WATCH_POLL_S = 0.25


class JobQueue(Protocol):
    def submit(self, job_id: str) -> None: ...


@dataclass
class Backend:
    encoders: Encoders
    index: VectorIndex
    jobs: SqliteJobStore
    queue: JobQueue
    model_version: str  # of the stored vectors: the dual encoder (+ the vision encoder)
    vectors: dict[str, int]  # named vectors a collection of this model holds
    default_chunk_size: int
    engine: QueryEngine
    generative: Generative | None = None
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    links: ObjectLinks = field(default_factory=lambda: ObjectLinks(StorageSettings()))
    limits: LimitSettings = field(default_factory=LimitSettings)
    slots: GenerationSlots = field(default_factory=lambda: GenerationSlots(4))
    text_vectors: dict[str, int] = field(default_factory=dict)  # of a text gallery
    captions: Captions | None = None


R = TypeVar("R")


def rpc(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Map errors of a unary RPC to status codes."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await fn(self, request, context)
        except Exception as exc:
            await _abort(context, exc, fn.__name__)
            raise  # unreachable: abort raises

    return wrapper


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, name: str) -> None:
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    code, message = _status(exc)
    rid = current_request_id() or uuid.uuid4().hex[:16]
    if code is grpc.StatusCode.INTERNAL:
        # One line with the error's type and message (redacted), never a stack trace.
        log.error("%s failed (request id %s): %s: %s", name, rid, type(exc).__name__, exc)
        message = f"internal error (request id {rid})"
    elif code is grpc.StatusCode.UNAVAILABLE:
        log.warning("%s: %s", name, message)
    await context.abort(code, redact(message))


# Ray errors of a deployment that is down or overloaded (matched by name: no Ray import here).
_UNAVAILABLE_NAMES = {
    "RayActorError",
    "ActorDiedError",
    "ActorUnavailableError",
    "ActorUnschedulableError",
    "BackPressureError",
    "DeploymentUnavailableError",
    "RaySystemError",
    "GetTimeoutError",
}


def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, BadRequest | FusionError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, TooManyRequests):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, CollectionNotFound | JobNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc).strip("'\"")
    if isinstance(exc, ModelVersionMismatch | AliasError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "a dependency did not answer in time"
    if isinstance(exc, IndexUnavailable | ConnectionError) or any(
        t.__name__ in _UNAVAILABLE_NAMES for t in type(exc).__mro__
    ):
        detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        return (
            grpc.StatusCode.UNAVAILABLE,
            f"a dependency is unavailable ({detail}); retry with backoff",
        )
    return grpc.StatusCode.INTERNAL, ""


def check_collection(name: str) -> str:
    if not COLLECTION_NAME.match(name):
        raise BadRequest(
            f"bad collection name {name!r}: 1-128 letters, digits, '_', '-', '.', "
            "starting with a letter or digit"
        )
    return name


def _struct(payload: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(payload)
    return s


# -- retrieval --------------------------------------------------------------------------------
class RetrievalServicer(ret_grpc.RetrievalServiceServicer):
    def __init__(self, backend: Backend) -> None:
        self.b = backend

    @rpc
    async def Search(self, request: Any, context: Any) -> Any:
        check_collection(request.collection)
        if wants_generation(request, self.b.generative):
            with self.b.slots.hold():
                res = await self.b.engine.search(request)
        else:
            res = await self.b.engine.search(request)
        resp = ret_pb.SearchResponse(
            model_version=self.b.model_version,
            weights=res.weights,
            cache_hit=res.cache_hit,
            query_caption=res.query_caption,
        )
        for h in res.hits:
            resp.hits.append(
                ret_pb.SearchHit(
                    id=h.id,
                    score=h.score,
                    path_scores=h.path_scores,
                    uri=str(h.payload.get("source_uri", "")),
                    payload=_struct(h.payload),
                    url=self.b.links.url(
                        str(h.payload.get("source", "")), str(h.payload.get("key", ""))
                    ),
                )
            )
        if request.explain:
            resp.timings_ms.update(res.timings_ms)
            resp.generated_images.extend(res.generated_pngs)
        return resp


# -- models -----------------------------------------------------------------------------------
class ModelServicer(mod_grpc.ModelServiceServicer):
    def __init__(self, backend: Backend) -> None:
        self.b = backend

    @rpc
    async def EncodeText(self, request: Any, context: Any) -> Any:
        texts = list(request.texts)
        _check_batch(len(texts), "texts")
        for i, t in enumerate(texts):
            if not t.strip():
                raise BadRequest(f"texts[{i}] is empty")
            check_text(t, f"texts[{i}]", self.b.limits)
        vecs = await self.b.encoders.text(texts)
        return mod_pb.EncodeTextResponse(
            embeddings=[common_pb2.Vector(values=v.tolist()) for v in vecs],
            model_version=self.b.model_version,
        )

    @rpc
    async def EncodeImage(self, request: Any, context: Any) -> Any:
        images = list(request.images)
        _check_batch(len(images), "images")
        vector = request.vector or "image"
        if vector not in self.b.vectors:
            known = ", ".join(sorted(self.b.vectors))
            raise BadRequest(f"unknown image vector {request.vector!r}; this model has: {known}")
        for i, img in enumerate(images):
            if len(img) > self.b.limits.max_image_bytes:
                raise over_limit(
                    f"images[{i}] size in bytes", len(img), "max_image_bytes", self.b.limits
                )
        if vector == "visual":
            results = await self.b.encoders.visual(images)
        else:
            results = await self.b.encoders.images(images)
        resp = mod_pb.EncodeImageResponse(model_version=self.b.model_version)
        for r in results:
            if isinstance(r, str):
                resp.embeddings.append(common_pb2.Vector())
                resp.errors.append(r)
            else:
                resp.embeddings.append(common_pb2.Vector(values=r.tolist()))
                resp.errors.append("")
        return resp

    @rpc
    async def Generate(self, request: Any, context: Any) -> Any:
        gen = self.b.generative
        if gen is None:
            raise ModelVersionMismatch("this service runs no diffusion generator")
        prompt = request.prompt.strip()
        if not prompt:
            raise BadRequest("prompt is empty")
        check_text(prompt, "prompt", self.b.limits)
        d = self.b.defaults
        k = request.num_images or d.num_generated
        steps = request.steps or d.steps
        guidance = request.guidance or d.guidance
        check_sampling(k, steps, "num_images", self.b.limits)
        if not (math.isfinite(guidance) and 0 < guidance <= MAX_GUIDANCE):
            raise BadRequest(f"guidance {guidance} is outside (0, {MAX_GUIDANCE}]")
        with self.b.slots.hold():
            images = await gen.generate(prompt, k, steps, float(guidance), int(request.seed))
        return mod_pb.GenerateResponse(
            images=[png_bytes(i) for i in images], model_version=gen.info.generator_version
        )

    @rpc
    async def Caption(self, request: Any, context: Any) -> Any:
        captions = self.b.captions
        if captions is None:
            raise ModelVersionMismatch(
                "this service runs no caption decoder (IMAGINE_CAPTION_MODEL is empty)"
            )
        images = list(request.images)
        _check_batch(len(images), "images")
        for i, img in enumerate(images):
            if len(img) > self.b.limits.max_image_bytes:
                raise over_limit(
                    f"images[{i}] size in bytes", len(img), "max_image_bytes", self.b.limits
                )
        if request.strategy not in _STRATEGIES:
            raise BadRequest(f"unknown decoding strategy {request.strategy}")
        strategy = _STRATEGIES[request.strategy]
        beam = request.beam_size or 4
        temperature = request.temperature or 1.0
        try:
            check_decoding(strategy, beam, temperature)
        except DecodeError as exc:
            raise BadRequest(str(exc)) from None
        results = await captions.caption(images, strategy, beam, temperature, int(request.seed))
        resp = mod_pb.CaptionResponse(model_version=captions.model_version)
        for r in results:
            if isinstance(r, str):
                resp.captions.append(mod_pb.Caption(error=r))
            else:
                resp.captions.append(mod_pb.Caption(text=r[0], log_prob=r[1]))
        return resp


_STRATEGIES = {
    mod_pb.DECODING_STRATEGY_UNSPECIFIED: "greedy",
    mod_pb.DECODING_STRATEGY_GREEDY: "greedy",
    mod_pb.DECODING_STRATEGY_BEAM: "beam",
    mod_pb.DECODING_STRATEGY_SAMPLE: "sample",
}


def _check_batch(n: int, what: str) -> None:
    if n == 0:
        raise BadRequest(f"no {what} given")
    if n > MAX_BATCH:
        raise BadRequest(f"{n} {what} exceed the limit of {MAX_BATCH} per request")


# -- collections ------------------------------------------------------------------------------
def _collection_pb(info: CollectionInfo) -> Any:
    return col_pb.Collection(
        name=info.name,
        model_version=info.model_version,
        points_count=info.points_count,
        vectors=[col_pb.NamedVector(name=k, size=v) for k, v in sorted(info.vectors.items())],
        aliases=info.aliases,
    )


class CollectionServicer(col_grpc.CollectionServiceServicer):
    def __init__(self, backend: Backend) -> None:
        self.b = backend

    @rpc
    async def CreateCollection(self, request: Any, context: Any) -> Any:
        name = check_collection(request.name)
        await asyncio.to_thread(
            self.b.index.ensure_collection, name, self.b.vectors, self.b.model_version
        )
        info = await asyncio.to_thread(self.b.index.describe, name)
        return col_pb.CreateCollectionResponse(collection=_collection_pb(info))

    @rpc
    async def DescribeCollection(self, request: Any, context: Any) -> Any:
        info = await asyncio.to_thread(self.b.index.describe, check_collection(request.name))
        return col_pb.DescribeCollectionResponse(collection=_collection_pb(info))

    @rpc
    async def ListCollections(self, request: Any, context: Any) -> Any:
        infos = await asyncio.to_thread(self.b.index.list_collections)
        return col_pb.ListCollectionsResponse(collections=[_collection_pb(i) for i in infos])

    @rpc
    async def DeleteCollection(self, request: Any, context: Any) -> Any:
        name = check_collection(request.name)
        if not await asyncio.to_thread(self.b.index.delete_collection, name):
            raise CollectionNotFound(f"collection {name!r} not found")
        return col_pb.DeleteCollectionResponse()

    @rpc
    async def UpdateAlias(self, request: Any, context: Any) -> Any:
        alias = check_collection(request.alias)
        target = check_collection(request.collection)
        await asyncio.to_thread(self.b.index.set_alias, alias, target)
        return col_pb.UpdateAliasResponse(alias=col_pb.Alias(alias=alias, collection=target))

    @rpc
    async def DeleteAlias(self, request: Any, context: Any) -> Any:
        alias = check_collection(request.alias)
        if not await asyncio.to_thread(self.b.index.delete_alias, alias):
            raise CollectionNotFound(f"alias {alias!r} not found")
        return col_pb.DeleteAliasResponse()

    @rpc
    async def ListAliases(self, request: Any, context: Any) -> Any:
        aliases = await asyncio.to_thread(self.b.index.aliases)
        return col_pb.ListAliasesResponse(
            aliases=[col_pb.Alias(alias=a, collection=c) for a, c in sorted(aliases.items())]
        )


# -- ingestion --------------------------------------------------------------------------------
_STATES = {
    "QUEUED": ing_pb.JOB_STATE_QUEUED,
    "RUNNING": ing_pb.JOB_STATE_RUNNING,
    "SUCCEEDED": ing_pb.JOB_STATE_SUCCEEDED,
    "SUCCEEDED_WITH_ERRORS": ing_pb.JOB_STATE_SUCCEEDED_WITH_ERRORS,
    "FAILED": ing_pb.JOB_STATE_FAILED,
    "CANCELLED": ing_pb.JOB_STATE_CANCELLED,
}


def job_pb(job: Job) -> Any:
    return ing_pb.IngestJob(
        id=job.id,
        collection=job.collection,
        source=job.source,
        state=_STATES[job.state.value],
        total=job.total,
        embedded=job.embedded,
        skipped=job.skipped,
        failed=job.failed,
        listing_done=job.listing_done,
        error=job.error,
        model_version=job.model_version,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        failures=[ing_pb.ObjectFailure(uri=u, reason=r) for u, r in job.failures],
        sync=job.sync,
        removed=job.removed,
        objects_per_second=job.objects_per_second(),
        kind=_KINDS_PB[job.kind],
    )


_KINDS = {
    ing_pb.GALLERY_KIND_UNSPECIFIED: "images",
    ing_pb.GALLERY_KIND_IMAGES: "images",
    ing_pb.GALLERY_KIND_TEXTS: "texts",
}
_KINDS_PB = {"images": ing_pb.GALLERY_KIND_IMAGES, "texts": ing_pb.GALLERY_KIND_TEXTS}


def check_source(source: str, kind: str = "images") -> str:
    from pathlib import Path

    source = source.strip()
    if not source:
        raise BadRequest("source is empty: give a folder or s3://bucket/prefix")
    if source.startswith("s3://"):
        if len(source) <= len("s3://") or source[5] == "/":
            raise BadRequest(f"bad source {source!r}: expected s3://bucket/prefix")
        return source
    path = Path(source.removeprefix("file://"))
    if not path.is_absolute():
        raise BadRequest(f"source folder {source!r} must be an absolute path on the server")
    if kind == "texts" and path.suffix == ".jsonl":
        if not path.is_file():
            raise BadRequest(f"source file {source} does not exist on the server")
        return source
    if not path.is_dir():
        raise BadRequest(f"source folder {source} does not exist on the server")
    return source


class IngestionServicer(ing_grpc.IngestionServiceServicer):
    def __init__(self, backend: Backend) -> None:
        self.b = backend

    @rpc
    async def CreateIngestJob(self, request: Any, context: Any) -> Any:
        b = self.b
        name = check_collection(request.collection)
        if request.kind not in _KINDS:
            raise BadRequest(f"unknown gallery kind {request.kind}")
        kind = _KINDS[request.kind]
        source = check_source(request.source, kind)
        chunk = request.chunk_size or b.default_chunk_size
        if chunk < 0:
            raise BadRequest(f"chunk_size {chunk} is negative")
        if chunk > 10_000:
            raise BadRequest(f"chunk_size {chunk} exceeds the limit of 10000")
        vectors = b.text_vectors if kind == "texts" else b.vectors
        try:
            await asyncio.to_thread(b.index.ensure_collection, name, vectors, b.model_version)
        except ModelVersionMismatch as exc:
            other = "an image" if kind == "texts" else "a text"
            raise ModelVersionMismatch(f"{exc} (is it {other} gallery?)") from None
        # An alias is resolved once: the job fills the collection it named at creation.
        name = (await asyncio.to_thread(b.index.describe, name)).name
        job = await asyncio.to_thread(
            b.jobs.create,
            name,
            source,
            chunk,
            dict(request.metadata),
            b.model_version,
            request.sync,
            kind,
        )
        try:
            await asyncio.to_thread(b.queue.submit, job.id)
        except Exception as exc:
            await asyncio.to_thread(b.jobs.fail, job.id, f"could not queue the job: {exc}")
            raise IndexUnavailable(f"the job queue is unavailable: {exc}") from exc
        log.info("ingest job %s queued: %s -> %s", job.id, source, name)
        return ing_pb.CreateIngestJobResponse(job=job_pb(job))

    @rpc
    async def ListIngestJobFailures(self, request: Any, context: Any) -> Any:
        size = request.page_size or 1000
        if size < 0:
            raise BadRequest(f"page_size {size} is negative")
        if size > 10_000:
            raise BadRequest(f"page_size {size} exceeds the limit of 10000")
        page = await asyncio.to_thread(
            self.b.jobs.failures, request.id, request.page_token, size + 1
        )
        more = len(page) > size
        page = page[:size]
        return ing_pb.ListIngestJobFailuresResponse(
            failures=[ing_pb.ObjectFailure(uri=u, reason=r) for u, r in page],
            next_page_token=page[-1][0] if more else "",
        )

    @rpc
    async def GetIngestJob(self, request: Any, context: Any) -> Any:
        job = await asyncio.to_thread(self.b.jobs.get, request.id)
        return ing_pb.GetIngestJobResponse(job=job_pb(job))

    async def WatchIngestJob(self, request: Any, context: Any) -> AsyncIterator[Any]:
        last = None
        while True:
            try:
                job = await asyncio.to_thread(self.b.jobs.get, request.id)
            except Exception as exc:
                await _abort(context, exc, "WatchIngestJob")
                return
            snapshot = (job.state, job.total, job.processed, job.listing_done)
            if snapshot != last:
                last = snapshot
                yield ing_pb.WatchIngestJobResponse(job=job_pb(job))
            if job.state.terminal:
                return
            await asyncio.sleep(WATCH_POLL_S)

    @rpc
    async def CancelIngestJob(self, request: Any, context: Any) -> Any:
        job = await asyncio.to_thread(self.b.jobs.cancel, request.id)
        return ing_pb.CancelIngestJobResponse(job=job_pb(job))

    @rpc
    async def ListIngestJobs(self, request: Any, context: Any) -> Any:
        size = request.page_size or 50
        if size < 0:
            raise BadRequest(f"page_size {size} is negative")
        if size > 1000:
            raise BadRequest("page_size exceeds the limit of 1000")
        jobs = await asyncio.to_thread(self.b.jobs.list, request.collection, size)
        return ing_pb.ListIngestJobsResponse(jobs=[job_pb(j) for j in jobs])


# -- internal index access --------------------------------------------------------------------
class IndexServicer(idx_grpc.IndexServiceServicer):
    """Lets workers use an embedded index that this process owns."""

    def __init__(self, backend: Backend) -> None:
        self.b = backend

    @rpc
    async def EnsureCollection(self, request: Any, context: Any) -> Any:
        name = check_collection(request.collection)
        if not request.vectors:
            raise BadRequest("no vectors given")
        for vec, size in request.vectors.items():
            if not VECTOR_NAME.match(vec) or not 1 <= size <= MAX_VECTOR_SIZE:
                raise BadRequest(
                    f"bad vector {vec!r} of size {size}: a lower-case name and a size in "
                    f"1..{MAX_VECTOR_SIZE}"
                )
        if not request.model_version.strip():
            raise BadRequest("model_version is empty")
        await asyncio.to_thread(
            self.b.index.ensure_collection, name, dict(request.vectors), request.model_version
        )
        return idx_pb.EnsureCollectionResponse()

    @rpc
    async def GetEtags(self, request: Any, context: Any) -> Any:
        etags = await asyncio.to_thread(
            self.b.index.get_etags, check_collection(request.collection), list(request.ids)
        )
        return idx_pb.GetEtagsResponse(etags=etags)

    @rpc
    async def UpsertPoints(self, request: Any, context: Any) -> Any:
        name = check_collection(request.collection)
        points = []
        for i, p in enumerate(request.points):
            vectors: dict[str, Sequence[float]] = {k: list(v.values) for k, v in p.vectors.items()}
            if not vectors or not all(v and all(map(math.isfinite, v)) for v in vectors.values()):
                raise BadRequest(f"points[{i}]: every point needs finite, non-empty vectors")
            points.append(
                Point(
                    id=check_point_id(p.id, f"points[{i}].id"),
                    vectors=vectors,
                    payload=json_format.MessageToDict(p.payload),
                )
            )
        try:
            await asyncio.to_thread(self.b.index.upsert, name, points)
        except ValueError as exc:  # the index refused the vectors (unknown name, wrong size)
            if "Wrong input" not in str(exc):
                raise
            raise BadRequest(f"points do not fit collection {name!r}: {exc}") from exc
        return idx_pb.UpsertPointsResponse()

    @rpc
    async def ListSourcePoints(self, request: Any, context: Any) -> Any:
        ids, token = await asyncio.to_thread(
            self.b.index.source_ids,
            check_collection(request.collection),
            request.source,
            check_point_id(request.page_token, "page_token") if request.page_token else None,
            max(1, min(request.page_size or 1000, 10_000)),
        )
        return idx_pb.ListSourcePointsResponse(ids=ids, next_page_token=token or "")

    @rpc
    async def DeletePoints(self, request: Any, context: Any) -> Any:
        name = check_collection(request.collection)
        ids = [check_point_id(x, f"ids[{i}]") for i, x in enumerate(request.ids)]
        await asyncio.to_thread(self.b.index.delete, name, ids)
        return idx_pb.DeletePointsResponse()


def check_point_id(value: str, what: str) -> str:
    """Point ids are UUIDs (``imagine.index.point_id``)."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise BadRequest(f"{what} {value[:64]!r} is not a point id (a UUID)") from None


def add_all(server: grpc.aio.Server, backend: Backend, with_index: bool) -> list[str]:
    """Register every servicer; returns the full service names (for reflection)."""
    ret_grpc.add_RetrievalServiceServicer_to_server(RetrievalServicer(backend), server)
    ing_grpc.add_IngestionServiceServicer_to_server(IngestionServicer(backend), server)
    col_grpc.add_CollectionServiceServicer_to_server(CollectionServicer(backend), server)
    mod_grpc.add_ModelServiceServicer_to_server(ModelServicer(backend), server)
    names = [
        ret_pb.DESCRIPTOR.services_by_name["RetrievalService"].full_name,
        ing_pb.DESCRIPTOR.services_by_name["IngestionService"].full_name,
        col_pb.DESCRIPTOR.services_by_name["CollectionService"].full_name,
        mod_pb.DESCRIPTOR.services_by_name["ModelService"].full_name,
    ]
    if with_index:
        idx_grpc.add_IndexServiceServicer_to_server(IndexServicer(backend), server)
        names.append(idx_pb.DESCRIPTOR.services_by_name["IndexService"].full_name)
    return names
