"""Ingestion under faults, with real processes, on every broker we support.

The same tests run with the embedded ``filesystem://`` broker, Redis (a server of our own) and
RabbitMQ (the one on loopback, on a queue of our own). The stacks run without their built-in
worker: each test starts real ``python -m workers`` processes, kills them with SIGKILL, restarts
the broker, and then checks exact point counts. Leases are short (``IMAGINE_JOB_LEASE_S``) so
redelivery happens within seconds.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagine.client import state_name
from tests.conftest import (
    POISON_REASONS,
    ROOT,
    RedisServer,
    Stack,
    free_port,
    make_gallery,
    start_stack,
)

pytestmark = pytest.mark.integration

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
LEASE_S = 4


class Worker:
    """A real Celery ingestion worker process, in its own session so SIGKILL reaches it all."""

    def __init__(self, stack: Stack, **env: str) -> None:
        self.log = stack.data_dir / f"worker-{uuid.uuid4().hex[:6]}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers"],
            env={**stack.env, "IMAGINE_CONCURRENCY": "1", **env},
            cwd=ROOT,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def sigkill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.sigkill()


@pytest.fixture
def workers(broker_stack: Stack) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:
        w.stop()


@pytest.fixture(scope="module", params=["filesystem", "redis", "rabbitmq"])
def broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, RedisServer | None]]:
    """(name, broker URL, our Redis server or None); the filesystem broker is the default."""
    if request.param == "filesystem":
        yield "filesystem", "", None
    elif request.param == "redis":
        server = RedisServer(tmp_path_factory.mktemp("redis"))
        yield "redis", server.url, server
        server.stop()
    else:
        yield "rabbitmq", RABBITMQ_URL, None


@pytest.fixture(scope="module")
def broker_stack(
    broker: tuple[str, str, RedisServer | None], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    name, url, _ = broker
    queue = f"imagine-test-{uuid.uuid4().hex[:8]}"
    env = {
        "IMAGINE_TASK_QUEUE": queue,
        "IMAGINE_JOB_LEASE_S": str(LEASE_S),
        "IMAGINE_TASK_MAX_RETRIES": "2",
        "IMAGINE_TASK_RETRY_BACKOFF_MAX_S": "1",
        "IMAGINE_MAX_OBJECT_BYTES": "100000",
    }
    if url:
        env["IMAGINE_BROKER_URL"] = url
    stack = start_stack(tmp_path_factory.mktemp(f"{name}-stack"), env, ("--no-worker",))
    yield stack
    assert stack.stop() == 0, stack.log.read_text()[-4000:]
    if name == "rabbitmq":  # our queue is durable: remove it
        from kombu import Connection

        with Connection(url) as conn:
            conn.default_channel.queue_delete(queue)


def _points(stack: Stack, collection: str) -> int:
    with stack.client() as c:
        return int(c.describe_collection(collection).points_count)


def _claimed_chunks(stack: Stack, job_id: str) -> int:
    with sqlite3.connect(stack.data_dir / "jobs.sqlite3") as db:
        (n,) = db.execute(
            "SELECT COUNT(*) FROM outbox WHERE job_id=? AND claimed_at > 0", (job_id,)
        ).fetchone()
    return int(n)


def _wait_for(predicate, timeout_s: float = 120, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_poison_objects_are_listed_and_the_good_images_ingested(
    broker_stack: Stack, workers: list[Worker], tmp_path: Path
) -> None:
    gallery = make_gallery(tmp_path / "g", 24, poison=True)
    (gallery / "bad-big.png").write_bytes(os.urandom(150_000))  # over the 100 kB limit
    workers.append(Worker(broker_stack))
    with broker_stack.client() as c:
        job = c.wait_job(c.create_ingest_job(str(gallery), "poison", chunk_size=8).id, 300)
    assert state_name(job.state) == "SUCCEEDED_WITH_ERRORS"
    reasons = {f.uri.rsplit("/", 1)[1]: f.reason for f in job.failures}
    expected = {**POISON_REASONS, "bad-big.png": "too large"}
    assert set(reasons) == set(expected)
    for name, word in expected.items():
        assert word in reasons[name], (name, reasons[name])
    assert (job.embedded, job.failed) == (24, len(expected))
    assert _points(broker_stack, "poison") == 24
    assert workers[0].proc.poll() is None  # the worker is still alive


def test_worker_sigkilled_mid_chunk_loses_nothing(
    broker_stack: Stack, workers: list[Worker], tmp_path: Path
) -> None:
    n = 400
    gallery = make_gallery(tmp_path / "g", n)
    workers.append(Worker(broker_stack))
    with broker_stack.client() as c:
        job_id = c.create_ingest_job(str(gallery), "killed", chunk_size=16).id
        # Kill the worker while it holds a chunk it has claimed but not counted.
        _wait_for(
            lambda: c.get_job(job_id).embedded >= 32 and _claimed_chunks(broker_stack, job_id),
            what="a chunk in flight",
        )
        workers[0].sigkill()
        at_kill = c.get_job(job_id)
        assert state_name(at_kill.state) == "RUNNING"
        assert at_kill.embedded + at_kill.skipped < n

        workers.append(Worker(broker_stack))
        job = c.wait_job(job_id, 300)
    assert state_name(job.state) == "SUCCEEDED", job.error
    # Objects the killed chunk had already upserted count as unchanged the second time.
    assert (job.embedded + job.skipped, job.failed) == (n, 0)
    assert _points(broker_stack, "killed") == n


def stop_broker(name: str, redis_server: RedisServer | None) -> None:
    if redis_server is not None:
        redis_server.kill()  # no persistence: every queued message is gone
    else:  # RabbitMQ: the node's app stops; durable queues keep persistent messages
        subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)


def start_broker(name: str, redis_server: RedisServer | None) -> None:
    if redis_server is not None:
        redis_server.start()
    else:
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)
        subprocess.run(["rabbitmqctl", "await_startup"], check=True, capture_output=True)


# The filesystem broker is files on the server's disk: there is no broker process to restart.
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)
def test_broker_restart_during_a_job_loses_nothing(
    broker: tuple[str, str, RedisServer | None],
    broker_stack: Stack,
    workers: list[Worker],
    tmp_path: Path,
) -> None:
    name, _, redis_server = broker
    n = 1200
    gallery = make_gallery(tmp_path / "g", n)
    workers.append(Worker(broker_stack))
    with broker_stack.client() as c:
        job_id = c.create_ingest_job(str(gallery), "restarted", chunk_size=16).id
        _wait_for(lambda: c.get_job(job_id).embedded >= 32, what="progress")
        stop_broker(name, redis_server)
        try:
            assert c.get_job(job_id).embedded < n  # the broker went down in the middle
            time.sleep(1.0)
        finally:
            start_broker(name, redis_server)
        job = c.wait_job(job_id, 300)
    assert state_name(job.state) == "SUCCEEDED", job.error
    assert (job.embedded + job.skipped, job.failed) == (n, 0)
    assert _points(broker_stack, "restarted") == n


def test_unreachable_index_fails_the_job_with_the_reason(
    broker_stack: Stack, workers: list[Worker], tmp_path: Path
) -> None:
    gallery = make_gallery(tmp_path / "g", 8)
    dead = f"http://127.0.0.1:{free_port()}"
    workers.append(Worker(broker_stack, IMAGINE_QDRANT__URL=dead))
    with broker_stack.client() as c:
        job = c.wait_job(c.create_ingest_job(str(gallery), "no-index").id, 120)
    assert state_name(job.state) == "FAILED"
    assert "IndexUnavailable" in job.error, job.error
    assert _points(broker_stack, "no-index") == 0


def test_unreachable_object_store_fails_the_job_with_the_reason(
    broker_stack: Stack, workers: list[Worker]
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    workers.append(Worker(broker_stack, IMAGINE_STORAGE__ENDPOINT=dead))
    with broker_stack.client() as c:
        job = c.wait_job(c.create_ingest_job("s3://gallery/images", "no-store").id, 120)
    assert state_name(job.state) == "FAILED"
    assert "StoreUnavailable" in job.error, job.error
