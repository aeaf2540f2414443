"""Generate the RayService ``serveConfigV2`` of each overlay from the Serve application itself.

    python deploy/render_serve_config.py          # rewrite deploy/k8s/overlays/*/serve-config.yaml
    python deploy/render_serve_config.py --check  # exit 1 when a committed file is stale

The application is built by the builder named in ``IMPORT_PATH`` (the Ray Serve "application
builder" pattern: a function of the config's ``args``), with the models the overlay turns on
(its ``models.env``, which the Ray pods get as environment). Its deployments are listed from the
built application, so a deployment added, renamed or removed in ``services/``, or a generative
model switched on or off in ``models.env``, makes the committed config stale and
``tests/unit/test_deploy.py`` fails until this script is re-run. What differs per overlay —
replicas, autoscaling, CPUs/GPUs per replica, batch sizes (``args``: ServiceSettings fields) —
lives in ``PROFILES`` below, not in decorators.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
OVERLAYS = DEPLOY / "k8s" / "overlays"
OUTPUT_NAME = "serve-config.yaml"
MODELS_NAME = "models.env"
IMPORT_PATH = "services.app:app_from_env"
APP_NAME = "imagine"
RAYSERVICE_NAME = "imagine"
# The Ingress replica opens our gRPC server on IMAGINE_GRPC_ADDRESS (0.0.0.0:50051): one replica
# per pod, on the pods of the "ingress" worker group, which alone offer this custom resource.
INGRESS_RESOURCE = "imagine_ingress"


@dataclass(frozen=True)
class Profile:
    """The Serve settings of one overlay: ``deployments`` covers every deployment the application
    may have; only those it has with the overlay's models are written."""

    args: dict[str, Any]
    deployments: dict[str, dict[str, Any]]
    logging: dict[str, Any] = field(
        default_factory=lambda: {"encoding": "TEXT", "log_level": "INFO"}
    )


_INGRESS = {
    # One replica: it opens the job store (SQLite on a node-local volume, see deploy/README.md).
    "num_replicas": 1,
    "graceful_shutdown_timeout_s": 30,
}

PROFILES: dict[str, Profile] = {
    # CPU only, everything small: fits a laptop kind/minikube cluster.
    "dev": Profile(
        args={
            "encoder_batch_size": 32,
            "encoder_batch_wait_s": 0.01,
            "generator_batch_size": 4,
            "generator_batch_wait_s": 0.005,
            "generator_precision": "auto",  # bfloat16 on AVX512-BF16/AMX nodes, else float32
            # CPU passes of >= 16 rows split across the generator's torch threads (with one
            # thread, as here, nothing splits)
            "generator_split_rows": 16,
            "generator_small_pass_threads": 1,  # smaller passes: no OpenMP team
            "torch_threads": 1,
            "generator_torch_threads": 1,
        },
        deployments={
            "TextEncoder": {
                "num_replicas": 1,
                "max_ongoing_requests": 32,
                "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0},
            },
            "ImageEncoder": {
                "num_replicas": "auto",
                "autoscaling_config": {
                    "min_replicas": 1,
                    "max_replicas": 2,
                    "target_ongoing_requests": 4,
                },
                "max_ongoing_requests": 16,
                "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0},
            },
            "VisionEncoder": {
                "num_replicas": 1,
                "max_ongoing_requests": 16,
                "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0},
            },
            "Generator": {
                "num_replicas": 1,
                "max_ongoing_requests": 8,
                "ray_actor_options": {"num_cpus": 1, "num_gpus": 0},
            },
            "Aggregator": {
                "num_replicas": 1,
                "ray_actor_options": {"num_cpus": 0.1, "num_gpus": 0},
            },
            # on when IMAGINE_CAPTION_MODEL is set: a small decoder, CPU is enough
            "CaptionDecoder": {
                "num_replicas": 1,
                "max_ongoing_requests": 64,
                "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0},
            },
            "Ingress": {
                **_INGRESS,
                "ray_actor_options": {"num_cpus": 0.5, "resources": {INGRESS_RESOURCE: 1}},
            },
        },
    ),
    # GPU nodes (1 GPU, 8 CPUs per encoders pod, at most 6 pods): image and vision encoders take a
    # quarter GPU, the generator half; at their maxima they fill 5 GPUs (see deploy/README.md).
    "gpu": Profile(
        args={
            "encoder_batch_size": 128,
            "encoder_batch_wait_s": 0.005,
            "generator_batch_size": 16,
            "generator_batch_wait_s": 0.005,
            "generator_precision": "auto",  # bfloat16 on GPUs with bf16 units, else float32
            "generator_split_rows": 16,  # CPU only: a GPU pass is never split
            "generator_small_pass_threads": 1,  # CPU only, as above
            "torch_threads": 2,
            "generator_torch_threads": 2,
        },
        deployments={
            # One short sentence per query: the text tower is cheap enough on CPU.
            "TextEncoder": {
                "num_replicas": "auto",
                "autoscaling_config": {
                    "min_replicas": 1,
                    "max_replicas": 4,
                    "target_ongoing_requests": 8,
                },
                "max_ongoing_requests": 64,
                "ray_actor_options": {"num_cpus": 1, "num_gpus": 0},
            },
            "ImageEncoder": {
                "num_replicas": "auto",
                "autoscaling_config": {
                    "min_replicas": 1,
                    "max_replicas": 8,
                    "target_ongoing_requests": 4,
                    "upscale_delay_s": 10,
                    "downscale_delay_s": 300,
                },
                "max_ongoing_requests": 16,
                "ray_actor_options": {"num_cpus": 2, "num_gpus": 0.25},
            },
            "VisionEncoder": {
                "num_replicas": "auto",
                "autoscaling_config": {
                    "min_replicas": 1,
                    "max_replicas": 4,
                    "target_ongoing_requests": 4,
                },
                "max_ongoing_requests": 16,
                "ray_actor_options": {"num_cpus": 1, "num_gpus": 0.25},
            },
            # Diffusion is the heavy path: half a GPU per replica, batched across queries.
            "Generator": {
                "num_replicas": "auto",
                "autoscaling_config": {
                    "min_replicas": 1,
                    "max_replicas": 4,
                    "target_ongoing_requests": 8,
                    "upscale_delay_s": 10,
                    "downscale_delay_s": 600,
                },
                "max_ongoing_requests": 32,
                "ray_actor_options": {"num_cpus": 2, "num_gpus": 0.5},
            },
            "Aggregator": {
                "num_replicas": 1,
                "ray_actor_options": {"num_cpus": 0.25, "num_gpus": 0},
            },
            # on when IMAGINE_CAPTION_MODEL is set: a small decoder, batched on CPU
            "CaptionDecoder": {
                "num_replicas": "auto",
                "autoscaling_config": {"min_replicas": 1, "max_replicas": 4},
                "max_ongoing_requests": 128,
                "ray_actor_options": {"num_cpus": 2, "num_gpus": 0},
            },
            "Ingress": {
                **_INGRESS,
                "ray_actor_options": {"num_cpus": 2, "resources": {INGRESS_RESOURCE: 1}},
            },
        },
    ),
}


def load_builder(import_path: str = IMPORT_PATH) -> Any:
    module_name, _, attr = import_path.partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise SystemExit(
            f"{import_path} does not exist: the RayService needs this application builder "
            "(a function of the Serve config's args returning the Application)"
        ) from None


def read_models(overlay: str) -> dict[str, str]:
    """The overlay's models.env as ServiceSettings fields: {"model": ..., "vision_model": ...}."""
    out = {}
    for line in (OVERLAYS / overlay / MODELS_NAME).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.removeprefix("IMAGINE_").lower()] = value.strip()
    return out


def deployment_names(args: dict[str, Any]) -> list[str]:
    """The deployments of the application the builder returns, in build order."""
    # `serve build` lists deployments the same way (ray.serve._private.build_app).
    from ray.serve._private.build_app import build_app

    app = load_builder()(dict(args))
    return [d.name for d in build_app(app, name=APP_NAME).deployments]


def known_deployments() -> set[str]:
    """Every Serve deployment the services package defines."""
    from ray import serve

    from services import deployments, ingress

    modules = (deployments, ingress)
    return {d.name for m in modules for d in vars(m).values() if isinstance(d, serve.Deployment)}


def serve_config(profile: Profile, names: list[str]) -> dict[str, Any]:
    missing = sorted(set(names) - set(profile.deployments))
    if missing:
        raise SystemExit(f"the profile has no settings for the deployments {missing}")
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "logging_config": dict(profile.logging),
        "applications": [
            {
                "name": APP_NAME,
                "import_path": IMPORT_PATH,
                # No HTTP route: clients use our gRPC ingress on port 50051.
                "route_prefix": None,
                "args": dict(profile.args),
                "deployments": [{"name": n, **profile.deployments[n]} for n in names],
            }
        ],
    }


def render(overlay: str, names: list[str] | None = None) -> str:
    """The RayService patch (with the serveConfigV2 string) committed in the overlay."""
    profile = PROFILES[overlay]
    unknown = sorted(set(profile.deployments) - known_deployments())
    if unknown:
        raise SystemExit(f"the {overlay!r} profile names no deployment of services/: {unknown}")
    if names is None:
        names = deployment_names({**read_models(overlay), **profile.args})
    body = yaml.safe_dump(serve_config(profile, names), sort_keys=False, width=100)
    indented = "".join(f"    {line}" if line.strip() else line for line in body.splitlines(True))
    return (
        "# GENERATED by `python deploy/render_serve_config.py` from the Serve application\n"
        f"# ({IMPORT_PATH}) and the {overlay!r} profile in that script. Do not edit by hand:\n"
        "# change the profile and re-run; tests/unit/test_deploy.py fails when this is stale.\n"
        "apiVersion: ray.io/v1\n"
        "kind: RayService\n"
        "metadata:\n"
        f"  name: {RAYSERVICE_NAME}\n"
        "spec:\n"
        "  serveConfigV2: |\n"
        f"{indented}"
    )


def output_path(overlay: str) -> Path:
    return OVERLAYS / overlay / OUTPUT_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a committed file is stale")
    parser.add_argument("overlays", nargs="*", default=sorted(PROFILES))
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    stale = []
    for overlay in args.overlays:
        text, path = render(overlay), output_path(overlay)
        current = path.read_text() if path.exists() else ""
        if text == current:
            continue
        if args.check:
            stale.append(overlay)
            sys.stdout.writelines(
                difflib.unified_diff(
                    current.splitlines(True), text.splitlines(True), str(path), "rendered"
                )
            )
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python deploy/render_serve_config.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
