"""Settings: one pydantic-settings class per process kind, environment prefix ``IMAGINE_``.

Nested fields use ``__``: ``IMAGINE_STORAGE__ENDPOINT=minio:9000``. Build settings with the
``load_*`` functions and pass them down; nothing here is created at import time.

The embedded default needs no server: the index, objects, queue, job records and checkpoints all
live under ``IMAGINE_DATA_DIR``. The cluster profile sets ``IMAGINE_QDRANT__URL``,
``IMAGINE_STORAGE__ENDPOINT``, ``IMAGINE_BROKER_URL`` and friends; the code path is the same.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = REPO_ROOT / "checkpoints"
DEFAULT_MODEL = "local-dir:" + str(CHECKPOINTS / "fmnist-dual")
DEFAULT_VISION = "local-dir:" + str(CHECKPOINTS / "fmnist-vision")
# guidance-distilled from checkpoints/fmnist-generator (`imagine train --stage distill`): one UNet
# pass of K rows a query instead of 2K, ~1.3x faster alone and ~1.6x in a burst of 16
DEFAULT_GENERATOR = "local-dir:" + str(CHECKPOINTS / "fmnist-generator-distilled")
DEFAULT_AGGREGATOR = "local-dir:" + str(CHECKPOINTS / "fmnist-aggregator")
DEFAULT_CAPTIONER = "local-dir:" + str(CHECKPOINTS / "fmnist-captioner")


class QdrantSettings(BaseModel):
    """Where the vector index lives. No URL: Qdrant embedded under ``data_dir/qdrant``."""

    url: str | None = None
    api_key: str | None = None
    timeout_s: float = 30.0
    # Layout of the collections we create on a Qdrant cluster (None: the server's default).
    shard_number: int | None = None
    replication_factor: int | None = None


class StorageSettings(BaseModel):
    """The S3/MinIO endpoint used for ``s3://bucket/prefix`` sources."""

    endpoint: str | None = None  # host:port, e.g. "minio:9000"
    access_key: str | None = None
    secret_key: str | None = None
    secure: bool = False
    region: str | None = None
    # Search hits of object-store galleries carry a presigned GET URL valid this long.
    presign_ttl_s: int = 3600


Role = Literal["reader", "writer", "admin"]
ROLES: tuple[Role, ...] = ("reader", "writer", "admin")  # each role can do what those before can


def hash_api_key(key: str) -> str:
    """The form an API key is kept in at rest (keys are random tokens: one SHA-256 suffices)."""
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKey(BaseModel):
    """One API key, at rest: its SHA-256 (``imagine keys new`` prints one), a name for logs."""

    name: str
    role: Role
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class AuthSettings(BaseModel):
    """API keys. ``enabled`` unset: on, except in the embedded profile (no Qdrant URL) where it
    is off and the ingress then binds to 127.0.0.1 only."""

    enabled: bool | None = None
    # JSON: [{"name": "ci", "role": "writer", "sha256": "<hex>"}, ...]
    keys: list[ApiKey] = []


class TlsSettings(BaseModel):
    """TLS on the gRPC ingress: a PEM certificate (chain) and its private key."""

    cert_file: Path | None = None
    key_file: Path | None = None


class LimitSettings(BaseModel):
    """Per-request limits of the gRPC API; a request over one gets INVALID_ARGUMENT (or
    RESOURCE_EXHAUSTED) naming it."""

    max_query_chars: int = 1000
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_top_k: int = 10_000
    max_generated: int = 16  # K generated images per query
    max_steps: int = 100
    max_request_s: float = 300.0  # a server-side deadline on every unary call
    # generating calls in flight per client (key, or peer host without keys): one client may
    # fill one denoising batch (IMAGINE_GENERATOR_BATCH_SIZE), no more
    max_concurrent_generations: int = 16


class _Common(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="IMAGINE_", env_nested_delimiter="__", extra="ignore"
    )

    data_dir: Path = Field(
        default=Path.home() / ".imagine",
        description="Where the embedded profile keeps index, objects, queue, jobs, checkpoints.",
    )
    grpc_address: str = Field(
        default="127.0.0.1:50051", description="The gRPC ingress address (host:port)."
    )
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one object per line with request_id / job_id"
    )

    def ensure_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)


class ClientSettings(_Common):
    """The CLI and Python client."""

    api_key: str | None = Field(default=None, description="sent as x-api-key metadata")
    ca_file: Path | None = Field(default=None, description="PEM CA: connect with TLS")


class ServiceSettings(_Common):
    """The Ray Serve application (model deployments and the gRPC ingress)."""

    model: str = Field(
        default=DEFAULT_MODEL,
        description="Dual encoder spec (local-dir:/path, open_clip:ARCH@/weights)",
    )
    # The generative paths; an empty spec switches a model off (text-only search).
    vision_model: str = Field(default=DEFAULT_VISION, description="Vision-only encoder spec")
    generator_model: str = Field(default=DEFAULT_GENERATOR, description="Diffusion generator")
    aggregator_model: str = Field(default=DEFAULT_AGGREGATOR, description="Aggregator + fusion")
    caption_model: str = Field(default=DEFAULT_CAPTIONER, description="Caption decoder spec")
    # The caption path's default weight: for text -> image search (0: only when a request
    # weights it) and for image queries (image -> text over text galleries, image -> image).
    caption_weight: float = Field(default=0.0, ge=0.0, le=1.0)
    image_query_caption_weight: float = Field(default=0.5, ge=0.0, le=1.0)
    caption_batch_size: int = 64
    caption_batch_wait_s: float = 0.01
    default_num_generated: int = 4
    default_steps: int = 20
    default_guidance: float = 2.0  # measured: generated-only mAP 0.84 at 2.0, 0.57 at 3.0
    generator_batch_size: int = 16  # queries denoised at once, sharing every UNet pass
    # Requests arriving within this wait enter the denoising loop together; later ones join it
    # at its next pass (continuous batching), so a longer wait only adds latency.
    generator_batch_wait_s: float = 0.005
    # The UNet's number format: auto (bfloat16 on hardware with native bf16, e.g. AVX512-BF16
    # CPUs, else float32), float32 or bfloat16. Part of the generated-query cache key.
    generator_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    # On a CPU, a UNet pass of at least this many rows (K per query, twice with guidance) runs
    # as row chunks on the generator's torch threads, one intra-op thread each, instead of on
    # one thread and its OpenMP team: 1.2-1.45x the throughput of 16 concurrent queries here.
    # A smaller pass runs on generator_small_pass_threads. 0: never split, every pass on the
    # team (and the next setting does not apply).
    generator_split_rows: int = Field(default=16, ge=0)
    # Intra-op threads for a pass too small to split (one query's). 1: a team stalls whenever
    # another process preempts one of its threads. 0: all the generator's torch threads (a
    # team, for a generator with cores of its own).
    generator_small_pass_threads: int = Field(default=1, ge=0)
    query_cache_size: int = 1024  # generated-query vectors kept (LRU)
    qdrant: QdrantSettings = QdrantSettings()
    storage: StorageSettings = StorageSettings()
    broker_url: str | None = Field(default=None, description="None: filesystem:// under data_dir")
    jobs_url: str | None = Field(
        default=None,
        description="postgresql://... (shared by every node); None: SQLite under data_dir",
    )
    default_chunk_size: int = 256
    task_queue: str = Field(default="imagine-ingest", description="Broker queue of ingest tasks")
    # A chunk claimed this long ago and not counted is queued again (its worker died); after
    # job_max_attempts such losses its job fails. Also how long the whole system may make no
    # progress before messages the broker lost are queued again. See imagine/jobs.py.
    job_lease_s: float = 300.0
    job_max_attempts: int = 5
    # Poison-object limits: larger objects and images become per-object failures.
    max_object_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    encoder_batch_size: int = 64
    encoder_batch_wait_s: float = 0.005
    encoder_replicas: int = 1
    # Ray resources per replica (fractions share a core). Torch threads per replica of the
    # encoders and the caption decoder: one each, so replicas working at once (ingestion sends
    # every chunk to three of them) do not oversubscribe the cores; 0: all cores. The generator
    # usually works alone (a query at a time or one batch): all cores by default.
    encoder_num_cpus: float = 0.25
    ingress_num_cpus: float = 0.25
    torch_threads: int = 1
    generator_torch_threads: int = 0
    ray_address: str | None = Field(default=None, description="None: start a local Ray")
    num_cpus: int | None = None
    auth: AuthSettings = AuthSettings()
    tls: TlsSettings = TlsSettings()
    limits: LimitSettings = LimitSettings()
    # host:port of the ingress's Prometheus endpoint (GET /metrics); empty: none
    metrics_address: str = ""

    @property
    def embedded(self) -> bool:
        return not self.qdrant.url

    @property
    def auth_enabled(self) -> bool:
        return self.auth.enabled if self.auth.enabled is not None else not self.embedded

    def generative_specs(self) -> dict[str, str]:
        """The generative models to serve. An empty spec switches one off; a default checkpoint
        that is not there (not trained yet) is skipped, while an explicit spec must load."""
        defaults = {
            "vision": DEFAULT_VISION,
            "generator": DEFAULT_GENERATOR,
            "aggregator": DEFAULT_AGGREGATOR,
            "caption": DEFAULT_CAPTIONER,
        }
        specs = {
            "vision": self.vision_model,
            "generator": self.generator_model,
            "aggregator": self.aggregator_model,
            "caption": self.caption_model,
        }
        out = {}
        for name, spec in specs.items():
            if not spec:
                continue
            if spec == defaults[name] and not Path(spec.removeprefix("local-dir:")).is_dir():
                continue
            out[name] = spec
        return out

    @property
    def qdrant_path(self) -> Path:
        return self.data_dir / "qdrant"

    @property
    def jobs_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    def broker_folders(self) -> Path:
        return self.data_dir / "broker"


class WorkerSettings(ServiceSettings):
    """A Celery ingestion worker: reaches the models (and the embedded index) over gRPC."""

    concurrency: int = 4
    encode_rpc_batch: int = 64
    # Transient errors (store, index or models unreachable) are retried with exponential
    # backoff (1 s, 2 s, ... capped, with jitter); then the job fails with the reason.
    task_max_retries: int = 8
    task_retry_backoff_max_s: int = 60
    # How the worker calls the ingress (a key with the admin role for the embedded index).
    api_key: str | None = None
    ca_file: Path | None = None
    # host:port of the worker's Prometheus endpoint (task outcomes); empty: none
    worker_metrics_address: str = ""


class TrainSettings(_Common):
    """The Ray Train job."""

    use_gpu: bool = False
    num_workers: int = 1


def load_service_settings(**overrides: object) -> ServiceSettings:
    return ServiceSettings(**overrides)  # type: ignore[arg-type]


def load_worker_settings(**overrides: object) -> WorkerSettings:
    return WorkerSettings(**overrides)  # type: ignore[arg-type]


def load_client_settings(**overrides: object) -> ClientSettings:
    return ClientSettings(**overrides)  # type: ignore[arg-type]


def load_train_settings(**overrides: object) -> TrainSettings:
    return TrainSettings(**overrides)  # type: ignore[arg-type]
