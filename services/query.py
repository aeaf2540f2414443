"""The query service: generate-embed-fuse retrieval, wired from the deployments and the index.

Text -> (encode the text) + (generate K images -> vision-encode -> aggregate) -> candidates from
each path through the index's prefetch -> exact re-scoring with the fused formula
(``imagine.fusion``). The aggregated generated-query vector is cached by (normalised text,
generator and aggregator versions, aggregation, K, steps, guidance, seed).
"""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from imagine.cache import LRUCache
from imagine.config import LimitSettings
from imagine.fusion import resolve_weights
from imagine.index import CollectionInfo, ModelVersionMismatch, VectorIndex
from imagine.observability import QUERY_CACHE, STAGE_SECONDS
from protos.gen.imagine.v1 import retrieval_service_pb2 as ret_pb

MAX_GUIDANCE = 20.0


class BadRequest(ValueError):
    """INVALID_ARGUMENT: the message says what is wrong."""


class TooManyRequests(RuntimeError):
    """RESOURCE_EXHAUSTED: a per-client limit; the message names it."""


def over_limit(what: str, value: object, limit_name: str, limits: LimitSettings) -> BadRequest:
    """The error of a request over a configured limit, naming the limit and its variable."""
    limit = getattr(limits, limit_name)
    return BadRequest(
        f"{what} ({value}) exceeds the limit {limit_name}={limit} "
        f"(IMAGINE_LIMITS__{limit_name.upper()})"
    )


def check_image(data: bytes, what: str, limits: LimitSettings) -> None:
    """Bytes and pixels (from the header, before decoding) of a request image."""
    if len(data) > limits.max_image_bytes:
        raise over_limit(f"{what} size in bytes", len(data), "max_image_bytes", limits)
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Exception:
        return  # not an image: the encoder says why, per image
    if w * h > limits.max_image_pixels:
        raise over_limit(f"{what} pixels ({w}x{h})", w * h, "max_image_pixels", limits)


def check_text(text: str, what: str, limits: LimitSettings) -> None:
    if len(text) > limits.max_query_chars:
        raise over_limit(f"{what} length in characters", len(text), "max_query_chars", limits)


class Encoders(Protocol):
    async def text(self, texts: list[str]) -> list[np.ndarray]: ...

    async def images(self, images: list[bytes]) -> list[np.ndarray | str]: ...

    async def visual(self, images: list[Any]) -> list[np.ndarray | str]: ...


@dataclass
class GenerativeInfo:
    generator_version: str
    aggregator_version: str
    fusion_weight: float  # l = sigmoid(p), the generated path's weight


class Generative(Protocol):
    info: GenerativeInfo

    async def generate(
        self, prompt: str, k: int, steps: int, guidance: float, seed: int
    ) -> list[Image.Image]: ...

    async def aggregate(self, embeddings: np.ndarray, mode: str) -> np.ndarray: ...


@dataclass
class SamplingDefaults:
    num_generated: int = 4
    steps: int = 20
    guidance: float = 2.0


def normalise_query(text: str) -> str:
    return " ".join(text.lower().split())


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


_AGGREGATION = {
    ret_pb.AGGREGATION_UNSPECIFIED: "attention",
    ret_pb.AGGREGATION_ATTENTION: "attention",
    ret_pb.AGGREGATION_MEAN: "mean",
}


class QueryEngine:
    def __init__(
        self,
        encoders: Encoders,
        index: VectorIndex,
        model_version: str,
        generative: Generative | None,
        defaults: SamplingDefaults,
        cache_size: int,
        limits: LimitSettings | None = None,
    ) -> None:
        self.limits = limits or LimitSettings()
        self.encoders = encoders
        self.index = index
        self.model_version = model_version
        self.generative = generative
        self.defaults = defaults
        self.cache: LRUCache[tuple[np.ndarray, list[bytes]]] = LRUCache(cache_size)

    async def search(self, req: Any) -> Any:
        t: dict[str, float] = {}
        start = time.perf_counter()
        if req.top_k < 0:
            raise BadRequest(f"top_k {req.top_k} is negative")
        if req.top_k > self.limits.max_top_k:
            raise over_limit("top_k", req.top_k, "max_top_k", self.limits)
        top_k = req.top_k or 10
        kind = req.WhichOneof("query")
        queries: dict[str, np.ndarray] = {}
        generated_pngs: list[bytes] = []
        cache_hit = False
        if kind == "text":
            text = req.text.strip()
            if not text:
                raise BadRequest("query text is empty")
            check_text(text, "query text", self.limits)
            mode = self._mode(req.mode)
            want_text = mode in ("text", "fused") or "text" in req.path_weights
            want_gen = mode in ("generated", "fused") or "generated" in req.path_weights
            jobs: list[Any] = []
            if want_text:
                jobs.append(self._encode_text(text, t))
            if want_gen:
                jobs.append(self._generated_query(text, req, t))
            results = await asyncio.gather(*jobs)
            if want_text:
                queries["text"] = results[0]
            if want_gen:
                queries["generated"], generated_pngs, cache_hit = results[-1]
            defaults = self._default_weights(mode)
        elif kind == "image":
            if req.mode not in (ret_pb.SEARCH_MODE_UNSPECIFIED, ret_pb.SEARCH_MODE_TEXT):
                raise BadRequest("generated and fused modes need a text query")
            if not req.image:
                raise BadRequest("query image is empty")
            check_image(req.image, "query image", self.limits)
            (res,) = await self.encoders.images([req.image])
            if isinstance(res, str):
                raise BadRequest(f"query image: {res}")
            queries["image"] = res
            defaults = {"image": 1.0}
            t["encode_image"] = (time.perf_counter() - start) * 1e3
        else:
            raise BadRequest("set a query: text or image")
        weights = resolve_weights(set(queries), defaults, dict(req.path_weights))
        t0 = time.perf_counter()
        info = await asyncio.to_thread(self.index.describe, req.collection)
        check_version(info, self.model_version)
        if "generated" in weights and "visual" not in info.vectors:
            raise ModelVersionMismatch(
                f"collection {info.name!r} has no visual vectors: "
                "re-ingest it with a vision encoder"
            )
        hits = await asyncio.to_thread(
            self.index.search, req.collection, queries, weights, top_k, dict(req.filter)
        )
        t["search"] = (time.perf_counter() - t0) * 1e3
        t["total"] = (time.perf_counter() - start) * 1e3
        for stage, ms in t.items():
            if stage != "total":
                STAGE_SECONDS.labels(stage).observe(ms / 1e3)
        return hits, weights, t, generated_pngs if req.explain else [], cache_hit

    def _mode(self, mode: int) -> str:
        if mode == ret_pb.SEARCH_MODE_UNSPECIFIED:
            return "fused" if self.generative is not None else "text"
        names: dict[int, str] = {
            ret_pb.SEARCH_MODE_TEXT: "text",
            ret_pb.SEARCH_MODE_GENERATED: "generated",
            ret_pb.SEARCH_MODE_FUSED: "fused",
        }
        name = names.get(int(mode))
        if name is None:
            raise BadRequest(f"unknown search mode {mode}")
        if name != "text" and self.generative is None:
            raise ModelVersionMismatch(
                f"model {self.model_version} has no diffusion generator: "
                "generated and fused search need one; use SEARCH_MODE_TEXT"
            )
        return name

    def _default_weights(self, mode: str) -> dict[str, float]:
        if mode == "text":
            return {"text": 1.0}
        if mode == "generated":
            return {"generated": 1.0}
        assert self.generative is not None
        lam = self.generative.info.fusion_weight
        return {"text": 1.0 - lam, "generated": lam}

    async def _encode_text(self, text: str, t: dict[str, float]) -> np.ndarray:
        start = time.perf_counter()
        (vec,) = await self.encoders.text([text])
        t["encode_text"] = (time.perf_counter() - start) * 1e3
        return vec

    async def _generated_query(
        self, text: str, req: Any, t: dict[str, float]
    ) -> tuple[np.ndarray, list[bytes], bool]:
        assert self.generative is not None
        k = req.num_generated or self.defaults.num_generated
        steps = req.steps or self.defaults.steps
        guidance = req.guidance or self.defaults.guidance
        check_sampling(k, steps, "num_generated", self.limits)
        if not (np.isfinite(guidance) and 0 < guidance <= MAX_GUIDANCE):
            raise BadRequest(f"guidance {guidance} is outside (0, {MAX_GUIDANCE}]")
        if req.aggregation not in _AGGREGATION:
            raise BadRequest(f"unknown aggregation {req.aggregation}")
        aggregation = _AGGREGATION[req.aggregation]
        info = self.generative.info
        key = (
            normalise_query(text),
            info.generator_version,
            info.aggregator_version,
            aggregation,
            k,
            steps,
            round(float(guidance), 4),
            int(req.seed),
        )
        cached = self.cache.get(key)
        QUERY_CACHE.labels("hit" if cached is not None else "miss").inc()
        if cached is not None:
            return cached[0], cached[1], True
        start = time.perf_counter()
        images = await self.generative.generate(text, k, steps, float(guidance), int(req.seed))
        t1 = time.perf_counter()
        vis = await self.encoders.visual(list(images))
        t2 = time.perf_counter()
        agg = await self.generative.aggregate(np.stack(vis), aggregation)
        t3 = time.perf_counter()
        t.update(
            {
                "generate": (t1 - start) * 1e3,
                "encode_generated": (t2 - t1) * 1e3,
                "aggregate": (t3 - t2) * 1e3,
            }
        )
        pngs = [png_bytes(img) for img in images]
        self.cache.put(key, (agg, pngs))
        return agg, pngs, False


def check_sampling(k: int, steps: int, k_name: str, limits: LimitSettings) -> None:
    if k < 1:
        raise BadRequest(f"{k_name} {k} is below 1")
    if k > limits.max_generated:
        raise over_limit(k_name, k, "max_generated", limits)
    if steps < 1:
        raise BadRequest(f"steps {steps} is below 1")
    if steps > limits.max_steps:
        raise over_limit("steps", steps, "max_steps", limits)


def wants_generation(req: Any, generative: Generative | None) -> bool:
    """Whether a Search request will run the generator (and so takes a generation slot)."""
    if generative is None or req.WhichOneof("query") != "text":
        return False
    return req.mode != ret_pb.SEARCH_MODE_TEXT or "generated" in req.path_weights


def check_version(info: CollectionInfo, model_version: str) -> None:
    if info.model_version != model_version:
        raise ModelVersionMismatch(
            f"collection {info.name!r} was filled by model {info.model_version}; "
            f"this service runs {model_version}"
        )
