"""The application builder and the embedded-profile runner.

``build_app(settings)`` composes the deployments with ``.bind()``; replica counts and batch sizes
come from the settings (and, on Kubernetes, from the Serve config in ``deploy/``).
``init_ray(settings)`` starts a local Ray on loopback (or joins ``IMAGINE_RAY_ADDRESS``);
``run_app(settings)`` then runs the application and returns once every deployment is up.
"""

from __future__ import annotations

import logging
from typing import Any

from imagine.config import ServiceSettings
from imagine.runtime import quiet_environment, use_loopback_ray

log = logging.getLogger("imagine.app")
APP_NAME = "imagine"


def build_app(settings: ServiceSettings) -> Any:
    from services import deployments, ingress

    # @serve.deployment turns the classes into Deployments (options/bind); mypy sees classes.
    TextEncoder: Any = deployments.TextEncoder
    ImageEncoder: Any = deployments.ImageEncoder
    VisionEncoder: Any = deployments.VisionEncoder
    Generator: Any = deployments.Generator
    Aggregator: Any = deployments.Aggregator
    CaptionDecoder: Any = deployments.CaptionDecoder
    Ingress: Any = ingress.Ingress

    # Serve queues at most max_ongoing_requests per replica (5 by default): let enough
    # concurrent requests in for @serve.batch to fill its batches.
    replicas = {
        "num_replicas": settings.encoder_replicas,
        "ray_actor_options": {"num_cpus": settings.encoder_num_cpus},
        "max_ongoing_requests": 4 * settings.encoder_batch_size,
    }
    common = (settings.model, settings.encoder_batch_size, settings.encoder_batch_wait_s)
    text = TextEncoder.options(**replicas).bind(*common, settings.torch_threads)
    image = ImageEncoder.options(**replicas).bind(
        *common, settings.torch_threads, settings.max_image_pixels
    )
    vision = generator = aggregator = None
    specs = settings.generative_specs()
    if "vision" in specs:
        vision = VisionEncoder.options(**replicas).bind(
            specs["vision"], *common[1:], settings.torch_threads, settings.max_image_pixels
        )
    if {"vision", "generator", "aggregator"} <= set(specs):
        generator = Generator.options(
            **replicas | {"max_ongoing_requests": 2 * settings.generator_batch_size}
        ).bind(
            specs["generator"],
            settings.generator_batch_size,
            settings.generator_batch_wait_s,
            settings.generator_torch_threads,
            settings.generator_precision,
            settings.generator_split_rows,
            settings.generator_small_pass_threads,
        )
        aggregator = Aggregator.options(
            ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64
        ).bind(specs["aggregator"])
    captioner = None
    if "caption" in specs:
        captioner = CaptionDecoder.options(
            **replicas | {"max_ongoing_requests": 4 * settings.caption_batch_size}
        ).bind(
            specs["caption"],
            settings.caption_batch_size,
            settings.caption_batch_wait_s,
            settings.torch_threads,
            settings.max_image_pixels,
        )
    front = Ingress.options(ray_actor_options={"num_cpus": settings.ingress_num_cpus})
    return front.bind(
        settings.model_dump(mode="json"), text, image, vision, generator, aggregator, captioner
    )


def init_ray(settings: ServiceSettings) -> None:
    """Start (or join) Ray. A driver's ``ray.init`` installs Ray's own SIGTERM handlers (a
    ``sys.exit`` and a fatal-signal report): a caller with handlers of its own installs them
    again after this."""
    quiet_environment()
    if not settings.ray_address:
        use_loopback_ray()  # before Ray is imported: it reads the setting at import time
    import ray

    settings.ensure_dirs()
    if not ray.is_initialized():
        ray.init(
            # unset: a Ray of our own, not a cluster that RAY_ADDRESS or the address file of the
            # last `ray start` on this machine names (Ray joins those by default)
            address=settings.ray_address or "local",
            num_cpus=settings.num_cpus,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=True,
        )


def run_app(settings: ServiceSettings) -> dict[str, str]:
    """Run the application on the Ray of :func:`init_ray`; returns the ingress address info."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    handle = serve.run(build_app(settings), name=APP_NAME, route_prefix=None)
    info: dict[str, str] = handle.address_info.remote().result()
    return info


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()


def app_from_env(args: dict[str, Any] | None = None) -> Any:
    """Serve application builder (``services.app:app_from_env``) for ``serve run`` and KubeRay's
    RayService: settings come from the ``IMAGINE_*`` environment; ``args`` override fields."""
    from imagine.config import load_service_settings

    return build_app(load_service_settings(**(args or {})))
