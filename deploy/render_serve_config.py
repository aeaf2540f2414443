"""Generate the RayService ``serveConfigV2`` of each overlay from the Serve application itself.

    python deploy/render_serve_config.py            # rewrite deploy/k8s/overlays/*/serve-config.yaml
    python deploy/render_serve_config.py --check    # exit 1 when a committed file is stale

The application is built by the builder named in ``IMPORT_PATH`` (the Ray Serve "application
builder" pattern: a function of the config's ``args``). Its deployments are listed from the built
application, so a deployment added, renamed or removed in ``services/`` makes the committed config
stale and ``tests/unit/test_deploy.py`` fails until this script is re-run. What differs per
overlay — replicas, autoscaling, CPUs/GPUs per replica, batch sizes (``args``: ServiceSettings
fields) — lives in ``PROFILES`` below, not in decorators.
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
IMPORT_PATH = "services.app:app_from_env"
APP_NAME = "imagine"
RAYSERVICE_NAME = "imagine"
# The Ingress replica opens our gRPC server on IMAGINE_GRPC_ADDRESS (0.0.0.0:50051): one replica
# per pod, on the pods of the "ingress" worker group, which alone offer this custom resource.
INGRESS_RESOURCE = "imagine_ingress"


@dataclass(frozen=True)
class Profile:
    """The Serve settings of one overlay."""

    args: dict[str, Any]
    deployments: dict[str, dict[str, Any]]
    logging: dict[str, Any] = field(default_factory=lambda: {"encoding": "TEXT", "log_level": "INFO"})


_INGRESS = {
    # One replica: it opens the job store (SQLite on a node-local volume, see deploy/README.md).
    "num_replicas": 1,
    "graceful_shutdown_timeout_s": 30,
}

PROFILES: dict[str, Profile] = {
    # CPU only, everything small: fits a laptop kind/minikube cluster.
    "dev": Profile(
        args={"encoder_batch_size": 32, "encoder_batch_wait_s": 0.01, "torch_threads": 1},
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
            "Ingress": {
                **_INGRESS,
                "ray_actor_options": {"num_cpus": 0.5, "resources": {INGRESS_RESOURCE: 1}},
            },
        },
    ),
    # GPU nodes: encoders share a GPU in quarters (about 1 GiB each, see the sizing table).
    "gpu": Profile(
        args={"encoder_batch_size": 128, "encoder_batch_wait_s": 0.005, "torch_threads": 2},
        deployments={
            "TextEncoder": {
                "num_replicas": "auto",
                "autoscaling_config": {
                    "min_replicas": 1,
                    "max_replicas": 4,
                    "target_ongoing_requests": 8,
                },
                "max_ongoing_requests": 64,
                "ray_actor_options": {"num_cpus": 1, "num_gpus": 0.25},
            },
            "ImageEncoder": {
                "num_replicas": "auto",
                "autoscaling_config": {
                    "min_replicas": 1,
                    "max_replicas": 12,
                    "target_ongoing_requests": 4,
                    "upscale_delay_s": 10,
                    "downscale_delay_s": 300,
                },
                "max_ongoing_requests": 16,
                "ray_actor_options": {"num_cpus": 2, "num_gpus": 0.25},
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


def deployment_names(args: dict[str, Any]) -> list[str]:
    """The deployments of the application the builder returns, in build order."""
    # `serve build` lists deployments the same way (ray.serve._private.build_app).
    from ray.serve._private.build_app import build_app

    app = load_builder()(dict(args))
    return [d.name for d in build_app(app, name=APP_NAME).deployments]


def serve_config(profile: Profile, names: list[str]) -> dict[str, Any]:
    missing = sorted(set(names) - set(profile.deployments))
    unknown = sorted(set(profile.deployments) - set(names))
    if missing or unknown:
        raise SystemExit(
            f"profile and application disagree: no settings for {missing}, "
            f"settings for deployments the application does not have: {unknown}"
        )
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
    if names is None:
        names = deployment_names(profile.args)
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
