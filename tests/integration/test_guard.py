"""The ingress's guard over real gRPC (an in-process grpc.aio server on loopback with the real
interceptor and error mapping, over servicers that misbehave on purpose): deadlines, UNAVAILABLE
with retry advice, INTERNAL without a trace or a secret, roles, and the client's retries."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from imagine.client import ImagineClient
from imagine.config import ApiKey, LimitSettings, hash_api_key
from imagine.index import CollectionNotFound, IndexUnavailable
from imagine.observability import JsonFormatter
from protos.gen.imagine.v1 import collection_service_pb2 as col_pb
from protos.gen.imagine.v1 import collection_service_pb2_grpc as col_grpc
from protos.gen.imagine.v1 import retrieval_service_pb2 as ret_pb
from protos.gen.imagine.v1 import retrieval_service_pb2_grpc as ret_grpc
from services.guard import Guard
from services.servicers import rpc
from tests.conftest import free_port

pytestmark = pytest.mark.integration
KEYS = {"reader": "r-key-0123456789", "writer": "w-key-0123456789", "admin": "a-key-0123456789"}
SECRET = "hunter2-s3cr3t"


class Misbehaving(ret_grpc.RetrievalServiceServicer):
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    @rpc
    async def Search(self, request: Any, context: Any) -> Any:
        what = request.collection
        self.calls[what] = self.calls.get(what, 0) + 1
        if what == "slow":
            await asyncio.sleep(30)
        if what == "down":
            raise IndexUnavailable(f"qdrant at http://admin:{SECRET}@qdrant:6333 refused")
        if what == "flaky" and self.calls[what] <= 2:
            raise ConnectionError("connection refused")
        if what == "boom":
            raise RuntimeError(f"password={SECRET} and an internal detail")
        if what == "missing":
            raise CollectionNotFound("collection 'missing' not found")
        return ret_pb.SearchResponse(model_version="m")


class Collections(col_grpc.CollectionServiceServicer):
    @rpc
    async def DeleteCollection(self, request: Any, context: Any) -> Any:
        return col_pb.DeleteCollectionResponse()


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Misbehaving, io.StringIO]]:
    port = free_port()
    servicer = Misbehaving()
    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    keys = [ApiKey(name=role, role=role, sha256=hash_api_key(k)) for role, k in KEYS.items()]

    async def main() -> None:
        srv = grpc.aio.server(interceptors=[Guard(keys, LimitSettings(max_request_s=1.0))])
        ret_grpc.add_RetrievalServiceServicer_to_server(servicer, srv)
        col_grpc.add_CollectionServiceServicer_to_server(Collections(), srv)
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), srv)
        srv.add_insecure_port(f"127.0.0.1:{port}")
        await srv.start()
        ready.set()
        await stop.wait()
        await srv.stop(0)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield f"127.0.0.1:{port}", servicer, logs
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)
    logging.getLogger().removeHandler(handler)


def _search(address: str, collection: str, key: str | None = KEYS["reader"], **kw: Any) -> Any:
    with ImagineClient(address, timeout_s=20, api_key=key, retries=0, **kw) as c:
        return c.search("x", collection=collection)


def _code(fn: Any, *args: Any, **kw: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kw)
    return err.value.code(), err.value.details()


def test_a_call_past_the_server_deadline_gets_deadline_exceeded(server: Any) -> None:
    address, _, _ = server
    code, details = _code(_search, address, "slow")
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "max_request_s=1" in details


def test_a_dependency_down_is_unavailable_with_retry_advice_and_no_secret(server: Any) -> None:
    address, _, logs = server
    code, details = _code(_search, address, "down")
    assert code is grpc.StatusCode.UNAVAILABLE
    assert "retry" in details and SECRET not in details
    assert SECRET not in logs.getvalue()


def test_an_unexpected_error_is_internal_with_a_request_id_only(server: Any) -> None:
    address, _, logs = server
    code, details = _code(_search, address, "boom")
    assert code is grpc.StatusCode.INTERNAL
    assert details.startswith("internal error (request id ") and SECRET not in details
    text = logs.getvalue()
    assert "Traceback" not in text and SECRET not in text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    failed = [r for r in lines if "Search failed" in r["message"]]
    assert failed and failed[-1]["request_id"] in details  # the client's id finds the line


def test_unknown_things_are_not_found(server: Any) -> None:
    address, _, _ = server
    assert _code(_search, address, "missing")[0] is grpc.StatusCode.NOT_FOUND


def test_the_client_retries_unavailable_with_backoff(server: Any) -> None:
    address, servicer, _ = server
    with ImagineClient(address, api_key=KEYS["reader"], retries=4, backoff_s=0.05) as c:
        assert c.search("x", collection="flaky").model_version == "m"
    assert servicer.calls["flaky"] == 3  # two UNAVAILABLE, then the answer
    before = servicer.calls.get("down", 0)
    client = ImagineClient(address, api_key=KEYS["reader"], retries=2, backoff_s=0.05)
    with client as c, pytest.raises(grpc.RpcError) as err:
        c.search("x", collection="down")
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert servicer.calls["down"] - before == 3  # tried, then retried twice
    # a client deadline shorter than the server's is the one that counts
    with ImagineClient(address, api_key=KEYS["reader"], timeout_s=0.3) as c:
        code, _ = _code(c.search, "x", collection="slow")
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_keys_and_roles(server: Any) -> None:
    address, _, logs = server
    code, details = _code(_search, address, "ok", key=None)
    assert code is grpc.StatusCode.UNAUTHENTICATED and "missing" in details
    code, details = _code(_search, address, "ok", key="not-a-key")
    assert code is grpc.StatusCode.UNAUTHENTICATED and "not valid" in details
    assert _search(address, "ok").model_version == "m"
    with ImagineClient(address, api_key=KEYS["reader"]) as c:
        code, details = _code(c.delete_collection, "x")
    assert code is grpc.StatusCode.PERMISSION_DENIED and "writer" in details
    for role in ("writer", "admin"):
        with ImagineClient(address, api_key=KEYS[role]) as c:
            c.delete_collection("x")
    # health stays open
    with grpc.insecure_channel(address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert "not-a-key" not in logs.getvalue() and KEYS["reader"] not in logs.getvalue()
