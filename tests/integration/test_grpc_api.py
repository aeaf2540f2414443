"""The gRPC API over loopback against the real stack: Ray Serve deployments, our gRPC ingress,
a Celery worker on the filesystem:// broker, Qdrant embedded and SQLite job records."""

from __future__ import annotations

import io
import socket
from pathlib import Path
from urllib.parse import unquote, urlsplit

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from PIL import Image

from imagine.client import TERMINAL_STATES, state_name
from tests.conftest import (
    POISON_REASONS,
    Stack,
    assert_no_process_left,
    free_port,
    launch_stack,
    make_gallery,
    wait_for_line,
)

pytestmark = pytest.mark.integration
N = 60


def test_serve_starts_its_own_ray_and_stops_cleanly_when_stopped_while_starting(
    tmp_path: Path,
) -> None:
    """Without IMAGINE_RAY_ADDRESS `imagine serve` starts a Ray of its own, even where Ray's
    default would join another (here RAY_ADDRESS names one that is gone). A SIGTERM after Ray is
    up but before the services are (Ray's driver had replaced our handlers: it exited with 15,
    once with SIGABRT) stops them once they are up: exit 0, no process left behind. (First in
    the module: the shared stack is not up.)"""
    stack = launch_stack(tmp_path / "starting", {"RAY_ADDRESS": f"127.0.0.1:{free_port()}"})
    wait_for_line(stack.log, "imagine: Ray is up", stack.proc, timeout=300)
    assert stack.stop() == 0, stack.log.read_text()[-3000:]
    log = stack.log.read_text()
    assert "imagine: stopping" in log and "SIGTERM received" not in log, log[-3000:]
    assert_no_process_left(str(stack.data_dir))


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_gallery(tmp_path_factory.mktemp("gallery"), N, poison=True)


@pytest.fixture(scope="module")
def ingested(stack: Stack, gallery: Path) -> str:
    with stack.client() as c:
        job = c.create_ingest_job(str(gallery), "api")
        job = c.wait_job(job.id, timeout_s=300)
    assert state_name(job.state) == "SUCCEEDED_WITH_ERRORS", job
    return "api"


def test_ingest_embeds_good_images_and_lists_every_bad_one(stack: Stack, ingested: str) -> None:
    with stack.client() as c:
        job = c.list_jobs(ingested)[-1]  # the first job of this collection
        job = c.get_job(job.id)
        bad = len(POISON_REASONS)
        assert (job.total, job.embedded, job.skipped, job.failed) == (N + bad, N, 0, bad)
        reasons = {f.uri.rsplit("/", 1)[1]: f.reason for f in job.failures}
        assert set(reasons) == set(POISON_REASONS)
        for name, word in POISON_REASONS.items():
            assert word in reasons[name], (name, reasons[name])
        assert c.describe_collection(ingested).points_count == N
        # Every failure is listable, page by page, and the job reports its throughput.
        paged = [(f.uri, f.reason) for f in c.job_failures(job.id, page_size=2)]
        assert paged == sorted((f.uri, f.reason) for f in job.failures)
        assert job.finished_at > job.started_at and job.objects_per_second > 0
        with pytest.raises(grpc.RpcError) as err:
            list(c.job_failures("no-such-job"))
        assert err.value.code() is grpc.StatusCode.NOT_FOUND


def test_second_ingestion_adds_no_point_and_reports_skips(
    stack: Stack, gallery: Path, ingested: str
) -> None:
    with stack.client() as c:
        job = c.wait_job(c.create_ingest_job(str(gallery), ingested).id, timeout_s=300)
        assert (job.embedded, job.skipped, job.failed) == (0, N, len(POISON_REASONS))
        assert c.describe_collection(ingested).points_count == N


def test_sync_removes_the_points_of_objects_that_are_gone(stack: Stack, tmp_path: Path) -> None:
    folder = make_gallery(tmp_path / "g", 12)
    with stack.client() as c:
        c.wait_job(c.create_ingest_job(str(folder), "synced", chunk_size=4).id, timeout_s=300)
        for name in ("00002.png", "00007.png", "00011.png"):
            (folder / name).unlink()
        plain = c.wait_job(c.create_ingest_job(str(folder), "synced").id, timeout_s=300)
        assert (plain.skipped, plain.removed) == (9, 0)  # without sync nothing is removed
        assert c.describe_collection("synced").points_count == 12
        job = c.create_ingest_job(str(folder), "synced", chunk_size=4, sync=True)
        job = c.wait_job(job.id, timeout_s=300)
        assert state_name(job.state) == "SUCCEEDED" and job.sync
        assert (job.skipped, job.removed) == (9, 3)
        assert c.describe_collection("synced").points_count == 9
        hits = c.search("a bag", collection="synced", top_k=20).hits
        keys = {h.uri.rsplit("/", 1)[1] for h in hits}
        assert len(keys) == 9 and not keys & {"00002.png", "00007.png", "00011.png"}


def test_an_alias_switches_searches_to_a_new_collection(stack: Stack, tmp_path: Path) -> None:
    old, new = make_gallery(tmp_path / "old", 4), make_gallery(tmp_path / "new", 6)
    with stack.client() as c:
        c.wait_job(c.create_ingest_job(str(old), "shop-v1").id, timeout_s=300)
        c.set_alias("shop", "shop-v1")
        assert len(c.search("a bag", collection="shop", top_k=20).hits) == 4
        # Ingest the next version beside it, then switch: clients keep using "shop".
        job = c.wait_job(c.create_ingest_job(str(new), "shop-v2").id, timeout_s=300)
        assert job.collection == "shop-v2"
        c.set_alias("shop", "shop-v2")
        assert len(c.search("a bag", collection="shop", top_k=20).hits) == 6
        assert c.list_aliases()["shop"] == "shop-v2"
        described = c.describe_collection("shop")
        assert (described.name, list(described.aliases)) == ("shop-v2", ["shop"])
        # A job created through the alias fills the collection behind it.
        again = c.wait_job(c.create_ingest_job(str(new), "shop").id, timeout_s=300)
        assert (again.collection, again.skipped) == ("shop-v2", 6)
        for bad, code in (
            (lambda: c.set_alias("shop-v1", "shop-v2"), grpc.StatusCode.FAILED_PRECONDITION),
            (lambda: c.set_alias("other", "missing"), grpc.StatusCode.NOT_FOUND),
            (lambda: c.delete_alias("missing"), grpc.StatusCode.NOT_FOUND),
        ):
            with pytest.raises(grpc.RpcError) as err:
                bad()
            assert err.value.code() is code
        c.delete_alias("shop")
        with pytest.raises(grpc.RpcError) as err:
            c.search("a bag", collection="shop", top_k=3)
        assert err.value.code() is grpc.StatusCode.NOT_FOUND


def test_changed_object_is_re_embedded_in_place(stack: Stack, tmp_path: Path) -> None:
    folder = make_gallery(tmp_path / "g", 5)
    with stack.client() as c:
        c.wait_job(c.create_ingest_job(str(folder), "changes").id, timeout_s=300)
        Image.new("L", (28, 28), 200).save(folder / "00003.png")
        job = c.wait_job(c.create_ingest_job(str(folder), "changes").id, timeout_s=300)
        assert (job.embedded, job.skipped) == (1, 4)
        assert c.describe_collection("changes").points_count == 5


def test_watch_streams_progress_until_the_job_ends(stack: Stack, gallery: Path) -> None:
    with stack.client() as c:
        job = c.create_ingest_job(str(gallery), "watched", chunk_size=8)
        states = [j for j in c.watch_job(job.id)]
    assert states[-1].state in TERMINAL_STATES
    done = [j.embedded + j.skipped + j.failed for j in states]
    assert done == sorted(done) and done[-1] == N + len(POISON_REASONS)


def test_search_returns_labelled_hits_and_honours_filters(stack: Stack, ingested: str) -> None:
    with stack.client() as c:
        resp = c.search("a photo of a sneaker", collection=ingested, top_k=7, explain=True)
        assert len(resp.hits) == 7
        scores = [h.score for h in resp.hits]
        assert scores == sorted(scores, reverse=True)
        assert all(h.uri.startswith("file://") and "label" in h.payload.fields for h in resp.hits)
        # A local gallery's hits link to the file itself.
        first = resp.hits[0]
        assert first.url.startswith("file:///")
        assert Path(unquote(urlsplit(first.url).path)).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert set(resp.timings_ms) >= {"encode_text", "search", "total"}
        flt = c.search("anything", collection=ingested, top_k=50, filters={"label": "Bag"})
        assert flt.hits and {h.payload.fields["label"].string_value for h in flt.hits} == {"Bag"}
        png = io.BytesIO()
        Image.new("L", (28, 28), 90).save(png, format="PNG")
        by_image = c.search(collection=ingested, image=png.getvalue(), top_k=3)
        assert len(by_image.hits) == 3 and "image" in by_image.hits[0].path_scores


@pytest.mark.parametrize(
    ("kwargs", "code", "words"),
    [
        ({"text": "x", "collection": "nope"}, grpc.StatusCode.NOT_FOUND, "not found"),
        ({"text": "   ", "collection": "api"}, grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        ({"text": "x", "collection": "bad name!"}, grpc.StatusCode.INVALID_ARGUMENT, "collection"),
        (
            {"text": "x", "collection": "api", "top_k": 20_000},
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_k",
        ),
        ({"text": "x" * 1001, "collection": "api"}, grpc.StatusCode.INVALID_ARGUMENT, "1000"),
        (
            {"text": "x", "collection": "api", "mode": "fused"},
            grpc.StatusCode.FAILED_PRECONDITION,
            "generator",
        ),
        (
            {"collection": "api", "image": b"not an image"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "not an image",
        ),
    ],
)
def test_bad_search_requests_get_clear_status_codes(
    stack: Stack, ingested: str, kwargs: dict, code: grpc.StatusCode, words: str
) -> None:
    with stack.client() as c, pytest.raises(grpc.RpcError) as err:
        c.search(**kwargs)
    assert err.value.code() == code
    assert words in err.value.details()


def test_bad_ingestion_and_job_requests(stack: Stack, tmp_path: Path) -> None:
    with stack.client() as c:
        for source, words in [
            ("", "empty"),
            ("relative/dir", "absolute"),
            (str(tmp_path / "missing"), "does not exist"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                c.create_ingest_job(source, "x")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in err.value.details()
        for call in (c.get_job, c.cancel_job):
            with pytest.raises(grpc.RpcError) as err:
                call("no-such-job")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            c.encode_text([""])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        vectors, _ = c.encode_images([b"garbage"])
        assert isinstance(vectors[0], str) and "not an image" in vectors[0]


def test_collections_lifecycle(stack: Stack) -> None:
    with stack.client() as c:
        col = c.create_collection("lifecycle")
        assert col.points_count == 0 and [v.name for v in col.vectors] == ["image"]
        assert col.model_version == c.encode_text(["x"])[1]
        assert "lifecycle" in [x.name for x in c.list_collections()]
        c.delete_collection("lifecycle")
        assert "lifecycle" not in [x.name for x in c.list_collections()]
        with pytest.raises(grpc.RpcError) as err:
            c.describe_collection("lifecycle")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_cancelled_job_stays_cancelled(stack: Stack, tmp_path: Path) -> None:
    folder = make_gallery(tmp_path / "g", 200)
    with stack.client() as c:
        job = c.create_ingest_job(str(folder), "cancelled", chunk_size=1)
        c.cancel_job(job.id)
        job = c.wait_job(job.id, timeout_s=60)
        assert state_name(job.state) == "CANCELLED"
        assert state_name(c.get_job(job.id).state) == "CANCELLED"


def test_generic_client_discovers_services_by_reflection_and_searches(
    stack: Stack, ingested: str
) -> None:
    channel = grpc.insecure_channel(stack.address)
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {
        "imagine.v1.RetrievalService",
        "imagine.v1.IngestionService",
        "imagine.v1.CollectionService",
        "imagine.v1.ModelService",
        "grpc.health.v1.Health",
    } <= services
    pool = descriptor_pool.DescriptorPool(db)
    method = pool.FindServiceByName("imagine.v1.RetrievalService").methods_by_name["Search"]
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        "/imagine.v1.RetrievalService/Search",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_cls.FromString,
    )
    resp = call(request_cls(collection=ingested, text="a bag", top_k=3), timeout=60)
    assert len(resp.hits) == 3
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "imagine.v1.RetrievalService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_ingress_listens_on_loopback_only(stack: Stack) -> None:
    port = int(stack.address.rsplit(":", 1)[1])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent: this picks the outward interface
        outward = s.getsockname()[0]
    assert outward != "127.0.0.1"
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(2)
        s.connect((outward, port))


def test_cli_ingest_search_and_jobs(stack: Stack, tmp_path: Path) -> None:
    folder = make_gallery(tmp_path / "g", 12)
    out = stack.cli("ingest", str(folder), "--collection", "cli")
    assert out.returncode == 0, out.stderr
    assert "12 embedded, 0 skipped (unchanged), 0 failed of 12" in out.stdout, out
    out = stack.cli("search", "a photo of a bag", "--collection", "cli", "--k", "4")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("4 hits") and out.stdout.count("file://") == 4, out
    out = stack.cli("jobs", "--collection", "cli")
    assert "SUCCEEDED" in out.stdout, out
    out = stack.cli("search", "x", "--collection", "missing")
    assert out.returncode == 2 and "NOT_FOUND" in out.stderr, out
