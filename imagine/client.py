"""The Python client: typed calls over gRPC. Imports no model code (no torch).

from imagine.client import ImagineClient
with ImagineClient("127.0.0.1:50051", api_key=KEY, ca_file="ca.pem") as c:
    hits = c.search("a photo of a sneaker", collection="fmnist", top_k=5).hits

Every call has a deadline (``timeout_s``); calls that fail with UNAVAILABLE (the server or one
of its dependencies is down) are retried with exponential backoff and jitter, ``retries`` times,
within that deadline. An API key is sent as ``x-api-key`` metadata on every call; with a CA file
the channel uses TLS.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc

from protos.gen.imagine.v1 import collection_service_pb2 as col_pb
from protos.gen.imagine.v1 import collection_service_pb2_grpc as col_grpc
from protos.gen.imagine.v1 import ingestion_service_pb2 as ing_pb
from protos.gen.imagine.v1 import ingestion_service_pb2_grpc as ing_grpc
from protos.gen.imagine.v1 import model_service_pb2 as mod_pb
from protos.gen.imagine.v1 import model_service_pb2_grpc as mod_grpc
from protos.gen.imagine.v1 import retrieval_service_pb2 as ret_pb
from protos.gen.imagine.v1 import retrieval_service_pb2_grpc as ret_grpc

TERMINAL_STATES = {
    ing_pb.JOB_STATE_SUCCEEDED,
    ing_pb.JOB_STATE_SUCCEEDED_WITH_ERRORS,
    ing_pb.JOB_STATE_FAILED,
    ing_pb.JOB_STATE_CANCELLED,
}
AGGREGATIONS = {
    "": ret_pb.AGGREGATION_UNSPECIFIED,
    "attention": ret_pb.AGGREGATION_ATTENTION,
    "mean": ret_pb.AGGREGATION_MEAN,
}
MODES = {
    "": ret_pb.SEARCH_MODE_UNSPECIFIED,
    "text": ret_pb.SEARCH_MODE_TEXT,
    "generated": ret_pb.SEARCH_MODE_GENERATED,
    "fused": ret_pb.SEARCH_MODE_FUSED,
}


T = TypeVar("T")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE}
STRATEGIES = {
    "": mod_pb.DECODING_STRATEGY_UNSPECIFIED,
    "greedy": mod_pb.DECODING_STRATEGY_GREEDY,
    "beam": mod_pb.DECODING_STRATEGY_BEAM,
    "sample": mod_pb.DECODING_STRATEGY_SAMPLE,
}
KINDS = {"images": ing_pb.GALLERY_KIND_IMAGES, "texts": ing_pb.GALLERY_KIND_TEXTS}


def state_name(state: int) -> str:
    return ing_pb.JobState.Name(state).removeprefix("JOB_STATE_")


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Adds metadata to every call on the channel: the API key, and a request id if
    ``request_id`` gives one (a worker sends its job's id, so the job can be followed)."""

    def __init__(
        self, metadata: list[tuple[str, str]], request_id: Callable[[], str] | None = None
    ) -> None:
        self.metadata = metadata
        self.request_id = request_id

    def _details(self, details: Any) -> Any:
        md = list(details.metadata or []) + self.metadata
        rid = self.request_id() if self.request_id is not None else ""
        if rid:
            md.append(("x-request-id", rid))
        return _Details(details, md)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, base: Any, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


def open_channel(
    address: str,
    *,
    api_key: str | None = None,
    ca_file: str | Path | None = None,
    server_name: str | None = None,
    request_id: Callable[[], str] | None = None,
) -> grpc.Channel:
    """A channel to the ingress: TLS when ``ca_file`` is given, the API key on every call."""
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if ca_file:
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        creds = grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes())
        channel = grpc.secure_channel(address, creds, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    if api_key or request_id is not None:
        fixed = [("x-api-key", api_key)] if api_key else []
        channel = grpc.intercept_channel(channel, _Metadata(fixed, request_id))
    return channel


class ImagineClient:
    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        timeout_s: float = 60.0,
        *,
        api_key: str | None = None,
        ca_file: str | Path | None = None,
        server_name: str | None = None,
        retries: int = 4,
        backoff_s: float = 0.25,
        max_backoff_s: float = 8.0,
        request_id: Callable[[], str] | None = None,
    ) -> None:
        """``timeout_s``: the deadline of each call (retries included); ``retries``: how often a
        call that failed with UNAVAILABLE is tried again (backoff doubles from ``backoff_s``);
        ``request_id``: called per call, a non-empty result is sent as ``x-request-id``."""
        self.address = address
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.channel = open_channel(
            address,
            api_key=api_key,
            ca_file=ca_file,
            server_name=server_name,
            request_id=request_id,
        )
        self.retrieval = ret_grpc.RetrievalServiceStub(self.channel)
        self.ingestion = ing_grpc.IngestionServiceStub(self.channel)
        self.collections = col_grpc.CollectionServiceStub(self.channel)
        self.models = mod_grpc.ModelServiceStub(self.channel)

    def __enter__(self) -> ImagineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the server accepts connections (raises grpc.FutureTimeoutError)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)

    def _call(self, method: Callable[..., T], request: Any, timeout_s: float | None = None) -> T:
        """One unary call under a deadline, retried with backoff while UNAVAILABLE."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            try:
                return method(request, timeout=max(left, 0.001))
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                if code not in RETRYABLE or attempt >= self.retries:
                    raise
                pause = min(self.max_backoff_s, self.backoff_s * 2**attempt)
                pause *= 0.5 + random.random() / 2
                if time.monotonic() + pause >= deadline:
                    raise
                time.sleep(pause)
                attempt += 1

    # -- retrieval ------------------------------------------------------------------------------
    def search(
        self,
        text: str | None = None,
        *,
        collection: str,
        image: bytes | None = None,
        top_k: int = 10,
        filters: dict[str, str] | None = None,
        mode: str = "",
        aggregation: str = "",
        weights: dict[str, float] | None = None,
        explain: bool = False,
        timeout_s: float | None = None,
        **extra: Any,
    ) -> Any:
        """``mode``: "" (the server's default: fused when it has a generator), "text",
        "generated" or "fused"; ``timeout_s``: this call's deadline (default the client's);
        ``extra``: num_generated, steps, guidance, seed."""
        if (text is None) == (image is None):
            raise ValueError("give exactly one of text or image")
        req = ret_pb.SearchRequest(
            collection=collection,
            top_k=top_k,
            filter=filters or {},
            mode=MODES[mode],
            aggregation=AGGREGATIONS[aggregation],
            path_weights=weights or {},
            explain=explain,
            **extra,
        )
        if text is not None:
            req.text = text
        else:
            req.image = image  # type: ignore[assignment]
        return self._call(self.retrieval.Search, req, timeout_s)

    # -- ingestion ------------------------------------------------------------------------------
    def create_ingest_job(
        self,
        source: str,
        collection: str,
        metadata: dict[str, str] | None = None,
        chunk_size: int = 0,
        sync: bool = False,
        kind: str = "images",
    ) -> Any:
        """``kind`` "texts": a text gallery (.txt objects, .jsonl objects or a .jsonl file)."""
        req = ing_pb.CreateIngestJobRequest(
            source=source,
            collection=collection,
            metadata=metadata or {},
            chunk_size=chunk_size,
            sync=sync,
            kind=KINDS[kind],
        )
        return self._call(self.ingestion.CreateIngestJob, req).job

    def job_failures(self, job_id: str, page_size: int = 1000) -> Iterator[Any]:
        """Every per-object failure of a job (``.uri``, ``.reason``), page by page."""
        token = ""
        while True:
            req = ing_pb.ListIngestJobFailuresRequest(
                id=job_id, page_size=page_size, page_token=token
            )
            resp = self._call(self.ingestion.ListIngestJobFailures, req)
            yield from resp.failures
            token = resp.next_page_token
            if not token:
                return

    def get_job(self, job_id: str) -> Any:
        req = ing_pb.GetIngestJobRequest(id=job_id)
        return self._call(self.ingestion.GetIngestJob, req).job

    def watch_job(self, job_id: str) -> Iterator[Any]:
        """Job snapshots as they change, until the job ends (a stream: no deadline, no retry)."""
        for msg in self.ingestion.WatchIngestJob(ing_pb.WatchIngestJobRequest(id=job_id)):
            yield msg.job

    def wait_job(self, job_id: str, timeout_s: float = 3600.0) -> Any:
        deadline = time.monotonic() + timeout_s
        job = self.get_job(job_id)
        for job in self.watch_job(job_id):
            if job.state in TERMINAL_STATES or time.monotonic() > deadline:
                break
        return job

    def cancel_job(self, job_id: str) -> Any:
        req = ing_pb.CancelIngestJobRequest(id=job_id)
        return self._call(self.ingestion.CancelIngestJob, req).job

    def list_jobs(self, collection: str = "", page_size: int = 50) -> list[Any]:
        req = ing_pb.ListIngestJobsRequest(collection=collection, page_size=page_size)
        return list(self._call(self.ingestion.ListIngestJobs, req).jobs)

    # -- collections ----------------------------------------------------------------------------
    def create_collection(self, name: str) -> Any:
        req = col_pb.CreateCollectionRequest(name=name)
        return self._call(self.collections.CreateCollection, req).collection

    def describe_collection(self, name: str) -> Any:
        req = col_pb.DescribeCollectionRequest(name=name)
        return self._call(self.collections.DescribeCollection, req).collection

    def list_collections(self) -> list[Any]:
        req = col_pb.ListCollectionsRequest()
        return list(self._call(self.collections.ListCollections, req).collections)

    def delete_collection(self, name: str) -> None:
        req = col_pb.DeleteCollectionRequest(name=name)
        self._call(self.collections.DeleteCollection, req)

    def set_alias(self, alias: str, collection: str) -> None:
        """Point ``alias`` at ``collection`` (atomically replacing its previous target)."""
        req = col_pb.UpdateAliasRequest(alias=alias, collection=collection)
        self.collections.UpdateAlias(req, timeout=self.timeout_s)

    def delete_alias(self, alias: str) -> None:
        req = col_pb.DeleteAliasRequest(alias=alias)
        self.collections.DeleteAlias(req, timeout=self.timeout_s)

    def list_aliases(self) -> dict[str, str]:
        """alias -> collection."""
        resp = self.collections.ListAliases(col_pb.ListAliasesRequest(), timeout=self.timeout_s)
        return {a.alias: a.collection for a in resp.aliases}

    # -- models ---------------------------------------------------------------------------------
    def encode_text(self, texts: list[str]) -> tuple[list[list[float]], str]:
        resp = self._call(self.models.EncodeText, mod_pb.EncodeTextRequest(texts=texts))
        return [list(v.values) for v in resp.embeddings], resp.model_version

    def generate(
        self, prompt: str, num_images: int = 0, steps: int = 0, guidance: float = 0.0, seed: int = 0
    ) -> tuple[list[bytes], str]:
        """PNGs of images generated from ``prompt`` (0 means the server default)."""
        req = mod_pb.GenerateRequest(
            prompt=prompt, num_images=num_images, steps=steps, guidance=guidance, seed=seed
        )
        resp = self._call(self.models.Generate, req)
        return list(resp.images), resp.model_version

    def caption(
        self,
        images: list[bytes],
        strategy: str = "",
        beam_size: int = 0,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> tuple[list[Any], str]:
        """Captions (``.text``, ``.log_prob``, ``.error``) in input order, and the decoder's
        version. ``strategy``: "" (greedy), "greedy", "beam" or "sample"."""
        resp = self.models.Caption(
            mod_pb.CaptionRequest(
                images=images,
                strategy=STRATEGIES[strategy],
                beam_size=beam_size,
                temperature=temperature,
                seed=seed,
            ),
            timeout=self.timeout_s,
        )
        return list(resp.captions), resp.model_version

    def encode_images(
        self, images: list[bytes], vector: str = "image"
    ) -> tuple[list[list[float] | str], str]:
        """Vectors, or the reason an image could not be encoded, in input order."""
        req = mod_pb.EncodeImageRequest(images=images, vector=vector)
        resp = self._call(self.models.EncodeImage, req)
        out: list[list[float] | str] = [
            err if err else list(v.values)
            for v, err in zip(resp.embeddings, resp.errors, strict=True)
        ]
        return out, resp.model_version
