"""Cluster-profile wiring on loopback: the Redis broker, an S3 (MinIO protocol) source and the
PostgreSQL job store.

The stack is the same code path as the embedded default, configured by environment: the ingress
queues jobs on Redis, the worker consumes them from Redis and reads the gallery from moto's S3
server through the `minio` client, and both keep the job records in PostgreSQL.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from imagine.client import state_name
from tests.conftest import RedisServer, Stack, free_port, postgres_database, start_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    from minio import Minio

    client = Minio(f"127.0.0.1:{port}", "testing", "testing", secure=False)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.list_buckets()
            break
        except Exception:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.2)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def jobs_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="module")
def redis_stack(
    tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str, redis_url: str, jobs_url: str
) -> Iterator[Stack]:
    stack = start_stack(
        tmp_path_factory.mktemp("redis-stack"),
        {
            "IMAGINE_BROKER_URL": redis_url,
            "IMAGINE_JOBS_URL": jobs_url,
            "IMAGINE_STORAGE__ENDPOINT": s3_endpoint,
            "IMAGINE_STORAGE__ACCESS_KEY": "testing",
            "IMAGINE_STORAGE__SECRET_KEY": "testing",
        },
    )
    yield stack
    assert stack.stop() == 0


def _put_gallery(endpoint: str, bucket: str, prefix: str, n: int) -> None:
    from minio import Minio

    from imagine.data import FASHION_MNIST_CLASSES, load_fashion_mnist

    client = Minio(endpoint, "testing", "testing", secure=False)
    client.make_bucket(bucket)
    images, labels = load_fashion_mnist("test")
    lines = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(images[i], mode="L").save(buf, format="PNG")
        key = f"img/{i:04d}.png"
        client.put_object(
            bucket, f"{prefix}/{key}", io.BytesIO(buf.getvalue()), len(buf.getvalue())
        )
        lines.append(f'{{"image": "{key}", "label": "{FASHION_MNIST_CLASSES[int(labels[i])]}"}}')
    manifest = ("\n".join(lines) + "\n").encode()
    client.put_object(bucket, f"{prefix}/manifest.jsonl", io.BytesIO(manifest), len(manifest))
    junk = b"\x89PNG\r\n\x1a\nbroken"
    client.put_object(bucket, f"{prefix}/img/zz-broken.png", io.BytesIO(junk), len(junk))


def test_s3_gallery_ingests_over_the_redis_broker(redis_stack: Stack, s3_endpoint: str) -> None:
    _put_gallery(s3_endpoint, "gallery", "fmnist", 40)
    with redis_stack.client() as c:
        job = c.create_ingest_job("s3://gallery/fmnist", "s3col", chunk_size=16)
        job = c.wait_job(job.id, timeout_s=300)
        assert state_name(job.state) == "SUCCEEDED_WITH_ERRORS", job.error
        assert (job.total, job.embedded, job.failed) == (41, 40, 1)
        assert job.failures[0].uri == "s3://gallery/fmnist/img/zz-broken.png"
        again = c.wait_job(c.create_ingest_job("s3://gallery/fmnist", "s3col").id, timeout_s=300)
        assert (again.embedded, again.skipped) == (0, 40)
        assert c.describe_collection("s3col").points_count == 40
        hits = c.search("a photo of a bag", collection="s3col", top_k=5).hits
        assert all(h.uri.startswith("s3://gallery/fmnist/img/") for h in hits)
        assert all(h.payload.fields["label"].string_value for h in hits)
    # Each hit links to its image: a presigned GET URL that serves the object's bytes.
    import urllib.request

    from minio import Minio

    raw = Minio(s3_endpoint, access_key="testing", secret_key="testing", secure=False)
    for h in hits[:2]:
        assert h.url.startswith(f"http://{s3_endpoint}/gallery/fmnist/img/"), h.url
        assert "X-Amz-Signature=" in h.url
        with urllib.request.urlopen(h.url, timeout=30) as resp:
            body = resp.read()
        key = h.uri.removeprefix("s3://gallery/")
        assert body == raw.get_object("gallery", key).read()


def test_missing_bucket_fails_the_job_with_the_reason(redis_stack: Stack) -> None:
    with redis_stack.client() as c:
        job = c.wait_job(c.create_ingest_job("s3://no-such-bucket/x", "s3none").id, timeout_s=120)
    assert state_name(job.state) == "FAILED"
    assert "no-such-bucket" in job.error


def test_jobs_survive_a_service_restart(redis_stack: Stack, tmp_path: Path) -> None:
    """Job records persist (in PostgreSQL): a restarted service still answers for old jobs."""
    with redis_stack.client() as c:
        before = {j.id: j.state for j in c.list_jobs()}
    assert before
    assert not (redis_stack.data_dir / "jobs.sqlite3").exists()  # nothing kept on this node
    assert redis_stack.stop() == 0
    restarted = start_stack(redis_stack.data_dir, {k: v for k, v in redis_stack.env.items()})
    try:
        with restarted.client() as c:
            after = {j.id: j.state for j in c.list_jobs()}
            assert after == before
            assert c.describe_collection("s3col").points_count == 40
    finally:
        redis_stack.proc = restarted.proc
        redis_stack.address = restarted.address
