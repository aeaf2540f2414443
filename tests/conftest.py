"""Shared fixtures: galleries on disk and the real embedded stack (`imagine serve`) on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = "config:tiny-dual"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def processes_with(marker: str) -> list[int]:
    """Pids of live processes whose environment mentions ``marker`` (ours and Ray's)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def assert_no_process_left(marker: str, timeout: float = 30) -> None:
    """Every process with ``marker`` in its environment (ours and Ray's) is gone in time."""
    deadline = time.monotonic() + timeout
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(1)
    assert processes_with(marker) == []


def wait_for_line(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Return once ``text`` is in ``log``; fail with the log's tail if ``proc`` exits first or
    ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def png_header_only(width: int, height: int, payload: bytes = b"") -> bytes:
    """A PNG that declares width x height 8-bit grey pixels; its data decompresses to
    ``payload`` (zeros compress ~1000:1, so a few KB can claim gigabytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(payload, 9))
        + chunk(b"IEND", b"")
    )


# Every kind of poison object make_gallery(poison=True) writes, and a word of its reason.
POISON_REASONS = {
    "bad-truncated.png": "truncated",
    "bad-empty.png": "empty",
    "bad-text.txt": "not an image",
    "bad-random.jpg": "not an image",
    "bad-bomb.png": "decompression bomb",
    "bad-huge.png": "exceeds the limit",
}


def make_gallery(root: Path, n: int, poison: bool = False) -> Path:
    """n Fashion-MNIST test images + manifest.jsonl labels; optionally one of each bad kind
    (``POISON_REASONS``)."""
    from imagine.data import export_gallery

    export_gallery(root, "test", n)
    if poison:
        good = (root / "00000.png").read_bytes()
        (root / "bad-truncated.png").write_bytes(good[: len(good) // 2])
        (root / "bad-empty.png").write_bytes(b"")
        (root / "bad-text.txt").write_text("not an image")
        (root / "bad-random.jpg").write_bytes(os.urandom(2048))
        # 1.6 gigapixels from 5 KB: refused from its header, before any byte is inflated
        (root / "bad-bomb.png").write_bytes(png_header_only(40_000, 40_000, bytes(4_000_000)))
        # 64 megapixels: under Pillow's bomb threshold, over our configured limit (50 M)
        (root / "bad-huge.png").write_bytes(png_header_only(8_000, 8_000, bytes(1_000_000)))
    return root


class RedisServer:
    """A redis-server of our own on a free loopback port (`make test` installs redis-server),
    without persistence: a restart loses whatever it held, like a crashed broker."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise
                time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


POSTGRES_URL = os.environ.get(
    "IMAGINE_TEST_POSTGRES_URL", "postgresql://postgres:postgres@127.0.0.1:5432/postgres"
)


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the PostgreSQL server on loopback (`make test-deps` starts one),
    dropped afterwards; yields its URL."""
    import uuid

    import psycopg

    name = f"imagine_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield POSTGRES_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@dataclass
class Stack:
    """A running `imagine serve` (Ray Serve app, gRPC ingress, Celery worker)."""

    address: str
    data_dir: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path
    client_kwargs: dict[str, Any] = field(default_factory=dict)  # api_key, ca_file, ...

    def client(self, **overrides: Any):  # type: ignore[no-untyped-def]
        from imagine.client import ImagineClient

        return ImagineClient(self.address, **{"timeout_s": 120, **self.client_kwargs, **overrides})

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


def start_stack(
    data_dir: Path,
    extra_env: dict[str, str] | None = None,
    serve_args: tuple[str, ...] = (),
    client_kwargs: dict[str, Any] | None = None,
) -> Stack:
    """`imagine serve` on ``data_dir``, returned once its ingress answers."""
    from imagine.client import ImagineClient

    stack = launch_stack(data_dir, extra_env, serve_args, client_kwargs)
    proc, log = stack.proc, stack.log
    deadline = time.monotonic() + 300
    with ImagineClient(stack.address, timeout_s=5, retries=0, **stack.client_kwargs) as c:
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


def launch_stack(
    data_dir: Path,
    extra_env: dict[str, str] | None = None,
    serve_args: tuple[str, ...] = (),
    client_kwargs: dict[str, Any] | None = None,
) -> Stack:
    """`imagine serve` on ``data_dir`` (tiny text-only models unless ``extra_env`` says
    otherwise), its output in ``data_dir/serve.log``; returned at once, still starting."""
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
        "IMAGINE_CAPTION_MODEL": "",
        **(extra_env or {}),
    }
    address = env["IMAGINE_GRPC_ADDRESS"]
    log = data_dir / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagine.cli", "serve", *serve_args],
        env=env,
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Stack(address, data_dir, env, proc, log, dict(client_kwargs or {}))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The embedded stack with the filesystem:// broker, shared by a module's tests. Stopped
    after the module: an idle Ray cluster kept to the session's end took CPU from every later
    test (the grpc_api module alone uses it)."""
    s = start_stack(tmp_path_factory.mktemp("stack"))
    yield s
    code = s.stop()
    assert code == 0, f"imagine serve exited with {code}:\n{s.log.read_text()[-4000:]}"
