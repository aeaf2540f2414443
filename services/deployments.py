"""Ray Serve deployments, one thin class per model. Each builds its model in ``__init__``.

Encode and generate methods use ``@serve.batch``: concurrent requests (queries, ingestion chunks)
are served by one forward pass or one denoising loop. A request may itself carry many inputs;
the batch is flattened and split back. Batch sizes come from the settings (Serve config / deploy
overlays), not the decorator.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from ray import serve

from imagine.imaging import BadImage, decode_image

if TYPE_CHECKING:
    from imagine.models.generator import DenoisingLoop, GenerateCall

log = logging.getLogger("imagine.services")


def _flatten(batches: list[list[Any]]) -> tuple[list[Any], list[int]]:
    flat = [x for b in batches for x in b]
    return flat, [len(b) for b in batches]


def _split(values: list[Any], sizes: list[int]) -> list[list[Any]]:
    out, start = [], 0
    for n in sizes:
        out.append(values[start : start + n])
        start += n
    return out


def serve_request_id() -> str:
    """The request id Ray Serve carries with this call (set by the ingress, passed on by the
    deployment handles); inside a ``@serve.batch`` method, the ids of the batch's requests."""
    from ray.serve import context

    batch = context._get_serve_batch_request_context()
    if batch:
        return ",".join(sorted({c.request_id for c in batch if c.request_id}))
    return context._get_serve_request_context().request_id


def _setup(torch_threads: int) -> None:
    import torch

    from imagine.config import load_client_settings
    from imagine.observability import set_request_id_source
    from imagine.runtime import keep_freed_memory, quiet_environment, setup_logging

    quiet_environment()
    keep_freed_memory()  # a large batch's activations would page-fault on every pass
    common = load_client_settings()  # the log settings every process shares
    setup_logging(common.log_level, common.log_format)
    set_request_id_source(serve_request_id)
    torch.set_num_threads(torch_threads or os.cpu_count() or 1)


class BatchStats:
    """Batches run and requests served by a ``@serve.batch`` method (the ingress scrapes them)."""

    def __init__(self) -> None:
        self.batches = 0
        self.requests = 0

    def count(self, n: int) -> None:
        self.batches += 1
        self.requests += n
        log.debug("batch of %d requests", n)

    def snapshot(self) -> dict[str, int]:
        return {"batches": self.batches, "requests": self.requests}


def encode_images_or_reasons(
    items: Sequence[bytes | Image.Image],
    encode: Callable[[list[Image.Image]], np.ndarray],
    max_pixels: int,
    batch: int,
) -> list[np.ndarray | str]:
    """Decode what needs decoding, encode in batches; a bad image yields its reason."""
    results: list[np.ndarray | str] = []
    images, where = [], []
    for i, item in enumerate(items):
        try:
            img = item if isinstance(item, Image.Image) else decode_image(item, max_pixels)
        except BadImage as exc:
            results.append(str(exc))
            continue
        images.append(img)
        where.append(i)
        results.append("")
    for start in range(0, len(images), batch):
        vecs = encode(images[start : start + batch])
        for j, vec in enumerate(vecs):
            results[where[start + j]] = vec
    return results


class _Batched:
    """Applies the configured batch limits to a ``@serve.batch`` method, and counts batches."""

    def _limits(self, method: Any, max_batch_size: int, batch_wait_s: float) -> None:
        self.stats = BatchStats()
        self.max_batch_size = max_batch_size
        method.set_max_batch_size(max_batch_size)
        method.set_batch_wait_timeout_s(batch_wait_s)

    def batch_stats(self) -> dict[str, int]:
        return self.stats.snapshot()


@serve.deployment(name="TextEncoder")
class TextEncoder(_Batched):
    """Texts -> joint-space vectors (L2-normalised)."""

    def __init__(
        self, model_spec: str, max_batch_size: int, batch_wait_s: float, torch_threads: int
    ) -> None:
        from imagine.models.dual_encoder import load_dual_encoder

        _setup(torch_threads)
        self.encoder = load_dual_encoder(model_spec)
        self._limits(self.encode, max_batch_size, batch_wait_s)

    def info(self) -> dict[str, Any]:
        return {"model_version": self.encoder.model_version, "dim": self.encoder.dim}

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def encode(self, requests: list[list[str]]) -> list[list[np.ndarray]]:
        self.stats.count(len(requests))
        texts, sizes = _flatten(requests)
        log.info("TextEncoder: %d texts in a batch of %d requests", len(texts), len(requests))
        vectors = list(self.encoder.encode_text(texts)) if texts else []
        return _split(vectors, sizes)


class _ImageTower(_Batched):
    """Encoded images (or generated PIL images) -> one tower's vectors; an undecodable image
    gives its reason instead."""

    def _serve(
        self, encoder: Any, max_batch_size: int, batch_wait_s: float, max_pixels: int
    ) -> None:
        self.encoder = encoder
        self.max_pixels = max_pixels
        self._limits(self.encode, max_batch_size, batch_wait_s)

    def info(self) -> dict[str, Any]:
        return {"model_version": self.encoder.model_version, "dim": self.encoder.dim}

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def encode(
        self, requests: list[list[bytes | Image.Image]]
    ) -> list[list[np.ndarray | str]]:
        self.stats.count(len(requests))
        items, sizes = _flatten(requests)
        out = encode_images_or_reasons(
            items, self.encoder.encode_images, self.max_pixels, self.max_batch_size
        )
        return _split(out, sizes)


@serve.deployment(name="ImageEncoder")
class ImageEncoder(_ImageTower):
    """Images -> joint-space vectors (the dual encoder's image tower)."""

    def __init__(
        self,
        model_spec: str,
        max_batch_size: int,
        batch_wait_s: float,
        torch_threads: int,
        max_pixels: int,
    ) -> None:
        from imagine.models.dual_encoder import load_dual_encoder

        _setup(torch_threads)
        self._serve(load_dual_encoder(model_spec), max_batch_size, batch_wait_s, max_pixels)


@serve.deployment(name="VisionEncoder")
class VisionEncoder(_ImageTower):
    """Images -> vision-only vectors (the second image vector, ``visual``)."""

    def __init__(
        self,
        model_spec: str,
        max_batch_size: int,
        batch_wait_s: float,
        torch_threads: int,
        max_pixels: int,
    ) -> None:
        from imagine.models.vision import load_vision_encoder

        _setup(torch_threads)
        self._serve(load_vision_encoder(model_spec), max_batch_size, batch_wait_s, max_pixels)


@serve.deployment(name="Generator")
class Generator(_Batched):
    """Prompts -> K generated images each, through one shared denoising loop: a query joins
    the queries being denoised at their next UNet pass, whatever its K, steps or guidance, and
    its images depend only on its own prompt and seed (:class:`DenoisingLoop`).

    ``@serve.batch`` takes the requests in; its batches do not wait for each other (up to
    ``INTAKE_BATCHES`` at once), so a query never waits for another batch's whole loop. The
    passes run one at a time on the replica's pass thread, which also loaded the model (so an
    OpenMP team, where one is used, belongs to it); the event loop stays free meanwhile, and a
    query that comes in during a pass joins the next one. On the event loop itself, a request
    needed several passes to get through Serve's intake (16 queries sent at once took 27 passes
    of 20 steps instead of 20-21). On a CPU, a pass of at least ``split_rows`` rows runs as row
    chunks on the replica's torch threads at once, and a smaller one on ``small_pass_threads``
    intra-op threads (0: all of them; :class:`RowWorkers`; ``split_rows`` 0: every pass on the
    pass thread's OpenMP team). ``max_batch_size`` also bounds the queries denoised at once."""

    INTAKE_BATCHES = 64

    def __init__(
        self,
        model_spec: str,
        max_batch_size: int,
        batch_wait_s: float,
        torch_threads: int,
        precision: str = "auto",
        split_rows: int = 16,
        small_pass_threads: int = 1,
    ) -> None:
        import torch

        from imagine.models.generator import DenoisingLoop, RowWorkers, load_generator
        from imagine.models.generator import Generator as OwnPipeline

        _setup(torch_threads)
        self.pass_thread = ThreadPoolExecutor(1, thread_name_prefix="denoise")
        self.generator = self.pass_thread.submit(
            load_generator, model_spec, precision=precision
        ).result()
        # Our pipeline shares UNet passes; a diffusers pipeline (the pretrained profile) runs its
        # own loop per group of queries with the same settings.
        self.loop = None
        if isinstance(self.generator, OwnPipeline):
            threads = torch.get_num_threads()
            split = split_rows > 0 and threads > 1 and self.generator.device == "cpu"
            small = min(small_pass_threads or threads, threads)
            workers = RowWorkers(threads, split_rows, small) if split else None
            self.loop = DenoisingLoop(self.generator, max_jobs=max_batch_size, workers=workers)
        self.driver: asyncio.Task[None] | None = None
        self._limits(self.generate, max_batch_size, batch_wait_s)

    def info(self) -> dict[str, Any]:
        """``model_version``: the weights' version, with ``+bfloat16`` when served in bfloat16
        (other images, so another version for the generated-query cache)."""
        version, precision = self.generator.model_version, self.generator.precision
        if precision != "float32":
            version += f"+{precision}"
        return {"model_version": version}

    def batch_stats(self) -> dict[str, int]:
        """The intake's batches, and the loop's passes and queries over them."""
        if self.loop is None:
            return self.stats.snapshot()
        return {
            **self.stats.snapshot(),
            "passes": self.loop.passes,
            "job_steps": self.loop.job_steps,
        }

    @serve.batch(
        max_batch_size=16, batch_wait_timeout_s=0.005, max_concurrent_batches=INTAKE_BATCHES
    )
    async def generate(self, calls: list[GenerateCall]) -> list[list[Image.Image]]:
        self.stats.count(len(calls))
        log.info("Generator: %d queries in", len(calls))
        if self.loop is None:
            events = asyncio.get_running_loop()
            return await events.run_in_executor(self.pass_thread, self._whole_loops, calls)
        images = [asyncio.wrap_future(self.loop.submit(*c)) for c in calls]
        if self.driver is None or self.driver.done():
            self.driver = asyncio.create_task(self._drive(self.loop, self.pass_thread))
        return list(await asyncio.gather(*images))

    def _whole_loops(self, calls: list[GenerateCall]) -> list[list[Image.Image]]:
        """One pipeline call per group of calls with the same K, steps and guidance."""
        groups: dict[tuple[int, int, float], list[int]] = {}
        for i, (_, k, steps, guidance, _) in enumerate(calls):
            groups.setdefault((k, steps, guidance), []).append(i)
        out: list[list[Image.Image]] = [[] for _ in calls]
        for (k, steps, guidance), idx in groups.items():
            images = self.generator.generate(
                [calls[i][0] for i in idx],
                num_images=k,
                steps=steps,
                guidance=guidance,
                seed=[calls[i][4] for i in idx],  # each query keeps its own seed
            )
            for i, imgs in zip(idx, images, strict=True):
                out[i] = imgs
        return out

    @staticmethod
    async def _drive(loop: DenoisingLoop, thread: ThreadPoolExecutor) -> None:
        """UNet passes on ``thread`` while queries remain. Whether any remain is read here, on
        the event loop that submits them, so a query submitted during the last pass is not
        left behind."""
        events = asyncio.get_running_loop()
        try:
            while True:
                await events.run_in_executor(thread, loop.run_pass)
                if not loop.busy:
                    break
        except Exception as exc:  # never leave a query waiting
            log.exception("denoising loop failed")
            loop.fail(exc)


@serve.deployment(name="Aggregator")
class Aggregator:
    """K generated-image embeddings -> one visual query (attention or mean), and the learned
    fusion weight."""

    def __init__(self, model_spec: str) -> None:
        from imagine.models.aggregator import load_aggregator

        _setup(1)
        self.aggregator = load_aggregator(model_spec)

    def info(self) -> dict[str, Any]:
        return {
            "model_version": self.aggregator.model_version,
            "fusion_weight": float(self.aggregator.fusion_weight),
            "mode": self.aggregator.mode,  # attention or mean
        }

    def aggregate(self, embeddings: np.ndarray, mode: str) -> np.ndarray:
        """``mode`` "attention" uses the trained attention aggregator (the query service asks
        for it only when that is what is loaded), "mean" the normalised mean."""
        if mode == "mean":
            from imagine.models.aggregator import mean_pool

            return mean_pool(embeddings[None])[0]
        if self.aggregator.mode != mode:
            raise ValueError(f"aggregator {self.aggregator.model_version} cannot do {mode!r}")
        return self.aggregator.aggregate(embeddings[None])[0]


# (encoded images, strategy, beam_size, temperature, seed): one request captions many images
CaptionCall = tuple[list[bytes], str, int, float, int]


@serve.deployment(name="CaptionDecoder")
class CaptionDecoder(_Batched):
    """Images -> captions with their log-probability. Concurrent requests with the same decoding
    settings share one decoding pass; an undecodable image gives its reason instead."""

    def __init__(
        self,
        model_spec: str,
        max_batch_size: int,
        batch_wait_s: float,
        torch_threads: int,
        max_pixels: int,
    ) -> None:
        from imagine.models.captioner import load_captioner

        _setup(torch_threads)
        self.captioner = load_captioner(model_spec)
        self.max_pixels = max_pixels
        self._limits(self.caption, max_batch_size, batch_wait_s)

    def info(self) -> dict[str, Any]:
        return {"model_version": self.captioner.model_version}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def caption(self, calls: list[CaptionCall]) -> list[list[tuple[str, float] | str]]:
        """``max_batch_size`` bounds both the requests batched and the images per pass."""
        self.stats.count(len(calls))
        out: list[list[tuple[str, float] | str]] = [[""] * len(c[0]) for c in calls]
        groups: dict[tuple[str, int, float, int], list[tuple[int, int, Image.Image]]] = {}
        for i, (blobs, strategy, beam, temperature, seed) in enumerate(calls):
            for j, blob in enumerate(blobs):
                try:
                    img = decode_image(blob, self.max_pixels)
                except BadImage as exc:
                    out[i][j] = str(exc)
                    continue
                groups.setdefault((strategy, beam, temperature, seed), []).append((i, j, img))
        for (strategy, beam, temperature, seed), items in groups.items():
            # a sampled caption depends only on its image and seed: one image per pass
            size = 1 if strategy == "sample" else self.max_batch_size
            for start in range(0, len(items), size):
                part = items[start : start + size]
                caps = self.captioner.caption(
                    [img for _, _, img in part], strategy, beam, temperature, seed
                )
                for (i, j, _), cap in zip(part, caps, strict=True):
                    out[i][j] = (cap.text, cap.log_prob)
        log.info(
            "CaptionDecoder: %d images in a batch of %d requests", sum(map(len, out)), len(calls)
        )
        return out
