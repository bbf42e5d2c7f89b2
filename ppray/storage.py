"""Storage behind ``pyarrow.fs`` URIs, so local disk and S3 work the same way.

A :class:`Storage` is rooted at a URI (``/data/out``, ``file:///data/out``,
``s3://bucket/prefix``). Relative keys are validated (no ``..``, no absolute
paths) so that a message cannot write or read outside the root. Writes are
atomic: on a local filesystem they go to a temporary name and are renamed;
object stores (S3, GCS) make each PUT atomic already.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ppray.errors import NonRetriableError, RetriableError

__all__ = ["Storage", "read_uri", "safe_key"]


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


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


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
        fs.create_dir(posixpath.dirname(path), recursive=True)
        if isinstance(fs, pafs.LocalFileSystem):
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with fs.open_output_stream(tmp) as out:
                out.write(data)
            os.replace(tmp, path)
        else:
            with fs.open_output_stream(path) as out:
                out.write(data)
        return self.uri(key)

    def read_bytes(self, key: str) -> bytes:
        """Read ``key``; a missing key is a :class:`RetriableError` (it may still be landing)."""
        fs, _ = self._filesystem()
        try:
            with fs.open_input_stream(self.path(key)) as src:
                return bytes(src.read())
        except FileNotFoundError as exc:
            raise RetriableError(f"{self.root}: no object {key!r}") from exc

    def exists(self, key: str) -> bool:
        fs, _ = self._filesystem()
        return fs.get_file_info(self.path(key)).type == pafs.FileType.File

    def list(self, prefix: str = "", suffix: str = "") -> list[str]:
        """Keys under ``prefix`` ending in ``suffix``, sorted; temporary files are skipped."""
        fs, base = self._filesystem()
        start = posixpath.join(base, safe_key(prefix)) if prefix else base
        if fs.get_file_info(start).type != pafs.FileType.Directory:
            return []
        infos = fs.get_file_info(pafs.FileSelector(start, recursive=True))
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
    try:
        with fs.open_input_stream(path) as src:
            return bytes(src.read())
    except FileNotFoundError as exc:
        raise RetriableError(f"no object at {uri}") from exc
