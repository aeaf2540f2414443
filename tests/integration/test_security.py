"""A service you can expose, over real gRPC against `imagine serve` with tiny generative models:
TLS with a self-signed certificate made here, API keys and roles, configured limits, clean
status codes, a property-based fuzz of every RPC, JSON logs with request ids, and the Prometheus
endpoints scraped after a small demo run (ingest, text and fused queries)."""

from __future__ import annotations

import datetime
import io
import ipaddress
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imagine.client import state_name
from imagine.config import hash_api_key
from protos.gen.imagine.v1 import (
    collection_service_pb2,
    index_service_pb2,
    ingestion_service_pb2,
    model_service_pb2,
    retrieval_service_pb2,
)
from protos.gen.imagine.v1 import retrieval_service_pb2 as ret_pb
from protos.gen.imagine.v1 import retrieval_service_pb2_grpc as ret_grpc
from tests.conftest import Stack, free_port, make_gallery, png_header_only, start_stack

pytestmark = pytest.mark.integration
KEYS = {role: f"{role}-key-{role[::-1]}-0123456789abcdef" for role in ("reader", "writer", "admin")}
LIMITS = {
    "MAX_QUERY_CHARS": "200",
    "MAX_IMAGE_BYTES": "300000",
    "MAX_IMAGE_PIXELS": "1000000",
    "MAX_TOP_K": "50",
    "MAX_GENERATED": "4",
    "MAX_STEPS": "30",
    "MAX_CONCURRENT_GENERATIONS": "1",
}
N = 30


def self_signed(folder: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("certs")
    cert, key = self_signed(folder)
    other, _ = self_signed(folder, "impostor")
    return {"cert": cert, "key": key, "other": other}


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, certs: dict[str, Path]) -> Iterator[Stack]:
    metrics, worker_metrics = free_port(), free_port()
    keys = [
        {"name": f"{role}-client", "role": role, "sha256": hash_api_key(k)}
        for role, k in KEYS.items()
    ]
    env = {
        "IMAGINE_VISION_MODEL": "config:tiny-vision",
        "IMAGINE_GENERATOR_MODEL": "config:tiny-generator",
        "IMAGINE_AGGREGATOR_MODEL": "config:tiny-aggregator",
        "IMAGINE_DEFAULT_STEPS": "4",
        "IMAGINE_AUTH__ENABLED": "true",
        "IMAGINE_AUTH__KEYS": json.dumps(keys),
        "IMAGINE_TLS__CERT_FILE": str(certs["cert"]),
        "IMAGINE_TLS__KEY_FILE": str(certs["key"]),
        "IMAGINE_METRICS_ADDRESS": f"127.0.0.1:{metrics}",
        "IMAGINE_WORKER_METRICS_ADDRESS": f"127.0.0.1:{worker_metrics}",
        # the worker's credentials (the CLI reads the same two)
        "IMAGINE_API_KEY": KEYS["admin"],
        "IMAGINE_CA_FILE": str(certs["cert"]),
        "IMAGINE_LOG_FORMAT": "json",
        **{f"IMAGINE_LIMITS__{k}": v for k, v in LIMITS.items()},
    }
    stack = start_stack(
        tmp_path_factory.mktemp("secure-stack"),
        env,
        client_kwargs={"api_key": KEYS["admin"], "ca_file": certs["cert"]},
    )
    stack.env["METRICS"] = f"http://127.0.0.1:{metrics}/metrics"
    stack.env["WORKER_METRICS"] = f"http://127.0.0.1:{worker_metrics}/metrics"
    yield stack
    assert stack.stop() == 0, stack.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def collection(secure: Stack, tmp_path_factory: pytest.TempPathFactory) -> str:
    gallery = make_gallery(tmp_path_factory.mktemp("g"), N)
    with secure.client(api_key=KEYS["writer"]) as c:
        job = c.wait_job(c.create_ingest_job(str(gallery), "secured").id, timeout_s=300)
    assert state_name(job.state) == "SUCCEEDED", job
    return "secured"


def _error(fn: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kwargs)
    return err.value.code(), err.value.details()


# -- 2. TLS -----------------------------------------------------------------------------------
def test_tls_round_trip_with_a_self_signed_certificate(
    secure: Stack, collection: str, certs: dict[str, Path]
) -> None:
    with secure.client(api_key=KEYS["reader"]) as c:
        hits = c.search("a bag", collection=collection, top_k=3, mode="text").hits
    assert len(hits) == 3
    # The CLI takes the CA file and the key as options too.
    out = secure.cli("--ca-file", str(certs["cert"]), "--api-key", KEYS["reader"], "collections")
    assert out.returncode == 0 and collection in out.stdout, out.stderr
    # Plaintext to a TLS port, or TLS that trusts another CA, never gets an answer.
    with secure.client(ca_file=None, retries=0, timeout_s=5) as c:
        code, _ = _error(c.list_collections)
    assert code is grpc.StatusCode.UNAVAILABLE
    with secure.client(ca_file=certs["other"], retries=0, timeout_s=5) as c:
        code, _ = _error(c.list_collections)
    assert code is grpc.StatusCode.UNAVAILABLE


# -- 1. authentication ------------------------------------------------------------------------
def test_missing_or_wrong_keys_are_unauthenticated(secure: Stack, collection: str) -> None:
    for key in (None, "wrong-key", KEYS["admin"] + "x"):
        with secure.client(api_key=key) as c:
            code, details = _error(c.search, "a bag", collection=collection)
        assert code is grpc.StatusCode.UNAUTHENTICATED, key
        assert "x-api-key" in details
    out = secure.cli("--api-key", "wrong-key", "collections")
    assert out.returncode == 2 and "UNAUTHENTICATED" in out.stderr


def test_roles(secure: Stack, collection: str, tmp_path: Path) -> None:
    folder = make_gallery(tmp_path / "g", 3)
    with secure.client(api_key=KEYS["reader"]) as c:
        assert c.describe_collection(collection).points_count == N
        assert c.list_jobs()
        for call, args in [
            (c.create_ingest_job, (str(folder), "by-reader")),
            (c.create_collection, ("by-reader",)),
            (c.delete_collection, (collection,)),
        ]:
            code, details = _error(call, *args)
            assert code is grpc.StatusCode.PERMISSION_DENIED and "writer role" in details
    with secure.client(api_key=KEYS["writer"]) as c:
        c.create_collection("by-writer")
        c.delete_collection("by-writer")
        # the internal index service (raw point writes) is for admins
        from protos.gen.imagine.v1 import index_service_pb2_grpc as idx_grpc

        stub = idx_grpc.IndexServiceStub(c.channel)
        req = index_service_pb2.DeletePointsRequest(collection=collection, ids=["x"])
        code, details = _error(stub.DeletePoints, req, timeout=10)
        assert code is grpc.StatusCode.PERMISSION_DENIED and "admin role" in details
    with secure.client(api_key=KEYS["admin"]) as c:
        assert c.describe_collection(collection).points_count == N


def test_health_and_reflection_stay_open(secure: Stack, certs: dict[str, Path]) -> None:
    creds = grpc.ssl_channel_credentials(certs["cert"].read_bytes())
    with grpc.secure_channel(secure.address, creds) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        (resp,) = list(stub.ServerReflectionInfo(iter([req]), timeout=10))
        names = {s.name for s in resp.list_services_response.service}
        assert "imagine.v1.RetrievalService" in names


# -- 3. limits --------------------------------------------------------------------------------
def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("kwargs", "limit"),
    [
        ({"text": "x" * 201}, "max_query_chars=200"),
        ({"image": b"\x89PNG" + bytes(300_001)}, "max_image_bytes=300000"),
        ({"image": png_header_only(2000, 1000, bytes(1000))}, "max_image_pixels=1000000"),
        ({"text": "a bag", "top_k": 51}, "max_top_k=50"),
        ({"text": "a bag", "mode": "generated", "num_generated": 5}, "max_generated=4"),
        ({"text": "a bag", "mode": "fused", "steps": 31}, "max_steps=30"),
    ],
)
def test_each_limit_is_invalid_argument_naming_it(
    secure: Stack, collection: str, kwargs: dict[str, Any], limit: str
) -> None:
    with secure.client() as c:
        code, details = _error(c.search, collection=collection, **kwargs)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert limit in details and "IMAGINE_LIMITS__" in details


def test_model_service_limits(secure: Stack) -> None:
    with secure.client() as c:
        code, details = _error(c.encode_text, ["y" * 201])
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "max_query_chars=200" in details
        code, details = _error(c.generate, "a bag", num_images=5)
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "max_generated=4" in details
        code, details = _error(c.generate, "a bag", steps=31)
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "max_steps=30" in details
        code, details = _error(c.encode_images, [bytes(300_001)])
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "max_image_bytes" in details


def test_concurrent_generation_per_client_is_resource_exhausted(secure: Stack) -> None:
    def generate(i: int) -> str:
        with secure.client(api_key=KEYS["reader"], retries=0) as c:
            try:
                c.generate("a dress", num_images=4, steps=30, seed=i)
                return "OK"
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                assert "max_concurrent_generations=1" in exc.details()
                return "RESOURCE_EXHAUSTED"

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(generate, range(6)))
    assert "OK" in outcomes and "RESOURCE_EXHAUSTED" in outcomes, outcomes
    # another client (key) has its own allowance, and a finished call frees the slot
    with secure.client(api_key=KEYS["writer"]) as c:
        assert len(c.generate("a dress", num_images=2, steps=2)[0]) == 2


# -- 4. errors --------------------------------------------------------------------------------
def test_unknown_collections_and_jobs_are_not_found(secure: Stack) -> None:
    with secure.client() as c:
        for call, arg in [
            (c.describe_collection, "no-such"),
            (c.delete_collection, "no-such"),
            (c.get_job, "no-such-job"),
            (c.cancel_job, "no-such-job"),
        ]:
            assert _error(call, arg)[0] is grpc.StatusCode.NOT_FOUND
        code, _ = _error(c.search, "a bag", collection="no-such")
        assert code is grpc.StatusCode.NOT_FOUND
        code, _ = _error(lambda: list(c.watch_job("no-such-job")))
        assert code is grpc.StatusCode.NOT_FOUND


# -- 5. fuzzing -------------------------------------------------------------------------------
SERVICES = [
    retrieval_service_pb2,
    ingestion_service_pb2,
    collection_service_pb2,
    model_service_pb2,
    index_service_pb2,
]
METHODS = [
    m
    for module in SERVICES
    for service in module.DESCRIPTOR.services_by_name.values()
    for m in service.methods
]
# A proper answer: the request was judged, not crashed on. INTERNAL or UNKNOWN would be a bug.
PROPER = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
FD = pb_descriptor.FieldDescriptor
EXTREME_INTS = st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), 10**6])
TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "../../etc", "s3://", "s3:///x", "file://", "a" * 5000]),
)
BYTES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [b"", _png((8, 8)), png_header_only(60_000, 60_000, bytes(2000)), bytes(400_000)]
    ),
)


# Values that reach past the first checks: a collection the fuzz may fill or delete (never the
# one the other tests use), names that pass the name check, point ids, a real job's id.
FUZZ_COLLECTIONS = ["fuzzed", "fuzzed-empty"]
REAL_IDS: list[str] = []  # filled by the fuzz test before it runs
NAMES = st.one_of(
    TEXT,
    st.sampled_from(FUZZ_COLLECTIONS),
    st.from_regex(r"[a-z][a-z0-9_.-]{0,12}", fullmatch=True),
)


def _scalar(field: Any) -> st.SearchStrategy[Any]:
    t = field.type
    if t == FD.TYPE_STRING:
        if field.name == "source":  # never an existing folder: no fuzz job lists the disk
            return st.one_of(TEXT.map(lambda s: "/no-such-dir/" + s), TEXT.map(lambda s: s[:1]))
        if field.name in ("collection", "name"):
            return NAMES
        if field.name in ("id", "ids", "page_token"):
            return st.deferred(lambda: IDS_NOW())
        if field.name == "vector":
            return st.one_of(TEXT, st.sampled_from(["image", "visual", "caption", "text"]))
        return TEXT
    if t == FD.TYPE_BYTES:
        return BYTES
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return st.floats(width=32 if t == FD.TYPE_FLOAT else 64)
    if t == FD.TYPE_ENUM:
        return st.integers(-3, 8)
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return st.one_of(st.sampled_from([0, 1, 2**32 - 1]), st.integers(0, 100))
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return st.one_of(st.sampled_from([0, 1, 2**64 - 1]), st.integers(0, 100))
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return st.one_of(EXTREME_INTS.filter(lambda v: -(2**31) <= v < 2**31), st.integers(-5, 60))
    return st.one_of(EXTREME_INTS, st.integers(-5, 60))


def _message(desc: Any, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """A dict of field values for ``desc`` (some fields left unset)."""
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for field in desc.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key = _scalar(field.message_type.fields_by_name["key"])
            vf = field.message_type.fields_by_name["value"]
            if vf.message_type is not None:
                if depth > 1 or vf.message_type.full_name.startswith("google.protobuf"):
                    continue
                value: st.SearchStrategy[Any] = _message(vf.message_type, depth + 1)
            else:
                value = _scalar(vf)
            parts[field.name] = st.dictionaries(key, value, max_size=3)
            continue
        if field.message_type is not None:
            if depth > 1 or field.message_type.full_name.startswith("google.protobuf"):
                continue
            one: st.SearchStrategy[Any] = _message(field.message_type, depth + 1)
        else:
            one = _scalar(field)
        if field.is_repeated:
            many = st.lists(one, max_size=3)
            if field.type == FD.TYPE_STRING and depth == 0:  # past the batch limit, sometimes
                many = st.one_of(many, st.just(["t"] * 300))
            parts[field.name] = many
        else:
            parts[field.name] = one
    return st.fixed_dictionaries({}, optional=parts)


def _build(desc: Any, values: dict[str, Any]) -> Any:
    msg = message_factory.GetMessageClass(desc)()
    _fill(msg, values)
    return msg


def _fill(msg: Any, values: dict[str, Any]) -> None:
    for name, value in values.items():
        field = msg.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for k, v in value.items():
                if isinstance(v, dict):
                    _fill(target[k], v)
                else:
                    target[k] = v
        elif field.message_type is not None:
            if field.is_repeated:
                for v in value:
                    _fill(target.add(), v)
            else:
                _fill(target, value)
                target.SetInParent()
        elif field.is_repeated:
            target.extend(value)
        else:
            setattr(msg, name, value)


def IDS_NOW() -> st.SearchStrategy[str]:
    real = st.sampled_from(REAL_IDS) if REAL_IDS else st.just("")
    return st.one_of(TEXT, st.uuids().map(str), st.integers(0, 10**6).map(str), real)


@st.composite
def calls(draw: Any) -> tuple[Any, Any]:
    method = draw(st.sampled_from(METHODS))
    values = draw(_message(method.input_type))
    return method, _build(method.input_type, values)


def test_fuzzed_requests_to_every_rpc_get_proper_statuses(
    secure: Stack, collection: str, tmp_path: Path
) -> None:
    seen: dict[str, set[str]] = {}
    with secure.client() as c:
        channel = c.channel
        c.wait_job(c.create_ingest_job(str(make_gallery(tmp_path / "g", 6)), "fuzzed").id)
        c.create_collection("fuzzed-empty")
        REAL_IDS[:] = [j.id for j in c.list_jobs()]
        REAL_IDS.extend(h.id for h in c.search("a bag", collection=collection, mode="text").hits)

        @settings(
            max_examples=400,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(calls())
        def one(call: tuple[Any, Any]) -> None:
            method, request = call
            path = f"/{method.containing_service.full_name}/{method.name}"
            reply = method.output_type
            deser = message_factory.GetMessageClass(reply).FromString
            try:
                if method.server_streaming:
                    rpc = channel.unary_stream(path, lambda m: m.SerializeToString(), deser)
                    for _ in rpc(request, timeout=30):
                        pass
                else:
                    rpc = channel.unary_unary(path, lambda m: m.SerializeToString(), deser)
                    rpc(request, timeout=60)
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
            seen.setdefault(method.name, set()).add(code.name)
            assert code in PROPER, (path, request, code, details)
            assert "Traceback" not in details and 'File "' not in details

        one()
    assert set(seen) == {m.name for m in METHODS}, "every RPC was called"
    # ...and the service keeps serving
    with secure.client() as c:
        assert len(c.search("a bag", collection=collection, top_k=2, mode="text").hits) == 2
        assert c.describe_collection(collection).points_count == N


# -- 6. observability -------------------------------------------------------------------------
def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def _series(text: str) -> dict[str, float]:
    """``name{k="v",...}`` (labels sorted by name) -> value."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            name, _, labels = key.partition("{")
            pairs = sorted(re.findall(r'(\w+)="([^"]*)"', labels))
            inner = ",".join(f'{k}="{v}"' for k, v in pairs)
            out[f"{name}{{{inner}}}" if pairs else name] = float(value)
    return out


def test_request_ids_follow_a_query_into_the_deployments(secure: Stack, collection: str) -> None:
    with secure.client() as c:
        stub = ret_grpc.RetrievalServiceStub(c.channel)
        req = ret_pb.SearchRequest(text="trace this red dress", collection=collection, top_k=3)
        _, call = stub.Search.with_call(
            req, metadata=[("x-request-id", "trace-me-0042")], timeout=60
        )
        assert ("x-request-id", "trace-me-0042") in call.trailing_metadata()
    deadline = time.monotonic() + 30
    while True:
        records = []
        for line in secure.log.read_text(errors="replace").splitlines():
            if "{" in line:
                try:
                    records.append(json.loads(line[line.index("{") :]))
                except json.JSONDecodeError:
                    continue
        traced = [r for r in records if "trace-me-0042" in r.get("request_id", "")]
        loggers = {r["logger"] for r in traced}
        if {"imagine.ingress", "imagine.services"} <= loggers or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert "imagine.ingress" in loggers and "imagine.services" in loggers, traced
    assert any("TextEncoder" in r["message"] for r in traced)
    assert any("Generator" in r["message"] for r in traced)  # the default mode is fused
    # an ingestion job's id is on its tasks' lines and, as the request id of the calls its
    # tasks make, on the ingress's lines for them
    with secure.client() as c:
        (job,) = [j for j in c.list_jobs(collection) if j.embedded == N]
    assert any(r.get("job_id") == job.id and r["logger"].startswith("imagine") for r in records)
    assert any(
        r.get("request_id") == f"job-{job.id}" and r["logger"] == "imagine.ingress" for r in records
    )
    text = secure.log.read_text(errors="replace")
    assert "Traceback" not in text
    assert not any(k in text for k in KEYS.values())


def test_metrics_endpoint_after_a_demo_run(secure: Stack, collection: str) -> None:
    with secure.client() as c:  # the demo's queries: text, then fused twice (a cache hit)
        c.search("a photo of a sneaker", collection=collection, top_k=5, mode="text")
        for _ in range(2):
            c.search("a photo of a bag", collection=collection, top_k=5, mode="fused", seed=7)
        _error(c.describe_collection, "no-such")
    deadline = time.monotonic() + 30
    while True:
        series = _series(_scrape(secure.env["METRICS"]))
        if series.get('imagine_batches{deployment="Generator"}', 0) > 0:
            break
        assert time.monotonic() < deadline, sorted(series)[:50]
        time.sleep(1)
    assert series['imagine_rpc_requests_total{code="OK",method="Search"}'] >= 3
    assert series['imagine_rpc_requests_total{code="NOT_FOUND",method="DescribeCollection"}'] >= 1
    assert series['imagine_rpc_latency_seconds_count{code="OK",method="Search"}'] >= 3
    for stage in ("encode_text", "generate", "encode_generated", "aggregate", "search"):
        assert series[f'imagine_stage_seconds_count{{stage="{stage}"}}'] >= 1, stage
    assert series['imagine_query_cache_total{result="hit"}'] >= 1
    assert series['imagine_query_cache_total{result="miss"}'] >= 1
    for dep in ("TextEncoder", "ImageEncoder", "VisionEncoder", "Generator"):
        assert series[f'imagine_batches{{deployment="{dep}"}}'] >= 1, dep
        assert series[f'imagine_batch_size_mean{{deployment="{dep}"}}'] >= 1, dep
    # the cold fused query ran the denoising loop (its cache hit ran none)
    assert series["imagine_generator_passes"] >= 1
    assert series["imagine_generator_queries_per_pass"] >= 1
    assert series['imagine_jobs{state="SUCCEEDED"}'] >= 1
    assert series['imagine_job_objects{outcome="embedded"}'] >= N
    worker = _series(_scrape(secure.env["WORKER_METRICS"]))
    assert worker['imagine_worker_tasks_total{outcome="succeeded",task="run_job"}'] >= 1
    assert worker['imagine_worker_tasks_total{outcome="succeeded",task="run_chunk"}'] >= 1
