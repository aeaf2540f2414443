"""Prometheus metrics and structured logs, shared by the ingress, the deployments and workers.

Metrics live in this module's registry and are served by :func:`serve_metrics` (GET /metrics).
Log lines are JSON objects carrying the ``request_id`` of the call being served (it follows a
query from the ingress through the deployments) or the ``job_id`` of the ingestion job a task
works on. No log line carries a stack trace: an exception becomes its type and message, with
credentials in URLs masked.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

RPC_REQUESTS = Counter(
    "imagine_rpc_requests", "gRPC calls served, by method and status code", ["method", "code"],
    registry=REGISTRY,
)  # fmt: skip
RPC_LATENCY = Histogram(
    "imagine_rpc_latency_seconds", "gRPC call latency, by method and status code",
    ["method", "code"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
STAGE_SECONDS = Histogram(
    "imagine_stage_seconds",
    "Query stage timings (encode_text, encode_image, generate, encode_generated, aggregate, "
    "search)", ["stage"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
QUERY_CACHE = Counter(
    "imagine_query_cache", "Generated-query cache lookups", ["result"], registry=REGISTRY
)
BATCH_SIZE = Gauge(
    "imagine_batch_size_mean", "Mean batch size of a deployment's @serve.batch method since start",
    ["deployment"], registry=REGISTRY,
)  # fmt: skip
BATCHES = Gauge(
    "imagine_batches", "Batches a deployment has run since start", ["deployment"],
    registry=REGISTRY,
)  # fmt: skip
GENERATOR_PASSES = Gauge(
    "imagine_generator_passes", "UNet passes of the generator's denoising loop since start",
    registry=REGISTRY,
)  # fmt: skip
GENERATOR_QUERIES_PER_PASS = Gauge(
    "imagine_generator_queries_per_pass",
    "Mean queries sharing a UNet pass of the denoising loop since start", registry=REGISTRY,
)  # fmt: skip
BATCH_ITEMS = Gauge(
    "imagine_batch_items", "Items a deployment has processed in batches since start",
    ["deployment"], registry=REGISTRY,
)  # fmt: skip
JOBS = Gauge("imagine_jobs", "Ingestion jobs by state", ["state"], registry=REGISTRY)
JOB_OBJECTS = Gauge(
    "imagine_job_objects",
    "Objects of the listed jobs by outcome (embedded, skipped, failed, total, removed)",
    ["outcome"], registry=REGISTRY,
)  # fmt: skip
JOB_PROGRESS = Gauge(
    "imagine_job_progress_ratio", "Done / total of each running or queued job", ["job_id"],
    registry=REGISTRY,
)  # fmt: skip
WORKER_TASKS = Counter(
    "imagine_worker_tasks", "Celery task outcomes (succeeded, retried, failed)",
    ["task", "outcome"], registry=REGISTRY,
)  # fmt: skip


def serve_metrics(address: str) -> int:
    """Serve this process's metrics on ``host:port`` (port 0: any); returns the port."""
    host, _, port = address.rpartition(":")
    server, _thread = start_http_server(
        int(port), addr=host.strip("[]") or "0.0.0.0", registry=REGISTRY
    )
    return int(server.server_port)


# -- logs -------------------------------------------------------------------------------------
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
job_id: contextvars.ContextVar[str] = contextvars.ContextVar("job_id", default="")
# Where a request id comes from in a process that does not set ``request_id`` itself (a Serve
# replica reads the request context Ray Serve propagates through deployment handles).
_fallback_request_id: Callable[[], str] | None = None

_URL_CREDENTIALS = re.compile(r"(\w+://)([^/@\s:]*):([^/@\s]*)@")
_SECRET_WORDS = re.compile(
    r"(?i)((?:api[_-]?key|secret[_-]?key|password|token|authorization)\W{0,3}[=:]\s*)[^\s,;'\"]+"
)


def redact(text: str) -> str:
    """Mask credentials: ``scheme://user:password@`` and ``secret=...`` style pairs."""
    text = _URL_CREDENTIALS.sub(r"\1\2:***@", text)
    return _SECRET_WORDS.sub(r"\1***", text)


def set_request_id_source(fn: Callable[[], str] | None) -> None:
    global _fallback_request_id
    _fallback_request_id = fn


def current_request_id() -> str:
    rid = request_id.get()
    if not rid and _fallback_request_id is not None:
        try:
            rid = _fallback_request_id()
        except Exception:  # a missing context is no reason to lose the line
            rid = ""
    return rid


def _exception_summary(record: logging.LogRecord) -> str:
    if not record.exc_info or record.exc_info[1] is None:
        return ""
    exc = record.exc_info[1]
    return redact(f"{type(exc).__name__}: {exc}")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, job_id, error."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        rid, jid = current_request_id(), job_id.get()
        if rid:
            out["request_id"] = rid
        if jid:
            out["job_id"] = jid
        error = _exception_summary(record)
        if error:
            out["error"] = error
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines with the same fields and the same rules (no stack traces)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            line = redact(super().format(record))
        finally:
            exc_info = saved[0]
            record.exc_info, record.exc_text, record.stack_info = saved
        ids = [
            f"{k}={v}"
            for k, v in (("request_id", current_request_id()), ("job_id", job_id.get()))
            if v
        ]
        if ids:
            line += " [" + " ".join(ids) + "]"
        if exc_info and exc_info[1] is not None:
            line += " error=" + redact(f"{type(exc_info[1]).__name__}: {exc_info[1]}")
        return line


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Route every logger through one handler with our formatter (replacing the root's)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
