"""Process-level runtime settings shared by the entry points (no Ray import here)."""

from __future__ import annotations

import os

# Ray picks the machine's interface address for a new local cluster on Linux; with this set to 0
# it uses the loopback address, so nothing Ray opens for the embedded profile is reachable from
# the network. (Ray reads it as "clusters enabled"; a local cluster needs none.)
_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Quiet third-party chatter that is not ours to show to users.
_QUIET_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "RAY_DEDUP_LOGS": "1",
    "RAY_TRAIN_V2_ENABLED": "1",
}


def use_loopback_ray() -> None:
    """Call before starting a local Ray (the embedded profile)."""
    for key, value in _LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)


def quiet_environment() -> None:
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    """JSON lines (or text) with request and job ids, never a stack trace."""
    from imagine.observability import configure_logging

    configure_logging(level, fmt)
