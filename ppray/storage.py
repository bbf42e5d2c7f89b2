"""Storage behind ``pyarrow.fs`` URIs, so local disk and S3 work the same way.

A :class:`Storage` is rooted at a URI (``/data/out``, ``file:///data/out``,
``s3://bucket/prefix``). Relative keys are validated (no ``..``, no absolute
paths) so that a message cannot write or read outside the root. Writes are
atomic: on a local filesystem they go to a temporary name and are renamed;
object stores (S3, GCS) make each PUT atomic already.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ppray.errors import NonRetriableError, RetriableError

__all__ = ["S3Options", "Storage", "configure_s3", "read_uri", "s3_retries", "safe_key"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")


def safe_key(key: str) -> str:
    """Normalise a relative storage key, rejecting path traversal.

    Raises
    ------
    NonRetriableError
        For an absolute key, a ``..`` component, or an empty key.
    """
    if not key or key.startswith("/") or "\\" in key:
        raise NonRetriableError(f"storage key {key!r} must be a non-empty relative path")
    parts = key.split("/")
    if any(p in {"..", "."} for p in parts):
        raise NonRetriableError(f"storage key {key!r} must not contain '.' or '..' components")
    return posixpath.normpath(key)


@dataclass(frozen=True)
class S3Options:
    """How ``s3://`` URIs are reached in this process (:func:`configure_s3`)."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    retries: int = 4
    retry_backoff_s: float = 0.25


_s3 = S3Options()
_s3_fs: pafs.FileSystem | None = None
_retries = collections.Counter[str]()


def configure_s3(options: S3Options) -> None:
    """Reach ``s3://`` roots with ``options`` from now on, in this process.

    Every process that opens a :class:`Storage` on S3 calls it once with the
    deployment's ``s3`` section (the actors do when they start).
    """
    global _s3, _s3_fs
    _s3, _s3_fs = options, None


def s3_retries() -> dict[str, int]:
    """Transient S3 errors retried in this process so far, by operation."""
    return dict(_retries)


def _s3_filesystem() -> pafs.FileSystem:
    global _s3_fs
    if _s3_fs is None:
        kwargs: dict[str, Any] = {}
        if _s3.endpoint_url:
            parsed = urlparse(_s3.endpoint_url)
            kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
        if _s3.region:
            kwargs["region"] = _s3.region
        if _s3.access_key_id:
            kwargs.update(access_key=_s3.access_key_id, secret_key=_s3.secret_access_key)
        # ppray retries (and counts) transient errors itself; one attempt each in the SDK.
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=1)
        _s3_fs = pafs.S3FileSystem(**kwargs)
    return _s3_fs


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    if uri.startswith("s3://"):
        return _s3_filesystem(), uri.removeprefix("s3://").rstrip("/")
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


_PERMANENT = ("ACCESS_DENIED", "AccessDenied", "Forbidden", "INVALID_ACCESS_KEY_ID",
              "SignatureDoesNotMatch", "NoSuchBucket", "NO_SUCH_BUCKET")  # fmt: skip


def _with_retries(
    operation: str, where: str, fn: Callable[[], _T], fs: pafs.FileSystem | None = None
) -> _T:
    """``fn()``, retrying transient object-store errors with exponential backoff.

    A missing object is a :class:`RetriableError` at once (it may still be landing: the
    caller decides how long to wait); a permission or credential error, or a missing
    bucket, a :class:`NonRetriableError`; any other ``OSError`` (throttling, 5xx,
    network) is retried ``retries`` times, each counted (:func:`s3_retries`).
    """
    delay = _s3.retry_backoff_s
    for attempt in range(_s3.retries + 1):
        try:
            return fn()
        except FileNotFoundError as exc:
            raise RetriableError(f"{where}: no such object") from exc
        except OSError as exc:
            if isinstance(fs, pafs.LocalFileSystem):
                raise  # a local disk's errors are not transient: as they are
            words = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if any(p in str(exc) for p in _PERMANENT):
                raise NonRetriableError(f"{where}: refused by the object store: {words}") from exc
            if attempt == _s3.retries:
                raise RetriableError(
                    f"{where}: still failing after {attempt} retries: {words}"
                ) from exc
            _retries[operation] += 1
            log.warning("%s: %s; retry %d in %.2f s", where, words, attempt + 1, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("not reached")


class Storage:
    """A key-value view of a directory or bucket prefix.

    Parameters
    ----------
    root
        Local path or ``pyarrow.fs`` URI. Created lazily; nothing is touched at construction.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self._fs: pafs.FileSystem | None = None
        self._base = ""

    def _filesystem(self) -> tuple[pafs.FileSystem, str]:
        if self._fs is None:
            self._fs, self._base = _resolve(self.root)
        return self._fs, self._base

    @property
    def is_local(self) -> bool:
        return isinstance(self._filesystem()[0], pafs.LocalFileSystem)

    def path(self, key: str) -> str:
        """Filesystem path of ``key`` (inside the root)."""
        _, base = self._filesystem()
        return posixpath.join(base, safe_key(key))

    def uri(self, key: str) -> str:
        """A URI that :func:`read_uri` understands, for use in messages."""
        fs, _ = self._filesystem()
        path = self.path(key)
        if isinstance(fs, pafs.LocalFileSystem):
            return Path(path).as_uri()
        return f"{fs.type_name}://{path}"

    def write_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` at ``key`` atomically; returns its URI."""
        fs, _ = self._filesystem()
        path = self.path(key)
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(posixpath.dirname(path), recursive=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with fs.open_output_stream(tmp) as out:
                out.write(data)
            os.replace(tmp, path)
        else:

            def put() -> None:
                with fs.open_output_stream(path) as out:
                    out.write(data)

            _with_retries("write", f"{self.root}: object {key!r}", put, fs)
        return self.uri(key)

    def read_bytes(self, key: str) -> bytes:
        """Read ``key``; a missing key is a :class:`RetriableError` (it may still be landing).

        Transient object-store errors are retried with backoff; a refused read
        (permissions, credentials) is a :class:`NonRetriableError`.
        """
        fs, _ = self._filesystem()
        path = self.path(key)

        def read() -> bytes:
            with fs.open_input_stream(path) as src:
                return bytes(src.read())

        return _with_retries("read", f"{self.root}: object {key!r}", read, fs)

    def exists(self, key: str) -> bool:
        fs, _ = self._filesystem()
        path = self.path(key)
        info = _with_retries(
            "stat", f"{self.root}: object {key!r}", lambda: fs.get_file_info(path), fs
        )
        return bool(info.type == pafs.FileType.File)

    def list(self, prefix: str = "", suffix: str = "") -> list[str]:
        """Keys under ``prefix`` ending in ``suffix``, sorted; temporary files are skipped."""
        fs, base = self._filesystem()
        start = posixpath.join(base, safe_key(prefix)) if prefix else base
        where = f"{self.root}: listing {prefix!r}"
        if _with_retries("list", where, lambda: fs.get_file_info(start), fs).type != (
            pafs.FileType.Directory
        ):
            return []
        infos = _with_retries(
            "list", where, lambda: fs.get_file_info(pafs.FileSelector(start, recursive=True)), fs
        )
        keys = [
            posixpath.relpath(i.path, base)
            for i in infos
            if i.type == pafs.FileType.File and i.path.endswith(suffix) and ".tmp-" not in i.path
        ]
        return sorted(keys)

    def delete(self, key: str) -> None:
        fs, _ = self._filesystem()
        fs.delete_file(self.path(key))

    def write_json(self, key: str, obj: Any) -> str:
        return self.write_bytes(key, json.dumps(obj, indent=1, sort_keys=True).encode())

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_parquet(self, key: str, table: pa.Table) -> str:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return self.write_bytes(key, buf.getvalue())

    def read_parquet(self, key: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(key)))


def read_uri(uri: str) -> bytes:
    """Read a whole object by URI (``file://``, ``s3://``...) or local path.

    Raises
    ------
    RetriableError
        If the object does not exist (yet).
    """
    fs, path = _resolve(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as src:
            return bytes(src.read())

    return _with_retries("read", uri, read, fs)
