"""Shared fixtures: galleries on disk and the real embedded stack (`imagine serve`) on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = "config:tiny-dual"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_gallery(root: Path, n: int, poison: bool = False) -> Path:
    """n Fashion-MNIST test images + manifest.jsonl labels; optionally one of each bad kind."""
    from imagine.data import export_gallery

    export_gallery(root, "test", n)
    if poison:
        good = (root / "00000.png").read_bytes()
        (root / "bad-truncated.png").write_bytes(good[: len(good) // 2])
        (root / "bad-empty.png").write_bytes(b"")
        (root / "bad-text.txt").write_text("not an image")
        (root / "bad-random.jpg").write_bytes(os.urandom(2048))
    return root


@dataclass
class Stack:
    """A running `imagine serve` (Ray Serve app, gRPC ingress, Celery worker)."""

    address: str
    data_dir: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self):  # type: ignore[no-untyped-def]
        from imagine.client import ImagineClient

        return ImagineClient(self.address, timeout_s=120)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "imagine.cli", "--address", self.address, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return int(self.proc.returncode)


def start_stack(data_dir: Path, extra_env: dict[str, str] | None = None) -> Stack:
    from imagine.client import ImagineClient

    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "IMAGINE_DATA_DIR": str(data_dir),
        "IMAGINE_GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
        "IMAGINE_MODEL": TINY_MODEL,
        # text-only unless a test asks for the generative path (tiny models)
        "IMAGINE_VISION_MODEL": "",
        "IMAGINE_GENERATOR_MODEL": "",
        "IMAGINE_AGGREGATOR_MODEL": "",
        **(extra_env or {}),
    }
    address = env["IMAGINE_GRPC_ADDRESS"]
    log = data_dir / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagine.cli", "serve"],
        env=env,
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    stack = Stack(address, data_dir, env, proc, log)
    deadline = time.monotonic() + 300
    with ImagineClient(address, timeout_s=5) as c:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"imagine serve exited early:\n{log.read_text()[-4000:]}")
            try:
                c.list_collections()
                break
            except Exception:
                if time.monotonic() > deadline:
                    stack.stop()
                    raise TimeoutError(f"stack did not start:\n{log.read_text()[-4000:]}") from None
                time.sleep(1)
    return stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The embedded stack with the filesystem:// broker, shared by the integration tests."""
    s = start_stack(tmp_path_factory.mktemp("stack"))
    yield s
    code = s.stop()
    assert code == 0, f"imagine serve exited with {code}:\n{s.log.read_text()[-4000:]}"
