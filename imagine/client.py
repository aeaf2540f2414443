"""The Python client: typed calls over gRPC. Imports no model code (no torch).

from imagine.client import ImagineClient
with ImagineClient("127.0.0.1:50051") as c:
    hits = c.search("a photo of a sneaker", collection="fmnist", top_k=5).hits
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

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


STRATEGIES = {
    "": mod_pb.DECODING_STRATEGY_UNSPECIFIED,
    "greedy": mod_pb.DECODING_STRATEGY_GREEDY,
    "beam": mod_pb.DECODING_STRATEGY_BEAM,
    "sample": mod_pb.DECODING_STRATEGY_SAMPLE,
}
KINDS = {"images": ing_pb.GALLERY_KIND_IMAGES, "texts": ing_pb.GALLERY_KIND_TEXTS}


def state_name(state: int) -> str:
    return ing_pb.JobState.Name(state).removeprefix("JOB_STATE_")


class ImagineClient:
    def __init__(self, address: str = "127.0.0.1:50051", timeout_s: float = 60.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
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
        **extra: Any,
    ) -> Any:
        """``mode``: "" (the server's default: fused when it has a generator), "text",
        "generated" or "fused"; ``extra``: num_generated, steps, guidance, seed."""
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
        return self.retrieval.Search(req, timeout=self.timeout_s)

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
        return self.ingestion.CreateIngestJob(req, timeout=self.timeout_s).job

    def job_failures(self, job_id: str, page_size: int = 1000) -> Iterator[Any]:
        """Every per-object failure of a job (``.uri``, ``.reason``), page by page."""
        token = ""
        while True:
            req = ing_pb.ListIngestJobFailuresRequest(
                id=job_id, page_size=page_size, page_token=token
            )
            resp = self.ingestion.ListIngestJobFailures(req, timeout=self.timeout_s)
            yield from resp.failures
            token = resp.next_page_token
            if not token:
                return

    def get_job(self, job_id: str) -> Any:
        req = ing_pb.GetIngestJobRequest(id=job_id)
        return self.ingestion.GetIngestJob(req, timeout=self.timeout_s).job

    def watch_job(self, job_id: str) -> Iterator[Any]:
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
        return self.ingestion.CancelIngestJob(req, timeout=self.timeout_s).job

    def list_jobs(self, collection: str = "", page_size: int = 50) -> list[Any]:
        req = ing_pb.ListIngestJobsRequest(collection=collection, page_size=page_size)
        return list(self.ingestion.ListIngestJobs(req, timeout=self.timeout_s).jobs)

    # -- collections ----------------------------------------------------------------------------
    def create_collection(self, name: str) -> Any:
        req = col_pb.CreateCollectionRequest(name=name)
        return self.collections.CreateCollection(req, timeout=self.timeout_s).collection

    def describe_collection(self, name: str) -> Any:
        req = col_pb.DescribeCollectionRequest(name=name)
        return self.collections.DescribeCollection(req, timeout=self.timeout_s).collection

    def list_collections(self) -> list[Any]:
        req = col_pb.ListCollectionsRequest()
        return list(self.collections.ListCollections(req, timeout=self.timeout_s).collections)

    def delete_collection(self, name: str) -> None:
        req = col_pb.DeleteCollectionRequest(name=name)
        self.collections.DeleteCollection(req, timeout=self.timeout_s)

    # -- models ---------------------------------------------------------------------------------
    def encode_text(self, texts: list[str]) -> tuple[list[list[float]], str]:
        resp = self.models.EncodeText(mod_pb.EncodeTextRequest(texts=texts), timeout=self.timeout_s)
        return [list(v.values) for v in resp.embeddings], resp.model_version

    def generate(
        self, prompt: str, num_images: int = 0, steps: int = 0, guidance: float = 0.0, seed: int = 0
    ) -> tuple[list[bytes], str]:
        """PNGs of images generated from ``prompt`` (0 means the server default)."""
        resp = self.models.Generate(
            mod_pb.GenerateRequest(
                prompt=prompt, num_images=num_images, steps=steps, guidance=guidance, seed=seed
            ),
            timeout=self.timeout_s,
        )
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
        resp = self.models.EncodeImage(
            mod_pb.EncodeImageRequest(images=images, vector=vector), timeout=self.timeout_s
        )
        out: list[list[float] | str] = [
            err if err else list(v.values)
            for v, err in zip(resp.embeddings, resp.errors, strict=True)
        ]
        return out, resp.model_version
