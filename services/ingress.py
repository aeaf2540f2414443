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
from imagine.jobs import TASK_RUN_CHUNK, TASK_RUN_JOB, SqliteJobStore, open_job_store
from imagine.observability import (
    BATCH_ITEMS,
    BATCH_SIZE,
    BATCHES,
    GENERATOR_PASSES,
    GENERATOR_QUERIES_PER_PASS,
    JOB_OBJECTS,
    JOB_PROGRESS,
    JOBS,
    serve_metrics,
)
from imagine.queueing import broker_config
from imagine.storage import ObjectLinks
from services.guard import GenerationSlots, Guard
from services.query import GenerativeInfo, QueryEngine, SamplingDefaults
from services.servicers import Backend, add_all

METRICS_POLL_S = 15.0  # each poll is a call per deployment (and a line in its log)
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}

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
        call = (images, strategy, beam_size, temperature, seed)
        return list(await self._handle.caption.remote(call))


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


async def poll_metrics_forever(handles: dict[str, DeploymentHandle], jobs: SqliteJobStore) -> None:
    """Keep the gauges of other processes fresh: each deployment's batches, the job records."""
    while True:
        for name, handle in handles.items():
            try:
                st = await asyncio.wait_for(handle.batch_stats.remote(), METRICS_POLL_S)
            except Exception as exc:
                log.debug("batch stats of %s: %s", name, type(exc).__name__)
                continue
            BATCHES.labels(name).set(st["batches"])
            BATCH_ITEMS.labels(name).set(st["requests"])
            BATCH_SIZE.labels(name).set(st["requests"] / st["batches"] if st["batches"] else 0)
            if "passes" in st:  # the generator's denoising loop
                GENERATOR_PASSES.set(st["passes"])
                GENERATOR_QUERIES_PER_PASS.set(
                    st["job_steps"] / st["passes"] if st["passes"] else 0
                )
        try:
            recent = await asyncio.to_thread(jobs.list, "", 500)
        except Exception as exc:
            log.warning("job metrics: %s", type(exc).__name__)
            recent = []
        states: dict[str, int] = {}
        objects = {"total": 0, "embedded": 0, "skipped": 0, "failed": 0, "removed": 0}
        JOB_PROGRESS.clear()
        for j in recent:
            states[j.state.value] = states.get(j.state.value, 0) + 1
            for k in objects:
                objects[k] += getattr(j, k)
            if not j.state.terminal:
                JOB_PROGRESS.labels(j.id).set(j.processed / j.total if j.total else 0.0)
        for state in ("QUEUED", "RUNNING", "SUCCEEDED", "SUCCEEDED_WITH_ERRORS", "FAILED",
                      "CANCELLED"):  # fmt: skip
            JOBS.labels(state).set(states.get(state, 0))
        for k, v in objects.items():
            JOB_OBJECTS.labels(k).set(v)
        await asyncio.sleep(METRICS_POLL_S)


def listen_address(s: ServiceSettings, auth_on: bool) -> str:
    """Without authentication the ingress listens on loopback only."""
    host, _, port = s.grpc_address.rpartition(":")
    if auth_on or host in LOOPBACK_HOSTS:
        return s.grpc_address
    log.warning(
        "authentication is off (embedded profile): listening on 127.0.0.1:%s instead of %s; "
        "set IMAGINE_AUTH__KEYS and IMAGINE_AUTH__ENABLED=true to serve other hosts",
        port,
        s.grpc_address,
    )
    return f"127.0.0.1:{port}"


def server_credentials(s: ServiceSettings) -> grpc.ServerCredentials | None:
    cert, key = s.tls.cert_file, s.tls.key_file
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise RuntimeError("TLS needs both IMAGINE_TLS__CERT_FILE and IMAGINE_TLS__KEY_FILE")
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])


def _bind_serve_request_id(rid: str) -> None:
    """Make the deployment handles carry ``rid`` as Ray Serve's request id."""
    from ray.serve import context

    context._set_request_context(request_id=rid)


def open_index(settings: ServiceSettings) -> QdrantIndex:
    return QdrantIndex.from_settings(settings.qdrant, settings.qdrant_path)


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
        setup_logging(s.log_level, s.log_format)
        auth_on = s.auth_enabled
        if auth_on and not s.auth.keys:
            raise RuntimeError(
                "authentication is on but no API key is configured: set IMAGINE_AUTH__KEYS "
                "(`imagine keys new --role admin` prints one)"
            )
        credentials = server_credentials(s)
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
                    ginfo["model_version"],
                    ainfo["model_version"],
                    ainfo["fusion_weight"],
                    ainfo["mode"],
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
        jobs, queue = open_job_store(s.jobs_url, s.jobs_path), CeleryQueue(s)
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
                encoders,
                self.index,
                version,
                generative,
                defaults,
                s.query_cache_size,
                limits=s.limits,
                captions=captions,
            ),
            generative=generative,
            captions=captions,
            defaults=defaults,
            links=ObjectLinks(s.storage),
            limits=s.limits,
            slots=GenerationSlots(s.limits.max_concurrent_generations),
        )
        # No SO_REUSEPORT: a second server on the same address must fail, not share it.
        guard = Guard(s.auth.keys if auth_on else None, s.limits, _bind_serve_request_id)
        self.server = grpc.aio.server(
            interceptors=[guard],
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        names = add_all(self.server, self.backend, with_index=not s.qdrant.url)
        health_servicer = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        for name in ["", *names]:
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            [*names, reflection.SERVICE_NAME, health.SERVICE_NAME], self.server
        )
        address = listen_address(s, auth_on)
        if credentials is None:
            port = self.server.add_insecure_port(address)
        else:
            port = self.server.add_secure_port(address, credentials)
        if port == 0:
            raise RuntimeError(f"cannot listen on {address}")
        await self.server.start()
        self.address = address
        self.metrics = None
        if s.metrics_address:
            serve_metrics(s.metrics_address)
            handles = {"TextEncoder": text, "ImageEncoder": image}
            handles |= {"VisionEncoder": vision} if vision is not None else {}
            handles |= {"Generator": generator} if generator is not None else {}
            handles |= {"CaptionDecoder": captioner} if captioner is not None else {}
            self.metrics = asyncio.get_running_loop().create_task(
                poll_metrics_forever(handles, jobs)
            )
        log.info(
            "gRPC ingress listening on %s (model %s, %s, authentication %s)%s",
            address,
            info["model_version"],
            "TLS" if credentials else "plaintext",
            "on" if auth_on else "off",
            f"; metrics on http://{s.metrics_address}/metrics" if s.metrics_address else "",
        )

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
        for task in (getattr(self, "redelivery", None), getattr(self, "metrics", None)):
            if task is not None:
                task.cancel()
        server = getattr(self, "server", None)
        if server is not None:
            await server.stop(grace=2)
        index = getattr(self, "index", None)
        if index is not None:
            index.close()
