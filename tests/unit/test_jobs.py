"""SqliteJobStore on tmp_path: states, exactly-once chunk counts, sharing between processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagine.jobs import JobNotFound, JobState, SqliteJobStore


@pytest.fixture
def store(tmp_path: Path) -> SqliteJobStore:
    return SqliteJobStore(tmp_path / "jobs" / "jobs.db")


def _running(store: SqliteJobStore, collection: str = "gallery") -> str:
    job = store.create(collection, "s3://bucket/prefix/", chunk_size=2)
    store.start(job.id)
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


def test_start_moves_queued_to_running_and_is_idempotent(store: SqliteJobStore) -> None:
    job = store.create("gallery", "s3://b/", 2)

    started = store.start(job.id)
    assert started.state is JobState.RUNNING
    assert started.started_at >= job.created_at

    again = store.start(job.id)
    assert again.state is JobState.RUNNING
    assert again.started_at == started.started_at


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
    assert store.start(job_id).state is JobState.CANCELLED
    assert store.fail(job_id, "boom").state is JobState.CANCELLED
    assert store.get(job_id).error == "cancelled by request"


def test_cancel_of_queued_job(store: SqliteJobStore) -> None:
    job = store.create("gallery", "s3://b/", 2)
    assert store.cancel(job.id).state is JobState.CANCELLED
    assert store.start(job.id).state is JobState.CANCELLED


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
        store.start("nope")
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


def test_two_stores_on_one_file_see_each_others_writes(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    service = SqliteJobStore(path)  # the query service
    worker = SqliteJobStore(path)  # an ingestion worker process

    job = service.create("gallery", "s3://b/", 2)
    assert worker.get(job.id).state is JobState.QUEUED

    worker.start(job.id)
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


def test_jobs_survive_reopening_the_store(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    job = SqliteJobStore(path).create("gallery", "s3://b/", 2, metadata={"k": "v"})

    again = SqliteJobStore(path).get(job.id)

    assert again.state is JobState.QUEUED
    assert again.metadata == {"k": "v"}
