"""The gRPC ingress: a Ray Serve deployment that serves our API on ``IMAGINE_GRPC_ADDRESS``.

It is a gRPC front of our own over deployment handles (rather than Serve's gRPC proxy) so it can
honour the address setting, stream ``WatchIngestJob``, and serve standard health checking and
server reflection. In the embedded profile it also owns the Qdrant store and exposes it to the
ingestion workers through the internal ``IndexService``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from PIL import Image
from ray import serve
from ray.serve.handle import DeploymentHandle

from imagine.config import ServiceSettings
from imagine.index import QdrantIndex
from imagine.jobs import TASK_RUN_CHUNK, TASK_RUN_JOB, SqliteJobStore
from imagine.queueing import broker_config
from imagine.storage import ObjectLinks
from services.query import GenerativeInfo, QueryEngine, SamplingDefaults
from services.servicers import Backend, add_all

log = logging.getLogger("imagine.ingress")


class HandleEncoders:
    """The encoders, reached through their deployment handles."""

    def __init__(
        self, text: DeploymentHandle, image: DeploymentHandle, vision: DeploymentHandle | None
    ) -> None:
        self._text = text
        self._image = image
        self._vision = vision

    async def text(self, texts: list[str]) -> list[np.ndarray]:
        return await self._text.encode.remote(texts)

    async def images(self, images: list[bytes]) -> list[np.ndarray | str]:
        return await self._image.encode.remote(images)

    async def visual(self, images: list[Any]) -> list[np.ndarray | str]:
        if self._vision is None:
            raise RuntimeError("no vision encoder is deployed")
        return await self._vision.encode.remote(images)


class HandleGenerative:
    """The generator and the aggregator, reached through their deployment handles."""

    def __init__(
        self, generator: DeploymentHandle, aggregator: DeploymentHandle, info: GenerativeInfo
    ) -> None:
        self._generator = generator
        self._aggregator = aggregator
        self.info = info

    async def generate(
        self, prompt: str, k: int, steps: int, guidance: float, seed: int
    ) -> list[Image.Image]:
        return await self._generator.generate.remote((prompt, k, steps, guidance, seed))

    async def aggregate(self, embeddings: np.ndarray, mode: str) -> np.ndarray:
        return await self._aggregator.aggregate.remote(embeddings, mode)


class HandleCaptions:
    """The caption decoder, reached through its deployment handle."""

    def __init__(self, handle: DeploymentHandle, model_version: str) -> None:
        self._handle = handle
        self.model_version = model_version

    async def caption(
        self, images: list[bytes], strategy: str, beam_size: int, temperature: float, seed: int
    ) -> list[tuple[str, float] | str]:
        calls = [
            self._handle.caption.remote((img, strategy, beam_size, temperature, seed))
            for img in images
        ]
        return list(await asyncio.gather(*calls))


class CeleryQueue:
    """Submits ingestion jobs to the workers by task name (the ingress imports no worker code)."""

    def __init__(self, settings: ServiceSettings) -> None:
        from celery import Celery

        self._app = Celery("imagine-ingress")
        self._app.conf.update(broker_config(settings))

    def submit(self, job_id: str) -> None:
        self._app.send_task(TASK_RUN_JOB, args=[job_id], retry=True)

    def submit_chunk(self, job_id: str, chunk: int, items: list[list[str]]) -> None:
        self._app.send_task(TASK_RUN_CHUNK, args=[job_id, chunk, items], retry=True)


async def redeliver_forever(
    jobs: SqliteJobStore, queue: CeleryQueue, lease_s: float, max_attempts: int
) -> None:
    """Queue again what a dead worker or a broker restart lost (see ``SqliteJobStore.due``).

    Several ingress replicas may run this: each redelivery is handed to one of them. A submit
    that fails (broker down) is retried a lease later, when the record is due again.
    """
    period = max(0.5, min(lease_s / 4, 15.0))
    while True:
        await asyncio.sleep(period)
        try:
            for r in await asyncio.to_thread(jobs.due, lease_s, max_attempts):
                if r.chunk is None:
                    log.warning("job %s: its job task was lost; queued again", r.job_id)
                    await asyncio.to_thread(queue.submit, r.job_id)
                else:
                    log.warning("job %s: chunk %d was lost; queued again", r.job_id, r.chunk)
                    await asyncio.to_thread(queue.submit_chunk, r.job_id, r.chunk, r.items)
        except Exception:  # never let the loop die; the next round retries
            log.exception("redelivery round failed")


def open_index(settings: ServiceSettings) -> QdrantIndex:
    if settings.qdrant.url:
        return QdrantIndex.remote(
            settings.qdrant.url, settings.qdrant.api_key, settings.qdrant.timeout_s
        )
    return QdrantIndex.embedded(settings.qdrant_path)


@serve.deployment(name="Ingress", num_replicas=1)
class Ingress:
    async def __init__(  # type: ignore[misc]  # Serve supports async constructors
        self,
        settings: dict[str, Any],
        text: DeploymentHandle,
        image: DeploymentHandle,
        vision: DeploymentHandle | None = None,
        generator: DeploymentHandle | None = None,
        aggregator: DeploymentHandle | None = None,
        captioner: DeploymentHandle | None = None,
    ) -> None:
        from imagine.runtime import setup_logging

        s = ServiceSettings.model_validate(settings)
        setup_logging(s.log_level)
        info = await text.info.remote()
        version, vectors = info["model_version"], {"image": info["dim"]}
        if vision is not None:
            vinfo = await vision.info.remote()
            version += "+" + vinfo["model_version"]
            vectors["visual"] = vinfo["dim"]
        captions = None
        if captioner is not None:
            cinfo = await captioner.info.remote()
            version += "+" + cinfo["model_version"]
            vectors["caption"] = info["dim"]  # the caption's text vector, in the joint space
            captions = HandleCaptions(captioner, cinfo["model_version"])
        generative = None
        if generator is not None and aggregator is not None and vision is not None:
            ginfo = await generator.info.remote()
            ainfo = await aggregator.info.remote()
            generative = HandleGenerative(
                generator,
                aggregator,
                GenerativeInfo(
                    ginfo["model_version"], ainfo["model_version"], ainfo["fusion_weight"]
                ),
            )
        encoders = HandleEncoders(text, image, vision)
        defaults = SamplingDefaults(
            s.default_num_generated,
            s.default_steps,
            s.default_guidance,
            s.caption_weight,
            s.image_query_caption_weight,
        )
        self.index = open_index(s)
        jobs, queue = SqliteJobStore(s.jobs_path), CeleryQueue(s)
        self.redelivery = asyncio.get_running_loop().create_task(
            redeliver_forever(jobs, queue, s.job_lease_s, s.job_max_attempts)
        )
        self.backend = Backend(
            encoders=encoders,
            index=self.index,
            jobs=jobs,
            queue=queue,
            model_version=version,
            vectors=vectors,
            text_vectors={"text": info["dim"]},
            default_chunk_size=s.default_chunk_size,
            engine=QueryEngine(
                encoders, self.index, version, generative, defaults, s.query_cache_size, captions
            ),
            generative=generative,
            captions=captions,
            defaults=defaults,
            links=ObjectLinks(s.storage),
        )
        # No SO_REUSEPORT: a second server on the same address must fail, not share it.
        self.server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ]
        )
        names = add_all(self.server, self.backend, with_index=not s.qdrant.url)
        health_servicer = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        for name in ["", *names]:
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            [*names, reflection.SERVICE_NAME, health.SERVICE_NAME], self.server
        )
        if self.server.add_insecure_port(s.grpc_address) == 0:
            raise RuntimeError(f"cannot listen on {s.grpc_address}")
        await self.server.start()
        self.address = s.grpc_address
        log.info("gRPC ingress listening on %s (model %s)", s.grpc_address, info["model_version"])

    async def address_info(self) -> dict[str, Any]:
        gen = self.backend.generative
        return {
            "address": self.address,
            "model_version": self.backend.model_version,
            "generator": gen.info.generator_version if gen else "",
            "captioner": self.backend.captions.model_version if self.backend.captions else "",
            "fusion_weight": gen.info.fusion_weight if gen else 0.0,
        }

    async def cache_stats(self) -> dict[str, int]:
        return self.backend.engine.cache.stats()

    async def check_health(self) -> None:
        """Serve's health check: fail when the gRPC server has stopped."""
        if self.server is None:
            raise RuntimeError("gRPC server is not running")

    async def __del__(self) -> None:
        redelivery = getattr(self, "redelivery", None)
        if redelivery is not None:
            redelivery.cancel()
        server = getattr(self, "server", None)
        if server is not None:
            await server.stop(grace=2)
        index = getattr(self, "index", None)
        if index is not None:
            index.close()
