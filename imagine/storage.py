"""The object-store port and its two adapters: a local folder and an S3/MinIO bucket prefix.

Sources are ``s3://bucket/prefix``, ``file:///abs/path`` or a plain path. Keys are paths relative
to the source root with "/" separators; listings are lazy, recursive, sorted by key (S3 order:
code point / UTF-8 byte order), and skip directories and hidden names (any segment starting with
"."). ``delete`` is idempotent on both adapters, as in S3. Content types are guessed from the key
("application/octet-stream" when unknown), except ``MinioStore.stat``/``put``, which report the
stored type. ``minio`` and ``urllib3`` are imported only when an S3 store is used.
"""

from __future__ import annotations

import io
import logging
import mimetypes
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote, urlsplit

from imagine.config import StorageSettings

if TYPE_CHECKING:
    from minio import Minio

log = logging.getLogger(__name__)
_CHUNK = 256 * 1024
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "ResourceNotFound"}
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"}


@dataclass(frozen=True)
class ObjectInfo:
    uri: str  # stable identity: file:///root/key or s3://bucket/fullkey
    key: str  # relative to the source root, "/" separators
    etag: str
    size: int
    content_type: str | None


class ObjectStoreError(Exception):
    """Base class of every storage error."""


class ObjectNotFound(ObjectStoreError):
    """The object, bucket or source folder does not exist."""


class StoreUnavailable(ObjectStoreError):
    """The endpoint is unreachable or failed transiently: callers may retry."""


class ObjectTooLarge(ObjectStoreError):
    """The object is larger than the ``max_bytes`` the caller accepts."""


class ObjectStore(Protocol):
    @property
    def root_uri(self) -> str: ...

    def list(self) -> Iterator[ObjectInfo]: ...

    def stat(self, key: str) -> ObjectInfo: ...

    def read(self, key: str, max_bytes: int | None = None) -> bytes: ...

    def put(self, key: str, data: bytes, content_type: str | None = None) -> ObjectInfo: ...

    def delete(self, key: str) -> None: ...

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None: ...


def _check_key(key: str) -> str:
    """A key is a relative "/"-separated path with no empty, "." or ".." segment."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\0" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}: must be a relative path inside the root")
    return key


def _listable(key: str) -> bool:
    try:
        _check_key(key)
    except ValueError:
        return False
    return not any(part.startswith(".") for part in key.split("/"))


def _guess_type(key: str) -> str:
    return mimetypes.guess_type(key, strict=False)[0] or "application/octet-stream"


def _too_large(key: str, size: int, max_bytes: int) -> ObjectTooLarge:
    return ObjectTooLarge(f"{key!r} is larger than {max_bytes} bytes ({size} bytes or more)")


def _collect(chunks: Iterable[bytes], key: str, max_bytes: int | None) -> bytes:
    """Join streamed chunks, stopping as soon as more than ``max_bytes`` arrived."""
    out: list[bytes] = []
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if max_bytes is not None and total > max_bytes:
            raise _too_large(key, total, max_bytes)
        out.append(chunk)
    return b"".join(out)


class LocalFolderStore:
    """Objects are the regular files under ``root``; etag is ``{size:x}-{mtime_ns:x}``."""

    def __init__(self, root: Path) -> None:
        self._root = Path(root).expanduser().resolve()

    @property
    def root_uri(self) -> str:
        return self._root.as_uri()

    def _path(self, key: str) -> Path:
        return self._root / _check_key(key)

    def _info(self, key: str, st: os.stat_result) -> ObjectInfo:
        return ObjectInfo(
            uri=(self._root / key).as_uri(),
            key=key,
            etag=f"{st.st_size:x}-{st.st_mtime_ns:x}",
            size=st.st_size,
            content_type=_guess_type(key),
        )

    def list(self) -> Iterator[ObjectInfo]:
        if not self._root.is_dir():
            raise ObjectNotFound(f"source folder {self._root} does not exist")
        return self._walk(self._root, "")

    def _walk(self, folder: Path, base: str) -> Iterator[ObjectInfo]:
        # A folder "d" sorts as "d/" so that depth-first order equals the sorted order of keys.
        try:
            with os.scandir(folder) as it:
                entries = [
                    (e.name + "/" if e.is_dir(follow_symlinks=False) else e.name, e)
                    for e in it
                    if not e.name.startswith(".")
                ]
        except (FileNotFoundError, NotADirectoryError):
            return  # removed while listing
        entries.sort(key=lambda pair: pair[0])
        for sort_name, entry in entries:
            if sort_name.endswith("/"):
                yield from self._walk(Path(entry.path), base + sort_name)
            elif entry.is_file():
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                yield self._info(base + entry.name, st)

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"no object {key!r} in {self.root_uri}") from exc
        if not path.is_file():
            raise ObjectNotFound(f"{key!r} in {self.root_uri} is not a file")
        return self._info(key, st)

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with path.open("rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if max_bytes is not None and size > max_bytes:
                    raise _too_large(key, size, max_bytes)
                return _collect(iter(lambda: fh.read(_CHUNK), b""), key, max_bytes)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise ObjectNotFound(f"no object {key!r} in {self.root_uri}") from exc
        except OSError as exc:
            raise ObjectStoreError(f"cannot read {key!r}: {exc}") from exc

    def put(self, key: str, data: bytes, content_type: str | None = None) -> ObjectInfo:
        """Atomic write. ``content_type`` is not stored: it is always guessed from the key."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                old_mtime: int | None = path.stat().st_mtime_ns
            except FileNotFoundError:
                old_mtime = None
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                st = os.stat(tmp)
                if old_mtime is not None and st.st_mtime_ns <= old_mtime:
                    # Coarse file clocks: make sure a rewrite always changes the etag.
                    os.utime(tmp, ns=(st.st_atime_ns, old_mtime + 1))
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise ObjectStoreError(f"cannot write {key!r} in {self.root_uri}: {exc}") from exc
        return self.stat(key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            if path.is_dir() or not path.exists():
                return  # not an object: nothing to delete
            raise ObjectStoreError(f"cannot delete {key!r}: {exc}") from exc
        parent = path.parent  # S3 has no folders: drop the ones the delete left empty
        while parent != self._root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        _check_key(key)
        return None


@contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    """Translate minio/urllib3 failures into the port's errors."""
    from minio.error import MinioException, S3Error, ServerError
    from urllib3.exceptions import HTTPError as Urllib3Error

    try:
        yield
    except S3Error as exc:
        if exc.code in _NOT_FOUND_CODES:
            raise ObjectNotFound(f"{what}: {exc.code}") from exc
        if exc.code in _TRANSIENT_CODES:
            raise StoreUnavailable(f"{what}: {exc.code}") from exc
        raise ObjectStoreError(f"{what}: {exc.code}: {exc.message}") from exc
    except ServerError as exc:
        cls = StoreUnavailable if exc.status_code >= 500 else ObjectStoreError
        raise cls(f"{what}: HTTP {exc.status_code}") from exc
    except (Urllib3Error, ConnectionError, TimeoutError) as exc:
        raise StoreUnavailable(f"{what}: endpoint unreachable: {exc}") from exc
    except MinioException as exc:
        raise ObjectStoreError(f"{what}: {exc}") from exc


class MinioStore:
    """Objects under ``prefix`` in an S3/MinIO bucket; keys are relative to the prefix."""

    def __init__(self, client: Minio, bucket: str, prefix: str = "") -> None:
        self._client = client
        self._bucket = bucket
        self._prefix = _norm_prefix(prefix)

    @property
    def root_uri(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}".rstrip("/")

    def _name(self, key: str) -> str:
        return self._prefix + _check_key(key)

    def _uri(self, name: str) -> str:
        return f"s3://{self._bucket}/{name}"

    def list(self) -> Iterator[ObjectInfo]:
        with _s3_errors(f"list {self.root_uri}"):
            # The client pages lazily (1,000 keys a request) and yields in key order.
            for obj in self._client.list_objects(self._bucket, prefix=self._prefix, recursive=True):
                name = obj.object_name or ""
                key = name[len(self._prefix) :]
                if obj.is_dir or not name.startswith(self._prefix) or not _listable(key):
                    continue
                yield ObjectInfo(
                    uri=self._uri(name),
                    key=key,
                    etag=(obj.etag or "").strip('"'),
                    size=obj.size or 0,
                    content_type=_guess_type(key),
                )

    def stat(self, key: str) -> ObjectInfo:
        name = self._name(key)
        with _s3_errors(f"stat {self._uri(name)}"):
            obj = self._client.stat_object(self._bucket, name)
        return ObjectInfo(
            uri=self._uri(name),
            key=key,
            etag=(obj.etag or "").strip('"'),
            size=obj.size or 0,
            content_type=obj.content_type,
        )

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        name = self._name(key)
        with _s3_errors(f"read {self._uri(name)}"):
            response = self._client.get_object(self._bucket, name)
            try:
                length = response.headers.get("Content-Length")
                if max_bytes is not None and length is not None and int(length) > max_bytes:
                    raise _too_large(key, int(length), max_bytes)
                return _collect(response.stream(_CHUNK), key, max_bytes)
            finally:
                response.close()
                response.release_conn()

    def put(self, key: str, data: bytes, content_type: str | None = None) -> ObjectInfo:
        name = self._name(key)
        ctype = content_type or _guess_type(key)
        with _s3_errors(f"put {self._uri(name)}"):
            result = self._client.put_object(
                self._bucket, name, io.BytesIO(data), len(data), content_type=ctype
            )
        return ObjectInfo(
            uri=self._uri(name),
            key=key,
            etag=(result.etag or "").strip('"'),
            size=len(data),
            content_type=ctype,
        )

    def delete(self, key: str) -> None:
        name = self._name(key)
        with _s3_errors(f"delete {self._uri(name)}"):
            self._client.remove_object(self._bucket, name)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        name = self._name(key)
        with _s3_errors(f"presign {self._uri(name)}"):
            return self._client.presigned_get_object(
                self._bucket, name, expires=timedelta(seconds=expires_s)
            )


def minio_client(settings: StorageSettings) -> Minio:
    """A client that fails in seconds on an unreachable endpoint (short retries and timeouts)."""
    import certifi
    import urllib3
    from minio import Minio

    if not settings.endpoint:
        raise ValueError(
            "s3:// sources need an S3 endpoint: set IMAGINE_STORAGE__ENDPOINT (e.g. minio:9000)"
        )
    endpoint, secure = settings.endpoint, settings.secure
    for scheme in ("http://", "https://"):  # tolerate a URL where host:port is expected
        if endpoint.startswith(scheme):
            endpoint, secure = endpoint[len(scheme) :].rstrip("/"), scheme == "https://"
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=2.0, read=30.0),
        retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        maxsize=16,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
    )
    return Minio(
        endpoint,
        access_key=settings.access_key,
        secret_key=settings.secret_key,
        secure=secure,
        region=settings.region,
        http_client=http,
    )


def _norm_prefix(prefix: str) -> str:
    """Prefix ``/a/b`` or ``a/b/`` becomes ``a/b/``; the empty prefix stays empty."""
    prefix = prefix.strip("/")
    if not prefix:
        return ""
    _check_key(prefix)
    return prefix + "/"


def parse_source(source: str) -> tuple[str, str, str]:
    """``(scheme, bucket_or_root, prefix)``: ("s3", bucket, "a/b") or ("file", "/abs/root", "")."""
    if not source.strip():
        raise ValueError("empty source: expected s3://bucket/prefix, file:///path or a path")
    scheme, sep, rest = source.partition("://")
    if not sep:
        return "file", str(Path(source).expanduser().resolve()), ""
    scheme = scheme.lower()
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"invalid source {source!r}: no bucket in s3://bucket/prefix")
        return "s3", bucket, _norm_prefix(prefix).rstrip("/")
    if scheme == "file":
        parts = urlsplit(source)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"invalid source {source!r}: expected file:///absolute/path")
        return "file", str(Path(unquote(parts.path)).resolve()), ""
    raise ValueError(f"unsupported source scheme {scheme!r} in {source!r}: use s3:// or file://")


def open_store(source: str, settings: StorageSettings) -> ObjectStore:
    """Open a source; checks that the folder or bucket exists (``ObjectNotFound`` if not)."""
    scheme, where, prefix = parse_source(source)
    if scheme == "s3":
        client = minio_client(settings)
        with _s3_errors(f"open s3://{where} at {settings.endpoint}"):
            exists = client.bucket_exists(where)
        if not exists:
            raise ObjectNotFound(f"bucket {where!r} does not exist at {settings.endpoint}")
        return MinioStore(client, where, prefix)
    root = Path(where)
    if not root.exists():
        raise ObjectNotFound(f"source folder {root} does not exist")
    if not root.is_dir():
        raise ObjectNotFound(f"source {root} is not a folder")
    return LocalFolderStore(root)


class ObjectLinks:
    """Where a client can fetch a hit's image: a presigned GET URL for objects in a bucket
    (valid ``settings.presign_ttl_s``), a ``file://`` URL for a local folder, or "" when
    there is none (presigning is local HMAC; the endpoint is asked once per bucket for its
    region unless ``settings.region`` is set, and a failure gives "" rather than failing a
    search)."""

    def __init__(self, settings: StorageSettings) -> None:
        self._settings = settings
        self._client: Minio | None = None

    def url(self, source: str, key: str) -> str:
        if not source or not key:
            return ""
        try:
            scheme, where, prefix = parse_source(source)
            if scheme == "file":
                return (Path(where) / key).as_uri()
            if not self._settings.endpoint:
                return ""
            if self._client is None:
                self._client = minio_client(self._settings)
            store = MinioStore(self._client, where, prefix)
            return store.presigned_url(key, self._settings.presign_ttl_s) or ""
        except (ValueError, ObjectStoreError) as exc:
            log.warning("no URL for %s in %s: %s", key, source, exc)
            return ""
