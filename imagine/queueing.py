"""Broker configuration shared by the job submitter (ingress) and the workers.

No Celery import here. The embedded profile's broker is kombu's ``filesystem://`` transport with
one fix: kombu writes a message file in place, and a consumer polling the folder can pick it up
before its bytes are written (a JSONDecodeError that kills the worker). Our transport
(``imagine-fs://``) writes each message to a hidden temporary name and renames it into the queue,
which is atomic on POSIX. It is registered with kombu (imported lazily) by :func:`broker_config`.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from imagine.config import ServiceSettings

FS_SCHEME = "imagine-fs"


def register_fs_transport() -> None:
    from kombu import transport

    transport.TRANSPORT_ALIASES[FS_SCHEME] = "imagine.queueing:AtomicFilesystemTransport"


def __getattr__(name: str) -> Any:
    """``AtomicFilesystemTransport`` is built on first use, so importing us needs no kombu."""
    if name == "AtomicFilesystemTransport":
        global _TRANSPORT
        if _TRANSPORT is None:
            _TRANSPORT = _atomic_fs_transport()
        return _TRANSPORT
    raise AttributeError(name)


_TRANSPORT: Any = None


def _atomic_fs_transport() -> Any:
    from kombu.transport import filesystem
    from kombu.utils.json import dumps

    class AtomicChannel(filesystem.Channel):  # type: ignore[misc]
        def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
            name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
            folder = str(self.data_folder_out)
            tmp = os.path.join(folder, f".tmp-{uuid.uuid4()}")
            with open(tmp, "wb") as f:
                f.write(dumps(payload).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(folder, name))

    class Transport(filesystem.Transport):  # type: ignore[misc]
        Channel = AtomicChannel
        driver_name = FS_SCHEME

    return Transport


def broker_config(settings: ServiceSettings) -> dict[str, Any]:
    """Celery settings for the configured broker: ``filesystem://`` under data_dir by default."""
    url = settings.effective_broker_url
    if url.startswith("filesystem://"):
        register_fs_transport()
        url = FS_SCHEME + "://"
    conf: dict[str, Any] = {
        "broker_url": url,
        "task_default_queue": settings.task_queue,
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
    if url.startswith(FS_SCHEME):
        queue = settings.broker_folders() / "queue"
        processed = settings.broker_folders() / "processed"
        control = settings.broker_folders() / "control"
        for folder in (queue, processed, control):
            folder.mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(queue),
            "data_folder_out": str(queue),
            "processed_folder": str(processed),
            "store_processed": False,
            "control_folder": str(control),
            "polling_interval": 0.1,
        }
    elif url.startswith("redis://"):
        # Redelivery of a dead worker's chunk is ours (the job outbox, within job_lease_s);
        # Redis's own comes after the visibility timeout, kept above any chunk's run time.
        conf["broker_transport_options"] = {"visibility_timeout": 3600}
    return conf
