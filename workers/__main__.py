"""``python -m workers [celery worker options]``: a Celery ingestion worker."""

from __future__ import annotations

import sys

from imagine.config import load_worker_settings
from imagine.runtime import quiet_environment, setup_logging
from workers.celery_app import create_app


def main(argv: list[str] | None = None) -> int:
    quiet_environment()
    settings = load_worker_settings()
    settings.ensure_dirs()
    setup_logging(settings.log_level, settings.log_format)
    if settings.worker_metrics_address:
        from imagine.observability import serve_metrics

        serve_metrics(settings.worker_metrics_address)
    app = create_app(settings)
    args = [
        "worker",
        f"--loglevel={settings.log_level}",
        "--pool=threads",
        f"--concurrency={settings.concurrency}",
        "--without-gossip",
        "--without-mingle",
        *(argv if argv is not None else sys.argv[1:]),
    ]
    app.worker_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
