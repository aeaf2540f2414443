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
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from imagine.cache import LRUCache
from imagine.config import LimitSettings
from imagine.fusion import PATH_VECTORS, resolve_weights
from imagine.index import CollectionInfo, ModelVersionMismatch, Pool, VectorIndex
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
    aggregator_mode: str  # what the loaded aggregator is: "attention" or "mean"


class Generative(Protocol):
    info: GenerativeInfo

    async def generate(
        self, prompt: str, k: int, steps: int, guidance: float, seed: int
    ) -> list[Image.Image]: ...

    async def aggregate(self, embeddings: np.ndarray, mode: str) -> np.ndarray: ...


class Captions(Protocol):
    """The caption decoder: encoded images -> (caption, log-probability) or the reason."""

    model_version: str

    async def caption(
        self, images: list[bytes], strategy: str, beam_size: int, temperature: float, seed: int
    ) -> list[tuple[str, float] | str]: ...


@dataclass
class SamplingDefaults:
    num_generated: int = 4
    steps: int = 20
    guidance: float = 2.0
    caption_weight: float = 0.0  # the caption path in text -> image search
    image_query_caption_weight: float = 0.5  # the caption path of image queries


def text_gallery(info: CollectionInfo) -> bool:
    """A gallery of texts (a ``text`` vector) rather than images."""
    return "text" in info.vectors and "image" not in info.vectors


def normalise_query(text: str) -> str:
    return " ".join(text.lower().split())


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


_AGGREGATION = {
    ret_pb.AGGREGATION_UNSPECIFIED: "",  # the loaded aggregator's own
    ret_pb.AGGREGATION_ATTENTION: "attention",
    ret_pb.AGGREGATION_MEAN: "mean",
}


@dataclass
class SearchResult:
    hits: list[Any]
    weights: dict[str, float]
    timings_ms: dict[str, float]
    generated_pngs: list[bytes]
    cache_hit: bool
    query_caption: str = ""  # the caption of an image query (the caption path)


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
        captions: Captions | None = None,
    ) -> None:
        self.limits = limits or LimitSettings()
        self.captions = captions
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
        generated_pngs: list[bytes] = []
        cache_hit = False
        query_caption = ""
        using: dict[str, str] = {}
        if kind not in ("text", "image"):
            raise BadRequest("set a query: text or image")
        check_query(req, self.limits)
        info = await asyncio.to_thread(self.index.describe, req.collection)
        check_version(info, self.model_version)
        has_captions = self.captions is not None and "caption" in info.vectors
        if kind == "text":
            if text_gallery(info):
                raise BadRequest(
                    f"collection {info.name!r} is a text gallery: search it with an image query"
                )
            text = req.text.strip()
            mode = self._mode(req.mode)
            want_caption = has_captions and (
                "caption" in req.path_weights or self.defaults.caption_weight > 0
            )
            want_text = mode in ("text", "fused") or "text" in req.path_weights or want_caption
            want_gen = mode in ("generated", "fused") or "generated" in req.path_weights
            sampling = self._sampling(req) if want_gen else None
            defaults = self._default_weights(mode)
            if want_caption and self.defaults.caption_weight > 0:
                w = self.defaults.caption_weight
                defaults = {p: (1 - w) * v for p, v in defaults.items()} | {"caption": w}
            wanted = (("text", want_text), ("generated", want_gen), ("caption", want_caption))
            available = {p for p, on in wanted if on}
            weights = _weights(available, defaults, req.path_weights)
            if "generated" in weights and "visual" not in info.vectors:
                raise ModelVersionMismatch(
                    f"collection {info.name!r} has no visual vectors: "
                    "re-ingest it with a vision encoder"
                )
            # Each path's vector comes as its own task, so that its candidates can be fetched
            # as soon as it is known (the caption path is the text's vector against captions).
            sources: dict[str, Awaitable[np.ndarray]] = {}
            if weights.keys() & {"text", "caption"}:
                encoded = asyncio.ensure_future(self._encode_text(text, t))
                sources |= {p: encoded for p in ("text", "caption") if p in weights}
            generated = None
            if "generated" in weights:
                assert sampling is not None
                generated = asyncio.ensure_future(
                    self._generated_query(text, sampling, int(req.seed), t)
                )
                sources["generated"] = _first(generated)
            hits = await self._ranked(req, sources, weights, top_k, None, t)
            if generated is not None:
                _, generated_pngs, cache_hit = generated.result()
        else:
            gallery_of_texts = text_gallery(info)
            if gallery_of_texts:
                using = {"image": "text", "caption": "text"}
                has_captions = self.captions is not None
            want_caption = has_captions and (
                "caption" not in req.path_weights or req.path_weights["caption"] > 0
            )
            # image -> image over the vision-only vectors: when a request weights "visual"
            want_visual = (
                not gallery_of_texts
                and "visual" in info.vectors
                and req.path_weights.get("visual", 0) > 0
            )
            jobs: list[Any] = [self.encoders.images([req.image])]
            if want_visual:
                jobs.append(self.encoders.visual([req.image]))
            if want_caption:
                jobs.append(self._caption_query(req.image, t))
            results = await asyncio.gather(*jobs)
            (res,) = results[0]
            if isinstance(res, str):
                raise BadRequest(f"query image: {res}")
            queries = {"image": res}
            if want_visual:
                (vis,) = results[1]
                if isinstance(vis, str):
                    raise BadRequest(f"query image: {vis}")
                queries["visual"] = vis
            defaults = {"image": 1.0}
            if want_caption:
                query_caption, queries["caption"] = results[-1]
                w = self.defaults.image_query_caption_weight
                defaults = {"image": 1.0 - w, "caption": w}
            t["encode_image"] = (time.perf_counter() - start) * 1e3
            weights = _weights(set(queries), defaults, req.path_weights)
            hits = await self._ranked(
                req, {p: _ready(queries[p]) for p in weights}, weights, top_k, using or None, t
            )
        t["total"] = (time.perf_counter() - start) * 1e3
        for stage, ms in t.items():
            if stage != "total":
                STAGE_SECONDS.labels(stage).observe(ms / 1e3)
        pngs = generated_pngs if req.explain else []
        return SearchResult(hits, weights, t, pngs, cache_hit, query_caption)

    async def _caption_query(self, image: bytes, t: dict[str, float]) -> tuple[str, np.ndarray]:
        """The query image's greedy caption and its text vector (the caption path)."""
        assert self.captions is not None
        start = time.perf_counter()
        (res,) = await self.captions.caption([image], "greedy", 1, 1.0, 0)
        if isinstance(res, str):
            raise BadRequest(f"query image: {res}")
        t1 = time.perf_counter()
        (vec,) = await self.encoders.text([res[0] or "."])
        t.update(
            {"caption": (t1 - start) * 1e3, "encode_caption": (time.perf_counter() - t1) * 1e3}
        )
        return res[0], vec

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

    async def _ranked(
        self,
        req: Any,
        sources: dict[str, Awaitable[np.ndarray]],
        weights: dict[str, float],
        top_k: int,
        using: dict[str, str] | None,
        t: dict[str, float],
    ) -> list[Any]:
        """The fused top ``top_k``. Each path's candidates are fetched as soon as its query
        vector is known (a cached generated query's at once, while the text is still being
        encoded); the union is ranked once every path is in. ``search`` in the timings is the
        index's work after the last query vector arrived."""
        filters = dict(req.filter)
        if len(weights) == 1:
            ((path, source),) = sources.items()
            vector = await source
            t0 = time.perf_counter()
            hits: list[Any] = await asyncio.to_thread(
                self.index.search,
                req.collection,
                {path: vector},
                weights,
                top_k,
                filters,
                using=using,
            )
            t["search"] = (time.perf_counter() - t0) * 1e3
            return hits
        queries: dict[str, np.ndarray] = {}
        arrived: list[float] = []
        early: dict[str, asyncio.Task[Pool]] = {}  # fetched while another vector is awaited

        def fetch(path: str) -> Pool:
            return self.index.candidates(
                req.collection, path, queries[path], weights, top_k, filters, using=using
            )

        def fetch_and_rank(last: str, pools: dict[str, Pool]) -> list[Any]:
            pools = pools | {last: fetch(last)}
            return self.index.rank(req.collection, pools, queries, weights, top_k, using)

        async def arrive(path: str) -> list[Any] | None:
            queries[path] = await sources[path]
            arrived.append(time.perf_counter())
            if len(queries) < len(weights):
                early[path] = asyncio.ensure_future(asyncio.to_thread(fetch, path))
                early[path].add_done_callback(_observed)  # read below, unless the query failed
                return None
            # The last vector in: its candidates and the ranking in one hop to a thread (a hop
            # costs ~0.5-1 ms on a busy ingress, where a cached fused query spends ~4 ms in
            # search); the other pools were fetched meanwhile.
            pools = {p: await task for p, task in early.items()}
            return await asyncio.to_thread(fetch_and_rank, path, pools)

        (hits,) = [h for h in await asyncio.gather(*map(arrive, weights)) if h is not None]
        t["search"] = (time.perf_counter() - max(arrived)) * 1e3
        return hits

    def _sampling(self, req: Any) -> tuple[int, int, float, str]:
        """K, steps, guidance and aggregation of a request that generates, checked."""
        k = req.num_generated or self.defaults.num_generated
        steps = req.steps or self.defaults.steps
        guidance = req.guidance or self.defaults.guidance
        check_sampling(k, steps, "num_generated", self.limits)
        if not (np.isfinite(guidance) and 0 < guidance <= MAX_GUIDANCE):
            raise BadRequest(f"guidance {guidance} is outside (0, {MAX_GUIDANCE}]")
        if req.aggregation not in _AGGREGATION:
            raise BadRequest(f"unknown aggregation {req.aggregation}")
        loaded = self.generative.info if self.generative else None
        aggregation = _AGGREGATION[req.aggregation] or (loaded.aggregator_mode if loaded else "")
        if aggregation == "attention" and loaded and loaded.aggregator_mode != "attention":
            # Asked for by name, the CLE-TIR aggregator is never silently replaced by the mean.
            raise ModelVersionMismatch(
                f"aggregator {loaded.aggregator_version} is {loaded.aggregator_mode} pooling, "
                "not an attention aggregator: use AGGREGATION_MEAN (or unspecified), or serve "
                "a trained attention aggregator (IMAGINE_AGGREGATOR_MODEL)"
            )
        return k, steps, float(guidance), aggregation

    async def _generated_query(
        self, text: str, sampling: tuple[int, int, float, str], seed: int, t: dict[str, float]
    ) -> tuple[np.ndarray, list[bytes], bool]:
        assert self.generative is not None
        k, steps, guidance, aggregation = sampling
        info = self.generative.info
        key = (
            normalise_query(text),
            info.generator_version,
            info.aggregator_version,
            aggregation,
            k,
            steps,
            round(guidance, 4),
            seed,
        )
        cached = self.cache.get(key)
        QUERY_CACHE.labels("hit" if cached is not None else "miss").inc()
        if cached is not None:
            return cached[0], cached[1], True
        start = time.perf_counter()
        images = await self.generative.generate(text, k, steps, guidance, seed)
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


def _weights(
    available: set[str], defaults: dict[str, float], requested: Mapping[str, float]
) -> dict[str, float]:
    """The normalised path weights; a path a request switches off (weight 0) that this query
    does not compute anyway is simply left out."""
    overrides = {
        p: w
        for p, w in requested.items()
        if not (w == 0 and p in PATH_VECTORS and p not in available)
    }
    return resolve_weights(available, defaults, overrides)


def _observed(task: asyncio.Future[Any]) -> None:
    """Mark a task's error as seen: its query has failed on another path and said why."""
    if not task.cancelled():
        task.exception()


async def _first(generated: Awaitable[tuple[np.ndarray, list[bytes], bool]]) -> np.ndarray:
    return (await generated)[0]


async def _ready(vector: np.ndarray) -> np.ndarray:
    return vector


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


def check_query(req: Any, limits: LimitSettings) -> None:
    """Checks of the query itself, before the collection is looked up."""
    if req.WhichOneof("query") == "text":
        text = req.text.strip()
        if not text:
            raise BadRequest("query text is empty")
        check_text(text, "query text", limits)
        return
    if req.mode not in (ret_pb.SEARCH_MODE_UNSPECIFIED, ret_pb.SEARCH_MODE_TEXT):
        raise BadRequest("generated and fused modes need a text query")
    if not req.image:
        raise BadRequest("query image is empty")
    check_image(req.image, "query image", limits)


def check_version(info: CollectionInfo, model_version: str) -> None:
    if info.model_version != model_version:
        raise ModelVersionMismatch(
            f"collection {info.name!r} was filled by model {info.model_version}; "
            f"this service runs {model_version}"
        )
