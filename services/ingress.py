"""The gRPC ingress: a Ray Serve deployment that serves our API on ``IMAGINE_GRPC_ADDRESS``.

It is a gRPC front of our own over deployment handles (rather than Serve's gRPC proxy) so it can
honour the address setting, stream ``WatchIngestJob``, and serve standard health checking and
server reflection. In the embedded profile it also owns the Qdrant store and exposes it to the
ingestion workers through the internal ``IndexService``.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from ray import serve
from ray.serve.handle import DeploymentHandle

from imagine.config import ServiceSettings
from imagine.index import QdrantIndex
from imagine.jobs import TASK_RUN_JOB, SqliteJobStore
from imagine.queueing import broker_config
from services.servicers import Backend, add_all

log = logging.getLogger("imagine.ingress")


class HandleEncoders:
    """The encoders, reached through their deployment handles."""

    def __init__(self, text: DeploymentHandle, image: DeploymentHandle) -> None:
        self._text = text
        self._image = image

    async def text(self, texts: list[str]) -> list[np.ndarray]:
        return await self._text.encode.remote(texts)

    async def images(self, images: list[bytes]) -> list[np.ndarray | str]:
        return await self._image.encode.remote(images)


class CeleryQueue:
    """Submits ingestion jobs to the workers by task name (the ingress imports no worker code)."""

    def __init__(self, settings: ServiceSettings) -> None:
        from celery import Celery

        self._app = Celery("imagine-ingress")
        self._app.conf.update(broker_config(settings))

    def submit(self, job_id: str) -> None:
        self._app.send_task(TASK_RUN_JOB, args=[job_id], retry=True)


def open_index(settings: ServiceSettings) -> QdrantIndex:
    if settings.qdrant.url:
        return QdrantIndex.remote(
            settings.qdrant.url, settings.qdrant.api_key, settings.qdrant.timeout_s
        )
    return QdrantIndex.embedded(settings.qdrant_path)


@serve.deployment(name="Ingress", num_replicas=1)
class Ingress:
    async def __init__(  # type: ignore[misc]  # Serve supports async constructors
        self, settings: dict[str, Any], text: DeploymentHandle, image: DeploymentHandle
    ) -> None:
        from imagine.runtime import setup_logging

        s = ServiceSettings.model_validate(settings)
        setup_logging(s.log_level)
        info = await text.info.remote()
        self.index = open_index(s)
        self.backend = Backend(
            encoders=HandleEncoders(text, image),
            index=self.index,
            jobs=SqliteJobStore(s.jobs_path),
            queue=CeleryQueue(s),
            model_version=info["model_version"],
            dim=info["dim"],
            default_chunk_size=s.default_chunk_size,
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

    async def address_info(self) -> dict[str, str]:
        return {"address": self.address, "model_version": self.backend.model_version}

    async def check_health(self) -> None:
        """Serve's health check: fail when the gRPC server has stopped."""
        if self.server is None:
            raise RuntimeError("gRPC server is not running")

    async def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            await server.stop(grace=2)
        index = getattr(self, "index", None)
        if index is not None:
            index.close()
