"""The ingestion logic: list a source, chunk it, embed chunks, upsert points. No Celery here.

A job task lists the source and fans out chunk tasks (keys and etags only, never image bytes).
Image galleries get each image's vectors (``image``, ``visual``) and, with a caption decoder, its
caption in the payload and the caption's text vector (``caption``). Text galleries
(``kind="texts"``: ``.txt`` objects, ``.jsonl`` objects or one local ``.jsonl`` file) get a
``text`` vector per text; their chunk items carry the (short) texts themselves.
A chunk task skips objects whose etag is unchanged, reads the rest, gets their vectors from the
encoder deployments, and upserts them under ids derived from the object identity. Bad objects
become per-object failures with a reason; they never stop the job. Chunk outcomes are counted
once per chunk number, so a retried or redelivered chunk never double-counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from imagine.index import Point, PointStore, point_id
from imagine.jobs import JobState, SqliteJobStore
from imagine.storage import ObjectNotFound, ObjectStore, ObjectStoreError, ObjectTooLarge

log = logging.getLogger("imagine.ingest")

MANIFEST_KEY = "manifest.jsonl"  # optional labels: {"image": "key", "label": "..."} per line

# One chunk item: (key, etag, label) for images; (key, etag, label, text, error) for texts
Item = tuple[str, ...]
MAX_TEXT_CHARS = 1000  # as the services accept (EncodeText)
MAX_TEXT_FILE_BYTES = 256 * 1024 * 1024


@dataclass
class Embedded:
    """What the models made of one image: named vectors and payload fields (its caption)."""

    vectors: dict[str, list[float]]
    payload: dict[str, Any] = field(default_factory=dict)


class Encoder(Protocol):
    """What the chunk task needs from the model deployments."""

    model_version: str

    def encode_images(self, images: list[bytes]) -> list[Embedded | str]:
        """Per image: its vectors and payload fields, or the reason it could not be encoded."""
        ...

    def encode_texts(self, texts: list[str]) -> list[list[float]]:
        """Per text: its joint-space vector (texts are non-empty and within the limit)."""
        ...


@dataclass
class IngestContext:
    jobs: SqliteJobStore
    index: PointStore
    open_store: Callable[[str], ObjectStore]
    encoder: Encoder
    encode_batch: int = 64
    lease_s: float = 300.0  # a lister silent this long is taken over (see imagine.jobs)
    max_object_bytes: int = 20 * 1024 * 1024  # larger objects are per-object failures


def read_labels(store: ObjectStore) -> dict[str, str]:
    try:
        raw = store.read(MANIFEST_KEY, max_bytes=256 * 1024 * 1024)
    except ObjectNotFound:
        return {}
    labels = {}
    for line in raw.decode("utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("image"):
            labels[str(rec["image"])] = str(rec.get("label", ""))
    return labels


def run_job(
    ctx: IngestContext, job_id: str, submit_chunk: Callable[[int, list[Item]], None]
) -> None:
    """List the source and fan out chunks, each written to the job's outbox before it is queued.

    A duplicate job task (redelivered while the listing is alive, or after it ended) does
    nothing; one that takes over a dead lister lists again, and the chunks it finds already in
    the outbox or counted keep their first version.
    """
    if not ctx.jobs.claim_listing(job_id, ctx.lease_s):
        log.info("job %s is %s; nothing to list", job_id, ctx.jobs.get(job_id).state.value)
        return
    try:
        _list_source(ctx, job_id, submit_chunk)
    except BaseException:
        ctx.jobs.release_listing(job_id)  # the task's retry lists again at once
        raise


def open_source(ctx: IngestContext, source: str) -> tuple[ObjectStore, str | None]:
    """The store of a source, and the one key to read when the source is a single local file
    (a text gallery's ``.jsonl``)."""
    path = Path(source.removeprefix("file://"))
    if "://" not in source.replace("file://", "") and path.suffix == ".jsonl":
        return ctx.open_store(str(path.parent)), path.name
    return ctx.open_store(source), None


def _image_items(store: ObjectStore) -> Iterator[Item]:
    labels = read_labels(store)
    for obj in store.list():
        if obj.key != MANIFEST_KEY:
            yield (obj.key, obj.etag, labels.get(obj.key, ""))


def _text_item(key: str, text: Any, label: Any) -> Item:
    if not isinstance(text, str) or not text.strip():
        return (key, "", "", "", "no text: a record needs a non-empty string 'text'")
    if len(text) > MAX_TEXT_CHARS:
        return (key, "", "", "", f"text exceeds the limit of {MAX_TEXT_CHARS} characters")
    label = label if isinstance(label, str) else ""
    etag = hashlib.sha256(f"{text}\0{label}".encode()).hexdigest()[:32]
    return (key, etag, label, text.strip(), "")


def _text_items(store: ObjectStore, only: str | None, max_bytes: int) -> Iterator[Item]:
    """Texts of a text gallery: each ``.txt`` object is one text; each ``.jsonl`` line a record
    ``{"text": ..., "id": ..., "label": ...}`` (key ``FILE#ID``, or ``FILE#LINE`` without id)."""
    objects = [store.stat(only)] if only else store.list()
    for obj in objects:
        if obj.key.endswith(".txt"):
            try:
                raw = store.read(obj.key, max_bytes=max_bytes)
            except ObjectTooLarge as exc:
                yield (obj.key, "", "", "", f"object too large: {exc}")
                continue
            yield _text_item(obj.key, raw.decode("utf-8", errors="replace"), "")
        elif obj.key.endswith(".jsonl"):
            raw = store.read(obj.key, max_bytes=MAX_TEXT_FILE_BYTES)
            lines = raw.decode("utf-8", errors="replace").splitlines()
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield (f"{obj.key}#{lineno}", "", "", "", f"line {lineno} is not JSON: {exc}")
                    continue
                if not isinstance(rec, dict):
                    yield (f"{obj.key}#{lineno}", "", "", "", f"line {lineno} is not an object")
                    continue
                key = f"{obj.key}#{rec.get('id', lineno)}"
                yield _text_item(key, rec.get("text"), rec.get("label", ""))
        elif obj.key != MANIFEST_KEY:
            yield (obj.key, "", "", "", "not a text object: use .txt or .jsonl")


def _list_source(
    ctx: IngestContext, job_id: str, submit_chunk: Callable[[int, list[Item]], None]
) -> None:
    job = ctx.jobs.get(job_id)
    store, only = open_source(ctx, job.source)
    items = (
        _text_items(store, only, ctx.max_object_bytes)
        if job.kind == "texts"
        else _image_items(store)
    )
    chunk: list[Item] = []
    total = chunks = 0

    def flush() -> None:
        """Record the chunk (its ids too, in sync mode) in the job store, then queue it."""
        if job.sync:
            ctx.jobs.add_listed(job_id, [point_id(_uri(store, it[0])) for it in chunk])
        ctx.jobs.add_chunk(job_id, chunks, [list(i) for i in chunk])
        submit_chunk(chunks, chunk)

    for item in items:
        chunk.append(item)
        total += 1
        if len(chunk) >= job.chunk_size:
            if ctx.jobs.get(job_id).state is JobState.CANCELLED:
                return
            flush()
            ctx.jobs.update_listed(job_id, total)
            chunks, chunk = chunks + 1, []
    if chunk:
        flush()
        chunks += 1
    if job.sync:
        _sweep(ctx, job)
    ctx.jobs.set_listing(job_id, total, chunks)
    log.info("job %s: listed %d objects in %d chunks", job_id, total, chunks)


def _sweep(ctx: IngestContext, job: Any, page_size: int = 1000) -> None:
    """Sync mode: remove the collection's points of this source that the listing did not find
    (their objects are gone). Pages through the index; the listed ids are on disk (job store),
    so memory stays flat however large the gallery."""
    removed = 0
    token: str | None = None
    while True:
        ids, token = ctx.index.source_ids(job.collection, job.source, token, page_size)
        gone = ctx.jobs.not_listed(job.id, ids)
        ctx.index.delete(job.collection, gone)
        removed += len(gone)
        if token is None:
            break
    ctx.jobs.finish_sweep(job.id, removed)
    log.info("job %s: sync removed %d points whose objects are gone", job.id, removed)


def run_chunk(ctx: IngestContext, job_id: str, chunk_no: int, items: Sequence[Item]) -> None:
    job = ctx.jobs.get(job_id)
    if job.state.terminal:
        log.info("job %s is %s; chunk %d skipped", job_id, job.state.value, chunk_no)
        return
    if not ctx.jobs.claim_chunk(job_id, chunk_no):
        log.info("job %s: chunk %d is already counted; duplicate dropped", job_id, chunk_no)
        return
    if ctx.encoder.model_version != job.model_version:
        raise RuntimeError(
            f"the encoder serves {ctx.encoder.model_version}, "
            f"job {job_id} needs {job.model_version}"
        )
    store, _ = open_source(ctx, job.source)
    uris = {it[0]: _uri(store, it[0]) for it in items}
    ids = {key: point_id(uri) for key, uri in uris.items()}
    existing = ctx.index.get_etags(job.collection, list(ids.values()))
    todo = [it for it in items if not it[1] or existing.get(ids[it[0]]) != it[1]]
    skipped = len(items) - len(todo)
    failures: list[tuple[str, str]] = []
    points: list[Point] = []
    if job.kind == "texts":
        for start in range(0, len(todo), ctx.encode_batch):
            batch = [it for it in todo[start : start + ctx.encode_batch] if not it[4]]
            failures.extend((uris[it[0]], it[4]) for it in todo[start : start + ctx.encode_batch]
                            if it[4])  # fmt: skip
            text_vecs = ctx.encoder.encode_texts([it[3] for it in batch]) if batch else []
            for (key, etag, label, text, _), vec in zip(batch, text_vecs, strict=True):
                payload = _payload(job, uris[key], key, etag, label, len(text.encode()))
                points.append(Point(ids[key], {"text": vec}, payload | {"text": text}))
        ctx.index.upsert(job.collection, points)
        ctx.jobs.record_chunk(job_id, chunk_no, len(points), skipped, failures)
        return
    for start in range(0, len(todo), ctx.encode_batch):
        batch = todo[start : start + ctx.encode_batch]
        blobs, ok = [], []
        for key, etag, label in (it[:3] for it in batch):
            try:
                blobs.append(store.read(key, max_bytes=ctx.max_object_bytes))
                ok.append((key, etag, label))
            except ObjectTooLarge as exc:
                failures.append((uris[key], f"object too large: {exc}"))
            except ObjectNotFound:
                failures.append((uris[key], "object disappeared before it was read"))
            except ObjectStoreError as exc:
                if type(exc) is not ObjectStoreError:
                    raise  # unavailable store: retry the chunk
                failures.append((uris[key], f"unreadable object: {exc}"))
        vectors = ctx.encoder.encode_images(blobs) if blobs else []
        for (key, etag, label), emb, blob in zip(ok, vectors, blobs, strict=True):
            if isinstance(emb, str):
                failures.append((uris[key], emb))
                continue
            payload = _payload(job, uris[key], key, etag, label, len(blob))
            points.append(
                Point(id=ids[key], vectors=dict(emb.vectors), payload=payload | emb.payload)
            )
    ctx.index.upsert(job.collection, points)
    ctx.jobs.record_chunk(job_id, chunk_no, len(points), skipped, failures)


def _uri(store: ObjectStore, key: str) -> str:
    return store.root_uri.rstrip("/") + "/" + key


def _payload(job: Any, uri: str, key: str, etag: str, label: str, size: int) -> dict[str, Any]:
    payload: dict[str, Any] = dict(job.metadata)
    payload.update(
        {
            "source_uri": uri,
            "source": job.source,
            "key": key,
            "etag": etag,
            "size": size,
            "job_id": job.id,
            "ingested_at": time.time(),
        }
    )
    if label:
        payload["label"] = label
    return payload
