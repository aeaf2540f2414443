"""Broker configuration shared by the job submitter (ingress) and the workers (no Celery here)."""

from __future__ import annotations

from typing import Any

from imagine.config import ServiceSettings


def broker_config(settings: ServiceSettings) -> dict[str, Any]:
    """Celery settings for the configured broker: ``filesystem://`` under data_dir by default."""
    url = settings.effective_broker_url
    conf: dict[str, Any] = {
        "broker_url": url,
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
    }
    if url.startswith("filesystem://"):
        queue = settings.broker_folders() / "queue"
        processed = settings.broker_folders() / "processed"
        queue.mkdir(parents=True, exist_ok=True)
        processed.mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(queue),
            "data_folder_out": str(queue),
            "processed_folder": str(processed),
            "store_processed": False,
            "polling_interval": 0.1,
        }
    elif url.startswith("redis://"):
        conf["broker_transport_options"] = {"visibility_timeout": 3600}
    return conf
