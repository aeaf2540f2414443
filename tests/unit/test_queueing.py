"""The embedded broker: messages are whole the moment a consumer can see them."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from celery import Celery

from imagine.config import ServiceSettings
from imagine.queueing import FS_SCHEME, broker_config


def _app(tmp_path: Path) -> Celery:
    app = Celery("t")
    app.conf.update(broker_config(ServiceSettings(data_dir=tmp_path)))
    return app


def test_embedded_broker_uses_the_atomic_filesystem_transport(tmp_path: Path) -> None:
    conf = broker_config(ServiceSettings(data_dir=tmp_path))
    assert conf["broker_url"] == f"{FS_SCHEME}://"
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert Path(conf["broker_transport_options"]["data_folder_in"]).is_dir()


def test_a_polling_consumer_never_sees_a_half_written_message(tmp_path: Path) -> None:
    """kombu's own filesystem transport writes in place; a consumer that lists the folder at the
    wrong moment reads an empty file. Every message file we expose must parse."""
    app = _app(tmp_path)
    queue = Path(broker_config(ServiceSettings(data_dir=tmp_path))["broker_transport_options"]
                 ["data_folder_in"])  # fmt: skip
    seen: list[bytes] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for name in os.listdir(queue):
                if name.endswith(".msg"):
                    with contextlib.suppress(FileNotFoundError):
                        seen.append((queue / name).read_bytes())

    t = threading.Thread(target=watch)
    t.start()
    try:
        for i in range(200):
            app.send_task("imagine.test", args=["x" * 20_000, i])
    finally:
        stop.set()
        t.join()
    assert seen and all(blob.startswith(b"{") and blob.endswith(b"}") for blob in seen)
    with app.connection_for_read() as conn, conn.SimpleQueue(ServiceSettings().task_queue) as q:
        got = sorted(q.get(timeout=5).payload[0][1] for _ in range(200))
    assert got == list(range(200))
