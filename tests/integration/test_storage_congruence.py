"""Both ObjectStore adapters behave the same: a local folder, and MinioStore against moto's S3
server running on loopback in a subprocess."""

from __future__ import annotations

import functools
import io
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from minio import Minio

from imagine.config import StorageSettings
from imagine.storage import (
    LocalFolderStore,
    MinioStore,
    ObjectNotFound,
    ObjectStore,
    ObjectTooLarge,
    StoreUnavailable,
    minio_client,
    open_store,
)

pytestmark = pytest.mark.integration

BUCKET = "congruence"
StoreFactory = Callable[[str], ObjectStore]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageSettings]:
    """moto's S3 server on a free loopback port, with the test bucket created."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto server exited: {log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"moto server did not answer: {log_path.read_text()}")
                time.sleep(0.1)
        settings = StorageSettings(
            endpoint=f"127.0.0.1:{port}", access_key="testing", secret_key="testing", secure=False
        )
        minio_client(settings).make_bucket(BUCKET)
        yield settings
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def client(s3_settings: StorageSettings) -> Minio:
    return minio_client(s3_settings)


def _local_factory(base: Path) -> StoreFactory:
    def make(name: str) -> ObjectStore:
        (base / name).mkdir(parents=True, exist_ok=True)
        return open_store(str(base / name), StorageSettings())

    return make


def _s3_factory(settings: StorageSettings) -> StoreFactory:
    run = uuid.uuid4().hex[:12]  # a fresh prefix per test
    return lambda name: open_store(f"s3://{BUCKET}/{run}/{name}", settings)


@pytest.fixture(params=["local", "s3"])
def make_store(
    request: pytest.FixtureRequest, tmp_path: Path, s3_settings: StorageSettings
) -> StoreFactory:
    if request.param == "local":
        return _local_factory(tmp_path)
    return _s3_factory(s3_settings)


@pytest.fixture
def store(make_store: StoreFactory) -> ObjectStore:
    return make_store("root")


# --- the same scenarios on both adapters -------------------------------------------------------


def test_open_store_gives_the_right_adapter(make_store: StoreFactory) -> None:
    store = make_store("root")
    assert isinstance(store, LocalFolderStore | MinioStore)
    assert store.root_uri.startswith(("file:///", f"s3://{BUCKET}/"))
    assert store.root_uri.endswith("/root")


def test_put_stat_list_read(store: ObjectStore) -> None:
    data = {"b.png": b"\x89PNG-bytes", "a/notes.txt": b"hello", "a/deep/x.json": b"{}"}
    put = {key: store.put(key, value) for key, value in data.items()}

    listed = list(store.list())

    assert [info.key for info in listed] == ["a/deep/x.json", "a/notes.txt", "b.png"]
    for info in listed:
        stat = store.stat(info.key)
        assert info.uri == stat.uri == put[info.key].uri == f"{store.root_uri}/{info.key}"
        assert info.size == stat.size == put[info.key].size == len(data[info.key])
        assert info.etag == stat.etag == put[info.key].etag != ""
        assert store.read(info.key) == data[info.key]
    assert [(i.content_type, store.stat(i.key).content_type) for i in listed] == [
        ("application/json", "application/json"),
        ("text/plain", "text/plain"),
        ("image/png", "image/png"),
    ]


def test_listing_order_skips_hidden_and_is_recursive(store: ObjectStore) -> None:
    for key in ["b.png", "a/z.txt", "a/b/c.jpg", "a-c.txt", "A.txt", ".hidden", "d/.cache/x"]:
        store.put(key, key.encode())

    assert [info.key for info in store.list()] == [
        "A.txt",
        "a-c.txt",
        "a/b/c.jpg",
        "a/z.txt",
        "b.png",
    ]


def test_listing_is_confined_to_the_root(make_store: StoreFactory) -> None:
    root, sibling = make_store("root"), make_store("root2")
    root.put("in.txt", b"1")
    sibling.put("out.txt", b"2")

    assert [info.key for info in root.list()] == ["in.txt"]
    assert [info.key for info in sibling.list()] == ["out.txt"]
    with pytest.raises(ObjectNotFound):
        root.read("out.txt")


def test_empty_root_lists_nothing(store: ObjectStore) -> None:
    assert list(store.list()) == []


def test_overwrite_changes_content_and_etag(store: ObjectStore) -> None:
    first = store.put("k.bin", b"aaaa")
    second = store.put("k.bin", b"bbbb")

    assert second.etag != first.etag
    assert store.stat("k.bin").etag == second.etag
    assert store.read("k.bin") == b"bbbb"
    assert [info.key for info in store.list()] == ["k.bin"]


def test_read_max_bytes(store: ObjectStore) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 7)  # several stream chunks
    store.put("big.bin", payload)
    store.put("empty.bin", b"")

    assert store.read("big.bin", max_bytes=len(payload)) == payload
    with pytest.raises(ObjectTooLarge):
        store.read("big.bin", max_bytes=len(payload) - 1)
    with pytest.raises(ObjectTooLarge):
        store.read("big.bin", max_bytes=0)
    assert store.read("empty.bin", max_bytes=0) == b""
    assert store.stat("empty.bin").size == 0


def test_missing_objects(store: ObjectStore) -> None:
    store.put("there.txt", b"x")

    with pytest.raises(ObjectNotFound):
        store.stat("missing.txt")
    with pytest.raises(ObjectNotFound):
        store.read("missing.txt")
    with pytest.raises(ObjectNotFound):
        store.read("there.txt/child")
    store.delete("missing.txt")  # idempotent, as in S3
    assert [info.key for info in store.list()] == ["there.txt"]


def test_delete(store: ObjectStore) -> None:
    store.put("a/b/c.txt", b"1")
    store.put("a/d.txt", b"2")

    store.delete("a/b/c.txt")

    assert [info.key for info in store.list()] == ["a/d.txt"]
    with pytest.raises(ObjectNotFound):
        store.stat("a/b/c.txt")
    store.put("a/b", b"a file where a folder was")
    assert store.read("a/b") == b"a file where a folder was"


@pytest.mark.parametrize("key", ["../escape.txt", "/abs.txt", "a/../../x", ""])
def test_invalid_keys_are_rejected(store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.put(key, b"x")
    with pytest.raises(ValueError):
        store.read(key)
    with pytest.raises(ValueError):
        store.stat(key)
    assert list(store.list()) == []


def _scenario(store: ObjectStore) -> list[object]:
    """Run a fixed script and record what a caller sees: values, or the error class."""
    seen: list[object] = []

    def record(fn: Callable[[], object]) -> None:
        try:
            seen.append(fn())
        except Exception as exc:
            seen.append(type(exc).__name__)

    def put(key: str, data: bytes) -> tuple[int, str | None]:
        info = store.put(key, data)
        return info.size, info.content_type

    for key, data in [("z.txt", b"zz"), ("m/n.png", b"png!"), ("m-n.txt", b""), ("README", b"r")]:
        record(functools.partial(put, key, data))
    record(lambda: store.put(".hidden", b"h").size)
    record(lambda: [(i.key, i.size, i.content_type) for i in store.list()])
    record(lambda: [(store.stat(i.key).size, store.stat(i.key).content_type) for i in store.list()])
    record(lambda: [store.read(i.key) for i in store.list()])
    record(lambda: store.read("m/n.png", max_bytes=3))
    record(lambda: store.read("m/n.png", max_bytes=4))
    record(lambda: store.stat("nope"))
    record(lambda: store.read("m"))
    record(lambda: store.put("../up", b""))
    record(lambda: store.delete("z.txt"))
    record(lambda: [i.key for i in store.list()])
    return seen


def test_scenario_is_congruent(tmp_path: Path, s3_settings: StorageSettings) -> None:
    local = _scenario(_local_factory(tmp_path)("root"))
    s3 = _scenario(_s3_factory(s3_settings)("root"))

    assert local == s3
    assert local == [
        (2, "text/plain"),
        (4, "image/png"),
        (0, "text/plain"),
        (1, "application/octet-stream"),
        1,
        [
            ("README", 1, "application/octet-stream"),
            ("m-n.txt", 0, "text/plain"),
            ("m/n.png", 4, "image/png"),
            ("z.txt", 2, "text/plain"),
        ],
        [(1, "application/octet-stream"), (0, "text/plain"), (4, "image/png"), (2, "text/plain")],
        [b"r", b"", b"png!", b"zz"],
        "ObjectTooLarge",
        b"png!",
        "ObjectNotFound",
        "ObjectNotFound",
        "ValueError",
        None,
        ["README", "m-n.txt", "m/n.png"],
    ]


# --- S3 specifics ------------------------------------------------------------------------------


def test_listing_more_than_one_page(s3_settings: StorageSettings, client: Minio) -> None:
    prefix = f"paged-{uuid.uuid4().hex[:8]}"
    keys = [f"img-{i:05d}.bin" for i in range(1100)]  # S3 returns at most 1,000 keys a page

    def put(key: str) -> None:
        client.put_object(BUCKET, f"{prefix}/{key}", io.BytesIO(key.encode()), len(key))

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(put, reversed(keys)))
    store = open_store(f"s3://{BUCKET}/{prefix}", s3_settings)

    listed = list(store.list())

    assert [info.key for info in listed] == keys
    assert {info.size for info in listed} == {len(keys[0])}
    assert store.read(listed[-1].key) == b"img-01099.bin"


def test_listing_skips_folder_markers_hidden_and_unaddressable_keys(
    s3_settings: StorageSettings, client: Minio
) -> None:
    prefix = f"odd-{uuid.uuid4().hex[:8]}"
    for name in ["dir/", "dir/ok.txt", ".hidden", "x/.git/config", "a//b", "top.txt"]:
        client.put_object(BUCKET, f"{prefix}/{name}", io.BytesIO(b"v"), 1)
    client.put_object(BUCKET, f"{prefix}-sibling.txt", io.BytesIO(b"v"), 1)

    store = open_store(f"s3://{BUCKET}/{prefix}/", s3_settings)

    assert [info.key for info in store.list()] == ["dir/ok.txt", "top.txt"]
    assert store.root_uri == f"s3://{BUCKET}/{prefix}"


def test_explicit_content_type_is_stored(make_store: StoreFactory) -> None:
    store = make_store("root")
    info = store.put("blob", b"RIFF....WEBP", content_type="image/webp")
    if isinstance(store, MinioStore):
        assert info.content_type == store.stat("blob").content_type == "image/webp"
    else:  # a folder cannot store it: guessed from the key
        assert info.content_type == store.stat("blob").content_type == "application/octet-stream"


def test_presigned_url_serves_the_bytes(store: ObjectStore) -> None:
    store.put("pics/cat.png", b"meow-bytes")

    url = store.presigned_url("pics/cat.png", expires_s=60)

    if isinstance(store, LocalFolderStore):
        assert url is None
        return
    assert url is not None
    assert "X-Amz-Expires=60" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"meow-bytes"


def test_missing_bucket(s3_settings: StorageSettings, client: Minio) -> None:
    with pytest.raises(ObjectNotFound, match="no-such-bucket"):
        open_store("s3://no-such-bucket/x", s3_settings)
    store = MinioStore(client, "no-such-bucket", "x")
    with pytest.raises(ObjectNotFound):
        store.stat("a.txt")
    with pytest.raises(ObjectNotFound):
        list(store.list())


def test_unreachable_endpoint_raises_store_unavailable() -> None:
    settings = StorageSettings(
        endpoint=f"127.0.0.1:{_free_port()}", access_key="testing", secret_key="testing"
    )

    with pytest.raises(StoreUnavailable):
        open_store(f"s3://{BUCKET}/x", settings)

    store = MinioStore(minio_client(settings.model_copy(update={"region": "us-east-1"})), BUCKET)
    for operation in [
        lambda: list(store.list()),
        lambda: store.stat("a"),
        lambda: store.read("a"),
        lambda: store.put("a", b"x"),
        lambda: store.delete("a"),
    ]:
        with pytest.raises(StoreUnavailable):
            operation()
