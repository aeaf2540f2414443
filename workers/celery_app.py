"""The Celery app and its tasks. Tasks are adapters (arguments, retries); the logic is in
``workers.ingest``. Tasks are idempotent, so they are acknowledged late and retried with backoff
on transient errors; a task that gives up marks its job FAILED with the reason.

Run a worker with ``python -m workers`` (or ``imagine worker``); settings come from the
environment (``IMAGINE_BROKER_URL``, ``IMAGINE_GRPC_ADDRESS``, ``IMAGINE_QDRANT__URL``, ...).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, Task, signals

from imagine.config import WorkerSettings, load_worker_settings
from imagine.index import IndexUnavailable
from imagine.jobs import TASK_RUN_CHUNK, TASK_RUN_JOB, SqliteJobStore, open_job_store
from imagine.observability import WORKER_TASKS, redact
from imagine.observability import job_id as current_job
from imagine.queueing import broker_config
from imagine.storage import StoreUnavailable, open_store
from workers.ingest import IngestContext, run_chunk, run_job
from workers.remote import TransientError

log = logging.getLogger("imagine.worker")
RETRY_ON = (TransientError, StoreUnavailable, IndexUnavailable, ConnectionError, TimeoutError)


class _Context:
    """Connections a worker process opens once, on first use."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self._ctx: IngestContext | None = None
        self._lock = threading.Lock()

    def get(self) -> IngestContext:
        with self._lock:
            if self._ctx is None:
                self._ctx = self._build()
            return self._ctx

    def jobs(self) -> SqliteJobStore:
        return open_job_store(self.settings.jobs_url, self.settings.jobs_path)

    def _build(self) -> IngestContext:
        from imagine.client import ImagineClient
        from imagine.index import PointStore, QdrantIndex
        from workers.remote import GrpcEncoder, RemoteIndex

        s = self.settings
        client = ImagineClient(
            s.grpc_address,
            timeout_s=300,
            api_key=s.api_key,
            ca_file=s.ca_file,
            request_id=_job_request_id,  # the ingress and the encoders log the job's id
        )
        index: PointStore
        if s.qdrant.url:
            index = QdrantIndex.from_settings(s.qdrant, s.qdrant_path)
        else:
            index = RemoteIndex(client.channel)
        return IngestContext(
            jobs=self.jobs(),
            index=index,
            open_store=lambda source: open_store(source, s.storage),
            encoder=GrpcEncoder(client),
            encode_batch=s.encode_rpc_batch,
            lease_s=s.job_lease_s,
            max_object_bytes=s.max_object_bytes,
        )


def create_app(settings: WorkerSettings | None = None) -> Celery:
    cfg = settings or load_worker_settings()
    app = Celery("imagine")
    app.conf.update(broker_config(cfg))
    app.conf.worker_hijack_root_logger = False  # our JSON lines, with the job id
    context = _Context(cfg)

    class JobTask(Task):  # type: ignore[misc]
        autoretry_for = RETRY_ON
        retry_backoff = 1
        retry_backoff_max = cfg.task_retry_backoff_max_s
        retry_jitter = True
        max_retries = cfg.task_max_retries
        acks_late = True
        reject_on_worker_lost = True

        def on_failure(
            self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any
        ) -> None:
            job_id = args[0] if args else kwargs.get("job_id")
            reason = redact(f"{type(exc).__name__}: {exc}")
            log.error("task %s for job %s failed: %s", self.name, job_id, reason)
            if job_id:
                context.jobs().fail(job_id, reason)

    @app.task(name=TASK_RUN_JOB, base=JobTask, bind=True)
    def ingest_job(self: Task, job_id: str) -> None:
        def submit(chunk_no: int, items: list[tuple[str, ...]]) -> None:
            ingest_chunk.apply_async(args=[job_id, chunk_no, [list(i) for i in items]])

        run_job(context.get(), job_id, submit)

    @app.task(name=TASK_RUN_CHUNK, base=JobTask, bind=True)
    def ingest_chunk(self: Task, job_id: str, chunk_no: int, items: list[list[str]]) -> None:
        run_chunk(context.get(), job_id, chunk_no, [tuple(i) for i in items])

    return app


def _job_request_id() -> str:
    job = current_job.get()
    return f"job-{job}" if job else ""


def _short(name: str | None) -> str:
    return (name or "unknown").rsplit(".", 1)[-1]


# Every log line of a task carries its job id; each outcome is counted.
@signals.task_prerun.connect
def _on_prerun(task: Any = None, args: Any = None, **_: Any) -> None:
    current_job.set(str(args[0]) if args else "")


@signals.task_postrun.connect
def _on_postrun(**_: Any) -> None:
    current_job.set("")


@signals.task_success.connect
def _on_success(sender: Any = None, **_: Any) -> None:
    WORKER_TASKS.labels(_short(getattr(sender, "name", None)), "succeeded").inc()


@signals.task_retry.connect
def _on_retry(sender: Any = None, **_: Any) -> None:
    WORKER_TASKS.labels(_short(getattr(sender, "name", None)), "retried").inc()


@signals.task_failure.connect
def _on_failure(sender: Any = None, **_: Any) -> None:
    WORKER_TASKS.labels(_short(getattr(sender, "name", None)), "failed").inc()
