"""The job store on SQLite (one node) and on PostgreSQL (the server on loopback, a database of
its own per test): states, exactly-once chunk counts, sharing between processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imagine.jobs import (
    JobNotFound,
    JobState,
    JobStoreUnavailable,
    PostgresJobStore,
    SqliteJobStore,
    open_job_store,
)
from tests.conftest import postgres_database

Opener = Callable[[], SqliteJobStore]


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens a store on one database; call it twice for two processes' views of it."""
    if request.param == "sqlite":
        yield lambda: SqliteJobStore(tmp_path / "jobs" / "jobs.db")
    else:
        with postgres_database() as url:
            yield lambda: PostgresJobStore(url)


@pytest.fixture
def store(opener: Opener) -> SqliteJobStore:
    return opener()


def _running(store: SqliteJobStore, collection: str = "gallery") -> str:
    job = store.create(collection, "s3://bucket/prefix/", chunk_size=2)
    assert store.claim_listing(job.id, lease_s=300)
    return job.id


def test_create_is_queued_with_its_request(store: SqliteJobStore) -> None:
    job = store.create(
        "gallery", "s3://bucket/prefix/", 64, metadata={"owner": "ana"}, model_version="m1"
    )

    assert job.state is JobState.QUEUED
    assert not job.state.terminal
    assert (job.collection, job.source, job.chunk_size) == ("gallery", "s3://bucket/prefix/", 64)
    assert job.metadata == {"owner": "ana"}
    assert job.model_version == "m1"
    assert job.processed == 0
    assert job.created_at > 0
    assert store.get(job.id) == job


def test_claim_listing_moves_queued_to_running_once(store: SqliteJobStore) -> None:
    job = store.create("gallery", "s3://b/", 2)

    assert store.claim_listing(job.id, lease_s=300) is True
    started = store.get(job.id)
    assert started.state is JobState.RUNNING
    assert started.started_at >= job.created_at

    # A duplicate job task while the lister is alive does nothing.
    assert store.claim_listing(job.id, lease_s=300) is False
    assert store.get(job.id).started_at == started.started_at
    # A lister silent for longer than the lease is taken over.
    assert store.claim_listing(job.id, lease_s=0) is True
    assert store.get(job.id).state is JobState.RUNNING
    # Once listed, nobody lists again.
    store.set_listing(job.id, total=4, num_chunks=2)
    assert store.claim_listing(job.id, lease_s=0) is False


def test_record_chunk_counts_each_chunk_once(store: SqliteJobStore) -> None:
    job_id = _running(store)
    store.set_listing(job_id, total=6, num_chunks=3)

    assert store.record_chunk(job_id, 0, embedded=1, skipped=1, failures=[]) is True
    # A retried chunk task reports the same chunk again: not counted twice.
    assert store.record_chunk(job_id, 0, embedded=1, skipped=1, failures=[]) is False
    assert store.record_chunk(job_id, 0, embedded=2, skipped=0, failures=[("x", "y")]) is False

    job = store.get(job_id)
    assert (job.embedded, job.skipped, job.failed, job.chunks_done) == (1, 1, 0, 1)
    assert job.failures == []
    assert job.state is JobState.RUNNING


def test_job_succeeds_when_listing_is_done_and_all_chunks_recorded(
    store: SqliteJobStore,
) -> None:
    job_id = _running(store)
    store.update_listed(job_id, 3)
    assert store.get(job_id).total == 3
    job = store.set_listing(job_id, total=4, num_chunks=2)
    assert job.state is JobState.RUNNING
    assert (job.total, job.num_chunks, job.listing_done) == (4, 2, True)

    store.record_chunk(job_id, 1, embedded=2, skipped=0, failures=[])
    assert store.get(job_id).state is JobState.RUNNING
    store.record_chunk(job_id, 0, embedded=1, skipped=1, failures=[])

    job = store.get(job_id)
    assert job.state is JobState.SUCCEEDED
    assert job.state.terminal
    assert (job.embedded, job.skipped, job.failed, job.processed) == (3, 1, 0, 4)
    assert job.finished_at >= job.started_at > 0


def test_job_with_failures_succeeds_with_errors_and_lists_reasons(
    store: SqliteJobStore,
) -> None:
    job_id = _running(store)
    store.set_listing(job_id, total=4, num_chunks=2)
    store.record_chunk(job_id, 0, 2, 0, [])
    store.record_chunk(
        job_id,
        1,
        embedded=0,
        skipped=0,
        failures=[
            ("s3://bucket/prefix/z.png", "not an image (unrecognised format)"),
            ("s3://bucket/prefix/a.png", "empty object (0 bytes)"),
        ],
    )

    job = store.get(job_id)
    assert job.state is JobState.SUCCEEDED_WITH_ERRORS
    assert job.failed == 2
    assert job.processed == 4
    assert job.failures == [
        ("s3://bucket/prefix/a.png", "empty object (0 bytes)"),
        ("s3://bucket/prefix/z.png", "not an image (unrecognised format)"),
    ]


def test_set_listing_after_all_chunks_finishes_the_job(store: SqliteJobStore) -> None:
    job_id = _running(store)
    # Chunks may be done before the listing task reports the final count.
    store.record_chunk(job_id, 0, 2, 0, [])
    store.record_chunk(job_id, 1, 1, 0, [])
    assert store.get(job_id).state is JobState.RUNNING

    job = store.set_listing(job_id, total=3, num_chunks=2)

    assert job.state is JobState.SUCCEEDED
    assert job.embedded == 3


def test_empty_listing_finishes_at_once(store: SqliteJobStore) -> None:
    job_id = _running(store)
    assert store.set_listing(job_id, total=0, num_chunks=0).state is JobState.SUCCEEDED


def test_cancel_of_running_job_is_final(store: SqliteJobStore) -> None:
    job_id = _running(store)
    store.set_listing(job_id, total=4, num_chunks=2)
    store.record_chunk(job_id, 0, 2, 0, [])

    job = store.cancel(job_id)
    assert job.state is JobState.CANCELLED
    assert job.error == "cancelled by request"
    assert job.finished_at > 0

    # A chunk still in flight finishes later: it must not revive or complete the job.
    store.record_chunk(job_id, 1, 2, 0, [])
    assert store.get(job_id).state is JobState.CANCELLED
    # Nor can a retried job task restart it, or a later failure overwrite it.
    assert store.claim_listing(job_id, lease_s=0) is False
    assert store.get(job_id).state is JobState.CANCELLED
    assert store.fail(job_id, "boom").state is JobState.CANCELLED
    assert store.get(job_id).error == "cancelled by request"


def test_cancel_of_queued_job(store: SqliteJobStore) -> None:
    job = store.create("gallery", "s3://b/", 2)
    assert store.cancel(job.id).state is JobState.CANCELLED
    assert store.claim_listing(job.id, lease_s=0) is False
    assert store.get(job.id).state is JobState.CANCELLED


def test_cancel_of_finished_job_keeps_its_state(store: SqliteJobStore) -> None:
    job_id = _running(store)
    store.set_listing(job_id, total=0, num_chunks=0)
    assert store.cancel(job_id).state is JobState.SUCCEEDED


def test_fail_records_the_error(store: SqliteJobStore) -> None:
    job_id = _running(store)

    job = store.fail(job_id, "bucket 'nope' does not exist")

    assert job.state is JobState.FAILED
    assert job.error == "bucket 'nope' does not exist"
    assert store.get(job_id).error == "bucket 'nope' does not exist"
    # A late listing result does not turn a failed job into a success.
    assert store.set_listing(job_id, 0, 0).state is JobState.FAILED


def test_unknown_job_id_raises_job_not_found(store: SqliteJobStore) -> None:
    with pytest.raises(JobNotFound, match="nope"):
        store.get("nope")
    with pytest.raises(JobNotFound):
        store.claim_listing("nope", lease_s=300)
    with pytest.raises(JobNotFound):
        store.cancel("nope")
    with pytest.raises(JobNotFound):
        store.fail("nope", "x")
    with pytest.raises(JobNotFound):
        store.set_listing("nope", 1, 1)
    with pytest.raises(JobNotFound):
        store.record_chunk("nope", 0, 1, 0, [])


def test_list_by_collection_newest_first(store: SqliteJobStore) -> None:
    first = store.create("gallery", "s3://b/1/", 2)
    other = store.create("other", "s3://b/2/", 2)
    second = store.create("gallery", "s3://b/3/", 2)
    third = store.create("gallery", "s3://b/4/", 2)

    assert [j.id for j in store.list("gallery")] == [third.id, second.id, first.id]
    assert [j.id for j in store.list("other")] == [other.id]
    assert [j.id for j in store.list()] == [third.id, second.id, other.id, first.id]
    assert [j.id for j in store.list("gallery", limit=2)] == [third.id, second.id]
    assert store.list("none") == []


def test_two_stores_on_one_database_see_each_others_writes(opener: Opener) -> None:
    service = opener()  # the query service
    worker = opener()  # an ingestion worker process

    job = service.create("gallery", "s3://b/", 2)
    assert worker.get(job.id).state is JobState.QUEUED

    assert worker.claim_listing(job.id, lease_s=300)
    worker.set_listing(job.id, total=2, num_chunks=1)
    assert service.get(job.id).state is JobState.RUNNING

    assert worker.record_chunk(job.id, 0, 1, 0, [("s3://b/x", "corrupt")]) is True
    # The same chunk, reported through the other store, is still counted once.
    assert service.record_chunk(job.id, 0, 1, 0, [("s3://b/x", "corrupt")]) is False

    seen = service.get(job.id)
    assert seen.state is JobState.SUCCEEDED_WITH_ERRORS
    assert (seen.embedded, seen.failed) == (1, 1)
    assert seen.failures == [("s3://b/x", "corrupt")]
    assert [j.id for j in service.list("gallery")] == [job.id]


def test_jobs_survive_reopening_the_store(opener: Opener) -> None:
    job = opener().create("gallery", "s3://b/", 2, metadata={"k": "v"})

    again = opener().get(job.id)

    assert again.state is JobState.QUEUED
    assert again.metadata == {"k": "v"}


def _items(n: int) -> list[list[str]]:
    return [[f"k{i}.png", f"etag{i}", ""] for i in range(n)]


def test_a_chunk_claimed_by_a_dead_worker_is_redelivered(store: SqliteJobStore) -> None:
    job_id = _running(store)
    store.add_chunk(job_id, 0, _items(2))
    store.add_chunk(job_id, 1, _items(2))
    store.set_listing(job_id, total=4, num_chunks=2)
    assert store.claim_chunk(job_id, 0)
    store.record_chunk(job_id, 0, 2, 0, [])
    assert store.claim_chunk(job_id, 1)  # ... and its worker is SIGKILLed
    t = store.get(job_id).started_at

    assert store.due(lease_s=60, max_attempts=3, now=t + 30) == []  # still within its lease
    again = store.due(lease_s=60, max_attempts=3, now=t + 120)
    assert [(r.job_id, r.chunk, r.items) for r in again] == [(job_id, 1, _items(2))]
    assert store.due(lease_s=60, max_attempts=3, now=t + 121) == []  # queued once, not twice

    # A counted chunk is never claimed again: its duplicate message is dropped.
    assert store.claim_chunk(job_id, 0) is False
    assert store.claim_chunk(job_id, 1) is True
    store.record_chunk(job_id, 1, 2, 0, [])
    assert store.get(job_id).state is JobState.SUCCEEDED
    assert store.due(lease_s=60, max_attempts=3, now=t + 10_000) == []


def test_a_chunk_lost_too_often_fails_its_job_with_the_reason(store: SqliteJobStore) -> None:
    job_id = _running(store)
    store.add_chunk(job_id, 0, _items(1))
    store.set_listing(job_id, total=1, num_chunks=1)
    t = store.get(job_id).started_at
    for attempt in range(2):
        assert store.claim_chunk(job_id, 0)
        now = t + 100 * (attempt + 1) + 1000
        assert [r.chunk for r in store.due(lease_s=60, max_attempts=3, now=now)] == [0]
    assert store.claim_chunk(job_id, 0)
    assert store.due(lease_s=60, max_attempts=3, now=t + 5000) == []
    job = store.get(job_id)
    assert job.state is JobState.FAILED
    assert "chunk 0 was lost 3 times" in job.error


def test_messages_the_broker_lost_are_queued_again_only_when_nothing_moves(
    store: SqliteJobStore,
) -> None:
    queued = store.create("gallery", "s3://b/", 2)  # its job task was lost
    job_id = _running(store)
    store.add_chunk(job_id, 0, _items(2))  # queued, never claimed: lost or waiting?
    store.add_chunk(job_id, 1, _items(2))
    store.set_listing(job_id, total=4, num_chunks=2)
    t = store.get(job_id).started_at

    # Workers keep making progress: unclaimed chunks are a backlog, not a loss.
    assert store.claim_chunk(job_id, 1)
    assert store.due(lease_s=60, max_attempts=3, now=t + 50) == []
    store.record_chunk(job_id, 1, 2, 0, [])

    # Nothing moved for a lease: the broker lost them.
    again = store.due(lease_s=60, max_attempts=3, now=t + 1000)
    assert {(r.job_id, r.chunk) for r in again} == {(job_id, 0), (queued.id, None)}
    assert store.due(lease_s=60, max_attempts=3, now=t + 1001) == []
    # Losses in the broker do not count against the chunk.
    assert store.claim_chunk(job_id, 0)
    store.record_chunk(job_id, 0, 2, 0, [])
    assert store.get(job_id).state is JobState.SUCCEEDED


def test_a_lister_that_died_is_queued_again_and_its_task_takes_over(
    store: SqliteJobStore,
) -> None:
    job_id = _running(store)  # listing claimed, then its worker died
    t = store.get(job_id).started_at
    [again] = store.due(lease_s=60, max_attempts=3, now=t + 1000)
    assert (again.job_id, again.chunk) == (job_id, None)
    assert store.due(lease_s=60, max_attempts=3, now=t + 1001) == []  # not every poll
    # The re-queue is not a sign of life of the dead lister: the task it queued lists.
    assert store.claim_listing(job_id, lease_s=0) is True


def test_a_failed_lister_releases_the_listing_for_its_retry(store: SqliteJobStore) -> None:
    job_id = _running(store)
    assert store.claim_listing(job_id, lease_s=300) is False  # alive: a duplicate waits
    store.release_listing(job_id)  # it failed on a transient error and will be retried
    assert store.claim_listing(job_id, lease_s=300) is True


def test_cancel_drops_the_outbox(store: SqliteJobStore) -> None:
    job_id = _running(store)
    store.add_chunk(job_id, 0, _items(2))
    assert store.claim_chunk(job_id, 0)
    store.cancel(job_id)
    t = store.get(job_id).finished_at
    assert store.due(lease_s=1, max_attempts=3, now=t + 100) == []


def test_older_job_files_are_migrated(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, collection TEXT NOT NULL, source TEXT NOT NULL, "
        "state TEXT NOT NULL, model_version TEXT NOT NULL DEFAULT '', chunk_size INTEGER NOT NULL, "
        "metadata TEXT NOT NULL, total INTEGER NOT NULL DEFAULT 0, embedded INTEGER NOT NULL "
        "DEFAULT 0, skipped INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0, "
        "listing_done INTEGER NOT NULL DEFAULT 0, num_chunks INTEGER NOT NULL DEFAULT 0, "
        "chunks_done INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '', "
        "created_at REAL NOT NULL, started_at REAL NOT NULL DEFAULT 0, "
        "finished_at REAL NOT NULL DEFAULT 0)"
    )
    db.execute(
        "INSERT INTO jobs (id, collection, source, state, chunk_size, metadata, created_at) "
        "VALUES ('old1', 'g', '/data', 'SUCCEEDED', 8, '{}', 1.0)"
    )
    db.commit()
    db.close()
    store = SqliteJobStore(path)
    assert store.get("old1").state is JobState.SUCCEEDED
    job = store.create("g", "/data", 8)
    assert store.claim_listing(job.id, lease_s=300)


def test_open_job_store_picks_the_backend_by_url(tmp_path: Path) -> None:
    assert type(open_job_store(None, tmp_path / "j.db")) is SqliteJobStore
    with postgres_database() as url:
        assert type(open_job_store(url, tmp_path / "unused.db")) is PostgresJobStore
    with pytest.raises(ValueError, match="unsupported jobs_url"):
        open_job_store("mysql://x/y", tmp_path / "j.db")


def test_an_unreachable_postgres_is_a_retryable_error() -> None:
    from tests.conftest import free_port

    with pytest.raises(JobStoreUnavailable, match="unreachable") as err:
        PostgresJobStore(f"postgresql://postgres@127.0.0.1:{free_port()}/x", connect_timeout_s=2)
    assert isinstance(err.value, ConnectionError)  # what tasks retry and RPCs call UNAVAILABLE


def test_concurrent_chunk_reports_are_counted_once_on_postgres() -> None:
    """Several worker threads report overlapping chunks at once: each chunk counts once."""
    from concurrent.futures import ThreadPoolExecutor

    with postgres_database() as url:
        store = PostgresJobStore(url)
        job = store.create("gallery", "s3://b/", 2)
        assert store.claim_listing(job.id, lease_s=300)
        store.set_listing(job.id, total=40, num_chunks=20)
        with ThreadPoolExecutor(8) as pool:
            counted = list(
                pool.map(lambda c: store.record_chunk(job.id, c % 20, 2, 0, []), range(60))
            )
        assert sum(counted) == 20
        done = store.get(job.id)
        assert (done.state, done.embedded, done.chunks_done) == (JobState.SUCCEEDED, 40, 20)
