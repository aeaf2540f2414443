"""What every call through the ingress passes: authentication, roles, a deadline, a request id,
metrics and one log line per failure.

API keys arrive as ``x-api-key`` metadata (or ``authorization: Bearer KEY``) and are compared by
their SHA-256 with the configured ones (``IMAGINE_AUTH__KEYS``): a wrong or missing key gets
UNAUTHENTICATED, a key whose role is below the method's gets PERMISSION_DENIED. Health checking
and reflection stay open. Each unary call runs under the server deadline ``max_request_s`` (or
the client's, if shorter) and gets DEADLINE_EXCEEDED past it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc

from imagine.config import ROLES, ApiKey, LimitSettings, hash_api_key
from imagine.observability import RPC_LATENCY, RPC_REQUESTS, request_id

log = logging.getLogger("imagine.ingress")

OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")
# The least role each method needs; a method not listed needs "admin" (deny by default).
READER, WRITER, ADMIN = ROLES
_ROLE_OF: dict[str, str] = {
    "imagine.v1.RetrievalService/Search": READER,
    "imagine.v1.CollectionService/DescribeCollection": READER,
    "imagine.v1.CollectionService/ListCollections": READER,
    "imagine.v1.CollectionService/CreateCollection": WRITER,
    "imagine.v1.CollectionService/DeleteCollection": WRITER,
    "imagine.v1.IngestionService/GetIngestJob": READER,
    "imagine.v1.IngestionService/WatchIngestJob": READER,
    "imagine.v1.IngestionService/ListIngestJobs": READER,
    "imagine.v1.IngestionService/ListIngestJobFailures": READER,
    "imagine.v1.IngestionService/CreateIngestJob": WRITER,
    "imagine.v1.IngestionService/CancelIngestJob": WRITER,
    "imagine.v1.ModelService/EncodeText": READER,
    "imagine.v1.ModelService/EncodeImage": READER,
    "imagine.v1.ModelService/Generate": READER,
    # imagine.v1.IndexService/* (raw point writes for workers): admin
}

# Who is calling: the key's name, or the peer's host when authentication is off.
client_id: contextvars.ContextVar[str] = contextvars.ContextVar("client_id", default="")


def required_role(method: str) -> str:
    return _ROLE_OF.get(method.lstrip("/"), ADMIN)


def _metadata_key(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "x-api-key":
            return str(value)
        if key == "authorization" and str(value).lower().startswith("bearer "):
            return str(value)[7:].strip()
    return None


def _peer_host(peer: str) -> str:
    # "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555", "unix:/path"
    kind, _, rest = peer.partition(":")
    return rest.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else peer


class Guard(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        keys: list[ApiKey] | None,
        limits: LimitSettings,
        on_request_id: Callable[[str], None] | None = None,
    ) -> None:
        """``keys`` None: authentication off. ``on_request_id`` passes each call's request id
        on (the ingress hands it to Ray Serve, whose handles carry it to the deployments)."""
        self.keys = None if keys is None else {k.sha256: k for k in keys}
        self.limits = limits
        self.on_request_id = on_request_id

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None or method.lstrip("/").startswith(OPEN_SERVICES):
            return handler
        name = method.rsplit("/", 1)[-1]
        role = required_role(method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, name, role),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, name, role),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # no client-streaming RPCs in our API

    async def _admit(self, context: grpc.aio.ServicerContext, role: str, name: str) -> None:
        """Set the request id and the caller; abort unless the caller may call ``name``."""
        md = context.invocation_metadata() or ()
        given = dict((k, v) for k, v in md if k == "x-request-id").get("x-request-id")
        rid = str(given)[:64] if given else uuid.uuid4().hex[:16]
        request_id.set(rid)
        if self.on_request_id is not None:
            self.on_request_id(rid)
        context.set_trailing_metadata((("x-request-id", rid),))
        if self.keys is None:
            client_id.set(_peer_host(context.peer()))
            return
        key = _metadata_key(md)
        entry = self.keys.get(hash_api_key(key)) if key else None
        if entry is None:
            why = "missing" if not key else "not valid"
            log.warning("%s refused: API key %s (peer %s)", name, why, context.peer())
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"API key {why}: pass a key as 'x-api-key' metadata",
            )
        assert entry is not None
        client_id.set(entry.name)
        if ROLES.index(entry.role) < ROLES.index(role):
            log.warning("%s refused: key %r has role %s", name, entry.name, entry.role)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{name} needs the {role} role; this key has {entry.role}",
            )

    def _unary(self, behavior: Any, name: str, role: str) -> Any:
        limit = self.limits.max_request_s

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with _measured(name, context):
                await self._admit(context, role, name)
                remaining = context.time_remaining()
                budget = limit if remaining is None else min(limit, remaining)
                try:
                    return await asyncio.wait_for(behavior(request, context), budget)
                except TimeoutError:
                    await context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"{name} did not finish within its deadline of {budget:.1f} s "
                        f"(server limit max_request_s={limit:g})",
                    )

        return call

    def _stream(self, behavior: Any, name: str, role: str) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with _measured(name, context):
                await self._admit(context, role, name)
                async for msg in behavior(request, context):
                    yield msg

        return call


@contextlib.contextmanager
def _measured(name: str, context: grpc.aio.ServicerContext) -> Iterator[None]:
    start = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        yield
    except (asyncio.CancelledError, GeneratorExit):  # the client went away (or stopped reading)
        code = grpc.StatusCode.CANCELLED
        raise
    except BaseException:
        code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[assignment]
        raise
    finally:
        if not isinstance(code, grpc.StatusCode):
            code = grpc.StatusCode.UNKNOWN
        took = time.perf_counter() - start
        RPC_REQUESTS.labels(name, code.name).inc()
        RPC_LATENCY.labels(name, code.name).observe(took)
        log.info("%s %s %.1f ms (client %s)", name, code.name, took * 1e3, client_id.get() or "-")


class GenerationSlots:
    """At most ``limit`` generating calls in flight per client."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        from services.query import TooManyRequests

        who = client_id.get()
        n = self.in_flight.get(who, 0)
        if n >= self.limit:
            raise TooManyRequests(
                f"{n} generating calls of this client are in flight: the limit "
                f"max_concurrent_generations={self.limit} (IMAGINE_LIMITS__MAX_CONCURRENT_"
                "GENERATIONS) allows no more; retry when one finishes"
            )
        self.in_flight[who] = n + 1
        try:
            yield
        finally:
            left = self.in_flight[who] - 1
            if left:
                self.in_flight[who] = left
            else:
                del self.in_flight[who]
