"""The cluster profile's manifests (deploy/): they render, they are valid, they match the code.

No cluster is needed: every overlay is rendered with `kubectl kustomize`; core resources are checked
against the Kubernetes OpenAPI schemas (kubernetes-validate, offline), custom resources against
deploy/schemas (the fields KubeRay and KEDA accept), Ray pod templates against the Pod schema, the
Serve config against Ray Serve's own schema and the application's deployments. Then the manifests
are checked against the code: settings, addresses, the Celery queue, network policies, the
Dockerfiles' paths.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel
from referencing import Registry, Resource

from imagine.config import ServiceSettings, StorageSettings, TrainSettings, WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = DEPLOY / "k8s" / "overlays"
SCHEMAS = DEPLOY / "schemas"
STACKS = ["dev", "gpu"]  # the serving stack of each overlay
TRAINING = {"dev": "dev/train", "gpu": "gpu/train"}  # the RayJob beside each stack
K8S_VERSIONS = ["1.30.0", "1.37.0"]  # oldest supported (gRPC probes are GA) and newest shipped
CUSTOM_GROUPS = {"ray.io", "keda.sh"}
CR_SCHEMAS = {
    "RayService": "rayservice.json",
    "RayJob": "rayjob.json",
    "ScaledObject": "scaledobject.json",
    "TriggerAuthentication": "triggerauthentication.json",
}
Doc = dict[str, Any]


# -- rendering ----------------------------------------------------------------------------------
def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is needed to render the overlays (`kubectl kustomize`)")
    return path


_RENDERED: dict[str, list[Doc]] = {}


def render(overlay: str) -> list[Doc]:
    if overlay not in _RENDERED:
        proc = subprocess.run(
            [_kubectl(), "kustomize", str(OVERLAYS / overlay)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
        _RENDERED[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return copy.deepcopy(_RENDERED[overlay])


def all_overlays() -> list[str]:
    return sorted(str(p.parent.relative_to(OVERLAYS)) for p in OVERLAYS.rglob("kustomization.yaml"))


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def is_custom(doc: Doc) -> bool:
    return doc["apiVersion"].split("/")[0] in CUSTOM_GROUPS


@dataclass
class Pod:
    """A pod template somewhere in the rendered resources."""

    owner: str  # Kind/name[/group]
    labels: dict[str, str]
    spec: dict[str, Any]
    ray: dict[str, Any] | None = None  # the Ray group spec, for Ray pods

    def containers(self, init: bool = False) -> list[dict[str, Any]]:
        return list(self.spec.get("initContainers", []) if init else self.spec["containers"])


def pods(docs: list[Doc]) -> Iterator[Pod]:
    for d in docs:
        kind, name, spec = d["kind"], d["metadata"]["name"], d.get("spec", {})
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            t = spec["template"]
            yield Pod(f"{kind}/{name}", t["metadata"].get("labels", {}), t["spec"])
        elif kind in ("RayService", "RayJob"):
            cluster = spec["rayClusterConfig" if kind == "RayService" else "rayClusterSpec"]
            head = cluster["headGroupSpec"]
            t = head["template"]
            yield Pod(f"{kind}/{name}/head", t["metadata"].get("labels", {}), t["spec"], head)
            for g in cluster.get("workerGroupSpecs", []):
                t = g["template"]
                owner = f"{kind}/{name}/{g['groupName']}"
                yield Pod(owner, t["metadata"].get("labels", {}), t["spec"], g)


def pod_by_component(docs: list[Doc], component: str) -> Pod:
    found = [p for p in pods(docs) if p.labels.get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one pod template of component {component}, got {found}"
    return found[0]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def test_every_overlay_renders_into_one_namespace() -> None:
    overlays = all_overlays()
    assert set(overlays) >= {*STACKS, *TRAINING.values()}, overlays
    for overlay in overlays:
        docs = render(overlay)
        assert docs, overlay
        keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
        assert len(keys) == len(set(keys)), f"{overlay}: duplicate resources"
        for d in docs:
            if d["kind"] != "Namespace":
                assert d["metadata"].get("namespace") == "imagine", (overlay, d["kind"])


# -- Kubernetes schemas -------------------------------------------------------------------------
def k8s_errors(doc: Doc, version: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        return [f"{doc['kind']}/{doc['metadata']['name']} @ {where}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{doc['kind']}/{doc['metadata']['name']}: no Kubernetes schema ({exc})"]
    return []


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", [*STACKS, *TRAINING.values()])
def test_core_resources_match_the_kubernetes_schemas(overlay: str, version: str) -> None:
    docs = [d for d in render(overlay) if not is_custom(d)]
    errors = [e for d in docs for e in k8s_errors(d, version)]
    assert not errors, "\n".join(errors)


def embedded_core_objects(doc: Doc) -> Iterator[Doc]:
    """Core objects inside custom resources, wrapped so the Kubernetes schemas apply."""
    for p in pods([doc]):
        wrapped = {"metadata": {"labels": p.labels}, "spec": p.spec}
        yield {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": p.owner.lower().replace("/", "-")},
            "template": wrapped,
        }
    behavior = (
        doc.get("spec", {})
        .get("advanced", {})
        .get("horizontalPodAutoscalerConfig", {})
        .get("behavior")
    )
    if doc["kind"] == "ScaledObject" and behavior is not None:
        yield {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": doc["metadata"]["name"]},
            "spec": {
                "scaleTargetRef": doc["spec"]["scaleTargetRef"],
                "maxReplicas": doc["spec"].get("maxReplicaCount", 100),
                "behavior": behavior,
            },
        }


@pytest.mark.parametrize("overlay", [*STACKS, *TRAINING.values()])
def test_pod_templates_in_custom_resources_match_the_kubernetes_schemas(overlay: str) -> None:
    embedded = [o for d in render(overlay) if is_custom(d) for o in embedded_core_objects(d)]
    assert embedded
    errors = [e for o in embedded for v in K8S_VERSIONS for e in k8s_errors(o, v)]
    assert not errors, "\n".join(errors)


def test_the_kubernetes_schemas_reject_a_misspelt_field() -> None:
    """The strict schemas are what make the tests above able to fail."""
    worker = one(render("dev"), "Deployment", "imagine-worker")
    worker["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 1}}
    assert k8s_errors(worker, K8S_VERSIONS[0])
    ray = one(render("dev"), "RayService", "imagine")
    ray["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "resources"
    ]["limits"]["cpu"] = [1]
    assert any(k8s_errors(o, K8S_VERSIONS[0]) for o in embedded_core_objects(ray))


# -- custom resources ---------------------------------------------------------------------------
def cr_validator(kind: str) -> jsonschema.protocols.Validator:
    resources = []
    for path in SCHEMAS.glob("*.json"):
        resources.append((path.name, Resource.from_contents(json.loads(path.read_text()))))
    registry: Registry = Registry().with_resources(resources)
    schema = json.loads((SCHEMAS / CR_SCHEMAS[kind]).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=registry)


def cr_errors(doc: Doc) -> list[str]:
    if doc["kind"] not in CR_SCHEMAS:
        return [f"no schema for custom resource kind {doc['kind']}"]
    return [
        f"{doc['kind']}/{doc['metadata']['name']} @ {'/'.join(map(str, e.absolute_path))}: "
        f"{e.message}"
        for e in cr_validator(doc["kind"]).iter_errors(doc)
    ]


@pytest.mark.parametrize("overlay", [*STACKS, *TRAINING.values()])
def test_custom_resources_match_the_operator_schemas(overlay: str) -> None:
    docs = [d for d in render(overlay) if is_custom(d)]
    assert docs
    errors = [e for d in docs for e in cr_errors(d)]
    assert not errors, "\n".join(errors)
    for d in docs:
        if d["kind"] in ("RayService", "RayJob"):
            for p in pods([d]):
                g = p.ray or {}
                if "minReplicas" in g:
                    assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]), p.owner
                    assert g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], p.owner


def _breakages() -> list[tuple[str, str, Callable[[Doc], None]]]:
    def rs(d: Doc) -> dict[str, Any]:
        return d["spec"]["rayClusterConfig"]

    def trigger(d: Doc) -> dict[str, Any]:
        return d["spec"]["triggers"][0]["metadata"]

    return [
        (
            "RayService",
            "rayStartParams number",
            lambda d: rs(d)["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        ),
        ("RayService", "misspelt spec field", lambda d: d["spec"].update({"serveConfig": "x"})),
        (
            "RayService",
            "worker group without name",
            lambda d: rs(d)["workerGroupSpecs"][0].pop("groupName"),
        ),
        (
            "RayService",
            "bad upscaling mode",
            lambda d: rs(d)["autoscalerOptions"].update({"upscalingMode": "Fast"}),
        ),
        ("RayJob", "no entrypoint", lambda d: d["spec"].pop("entrypoint")),
        ("RayJob", "bad submission mode", lambda d: d["spec"].update({"submissionMode": "Job"})),
        ("ScaledObject", "unquoted list length", lambda d: trigger(d).update({"listLength": 8})),
        ("ScaledObject", "misspelt redis key", lambda d: trigger(d).update({"listname": "x"})),
        ("ScaledObject", "no target", lambda d: d["spec"].pop("scaleTargetRef")),
        (
            "TriggerAuthentication",
            "ref without key",
            lambda d: d["spec"]["secretTargetRef"][0].pop("key"),
        ),
    ]


@pytest.mark.parametrize("kind, what, breaks", _breakages(), ids=[b[1] for b in _breakages()])
def test_the_operator_schemas_reject_what_the_operators_reject(
    kind: str, what: str, breaks: Callable[[Doc], None]
) -> None:
    docs = render("gpu") + render("gpu/train")
    doc = next(d for d in docs if d["kind"] == kind)
    assert not cr_errors(doc)
    breaks(doc)
    assert cr_errors(doc), f"the {kind} schema accepts a {what}"


# -- the Serve config ---------------------------------------------------------------------------
def load_render_module() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(
        "render_serve_config", DEPLOY / "render_serve_config.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def serve_config(overlay: str) -> dict[str, Any]:
    text = one(render(overlay), "RayService", "imagine")["spec"]["serveConfigV2"]
    config: dict[str, Any] = yaml.safe_load(text)
    return config


def test_serve_config_is_generated_from_the_application() -> None:
    """The committed serveConfigV2 of each overlay equals a fresh render (not stale)."""
    rsc = load_render_module()
    assert sorted(rsc.PROFILES) == STACKS
    for overlay in STACKS:
        committed = rsc.output_path(overlay).read_text()
        assert committed == rsc.render(overlay), (
            f"{rsc.output_path(overlay)} is stale: run python deploy/render_serve_config.py"
        )


def test_the_serve_config_builder_exists_and_takes_the_args() -> None:
    rsc = load_render_module()
    for overlay in STACKS:
        app = serve_config(overlay)["applications"][0]
        builder = rsc.load_builder(app["import_path"])
        assert callable(builder)
        from ray.serve import Application

        assert isinstance(builder(dict(app["args"])), Application)


def deployment_resources(dep: dict[str, Any]) -> tuple[dict[str, float], int, int]:
    """(resources of one replica, min replicas, max replicas)."""
    opts = dep.get("ray_actor_options", {})
    need = {"CPU": float(opts.get("num_cpus", 1)), "GPU": float(opts.get("num_gpus", 0))}
    need.update({k: float(v) for k, v in opts.get("resources", {}).items()})
    if dep.get("num_replicas") == "auto" or "autoscaling_config" in dep:
        auto = dep["autoscaling_config"]
        return need, int(auto["min_replicas"]), int(auto["max_replicas"])
    return need, int(dep["num_replicas"]), int(dep["num_replicas"])


def ray_custom_resources(params: dict[str, str]) -> dict[str, float]:
    raw = params.get("resources")
    if not raw:
        return {}
    raw = raw.strip()
    if raw.startswith('"') and raw.endswith('"'):  # KubeRay passes it through bash
        raw = raw[1:-1].replace('\\"', '"')
    return {k: float(v) for k, v in json.loads(raw).items()}


def group_capacity(p: Pod) -> dict[str, float]:
    params = (p.ray or {}).get("rayStartParams", {})
    limits = p.containers()[0]["resources"]["limits"]
    cpu = params.get("num-cpus", str(limits["cpu"]))
    cap = {"CPU": float(cpu), "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
    cap.update(ray_custom_resources(params))
    return cap


def fits(items: list[dict[str, float]], slots: list[dict[str, float]]) -> bool:
    """First-fit decreasing of replicas into Ray nodes."""
    free = [dict(s) for s in slots]
    for item in sorted(items, key=lambda r: sorted(r.items()), reverse=True):
        for s in free:
            if all(s.get(k, 0) + 1e-9 >= v for k, v in item.items()):
                for k, v in item.items():
                    s[k] = s.get(k, 0) - v
                break
        else:
            return False
    return True


def check_serve_config(overlay: str, config: dict[str, Any], start_unscaled: bool = True) -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    # args are ServiceSettings fields: app_from_env(args) overrides the environment with them
    assert set(app["args"]) <= set(ServiceSettings.model_fields), app["args"]
    deps = {d["name"]: d for d in app["deployments"]}
    for d in deps.values():
        if "autoscaling_config" in d:
            assert d.get("num_replicas") == "auto", d["name"]
    docs = render(overlay)
    ray_pods = [p for p in pods(docs) if p.owner.startswith("RayService/")]
    groups = [p for p in ray_pods if not p.owner.endswith("/head")]
    # only the ingress group offers the resource the Ingress needs: the gRPC server lands there
    ingress_need, _, ingress_max = deployment_resources(deps["Ingress"])
    custom = {k for k in ingress_need if k not in ("CPU", "GPU")}
    assert custom, "the Ingress must be pinned to the ingress pods by a custom resource"
    offering = [p for p in groups if custom <= set(group_capacity(p))]
    assert [p.labels["app.kubernetes.io/component"] for p in offering] == ["ingress"]
    assert ingress_max <= sum(g.ray["maxReplicas"] for g in offering)  # type: ignore[index]
    head = next(p for p in ray_pods if p.owner.endswith("/head"))
    assert head.ray["rayStartParams"]["num-cpus"] == "0"  # type: ignore[index]
    # every replica fits: the minimum without the autoscaler, the maximum with it
    bounds = [(True, "minReplicas"), (False, "maxReplicas")]
    for at_min, key in bounds if start_unscaled else bounds[1:]:
        items = []
        for d in deps.values():
            need, low, high = deployment_resources(d)
            items += [need] * (low if at_min else high)
        slots = [group_capacity(g) for g in groups for _ in range(g.ray[key])]  # type: ignore[index]
        assert fits(items, slots), f"{overlay}: replicas at {key} do not fit the worker groups"
    gpus = sum(deployment_resources(d)[0]["GPU"] for d in deps.values())
    gpu_pods = [g for g in groups if group_capacity(g)["GPU"] > 0]
    if overlay == "dev":
        assert gpus == 0 and not gpu_pods
    else:
        assert gpus > 0 and [g.labels["app.kubernetes.io/component"] for g in gpu_pods] == [
            "encoders"
        ]
        for g in gpu_pods:
            assert any(t.get("key") == "nvidia.com/gpu" for t in g.spec.get("tolerations", []))


@pytest.mark.parametrize("overlay", STACKS)
def test_serve_config_is_valid_and_fits_the_ray_cluster(overlay: str) -> None:
    check_serve_config(overlay, serve_config(overlay))


@pytest.mark.parametrize("overlay", STACKS)
def test_with_every_generative_model_on_the_profile_still_fits(overlay: str) -> None:
    """Switching the generator path on (models.env) needs only a re-render, not new sizing."""
    rsc = load_render_module()
    on = {
        f: f"local-dir:/models/{f}" for f in ("vision_model", "generator_model", "aggregator_model")
    }
    names = rsc.deployment_names({**rsc.read_models(overlay), **on, **rsc.PROFILES[overlay].args})
    assert {"Generator", "VisionEncoder", "Aggregator"} <= set(names)
    config = rsc.serve_config(rsc.PROFILES[overlay], names)
    check_serve_config(overlay, config, start_unscaled=overlay != "dev")


# -- configuration congruence -------------------------------------------------------------------
def _model_type(annotation: Any) -> type[BaseModel] | None:
    if typing.get_origin(annotation) is list:  # a list of models is one JSON variable
        return None
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def env_names(cls: type[BaseModel], prefix: str | None = None, delimiter: str = "__") -> set[str]:
    """Every environment variable a pydantic-settings class reads."""
    if prefix is None:
        prefix = str(cls.model_config.get("env_prefix", ""))
        delimiter = str(cls.model_config.get("env_nested_delimiter") or delimiter)
    names = set()
    for name, info in cls.model_fields.items():
        nested = _model_type(info.annotation)
        if nested is not None:
            names |= env_names(nested, f"{prefix}{name.upper()}{delimiter}", delimiter)
        else:
            names.add(f"{prefix}{name}".upper())
    return names


STORAGE_NAMES = env_names(StorageSettings, "IMAGINE_STORAGE__")
_SERVICE_SIDE = "read by the model deployments, not by the worker"
_PLAINTEXT_IN_CLUSTER = (
    "gRPC inside the cluster is plaintext behind the NetworkPolicies (kubelet gRPC probes speak "
    "no TLS); an overlay that terminates TLS at the ingress sets the cert, key and CA files"
)
_LIMITS = [
    "MAX_QUERY_CHARS", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "MAX_TOP_K", "MAX_GENERATED",
    "MAX_STEPS", "MAX_REQUEST_S", "MAX_CONCURRENT_GENERATIONS",
]  # fmt: skip
# The settings each process may leave at their defaults, and why. Every other setting of that
# process must be set by the manifests; nothing else may be set.
DEFAULTS_OK: dict[str, dict[str, str]] = {
    "services": {
        "IMAGINE_QDRANT__TIMEOUT_S": "30 s suits an in-cluster Qdrant",
        "IMAGINE_STORAGE__REGION": "MinIO needs no region",
        "IMAGINE_STORAGE__PRESIGN_TTL_S": "hit URLs valid for an hour",
        "IMAGINE_DEFAULT_CHUNK_SIZE": "256; a job may ask for another chunk size",
        "IMAGINE_ENCODER_REPLICAS": "serveConfigV2 sets each deployment's replicas",
        "IMAGINE_ENCODER_NUM_CPUS": "serveConfigV2 sets ray_actor_options",
        "IMAGINE_INGRESS_NUM_CPUS": "serveConfigV2 sets ray_actor_options",
        "IMAGINE_RAY_ADDRESS": "embedded runner only: KubeRay runs the app in its cluster",
        "IMAGINE_NUM_CPUS": "embedded runner only",
        "IMAGINE_DEFAULT_NUM_GENERATED": "a request default; each Search may set its own",
        "IMAGINE_DEFAULT_STEPS": "a request default; each Search may set its own",
        "IMAGINE_DEFAULT_GUIDANCE": "a request default",
        "IMAGINE_QUERY_CACHE_SIZE": "1024 generated-query vectors per ingress",
        "IMAGINE_TLS__CERT_FILE": _PLAINTEXT_IN_CLUSTER,
        "IMAGINE_TLS__KEY_FILE": _PLAINTEXT_IN_CLUSTER,
        "IMAGINE_CAPTION_WEIGHT": "a request default; each Search may weight the caption path",
        "IMAGINE_IMAGE_QUERY_CAPTION_WEIGHT": "a request default; each Search may set its own",
        "IMAGINE_CAPTION_BATCH_SIZE": "32 images per caption batch suit a CPU replica",
        "IMAGINE_CAPTION_BATCH_WAIT_S": "10 ms: ingestion chunks fill the batches",
    },
    "worker": {
        "IMAGINE_QDRANT__TIMEOUT_S": "30 s suits an in-cluster Qdrant",
        "IMAGINE_STORAGE__REGION": "MinIO needs no region",
        "IMAGINE_STORAGE__PRESIGN_TTL_S": "hit URLs are made by the ingress",
        "IMAGINE_DEFAULT_CHUNK_SIZE": "the ingress decides a job's chunk size",
        "IMAGINE_MODEL": "the worker takes the model version from the encoders it calls",
        "IMAGINE_VISION_MODEL": "the worker takes the vectors from the services",
        "IMAGINE_GENERATOR_MODEL": _SERVICE_SIDE,
        "IMAGINE_AGGREGATOR_MODEL": _SERVICE_SIDE,
        "IMAGINE_CAPTION_MODEL": "the worker takes captions and vectors from the services",
        "IMAGINE_CAPTION_WEIGHT": _SERVICE_SIDE,
        "IMAGINE_IMAGE_QUERY_CAPTION_WEIGHT": _SERVICE_SIDE,
        "IMAGINE_CAPTION_BATCH_SIZE": _SERVICE_SIDE,
        "IMAGINE_CAPTION_BATCH_WAIT_S": _SERVICE_SIDE,
        "IMAGINE_DEFAULT_NUM_GENERATED": _SERVICE_SIDE,
        "IMAGINE_DEFAULT_STEPS": _SERVICE_SIDE,
        "IMAGINE_DEFAULT_GUIDANCE": _SERVICE_SIDE,
        "IMAGINE_GENERATOR_BATCH_SIZE": _SERVICE_SIDE,
        "IMAGINE_GENERATOR_BATCH_WAIT_S": _SERVICE_SIDE,
        "IMAGINE_GENERATOR_PRECISION": _SERVICE_SIDE,
        "IMAGINE_GENERATOR_SPLIT_ROWS": _SERVICE_SIDE,
        "IMAGINE_GENERATOR_SMALL_PASS_THREADS": _SERVICE_SIDE,
        "IMAGINE_QUERY_CACHE_SIZE": _SERVICE_SIDE,
        "IMAGINE_ENCODER_BATCH_SIZE": _SERVICE_SIDE,
        "IMAGINE_ENCODER_BATCH_WAIT_S": _SERVICE_SIDE,
        "IMAGINE_ENCODER_REPLICAS": _SERVICE_SIDE,
        "IMAGINE_ENCODER_NUM_CPUS": _SERVICE_SIDE,
        "IMAGINE_INGRESS_NUM_CPUS": _SERVICE_SIDE,
        "IMAGINE_TORCH_THREADS": _SERVICE_SIDE,
        "IMAGINE_GENERATOR_TORCH_THREADS": _SERVICE_SIDE,
        "IMAGINE_RAY_ADDRESS": _SERVICE_SIDE,
        "IMAGINE_NUM_CPUS": _SERVICE_SIDE,
        "IMAGINE_AUTH__ENABLED": _SERVICE_SIDE,
        "IMAGINE_AUTH__KEYS": _SERVICE_SIDE,
        "IMAGINE_TLS__CERT_FILE": _SERVICE_SIDE,
        "IMAGINE_TLS__KEY_FILE": _SERVICE_SIDE,
        "IMAGINE_METRICS_ADDRESS": "the worker serves IMAGINE_WORKER_METRICS_ADDRESS",
        **{f"IMAGINE_LIMITS__{k}": _SERVICE_SIDE for k in _LIMITS},
        "IMAGINE_CA_FILE": _PLAINTEXT_IN_CLUSTER,
    },
    "trainer": {
        "IMAGINE_DATA_DIR": "the job passes --output",
        "IMAGINE_GRPC_ADDRESS": "the trainer calls no service",
        "IMAGINE_STORAGE__REGION": "MinIO needs no region",
        "IMAGINE_STORAGE__PRESIGN_TTL_S": "the trainer makes no URLs",
        "IMAGINE_LOG_FORMAT": "the trainer shows progress bars; it configures no log format",
    },
}
# IMAGINE_* names the code reads from the environment outside the settings classes.
READ_OUTSIDE_SETTINGS = {
    "IMAGINE_FASHION_MNIST_DIR": "the images install Fashion-MNIST at the default path",
    "IMAGINE_PLAIN_PROGRESS": "the RayJob keeps Ray's progress bars",
}


def settings_of(process: str) -> set[str]:
    return {
        "services": env_names(ServiceSettings),
        "worker": env_names(WorkerSettings),
        "trainer": env_names(TrainSettings) | STORAGE_NAMES,  # + the upload step (s3sync.py)
    }[process]


def set_by(container: dict[str, Any], docs: list[Doc]) -> dict[str, str]:
    """IMAGINE_* names a container gets -> where from."""
    found: dict[str, str] = {}
    for env in container.get("env", []):
        found[env["name"]] = "env"
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            cm = one(docs, "ConfigMap", src["configMapRef"]["name"])
            found.update({k: f"ConfigMap/{cm['metadata']['name']}" for k in cm.get("data", {})})
        if "secretRef" in src:
            secret = one(docs, "Secret", src["secretRef"]["name"])
            keys = {**secret.get("data", {}), **secret.get("stringData", {})}
            found.update({k: f"Secret/{secret['metadata']['name']}" for k in keys})
    return {k: v for k, v in found.items() if k.startswith("IMAGINE_")}


def process_settings(stack: str) -> dict[str, tuple[dict[str, str], list[Doc]]]:
    """process -> (IMAGINE_* names set for it, the docs it was rendered from)."""
    docs, train = render(stack), render(TRAINING[stack])
    out: dict[str, tuple[dict[str, str], list[Doc]]] = {}
    services: dict[str, str] = {}
    for p in pods(docs):
        if p.owner.startswith("RayService/"):
            for c in p.containers() + p.containers(init=True):
                services.update(set_by(c, docs))
    args = serve_config(stack)["applications"][0]["args"]
    services.update({f"IMAGINE_{k.upper()}": "serveConfigV2 args" for k in args})
    out["services"] = (services, docs)
    worker = one(docs, "Deployment", "imagine-worker")["spec"]["template"]["spec"]
    out["worker"] = (
        {k: v for c in worker["containers"] for k, v in set_by(c, docs).items()},
        docs,
    )
    trainer: dict[str, str] = {}
    for p in pods(train):
        for c in p.containers() + p.containers(init=True):
            trainer.update(set_by(c, train))
    out["trainer"] = (trainer, train)
    return out


@pytest.mark.parametrize("stack", STACKS)
def test_every_setting_is_decided_and_nothing_unknown_is_set(stack: str) -> None:
    for process, (given, _) in process_settings(stack).items():
        known = settings_of(process)
        unknown = sorted(set(given) - known)
        assert not unknown, f"{stack}/{process}: the code reads no setting named {unknown}"
        defaults = DEFAULTS_OK[process]
        stale = sorted(set(defaults) - known)
        assert not stale, f"DEFAULTS_OK[{process}] names settings that no longer exist: {stale}"
        also_set = sorted(set(defaults) & set(given))
        assert not also_set, f"{stack}/{process}: {also_set} are set, drop them from DEFAULTS_OK"
        undecided = sorted(known - set(given) - set(defaults))
        assert not undecided, f"{stack}/{process}: set {undecided} or add them to DEFAULTS_OK"


def test_configmaps_hold_only_consumed_settings() -> None:
    for overlay in [*STACKS, *TRAINING.values()]:
        docs = render(overlay)
        used = {
            src["configMapRef"]["name"]
            for p in pods(docs)
            for c in p.containers() + p.containers(init=True)
            for src in c.get("envFrom", [])
            if "configMapRef" in src
        }
        for cm in (d for d in docs if d["kind"] == "ConfigMap"):
            if any(k.startswith("IMAGINE_") for k in cm.get("data", {})):
                assert cm["metadata"]["name"] in used, f"{overlay}: {cm['metadata']['name']}"


def test_every_imagine_variable_the_code_reads_is_a_setting_or_listed() -> None:
    literal = re.compile(r"""["'](IMAGINE_[A-Z0-9_]+)["']""")
    found = set()
    for package in ("imagine", "services", "workers", "trainer"):
        for path in (ROOT / package).rglob("*.py"):
            found |= set(literal.findall(path.read_text()))
    every_setting = set().union(*(settings_of(p) for p in DEFAULTS_OK))
    outside = found - every_setting
    assert outside == set(READ_OUTSIDE_SETTINGS), (
        f"read outside the settings classes: {sorted(outside)}; "
        f"listed: {sorted(READ_OUTSIDE_SETTINGS)}"
    )


def models_env(stack: str) -> dict[str, str]:
    lines = (OVERLAYS / stack / "models.env").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


@pytest.mark.parametrize("stack", STACKS)
def test_ray_containers_share_one_environment(stack: str) -> None:
    """The builder captures the settings wherever Ray runs it: every Ray node must agree."""
    docs = render(stack)
    ray = [p for p in pods(docs) if p.owner.startswith("RayService/")]
    envs = [(c.get("env"), c.get("envFrom")) for p in ray for c in p.containers()]
    assert len(envs) >= 3 and all(e == envs[0] for e in envs), "Ray containers differ in env"
    # the model choice is a generated ConfigMap (hashed name: a change rolls out a new cluster)
    refs = [s["configMapRef"]["name"] for s in envs[0][1] or [] if "configMapRef" in s]
    models = [n for n in refs if n.startswith("imagine-models-")]
    assert len(models) == 1, refs
    assert one(docs, "ConfigMap", models[0])["data"] == models_env(stack)
    for p in ray:
        for c in p.containers(init=True):
            assert models[0] in [s.get("configMapRef", {}).get("name") for s in c["envFrom"]]


def value_of(name: str, container: dict[str, Any], docs: list[Doc]) -> str:
    for env in container.get("env", []):
        if env["name"] == name:
            return str(env["value"])
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            data = one(docs, "ConfigMap", src["configMapRef"]["name"]).get("data", {})
            if name in data:
                return str(data[name])
    raise AssertionError(f"{name} is not set in container {container['name']}")


def service_port(docs: list[Doc], host: str, port: int) -> tuple[Doc, dict[str, Any]]:
    name, _, namespace = host.partition(".")
    if namespace:
        assert namespace.split(".")[0] == "imagine", f"{host}: not this namespace"
    svc = one(docs, "Service", name)
    ports = [p for p in svc["spec"]["ports"] if p["port"] == port]
    assert ports, f"Service {name} has no port {port}"
    return svc, ports[0]


def assert_reaches(docs: list[Doc], host: str, port: int, component: str) -> None:
    """host:port is a Service whose selector picks the component's pods and their port."""
    svc, sp = service_port(docs, host, port)
    target = pod_by_component(docs, component)
    assert selects({"matchLabels": svc["spec"]["selector"]}, target.labels), (host, component)
    ports = {p.get("name"): p["containerPort"] for c in target.containers() for p in c["ports"]}
    wanted = sp.get("targetPort", port)
    assert wanted in ports or wanted in ports.values(), f"{host}:{port} -> {wanted} not open"


@pytest.mark.parametrize("stack", STACKS)
def test_addresses_in_the_settings_reach_the_right_services(stack: str) -> None:
    docs, train = render(stack), render(TRAINING[stack])
    ingress = pod_by_component(docs, "ingress").containers()[0]
    worker = pod_by_component(docs, "worker").containers()[0]
    trainer = pod_by_component(train, "trainer").containers()[0]
    for c in (ingress, worker):
        url = value_of("IMAGINE_QDRANT__URL", c, docs)
        m = re.fullmatch(r"http://([a-z0-9.-]+):(\d+)", url)
        assert m, url
        assert_reaches(docs, m[1], int(m[2]), "qdrant")
        m = re.fullmatch(
            r"redis://:\$\(REDIS_PASSWORD\)@([a-z0-9.-]+):(\d+)/\d+",
            value_of("IMAGINE_BROKER_URL", c, docs),
        )
        assert m, "the broker URL takes the password from REDIS_PASSWORD"
        assert_reaches(docs, m[1], int(m[2]), "redis")
        names = [e["name"] for e in c["env"]]
        assert names.index("REDIS_PASSWORD") < names.index("IMAGINE_BROKER_URL")  # $(...) order
    for c, where in ((ingress, docs), (worker, docs), (trainer, train)):
        host, port = value_of("IMAGINE_STORAGE__ENDPOINT", c, where).split(":")
        assert_reaches(docs, host, int(port), "minio")
    # the workers reach the gRPC server the Ingress opens, through Service imagine-grpc
    host, port = value_of("IMAGINE_GRPC_ADDRESS", worker, docs).split(":")
    assert_reaches(docs, host, int(port), "ingress")
    bind_host, bind_port = value_of("IMAGINE_GRPC_ADDRESS", ingress, docs).rsplit(":", 1)
    assert bind_host == "0.0.0.0"
    assert int(bind_port) in [p["containerPort"] for p in ingress["ports"]]
    assert ingress["readinessProbe"]["grpc"]["port"] == int(bind_port)
    # KEDA watches the broker the workers consume
    so = one(docs, "ScaledObject", "imagine-worker")
    meta = so["spec"]["triggers"][0]["metadata"]
    host, port = meta["address"].split(":")
    assert_reaches(docs, host, int(port), "redis")
    broker_db = value_of("IMAGINE_BROKER_URL", worker, docs).rsplit("/", 1)[1]
    assert meta.get("databaseIndex", "0") == broker_db


@pytest.mark.parametrize("stack", STACKS)
def test_secret_and_config_references_resolve(stack: str) -> None:
    docs = render(stack)
    available = docs + render(TRAINING[stack])  # the RayJob uses the stack's Secrets
    for p in pods(available):
        for c in p.containers() + p.containers(init=True):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = one(available, "Secret", ref["name"])
                    keys = {**secret.get("data", {}), **secret.get("stringData", {})}
                    assert ref["key"] in keys, ref
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    one(available, "ConfigMap", src["configMapRef"]["name"])
        for vol in p.spec.get("volumes", []):
            if "persistentVolumeClaim" in vol:
                one(available, "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])
    for ta in (d for d in docs if d["kind"] == "TriggerAuthentication"):
        for ref in ta["spec"]["secretTargetRef"]:
            assert ref["key"] in one(docs, "Secret", ref["name"])["stringData"]
    for so in (d for d in docs if d["kind"] == "ScaledObject"):
        one(
            docs,
            so["spec"]["scaleTargetRef"].get("kind", "Deployment"),
            so["spec"]["scaleTargetRef"]["name"],
        )
        for t in so["spec"]["triggers"]:
            if "authenticationRef" in t:
                one(docs, "TriggerAuthentication", t["authenticationRef"]["name"])


def test_secrets_are_marked_placeholders() -> None:
    for d in render("dev"):
        if d["kind"] == "Secret":
            for key, value in d["stringData"].items():
                assert value.startswith("CHANGE-ME"), (d["metadata"]["name"], key)


# -- workers and the queue ----------------------------------------------------------------------
@pytest.mark.parametrize("stack", STACKS)
def test_keda_scales_the_workers_on_the_celery_queue(stack: str) -> None:
    from workers.celery_app import create_app

    app = create_app(WorkerSettings(broker_url="redis://unused:6379/0"))
    docs = render(stack)
    so = one(docs, "ScaledObject", "imagine-worker")
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == app.conf.task_default_queue
    deployment = one(docs, "Deployment", so["spec"]["scaleTargetRef"]["name"])
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    assert so["spec"]["minReplicaCount"] >= 1
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"] == ["python", "-m", "workers"]
    # warm shutdown finishes running chunks: give it minutes, not the default 30 s
    assert pod["terminationGracePeriodSeconds"] >= 120
    # the job store is PostgreSQL: workers and the ingress may run on any node, and reach it
    ingress = pod_by_component(docs, "ingress")
    postgres = pod_by_component(docs, "postgres")
    template = deployment["spec"]["template"]
    worker = Pod("Deployment/imagine-worker", template["metadata"]["labels"], template["spec"])
    for p in (worker, ingress):
        assert "affinity" not in p.spec or "podAffinity" not in p.spec["affinity"], p.owner
        assert not any(v.get("persistentVolumeClaim") for v in p.spec.get("volumes", []))
        env = {e["name"]: e for c in p.containers() for e in c.get("env", [])}
        assert env["IMAGINE_JOBS_URL"]["value"].startswith("postgresql://imagine:$(JOBS_DB")
        assert env["JOBS_DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "jobs-db"
    assert postgres.spec["containers"][0]["env"][0]["name"] == "POSTGRES_USER"


# -- probes, resources, budgets, images ---------------------------------------------------------
@pytest.mark.parametrize("overlay", [*STACKS, *TRAINING.values()])
def test_workloads_have_probes_resources_budgets_and_run_as_non_root(overlay: str) -> None:
    docs = render(overlay)
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for p in pods(docs):
        assert p.spec["securityContext"]["runAsNonRoot"] is True, p.owner
        for c in p.containers() + p.containers(init=True):
            res = c.get("resources", {})
            assert res.get("requests") and res.get("limits"), f"{p.owner}/{c['name']}"
            image = c["image"]
            assert ":" in image and not image.endswith(":latest"), image
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, p.owner
        if p.owner.split("/")[0] == "StatefulSet":
            for c in p.containers():
                assert "readinessProbe" in c and "livenessProbe" in c, p.owner
            assert any(selects(b["spec"]["selector"], p.labels) for b in budgets), (
                f"{p.owner} has no PodDisruptionBudget"
            )
    if overlay in STACKS:
        names = {d["metadata"]["name"] for d in docs if d["kind"] == "StatefulSet"}
        assert names == {"qdrant", "minio", "redis", "postgres"}
        grpc_probe = pod_by_component(docs, "ingress").containers()[0]["readinessProbe"]
        assert "grpc" in grpc_probe


def test_qdrant_replicates_shards_in_the_gpu_overlay() -> None:
    for stack, peers, copies in (("dev", 1, "1"), ("gpu", 3, "2")):
        sts = one(render(stack), "StatefulSet", "qdrant")
        env = {
            e["name"]: e.get("value")
            for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert sts["spec"]["replicas"] == peers
        assert env["QDRANT__STORAGE__COLLECTION__REPLICATION_FACTOR"] == copies
        assert int(copies) <= peers
        assert env["QDRANT__CLUSTER__ENABLED"] == "true"


# -- network policies ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Peer:
    labels: dict[str, str] = field(default_factory=dict)
    namespace: str = "imagine"

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace}


def allowed(
    policies: list[Doc], src: Peer, dst: Peer, port: int, ns_labels: dict[str, str]
) -> bool:
    """Kubernetes NetworkPolicy ingress semantics (labels, namespaces, numeric ports)."""
    applicable = [
        p
        for p in policies
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], dst.labels)
    ]
    if not applicable:
        return True
    src_ns = {**src.namespace_labels, **(ns_labels if src.namespace != "imagine" else {})}
    for policy in applicable:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and port not in [p["port"] for p in ports]:
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                pod_ok = "podSelector" not in peer or selects(peer["podSelector"], src.labels)
                if "namespaceSelector" in peer:
                    ns_ok = selects(peer["namespaceSelector"], src_ns)
                else:
                    ns_ok = src.namespace == "imagine"
                if pod_ok and ns_ok and "ipBlock" not in peer:
                    return True
    return False


@pytest.mark.parametrize("stack", STACKS)
def test_network_policies_let_only_the_needed_connections_through(stack: str) -> None:
    docs = render(stack)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    comp = {p.labels["app.kubernetes.io/component"]: Peer(p.labels) for p in pods(docs)}
    comp["trainer"] = Peer(pod_by_component(render(TRAINING[stack]), "trainer").labels)
    ext = {
        "kuberay": Peer({"app.kubernetes.io/name": "kuberay-operator"}, "kuberay-system"),
        "keda": Peer({"app": "keda-operator"}, "keda"),
        "client-pod": Peer({"imagine/grpc-client": "true"}),
        "client-ns": Peer({"app": "frontend"}, "search-frontend"),
        "stranger": Peer({"app": "something-else"}),
        "other-ns": Peer({"app.kubernetes.io/component": "worker"}, "default"),
    }
    everyone = {**comp, **ext}
    client_ns_labels = {"imagine/grpc-client": "true"}

    def ok(src: str, dst: str, port: int) -> bool:
        labels = client_ns_labels if src == "client-ns" else {}
        return allowed(policies, everyone[src], everyone[dst], port, labels)

    needed = [
        ("worker", "ingress", 50051),
        ("client-pod", "ingress", 50051),
        ("client-ns", "ingress", 50051),
        ("ingress", "qdrant", 6333),
        ("worker", "qdrant", 6333),
        ("qdrant", "qdrant", 6335),
        ("ingress", "redis", 6379),
        ("worker", "redis", 6379),
        ("keda", "redis", 6379),
        ("worker", "minio", 9000),
        ("ingress", "postgres", 5432),
        ("worker", "postgres", 5432),
        ("ingress", "minio", 9000),
        ("encoders", "minio", 9000),
        ("trainer", "minio", 9000),
        ("ray-head", "ingress", 10002),
        ("ingress", "ray-head", 6379),
        ("encoders", "ray-head", 6379),
        ("ingress", "encoders", 10002),
        ("kuberay", "ray-head", 8265),
        ("kuberay", "trainer", 8265),
    ]
    refused = [
        ("stranger", "ingress", 50051),
        ("other-ns", "ingress", 50051),
        ("worker", "ray-head", 6379),
        ("worker", "ray-head", 8265),
        ("stranger", "ray-head", 8265),
        ("stranger", "qdrant", 6333),
        ("trainer", "qdrant", 6333),
        ("encoders", "qdrant", 6333),
        ("worker", "qdrant", 6335),
        ("encoders", "redis", 6379),
        ("trainer", "redis", 6379),
        ("other-ns", "redis", 6379),
        ("stranger", "minio", 9000),
        ("stranger", "postgres", 5432),
        ("encoders", "postgres", 5432),
        ("trainer", "postgres", 5432),
        ("client-pod", "minio", 9000),
        ("worker", "minio", 9001),
        ("trainer", "ray-head", 6379),
        ("ray-head", "trainer", 6379),
        ("kuberay", "qdrant", 6333),
    ]
    wrong = [f"refused {c}" for c in needed if not ok(*c)]
    wrong += [f"allowed {c}" for c in refused if ok(*c)]
    assert not wrong, "\n".join(wrong)


# -- images -------------------------------------------------------------------------------------
def dockerfile(name: str) -> str:
    return (DEPLOY / "docker" / f"Dockerfile.{name}").read_text()


@pytest.mark.parametrize("name", ["services", "worker"])
def test_dockerfiles_pin_bases_install_with_constraints_and_drop_root(name: str) -> None:
    text = dockerfile(name)
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert bases
    for base in bases:
        assert re.search(r":[0-9][\w.-]*$", base), f"unpinned base image {base}"
    assert "-c constraints.txt" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    uid = int(users[-1].split(":")[0])
    for copied in re.findall(r"^COPY\s+(?!--from)(?:--\S+\s+)*(.+?)\s+\S+$", text, re.M):
        for src in copied.split():
            assert (ROOT / src).exists(), f"Dockerfile.{name} copies missing {src}"
    ignore = (DEPLOY / "docker" / f"Dockerfile.{name}.dockerignore").read_text()
    rules = [r for r in ignore.splitlines() if r.strip() and not r.startswith("#")]
    assert rules[0] == "**", "the build context must exclude everything not listed (.venv, .git)"
    # the manifests run these images as that user
    docs = render("dev") + render("dev/train")
    image = f"imagine-{name}:"
    for p in pods(docs):
        if any(c["image"].startswith(image) for c in p.containers()):
            assert p.spec["securityContext"]["runAsUser"] == uid, p.owner


def test_the_services_image_holds_what_the_manifests_run() -> None:
    text = dockerfile("services")
    python = re.search(r"PYTHON_VERSION=(3\.\d+)\.\d+", text)
    worker_python = re.search(r"FROM python:(3\.\d+)\.\d+", dockerfile("worker"))
    assert python and worker_python and python[1] == worker_python[1]
    assert f'requires-python = ">={python[1]},' in (ROOT / "pyproject.toml").read_text()
    for stack in STACKS:
        for spec in filter(None, models_env(stack).values()):
            path = spec.removeprefix("local-dir:")
            assert path.startswith(("/app/", "/models/")), spec
            if not path.startswith("/app/"):
                continue
            rel = path.removeprefix("/app/")
            assert (ROOT / rel / "config.json").is_file()
            assert f"COPY {rel} ./{rel}" in text
    assert "COPY deploy/scripts ./deploy/scripts" in text
    entry = one(render("dev/train"), "RayJob", "imagine-train")["spec"]["entrypoint"]
    assert "/app/deploy/scripts/s3sync.py copy" in entry
    assert "dataset-fashion-mnist" in text and "--dataset fashion-mnist" in entry


def test_the_training_job_runs_commands_that_parse_and_feed_model_sync() -> None:
    import shlex

    from trainer.main import build_parser

    job = one(render("dev/train"), "RayJob", "imagine-train")
    train_cmd, upload_cmd = (shlex.split(c) for c in job["spec"]["entrypoint"].split("&&"))
    assert train_cmd[:3] == ["python", "-m", "trainer"]
    train = build_parser().parse_args(train_cmd[3:])
    assert upload_cmd[:2] == ["python", "/app/deploy/scripts/s3sync.py"]
    upload = load_s3sync().build_parser().parse_args(upload_cmd[2:])
    assert (upload.command, Path(upload.src)) == ("copy", train.output)
    mounts = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert any(train.output.is_relative_to(m["mountPath"]) for m in mounts["volumeMounts"])
    # the Ray pods' model-sync fetches <store>/NAME for local-dir:/models/NAME
    store, _, name = upload.dst.rpartition("/")
    assert name == train.output.name
    for p in pods(render("dev")):
        for c in p.containers(init=True):
            fetch = load_s3sync().build_parser().parse_args(c["command"][2:])
            assert (fetch.command, fetch.source) == ("fetch-model", store)
            assert any(v["mountPath"] == str(fetch.models_dir) for v in c["volumeMounts"])


# -- the checkpoint sync script -----------------------------------------------------------------
def load_s3sync() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("s3sync", DEPLOY / "scripts" / "s3sync.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_s3sync_copies_a_checkpoint_and_fetches_models_only_into_the_models_dir(
    tmp_path: Path,
) -> None:
    s3sync = load_s3sync()
    storage = StorageSettings()
    store = tmp_path / "store"
    src = store / "fmnist-v2"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"\0" * 1000)
    (src / "sub" / "x.txt").write_text("x")
    assert s3sync.copy_tree(str(src), str(tmp_path / "copy"), storage) == 3
    assert (tmp_path / "copy" / "sub" / "x.txt").read_text() == "x"

    models = tmp_path / "models"
    spec = f"local-dir:{models}/fmnist-v2"
    message = s3sync.fetch_model(spec, models, str(store), storage)
    assert "fetched 3 files" in message
    assert (models / "fmnist-v2" / "model.safetensors").stat().st_size == 1000
    assert "already" in s3sync.fetch_model(spec, models, str(store), storage)
    baked = "local-dir:/app/checkpoints/fmnist-dual"
    assert "nothing to fetch" in s3sync.fetch_model(baked, models, str(store), storage)
    with pytest.raises(s3sync.ObjectNotFound):
        s3sync.fetch_model(f"local-dir:{models}/missing", models, str(store), storage)


@pytest.mark.parametrize("stack", STACKS)
def test_collections_are_laid_out_over_the_qdrant_peers(stack: str) -> None:
    """The services and workers create collections with one shard per Qdrant peer and at most
    as many copies as there are peers (QdrantSettings.shard_number / replication_factor)."""
    docs = render(stack)
    peers = one(docs, "StatefulSet", "qdrant")["spec"]["replicas"]

    def layout(container: dict[str, Any]) -> tuple[int, int]:
        data: dict[str, str] = {}
        for src in container.get("envFrom", []):
            if "configMapRef" in src:
                data.update(one(docs, "ConfigMap", src["configMapRef"]["name"]).get("data", {}))
        return int(data["IMAGINE_QDRANT__SHARD_NUMBER"]), int(
            data["IMAGINE_QDRANT__REPLICATION_FACTOR"]
        )

    worker = one(docs, "Deployment", "imagine-worker")["spec"]["template"]["spec"]
    seen = {layout(c) for c in worker["containers"]}
    seen |= {
        layout(c) for p in pods(docs) if p.owner.startswith("RayService/") for c in p.containers()
    }
    [(shards, copies)] = seen  # every process agrees
    assert shards == peers and 1 <= copies <= peers
    if peers > 1:
        assert copies >= 2, "a peer down must leave every shard served"
