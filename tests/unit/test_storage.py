"""LocalFolderStore and source parsing, on tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imagine.config import StorageSettings
from imagine.storage import (
    LocalFolderStore,
    MinioStore,
    ObjectNotFound,
    ObjectStoreError,
    ObjectTooLarge,
    StoreUnavailable,
    open_store,
    parse_source,
)


def _write(root: Path, key: str, data: bytes = b"x") -> None:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _keys(store: LocalFolderStore) -> list[str]:
    return [info.key for info in store.list()]


def test_list_is_recursive_sorted_by_key_and_skips_dirs_and_hidden(tmp_path: Path) -> None:
    for key in ["b.png", "a/z.txt", "a/b/c.jpg", "a-c.txt", "A.txt", ".hidden", ".git/x.txt"]:
        _write(tmp_path, key)
    _write(tmp_path, "a/.secret/y.txt")
    (tmp_path / "empty").mkdir()

    keys = _keys(LocalFolderStore(tmp_path))

    # "a-c.txt" < "a/b/c.jpg" in S3 (byte) order although the folder "a" sorts before "a-c.txt".
    assert keys == ["A.txt", "a-c.txt", "a/b/c.jpg", "a/z.txt", "b.png"]
    assert keys == sorted(keys)


def test_list_reports_uri_size_and_content_type(tmp_path: Path) -> None:
    _write(tmp_path, "dir name/pic.png", b"12345")

    [info] = LocalFolderStore(tmp_path).list()

    assert info.key == "dir name/pic.png"
    assert info.size == 5
    assert info.content_type == "image/png"
    assert info.uri == (tmp_path / "dir name" / "pic.png").as_uri()
    assert info.uri.startswith("file:///")
    assert info == LocalFolderStore(tmp_path).stat("dir name/pic.png")


def test_unknown_content_type_is_octet_stream(tmp_path: Path) -> None:
    _write(tmp_path, "README")
    _write(tmp_path, "blob.zzz-unknown")

    types = [info.content_type for info in LocalFolderStore(tmp_path).list()]

    assert types == ["application/octet-stream", "application/octet-stream"]


def test_list_is_lazy(tmp_path: Path) -> None:
    _write(tmp_path, "a/1.txt")
    _write(tmp_path, "b/2.txt")
    listing = LocalFolderStore(tmp_path).list()

    assert next(listing).key == "a/1.txt"
    _write(tmp_path, "b/3.txt")  # folder "b" has not been scanned yet

    assert [info.key for info in listing] == ["b/2.txt", "b/3.txt"]


def test_list_of_empty_folder_is_empty(tmp_path: Path) -> None:
    assert _keys(LocalFolderStore(tmp_path)) == []


def test_list_of_missing_root_raises_not_found(tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        list(LocalFolderStore(tmp_path / "gone").list())


def test_etag_changes_when_file_rewritten(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path)
    first = store.put("k.bin", b"aaaa")
    assert store.stat("k.bin").etag == first.etag

    second = store.put("k.bin", b"bbbb")  # same size, immediately after
    assert second.etag != first.etag
    assert store.stat("k.bin").etag == second.etag

    path = tmp_path / "k.bin"
    path.write_bytes(b"cccc")  # rewritten outside the store
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))
    assert store.stat("k.bin").etag not in {first.etag, second.etag}


def test_put_never_moves_mtime_backwards(tmp_path: Path) -> None:
    # With a coarse file clock, two same-size writes in one tick would share an etag: put bumps
    # the new mtime past the old one. A file stamped ahead of the clock shows the bump.
    store = LocalFolderStore(tmp_path)
    first = store.put("k.bin", b"aaaa")
    ahead = (tmp_path / "k.bin").stat().st_mtime_ns + 3600 * 10**9
    os.utime(tmp_path / "k.bin", ns=(ahead, ahead))

    second = store.put("k.bin", b"bbbb")

    assert (tmp_path / "k.bin").stat().st_mtime_ns == ahead + 1
    assert len({first.etag, f"4-{ahead:x}", second.etag}) == 3


def test_etag_is_size_and_mtime(tmp_path: Path) -> None:
    _write(tmp_path, "f.txt", b"0123456789abcdefX")
    os.utime(tmp_path / "f.txt", ns=(0, 255))

    assert LocalFolderStore(tmp_path).stat("f.txt").etag == "11-ff"


def test_read_and_max_bytes(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path)
    store.put("big.bin", b"z" * 1000)

    assert store.read("big.bin") == b"z" * 1000
    assert store.read("big.bin", max_bytes=1000) == b"z" * 1000
    with pytest.raises(ObjectTooLarge):
        store.read("big.bin", max_bytes=999)
    assert issubclass(ObjectTooLarge, ObjectStoreError)


def test_put_creates_folders_writes_atomically_and_returns_info(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path)

    info = store.put("x/y/z.json", b"{}")

    assert (tmp_path / "x" / "y" / "z.json").read_bytes() == b"{}"
    assert (info.key, info.size, info.content_type) == ("x/y/z.json", 2, "application/json")
    assert sorted(p.name for p in (tmp_path / "x" / "y").iterdir()) == ["z.json"]  # no temp left


def test_missing_objects_raise_not_found(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path)
    _write(tmp_path, "file.txt")
    (tmp_path / "folder").mkdir()

    for key in ["nope.txt", "file.txt/inner", "folder"]:
        with pytest.raises(ObjectNotFound):
            store.stat(key)
        with pytest.raises(ObjectNotFound):
            store.read(key)


def test_delete_removes_object_and_empty_folders_and_is_idempotent(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path)
    store.put("d/e/f.txt", b"1")
    store.put("d/keep.txt", b"2")

    store.delete("d/e/f.txt")
    store.delete("d/e/f.txt")
    store.delete("never-there.txt")

    assert _keys(store) == ["d/keep.txt"]
    assert not (tmp_path / "d" / "e").exists()
    assert (tmp_path / "d").is_dir()
    with pytest.raises(ObjectNotFound):
        store.stat("d/e/f.txt")


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "", "a//b", "./a", "a/"])
def test_keys_escaping_the_root_are_rejected(tmp_path: Path, key: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _write(tmp_path, "x", b"outside")
    store = LocalFolderStore(root)

    with pytest.raises(ValueError):
        store.read(key)
    with pytest.raises(ValueError):
        store.stat(key)
    with pytest.raises(ValueError):
        store.put(key, b"evil")
    with pytest.raises(ValueError):
        store.delete(key)
    assert (tmp_path / "x").read_bytes() == b"outside"


def test_presigned_url_is_none_for_local(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path)
    store.put("a.txt", b"a")
    assert store.presigned_url("a.txt") is None


def test_parse_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = tmp_path.resolve()
    assert parse_source("s3://bucket") == ("s3", "bucket", "")
    assert parse_source("s3://bucket/") == ("s3", "bucket", "")
    assert parse_source("S3://bucket/photos/2024/") == ("s3", "bucket", "photos/2024")
    assert parse_source(f"file://{base}/my%20pics") == ("file", f"{base}/my pics", "")
    assert parse_source(f"file://localhost{base}") == ("file", str(base), "")
    assert parse_source(f"{base}/abs/dir/") == ("file", f"{base}/abs/dir", "")
    assert parse_source("rel/dir") == ("file", f"{base}/rel/dir", "")


@pytest.mark.parametrize(
    "source",
    ["", "s3://", "s3:///prefix", "s3://b/../x", "gs://b/p", "file://host/x", "file://rel"],
)
def test_parse_source_rejects_bad_sources(source: str) -> None:
    with pytest.raises(ValueError):
        parse_source(source)


def test_open_store_local_paths_and_uri_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "my pics"
    _write(root, "a.png", b"png")
    settings = StorageSettings()
    monkeypatch.chdir(tmp_path)

    for source in [str(root), "my pics", root.as_uri()]:
        store = open_store(source, settings)
        assert isinstance(store, LocalFolderStore)
        assert store.root_uri == root.as_uri()
        assert store.read("a.png") == b"png"
        assert open_store(store.root_uri, settings).root_uri == store.root_uri


def test_open_store_local_missing_or_not_a_folder(tmp_path: Path) -> None:
    _write(tmp_path, "file.txt")

    with pytest.raises(ObjectNotFound, match="does not exist"):
        open_store(str(tmp_path / "missing"), StorageSettings())
    with pytest.raises(ObjectNotFound, match="not a folder"):
        open_store(str(tmp_path / "file.txt"), StorageSettings())


def test_open_store_s3_without_endpoint_names_the_setting() -> None:
    with pytest.raises(ValueError, match="IMAGINE_STORAGE__ENDPOINT"):
        open_store("s3://bucket/prefix", StorageSettings())


def test_minio_store_root_uri_normalises_prefix() -> None:
    from minio import Minio

    client = Minio("127.0.0.1:9", secure=False)
    assert MinioStore(client, "bkt", "/a/b/").root_uri == "s3://bkt/a/b"
    assert MinioStore(client, "bkt", "").root_uri == "s3://bkt"
    with pytest.raises(ValueError):
        MinioStore(client, "bkt", "a/../b")


def test_error_hierarchy() -> None:
    assert issubclass(ObjectNotFound, ObjectStoreError)
    assert issubclass(StoreUnavailable, ObjectStoreError)
    assert not issubclass(ObjectNotFound, StoreUnavailable)
