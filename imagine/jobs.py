"""Ingestion job records: state, counts, per-object failures. Persisted, shared by processes.

The embedded profile keeps them in SQLite under ``IMAGINE_DATA_DIR`` (WAL mode, so the query
service reads while workers write). Chunk results are recorded once per chunk number, so a chunk
task that is retried after a crash never counts its objects twice.

Nothing is lost when a message is: every chunk is written to an outbox (its keys and etags) before
it is queued, a worker claims it when it starts and the record is deleted when its outcome is
counted. :meth:`SqliteJobStore.due` finds what must be queued again — chunks claimed by a worker
that stopped answering (SIGKILL, OOM, lost node) and, when the whole system made no progress for
a lease, chunks and jobs whose messages the broker lost (a restart without persistence).
Redelivery is safe because chunks are idempotent; a chunk lost ``max_attempts`` times fails its
job with the reason instead of looping.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

TASK_RUN_JOB = "imagine.ingest.run_job"
TASK_RUN_CHUNK = "imagine.ingest.run_chunk"
MAX_FAILURES_SHOWN = 100


class JobState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    SUCCEEDED_WITH_ERRORS = "SUCCEEDED_WITH_ERRORS"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


class JobNotFound(KeyError):
    pass


@dataclass
class Job:
    id: str
    collection: str
    source: str
    state: JobState
    model_version: str = ""
    chunk_size: int = 256
    metadata: dict[str, str] = field(default_factory=dict)
    total: int = 0
    embedded: int = 0
    skipped: int = 0
    failed: int = 0
    listing_done: bool = False
    num_chunks: int = 0
    chunks_done: int = 0
    error: str = ""
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    sync: bool = False  # remove points of this source whose objects are gone
    removed: int = 0
    kind: str = "images"  # what the gallery holds: "images" or "texts"

    @property
    def processed(self) -> int:
        return self.embedded + self.skipped + self.failed

    def objects_per_second(self, now: float | None = None) -> float:
        """Processed objects per second from start to end (or to ``now`` while running)."""
        if not self.started_at:
            return 0.0
        end = self.finished_at or (time.time() if now is None else now)
        return self.processed / max(end - self.started_at, 1e-6)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY, collection TEXT NOT NULL, source TEXT NOT NULL, state TEXT NOT NULL,
  model_version TEXT NOT NULL DEFAULT '', chunk_size INTEGER NOT NULL, metadata TEXT NOT NULL,
  total INTEGER NOT NULL DEFAULT 0, embedded INTEGER NOT NULL DEFAULT 0,
  skipped INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
  listing_done INTEGER NOT NULL DEFAULT 0, num_chunks INTEGER NOT NULL DEFAULT 0,
  chunks_done INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '',
  created_at REAL NOT NULL, started_at REAL NOT NULL DEFAULT 0, finished_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_collection ON jobs(collection, created_at);
CREATE TABLE IF NOT EXISTS chunks (
  job_id TEXT NOT NULL, chunk INTEGER NOT NULL, PRIMARY KEY (job_id, chunk)
);
CREATE TABLE IF NOT EXISTS failures (
  job_id TEXT NOT NULL, uri TEXT NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (job_id, uri)
);
CREATE TABLE IF NOT EXISTS outbox (
  job_id TEXT NOT NULL, chunk INTEGER NOT NULL, items TEXT NOT NULL,
  submitted_at REAL NOT NULL, claimed_at REAL NOT NULL DEFAULT 0,
  lost INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (job_id, chunk)
);
CREATE TABLE IF NOT EXISTS listed (
  job_id TEXT NOT NULL, point_id TEXT NOT NULL, PRIMARY KEY (job_id, point_id)
);
CREATE TABLE IF NOT EXISTS progress (id INTEGER PRIMARY KEY CHECK (id = 0), at REAL NOT NULL);
INSERT INTO progress (id, at) VALUES (0, 0) ON CONFLICT DO NOTHING;
"""
# columns added after the first release: (name, declaration), applied to older files on open
# touched_at: the lister's last sign of life; requeued_at: when the redeliverer last queued
# the job task again (kept apart, so a re-queue does not look like a live lister).
_MIGRATIONS = (
    ("touched_at", "REAL NOT NULL DEFAULT 0"),
    ("requeued_at", "REAL NOT NULL DEFAULT 0"),
    ("sync", "INTEGER NOT NULL DEFAULT 0"),
    ("removed", "INTEGER NOT NULL DEFAULT 0"),
    ("kind", "TEXT NOT NULL DEFAULT 'images'"),
)
_COLUMNS = (
    "id, collection, source, state, model_version, chunk_size, metadata, total, embedded, "
    "skipped, failed, listing_done, num_chunks, chunks_done, error, created_at, started_at, "
    "finished_at, sync, removed, kind"
)


class _Db(Protocol):
    """What the store needs of a connection (sqlite3's API; PostgreSQL's through _PgDb)."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Any: ...


class JobStoreUnavailable(ConnectionError):
    """The job store's database cannot be reached (retry later)."""


@dataclass(frozen=True)
class Redelivery:
    """A task to queue again: the job task (``chunk is None``) or one chunk with its items."""

    job_id: str
    chunk: int | None = None
    items: list[list[str]] = field(default_factory=list)


GALLERY_KINDS = ("images", "texts")


class SqliteJobStore:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        db = self._conn()
        assert isinstance(db, sqlite3.Connection)
        db.executescript(_SCHEMA)
        have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        for name, decl in _MIGRATIONS:
            if name not in have:
                db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")

    def _conn(self) -> _Db:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[_Db]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- writes -----------------------------------------------------------------------------
    def create(
        self,
        collection: str,
        source: str,
        chunk_size: int,
        metadata: dict[str, str] | None = None,
        model_version: str = "",
        sync: bool = False,
        kind: str = "images",
    ) -> Job:
        if kind not in GALLERY_KINDS:
            raise ValueError(f"unknown gallery kind {kind!r}; use {', '.join(GALLERY_KINDS)}")
        job_id = uuid.uuid4().hex[:16]
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, collection, source, state, model_version, chunk_size, "
                "metadata, created_at, sync, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    collection,
                    source,
                    JobState.QUEUED.value,
                    model_version,
                    chunk_size,
                    json.dumps(metadata or {}),
                    time.time(),
                    int(sync),
                    kind,
                ),
            )
        return self.get(job_id)

    def claim_listing(self, job_id: str, lease_s: float) -> bool:
        """May this job task list the source? QUEUED -> RUNNING, or take over a listing whose
        lister has been silent for a lease. A duplicate job task gets False and does nothing."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state=?, started_at=?, touched_at=? WHERE id=? AND state=?",
                (JobState.RUNNING.value, now, now, job_id, JobState.QUEUED.value),
            )
            if cur.rowcount == 0:
                cur = db.execute(
                    "UPDATE jobs SET touched_at=? WHERE id=? AND state=? AND listing_done=0 "
                    "AND touched_at < ?",
                    (now, job_id, JobState.RUNNING.value, now - lease_s),
                )
            if cur.rowcount:
                _progress(db, now)
            elif not db.execute("SELECT 1 FROM jobs WHERE id=?", (job_id,)).fetchone():
                raise JobNotFound(f"ingest job {job_id!r} not found")
            return cur.rowcount > 0

    # -- sync mode: the ids a listing found, to sweep the points of objects that are gone ----
    def add_listed(self, job_id: str, point_ids: Sequence[str]) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT INTO listed (job_id, point_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
                [(job_id, pid) for pid in point_ids],
            )

    def not_listed(self, job_id: str, point_ids: Sequence[str]) -> list[str]:
        """Those of ``point_ids`` the job's listing did not find."""
        db = self._conn()
        found: set[str] = set()
        for i in range(0, len(point_ids), 500):
            part = list(point_ids[i : i + 500])
            marks = ",".join("?" * len(part))
            found.update(
                r[0]
                for r in db.execute(
                    f"SELECT point_id FROM listed WHERE job_id=? AND point_id IN ({marks})",
                    (job_id, *part),
                )
            )
        return [pid for pid in point_ids if pid not in found]

    def finish_sweep(self, job_id: str, removed: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET removed=? WHERE id=?", (removed, job_id))
            db.execute("DELETE FROM listed WHERE job_id=?", (job_id,))
            _progress(db, time.time())

    def release_listing(self, job_id: str) -> None:
        """The lister failed (and will be retried): let the next job task list at once."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET touched_at=0 WHERE id=? AND state=? AND listing_done=0",
                (job_id, JobState.RUNNING.value),
            )

    def update_listed(self, job_id: str, total: int) -> None:
        """Progress of a listing still under way."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET total=?, touched_at=? WHERE id=? AND listing_done=0",
                (total, now, job_id),
            )
            _progress(db, now)

    def add_chunk(self, job_id: str, chunk: int, items: list[list[str]]) -> None:
        """Write a chunk to the outbox before it is queued (a re-listing keeps the first)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO outbox (job_id, chunk, items, submitted_at) "
                "SELECT ?, ?, ?, ? WHERE NOT EXISTS "
                "(SELECT 1 FROM chunks WHERE job_id=? AND chunk=?) ON CONFLICT DO NOTHING",
                (job_id, chunk, json.dumps(items), time.time(), job_id, chunk),
            )

    def claim_chunk(self, job_id: str, chunk: int) -> bool:
        """A worker starts a chunk; False when its outcome is already counted (a duplicate)."""
        now = time.time()
        with self._tx() as db:
            if db.execute(
                "SELECT 1 FROM chunks WHERE job_id=? AND chunk=?", (job_id, chunk)
            ).fetchone():
                return False
            db.execute(
                "UPDATE outbox SET claimed_at=? WHERE job_id=? AND chunk=?", (now, job_id, chunk)
            )
            _progress(db, now)
        return True

    def set_listing(self, job_id: str, total: int, num_chunks: int) -> Job:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET total=?, num_chunks=?, listing_done=1 WHERE id=?",
                (total, num_chunks, job_id),
            )
            self._maybe_finish(db, job_id)
        return self.get(job_id)

    def record_chunk(
        self,
        job_id: str,
        chunk: int,
        embedded: int,
        skipped: int,
        failures: list[tuple[str, str]],
    ) -> bool:
        """Count a chunk's outcome once; returns False if it was already counted."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO chunks (job_id, chunk) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (job_id, chunk),
            )
            if cur.rowcount == 0:
                return False
            db.execute("DELETE FROM outbox WHERE job_id=? AND chunk=?", (job_id, chunk))
            _progress(db, time.time())
            db.executemany(
                "INSERT INTO failures (job_id, uri, reason) VALUES (?, ?, ?) "
                "ON CONFLICT (job_id, uri) DO UPDATE SET reason = excluded.reason",
                [(job_id, uri, reason) for uri, reason in failures],
            )
            db.execute(
                "UPDATE jobs SET embedded=embedded+?, skipped=skipped+?, failed=failed+?, "
                "chunks_done=chunks_done+1 WHERE id=?",
                (embedded, skipped, len(failures), job_id),
            )
            self._maybe_finish(db, job_id)
        return True

    def fail(self, job_id: str, error: str) -> Job:
        return self._end(job_id, JobState.FAILED, error)

    def cancel(self, job_id: str) -> Job:
        return self._end(job_id, JobState.CANCELLED, "cancelled by request")

    def _end(self, job_id: str, state: JobState, error: str) -> Job:
        with self._tx() as db:
            db.execute("DELETE FROM outbox WHERE job_id=?", (job_id,))
            db.execute(
                "UPDATE jobs SET state=?, error=?, finished_at=? WHERE id=? AND state IN (?, ?)",
                (
                    state.value,
                    error,
                    time.time(),
                    job_id,
                    JobState.QUEUED.value,
                    JobState.RUNNING.value,
                ),
            )
        return self.get(job_id)

    def _maybe_finish(self, db: _Db, job_id: str) -> None:
        row = db.execute(
            "SELECT state, listing_done, num_chunks, chunks_done, failed FROM jobs WHERE id=?",
            (job_id,),
        ).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        state, listing_done, num_chunks, chunks_done, failed = row
        if state != JobState.RUNNING.value or not listing_done or chunks_done < num_chunks:
            return
        final = JobState.SUCCEEDED_WITH_ERRORS if failed else JobState.SUCCEEDED
        db.execute(
            "UPDATE jobs SET state=?, finished_at=? WHERE id=?", (final.value, time.time(), job_id)
        )

    def due(self, lease_s: float, max_attempts: int, now: float | None = None) -> list[Redelivery]:
        """What to queue again now, marked as re-queued (call it from one place, periodically).

        - a chunk claimed more than a lease ago and not counted: its worker died or hangs;
          after ``max_attempts`` such losses the job fails with the reason;
        - when nothing anywhere progressed for a lease: chunks queued more than a lease ago
          and never claimed, and job tasks that never started or stopped listing — the broker
          lost them (while workers are busy, a queue backlog is not mistaken for a loss).
        """
        now = time.time() if now is None else now
        stale = now - lease_s
        out: list[Redelivery] = []
        with self._tx() as db:
            running = JobState.RUNNING.value
            rows = db.execute(
                "SELECT o.job_id, o.chunk, o.items, o.lost FROM outbox o JOIN jobs j "
                "ON j.id = o.job_id WHERE j.state=? AND o.claimed_at > 0 AND o.claimed_at < ? "
                "ORDER BY o.job_id, o.chunk",
                (running, stale),
            ).fetchall()
            failed_jobs: dict[str, str] = {}
            for job_id, chunk, items, lost in rows:
                if lost + 1 >= max_attempts:
                    failed_jobs.setdefault(
                        job_id,
                        f"chunk {chunk} was lost {lost + 1} times (its worker died or hung "
                        f"for over {lease_s:g} s each time); giving up",
                    )
                    continue
                db.execute(
                    "UPDATE outbox SET claimed_at=0, submitted_at=?, lost=lost+1 "
                    "WHERE job_id=? AND chunk=?",
                    (now, job_id, chunk),
                )
                out.append(Redelivery(job_id, chunk, json.loads(items)))
            for job_id, reason in failed_jobs.items():
                db.execute("DELETE FROM outbox WHERE job_id=?", (job_id,))
                db.execute(
                    "UPDATE jobs SET state=?, error=?, finished_at=? WHERE id=? AND state=?",
                    (JobState.FAILED.value, reason, now, job_id, running),
                )
                out = [r for r in out if r.job_id != job_id]
            (last,) = db.execute("SELECT at FROM progress WHERE id=0").fetchone()
            if last < stale:
                for job_id, chunk, items in db.execute(
                    "SELECT o.job_id, o.chunk, o.items FROM outbox o JOIN jobs j "
                    "ON j.id = o.job_id WHERE j.state=? AND o.claimed_at = 0 "
                    "AND o.submitted_at < ? ORDER BY o.job_id, o.chunk",
                    (running, stale),
                ).fetchall():
                    db.execute(
                        "UPDATE outbox SET submitted_at=? WHERE job_id=? AND chunk=?",
                        (now, job_id, chunk),
                    )
                    out.append(Redelivery(job_id, chunk, json.loads(items)))
                for (job_id,) in db.execute(
                    "SELECT id FROM jobs WHERE (state=? OR (state=? AND listing_done=0)) "
                    "AND touched_at < ? AND created_at < ? AND requeued_at < ? "
                    "ORDER BY created_at",
                    (JobState.QUEUED.value, running, stale, stale, stale),
                ).fetchall():
                    db.execute("UPDATE jobs SET requeued_at=? WHERE id=?", (now, job_id))
                    out.append(Redelivery(job_id))
        return out

    # -- reads ------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        db = self._conn()
        row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"ingest job {job_id!r} not found")
        failures = db.execute(
            "SELECT uri, reason FROM failures WHERE job_id=? ORDER BY uri LIMIT ?",
            (job_id, MAX_FAILURES_SHOWN),
        ).fetchall()
        return _job(row, failures)

    def list(self, collection: str = "", limit: int = 50) -> list[Job]:
        db = self._conn()
        if collection:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE collection=? ORDER BY created_at DESC LIMIT ?",
                (collection, limit),
            ).fetchall()
        else:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_job(r, []) for r in rows]

    def failures(
        self, job_id: str, after: str = "", limit: int = 1000
    ) -> Sequence[tuple[str, str]]:
        """A page of the job's per-object failures (uri, reason), by uri, after ``after``."""
        db = self._conn()
        if not db.execute("SELECT 1 FROM jobs WHERE id=?", (job_id,)).fetchone():
            raise JobNotFound(f"ingest job {job_id!r} not found")
        rows = db.execute(
            "SELECT uri, reason FROM failures WHERE job_id=? AND uri > ? ORDER BY uri LIMIT ?",
            (job_id, after, limit),
        ).fetchall()
        return [(u, r) for u, r in rows]


def _progress(db: _Db, now: float) -> None:
    db.execute("UPDATE progress SET at=? WHERE id=0", (now,))


def _job(row: tuple[Any, ...], failures: list[tuple[str, str]]) -> Job:
    (jid, coll, src, state, mv, cs, meta, total, emb, skp, fld, ld, nc, cd, err, ca, sa, fa,
     sync, removed, kind) = row  # fmt: skip
    return Job(
        id=jid,
        collection=coll,
        source=src,
        state=JobState(state),
        model_version=mv,
        chunk_size=cs,
        metadata=json.loads(meta),
        total=total,
        embedded=emb,
        skipped=skp,
        failed=fld,
        listing_done=bool(ld),
        num_chunks=nc,
        chunks_done=cd,
        error=err,
        created_at=ca,
        started_at=sa,
        finished_at=fa,
        failures=[(u, r) for u, r in failures],
        sync=bool(sync),
        removed=removed,
        kind=kind,
    )


# -- PostgreSQL: one job store for ingresses and workers on many nodes -------------------------
_PG_LOCK = 0x1A6E  # the advisory lock that serialises writers, as SQLite's BEGIN IMMEDIATE does


def _pg_sql(sql: str) -> str:
    return sql.replace("?", "%s")


def _pg_ddl(sql: str) -> str:
    # SQLite's REAL is 8 bytes; PostgreSQL's is 4 (unix times would lose minutes)
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)


class _PgDb:
    """sqlite3's ``execute``/``executemany`` on a psycopg connection (``?`` -> ``%s``); a lost
    connection raises :class:`JobStoreUnavailable` and is replaced on the next call."""

    def __init__(self, conn: Any, on_lost: Any) -> None:
        self._conn = conn
        self._on_lost = on_lost

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Any:
        import psycopg

        try:
            return self._conn.execute(_pg_sql(sql), params)
        except psycopg.OperationalError as exc:
            self._on_lost()
            raise JobStoreUnavailable(f"job store unreachable: {exc}") from exc

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Any:
        import psycopg

        try:
            with self._conn.cursor() as cur:
                cur.executemany(_pg_sql(sql), list(rows))
        except psycopg.OperationalError as exc:
            self._on_lost()
            raise JobStoreUnavailable(f"job store unreachable: {exc}") from exc


class PostgresJobStore(SqliteJobStore):
    """The same job records in PostgreSQL (``IMAGINE_JOBS_URL=postgresql://...``), so ingresses
    and workers on several nodes share them. Same SQL; writers are serialised by a transaction
    advisory lock, as SQLite serialises them, so every invariant of the SQLite store holds."""

    def __init__(self, url: str, connect_timeout_s: int = 10) -> None:
        self.url = url
        self._timeout = connect_timeout_s
        self._local = threading.local()
        with self._tx() as db:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(_pg_ddl(stmt))
            for name, decl in _MIGRATIONS:
                db.execute(f"ALTER TABLE jobs ADD COLUMN IF NOT EXISTS {name} {_pg_ddl(decl)}")

    def _conn(self) -> _Db:
        db = getattr(self._local, "conn", None)
        if db is None:
            import psycopg

            try:
                conn = psycopg.connect(self.url, autocommit=True, connect_timeout=self._timeout)
            except psycopg.OperationalError as exc:
                raise JobStoreUnavailable(f"job store unreachable: {exc}") from exc
            db = _PgDb(conn, self._lost)
            self._local.conn = db
        return db

    def _lost(self) -> None:
        db = getattr(self._local, "conn", None)
        self._local.conn = None
        if db is not None:
            with contextlib.suppress(Exception):
                db._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[_Db]:
        db = self._conn()
        db.execute("BEGIN")
        try:
            db.execute(f"SELECT pg_advisory_xact_lock({_PG_LOCK})")
            yield db
        except BaseException:
            with contextlib.suppress(Exception):
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def open_job_store(jobs_url: str | None, sqlite_path: Path) -> SqliteJobStore:
    """PostgreSQL when ``jobs_url`` names it, else SQLite at ``sqlite_path`` (one node)."""
    if not jobs_url:
        return SqliteJobStore(sqlite_path)
    if jobs_url.startswith(("postgresql://", "postgres://")):
        return PostgresJobStore(jobs_url)
    raise ValueError(f"unsupported jobs_url {jobs_url!r}: use postgresql://user:pass@host/db")
