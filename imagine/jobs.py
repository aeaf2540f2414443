"""Ingestion job records: state, counts, per-object failures. Persisted, shared by processes.

The embedded profile keeps them in SQLite under ``IMAGINE_DATA_DIR`` (WAL mode, so the query
service reads while workers write). Chunk results are recorded once per chunk number, so a chunk
task that is retried after a crash never counts its objects twice.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

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

    @property
    def processed(self) -> int:
        return self.embedded + self.skipped + self.failed


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
"""
_COLUMNS = (
    "id, collection, source, state, model_version, chunk_size, metadata, total, embedded, "
    "skipped, failed, listing_done, num_chunks, chunks_done, error, created_at, started_at, "
    "finished_at"
)


class SqliteJobStore:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
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
    ) -> Job:
        job_id = uuid.uuid4().hex[:16]
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, collection, source, state, model_version, chunk_size, "
                "metadata, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    collection,
                    source,
                    JobState.QUEUED.value,
                    model_version,
                    chunk_size,
                    json.dumps(metadata or {}),
                    time.time(),
                ),
            )
        return self.get(job_id)

    def start(self, job_id: str) -> Job:
        """QUEUED -> RUNNING (a retried job task finds it RUNNING and goes on)."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state=?, started_at=? WHERE id=? AND state=?",
                (JobState.RUNNING.value, time.time(), job_id, JobState.QUEUED.value),
            )
        return self.get(job_id)

    def update_listed(self, job_id: str, total: int) -> None:
        """Progress of a listing still under way."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET total=? WHERE id=? AND listing_done=0", (total, job_id))

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
                "INSERT OR IGNORE INTO chunks (job_id, chunk) VALUES (?, ?)", (job_id, chunk)
            )
            if cur.rowcount == 0:
                return False
            db.executemany(
                "INSERT OR REPLACE INTO failures (job_id, uri, reason) VALUES (?, ?, ?)",
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

    def _maybe_finish(self, db: sqlite3.Connection, job_id: str) -> None:
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


def _job(row: tuple[Any, ...], failures: list[tuple[str, str]]) -> Job:
    (jid, coll, src, state, mv, cs, meta, total, emb, skp, fld, ld, nc, cd, err, ca, sa, fa) = row
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
    )
