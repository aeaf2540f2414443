"""Security settings and log hygiene without servers: who must authenticate, where an
unauthenticated ingress listens, how keys are kept, and what a log line may hold."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from pydantic import ValidationError

from imagine.config import ApiKey, ServiceSettings, hash_api_key
from imagine.observability import JsonFormatter, TextFormatter, redact


def test_authentication_is_off_by_default_only_in_the_embedded_profile() -> None:
    assert not ServiceSettings().auth_enabled
    assert ServiceSettings(qdrant={"url": "http://qdrant:6333"}).auth_enabled
    assert ServiceSettings(auth={"enabled": True}).auth_enabled


def test_keys_are_kept_as_hashes_with_a_known_role(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = {"name": "ci", "role": "writer", "sha256": hash_api_key("s3cret")}
    monkeypatch.setenv("IMAGINE_AUTH__KEYS", json.dumps([entry]))
    (key,) = ServiceSettings().auth.keys
    assert key.role == "writer" and key.sha256 != "s3cret" and len(key.sha256) == 64
    with pytest.raises(ValidationError):
        ApiKey(name="x", role="root", sha256=hash_api_key("k"))
    with pytest.raises(ValidationError):
        ApiKey(name="x", role="reader", sha256="s3cret")  # a raw key is no hash


def test_without_authentication_the_ingress_binds_loopback_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from services.ingress import listen_address

    s = ServiceSettings(grpc_address="0.0.0.0:50051")
    with caplog.at_level(logging.WARNING):
        assert listen_address(s, auth_on=False) == "127.0.0.1:50051"
    assert "authentication is off" in caplog.text
    assert listen_address(s, auth_on=True) == "0.0.0.0:50051"
    assert listen_address(ServiceSettings(), auth_on=False) == "127.0.0.1:50051"


def test_log_lines_hold_no_stack_trace_and_no_credentials() -> None:
    try:
        raise ConnectionError("redis://:hunter2@redis:6379/0 refused; api_key=abc123")
    except ConnectionError:
        record = logging.LogRecord(
            "imagine.x", logging.ERROR, __file__, 1, "failed: %s", ("password=pw1",), sys.exc_info()
        )
    line = JsonFormatter().format(record)
    data = json.loads(line)
    assert data["error"].startswith("ConnectionError: redis://:***@redis")
    text = TextFormatter().format(record)
    for out in (line, text):
        assert "Traceback" not in out and "hunter2" not in out
        assert "abc123" not in out and "pw1" not in out
    assert redact("https://user:pw@host/x") == "https://user:***@host/x"
