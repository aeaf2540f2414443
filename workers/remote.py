"""Adapters a worker uses to reach the services over gRPC.

``RemoteIndex`` implements the vector-index port through the ingress's internal
``IndexService`` (the embedded profile, where the ingress owns the Qdrant store).
``GrpcEncoder`` gets image vectors from the encoder deployments through ``ModelService``.
gRPC UNAVAILABLE / DEADLINE_EXCEEDED become :class:`TransientError` so tasks retry them.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from google.protobuf import struct_pb2

from imagine.client import ImagineClient
from imagine.index import CollectionNotFound, ModelVersionMismatch, Point
from protos.gen.imagine.v1 import common_pb2
from protos.gen.imagine.v1 import index_service_pb2 as idx_pb
from protos.gen.imagine.v1 import index_service_pb2_grpc as idx_grpc
from workers.ingest import Embedded

T = TypeVar("T")
_POOL = ThreadPoolExecutor(8, thread_name_prefix="encode-rpc")
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class TransientError(RuntimeError):
    """A dependency is down or slow: retry the task later."""


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        detail = exc.details()  # type: ignore[attr-defined]
        if code in TRANSIENT:
            raise TransientError(f"{code.name}: {detail}") from exc
        if code is grpc.StatusCode.NOT_FOUND:
            raise CollectionNotFound(detail) from exc
        if code is grpc.StatusCode.FAILED_PRECONDITION:
            raise ModelVersionMismatch(detail) from exc
        raise


class GrpcEncoder:
    """Every named image vector the served model has (``image``, and ``visual`` if present),
    and with a caption decoder each image's caption and its text vector (``caption``)."""

    def __init__(self, client: ImagineClient) -> None:
        self.client = client
        _, self.model_version = call(client.encode_text, ["probe"])
        self.vectors = ["image"]
        try:
            call(client.encode_images, [_probe_png()], "visual")
            self.vectors.append("visual")
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.INVALID_ARGUMENT:  # type: ignore[attr-defined]
                raise
        self.captions = True
        try:
            call(client.caption, [_probe_png()])
        except ModelVersionMismatch:  # FAILED_PRECONDITION: no caption decoder
            self.captions = False

    def encode_texts(self, texts: list[str]) -> list[list[float]]:
        return call(self.client.encode_text, texts)[0]

    def encode_images(self, images: list[bytes]) -> list[Embedded | str]:
        # One RPC per vector (and the captions), in flight together: each deployment batches
        # its own (each in a copy of this thread's context: the calls carry the task's job id).
        futures = {
            name: _POOL.submit(
                contextvars.copy_context().run, call, self.client.encode_images, images, name
            )
            for name in self.vectors
        }
        captions = (
            _POOL.submit(contextvars.copy_context().run, call, self.client.caption, images)
            if self.captions
            else None
        )
        per_vector = {name: f.result()[0] for name, f in futures.items()}
        out: list[Embedded | str] = []
        for i in range(len(images)):
            first = per_vector["image"][i]
            if isinstance(first, str):
                out.append(first)
            else:
                out.append(Embedded({name: per_vector[name][i] for name in self.vectors}))  # type: ignore[misc]
        if captions is not None:
            caps = captions.result()[0]
            todo = [i for i, e in enumerate(out) if not isinstance(e, str) and caps[i].text]
            vecs = self.encode_texts([caps[i].text for i in todo]) if todo else []
            for i, vec in zip(todo, vecs, strict=True):
                emb = out[i]
                assert not isinstance(emb, str)
                emb.vectors["caption"] = vec
            for i, emb in enumerate(out):
                if not isinstance(emb, str):
                    emb.payload = {"caption": caps[i].text, "caption_log_prob": caps[i].log_prob}
        return out


def _probe_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


class RemoteIndex:
    """The ingestion side of the index port (``PointStore``) over the owner's ``IndexService``."""

    def __init__(self, channel: grpc.Channel, timeout_s: float = 120.0) -> None:
        self.stub = idx_grpc.IndexServiceStub(channel)
        self.timeout_s = timeout_s

    def ensure_collection(self, name: str, vectors: Mapping[str, int], model_version: str) -> None:
        req = idx_pb.EnsureCollectionRequest(
            collection=name, vectors=dict(vectors), model_version=model_version
        )
        call(self.stub.EnsureCollection, req, timeout=self.timeout_s)

    def get_etags(self, name: str, ids: Sequence[str]) -> dict[str, str]:
        req = idx_pb.GetEtagsRequest(collection=name, ids=list(ids))
        return dict(call(self.stub.GetEtags, req, timeout=self.timeout_s).etags)

    def upsert(self, name: str, points: Sequence[Point]) -> None:
        if not points:
            return
        req = idx_pb.UpsertPointsRequest(collection=name)
        for p in points:
            payload = struct_pb2.Struct()
            payload.update(p.payload)
            req.points.append(
                idx_pb.Point(
                    id=p.id,
                    vectors={k: common_pb2.Vector(values=list(v)) for k, v in p.vectors.items()},
                    payload=payload,
                )
            )
        call(self.stub.UpsertPoints, req, timeout=self.timeout_s)

    def source_ids(
        self, name: str, source: str, page_token: str | None, page_size: int
    ) -> tuple[list[str], str | None]:
        req = idx_pb.ListSourcePointsRequest(
            collection=name, source=source, page_token=page_token or "", page_size=page_size
        )
        resp = call(self.stub.ListSourcePoints, req, timeout=self.timeout_s)
        return list(resp.ids), resp.next_page_token or None

    def delete(self, name: str, ids: Sequence[str]) -> None:
        if ids:
            req = idx_pb.DeletePointsRequest(collection=name, ids=list(ids))
            call(self.stub.DeletePoints, req, timeout=self.timeout_s)
