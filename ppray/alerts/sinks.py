"""Where alerts go: one :class:`AlertSink` Protocol, a file sink and an in-memory twin.

A sink takes the alerts of one unit of work (a visit, or a visit's detector),
named by a relative key such as ``LSSTCam/20260101/<group>/R22_S11``, as
alert dicts or serialized bytes (bare or with the Confluent header).
Writing a key again replaces what it held, so a retried detector does not
duplicate its alerts. A Kafka sink will implement the same Protocol.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import fastavro

from ppray.alerts.packet import deserialize_alert
from ppray.config import DeploymentConfig
from ppray.layout import alert_file_key
from ppray.schema import AlertSchema, load_alert_schema
from ppray.storage import Storage

__all__ = [
    "FROM_CONFIG",
    "AlertSink",
    "FileAlertSink",
    "InMemoryAlertSink",
    "SinkFromConfig",
    "local_alert_sink",
    "read_alert_file",
]

Alerts = Sequence[bytes | dict[str, Any]]


@runtime_checkable
class AlertSink(Protocol):
    """Receives the alerts of one unit of work at a time."""

    def write(self, key: str, alerts: Alerts) -> str:
        """Deliver ``alerts`` under ``key`` (replacing an earlier write); returns where."""
        ...

    def close(self) -> None:
        """Flush and release resources; further writes are errors."""
        ...


def _records(alerts: Alerts, schema: AlertSchema) -> list[dict[str, Any]]:
    return [
        deserialize_alert(a, schema=schema) if isinstance(a, bytes | bytearray) else a
        for a in alerts
    ]


class FileAlertSink:
    """Avro container files, one per key: ``<prefix>/<key>.avro`` under a storage root.

    The embedded default. Files are written atomically (:class:`~ppray.storage.Storage`)
    with a sync marker derived from the key, so writing the same alerts again
    gives the same bytes.

    Parameters
    ----------
    root
        Storage or its root (local path or ``pyarrow.fs`` URI).
    prefix
        Key prefix inside the root.
    codec
        Avro block codec (``"null"``, ``"deflate"``; cutouts are float32 noise,
        so compression gains little).
    """

    def __init__(
        self,
        root: str | Storage,
        *,
        prefix: str = "alerts",
        codec: str = "null",
        schema: AlertSchema | None = None,
    ) -> None:
        self.storage = root if isinstance(root, Storage) else Storage(root)
        self.prefix = prefix
        self.codec = codec
        self.schema = schema or load_alert_schema()
        self._closed = False

    def key_for(self, key: str) -> str:
        return alert_file_key(key, self.prefix)

    def write(self, key: str, alerts: Alerts) -> str:
        if self._closed:
            raise RuntimeError("FileAlertSink is closed")
        storage_key = self.key_for(key)
        buf = io.BytesIO()
        sync = hashlib.sha256(storage_key.encode()).digest()[:16]
        fastavro.writer(
            buf,
            self.schema.definition,
            _records(alerts, self.schema),
            codec=self.codec,
            sync_marker=sync,
            metadata={"ppray.key": key},
        )
        return self.storage.write_bytes(storage_key, buf.getvalue())

    def read(self, key: str) -> list[dict[str, Any]]:
        """The alerts last written under ``key``."""
        return read_alert_file(self.storage.read_bytes(self.key_for(key)))

    def close(self) -> None:
        self._closed = True


def read_alert_file(data: bytes) -> list[dict[str, Any]]:
    """Alerts of an Avro container file (its embedded writer schema decodes them)."""
    return [dict(r) for r in fastavro.reader(io.BytesIO(data))]  # type: ignore[arg-type]


class InMemoryAlertSink:
    """The test twin: keeps the alerts (decoded) per key, in memory."""

    def __init__(self, schema: AlertSchema | None = None) -> None:
        self.schema = schema or load_alert_schema()
        self.by_key: dict[str, list[dict[str, Any]]] = {}
        self.writes = 0
        self.closed = False

    def write(self, key: str, alerts: Alerts) -> str:
        if self.closed:
            raise RuntimeError("InMemoryAlertSink is closed")
        self.by_key[key] = _records(alerts, self.schema)
        self.writes += 1
        return f"memory://{key}"

    def close(self) -> None:
        self.closed = True

    @property
    def alerts(self) -> list[dict[str, Any]]:
        """All alerts held, keys in sorted order."""
        return [a for k in sorted(self.by_key) for a in self.by_key[k]]


class SinkFromConfig:
    """The type of :data:`FROM_CONFIG`: "the sink the configuration names"."""

    def __repr__(self) -> str:
        return "FROM_CONFIG"


FROM_CONFIG = SinkFromConfig()
"""Default of a sink argument: make the sink ``config.alerts.sink`` names."""


def local_alert_sink(config: DeploymentConfig) -> AlertSink | None:
    """The sink ``config.alerts.sink`` names, of those the core makes (``file``, ``none``).

    Raises
    ------
    ValueError
        For ``kafka``: an adapter's sink is made by the runtime
        (:func:`ppray.kafka.sinks.make_alert_sink`) and passed in, so that the
        core never imports Kafka.
    """
    if config.alerts.sink == "file":
        return FileAlertSink(config.output_root)
    if config.alerts.sink == "none":
        return None
    raise ValueError(
        f"alerts.sink {config.alerts.sink!r} is made by the runtime "
        "(ppray.kafka.sinks.make_alert_sink), not by the core: pass it as alert_sink"
    )
