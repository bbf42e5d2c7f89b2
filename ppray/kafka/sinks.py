"""What ppray publishes to Kafka: alerts (Avro), metrics, events and dead letters (JSON).

Alerts go one Kafka message per alert as Rubin's producer sends them: value =
the Avro alert behind the Confluent wire-format header (magic byte 0, the
schema's registry id, big-endian; ``alerts.confluent_wire_format``), no key
(``alerts.kafka_key: diaSourceId`` sets it to the id in decimal ASCII), and a
``producer_timestamp`` header: the send time in milliseconds since the Unix epoch,
decimal ASCII. After a detector's alerts are flushed (acknowledged by all in-sync
replicas) a marker ``_published/alerts/<key>.json`` is written in the output
store, and a later write of the same key (a re-delivered visit after a
restart) is skipped: re-processing a visit does not publish its alerts twice.
A crash between the flush and the marker can still re-publish a detector's
alerts once, the same bytes: consumers deduplicate by ``diaSourceId``.

JSON records (metrics, events, dead letters) carry ``"schema": "ppray.<kind>/1"``;
their fields are listed in :func:`metrics_records`, :func:`event_record` and
:func:`dead_letter_record`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from ppray.alerts.packet import serialize_alert
from ppray.alerts.sinks import AlertSink, local_alert_sink
from ppray.config import DeploymentConfig
from ppray.config.kafka import KafkaConfig
from ppray.errors import RetriableError
from ppray.kafka.client import kafka_module, make_producer
from ppray.layout import published_marker_key
from ppray.messages import DetectorResult, Event, NextVisit, VisitSummary
from ppray.messaging import Inbound
from ppray.storage import Storage

__all__ = [
    "JsonPublisher",
    "KafkaAlertSink",
    "alert_id",
    "dead_letter_record",
    "event_record",
    "make_alert_sink",
    "metrics_records",
]

log = logging.getLogger(__name__)

METRICS_SCHEMA = "ppray.metrics/1"
EVENT_SCHEMA = "ppray.event/1"
DEAD_LETTER_SCHEMA = "ppray.dead_letter/1"


def alert_id(blob: bytes, confluent: bool = False) -> int:
    """The ``diaSourceId`` of a serialized alert, read without decoding the rest.

    ``diaSourceId`` is the first field of the Rubin alert record (schemas 7 to
    11), so it is the first Avro ``long`` (zig-zag varint) after the optional
    5-byte Confluent header.
    """
    pos = 5 if confluent else 0
    shift = result = 0
    while True:
        if pos >= len(blob) or shift > 63:
            raise ValueError("truncated alert: no diaSourceId varint")
        byte = blob[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            break
        shift += 7
    return (result >> 1) ^ -(result & 1)


def _confirm(producer: Any, futures: list[Any], timeout_s: float, what: str) -> None:
    """Flush, then raise :class:`RetriableError` unless the broker acknowledged every record."""
    producer.flush(timeout=timeout_s)
    kafka = kafka_module()
    try:
        for future in futures:
            future.get(timeout=0.001)
    except kafka.errors.KafkaError as exc:
        raise RetriableError(f"{what}: not acknowledged by Kafka: {exc}") from exc


class KafkaAlertSink:
    """The :class:`~ppray.alerts.sinks.AlertSink` for Kafka; made inside each worker.

    The producer is created on the first write (never pickled: the sink lives in
    the detector worker's process).

    Parameters
    ----------
    config
        Broker and topic names (``topics.alerts``).
    confluent
        Whether the alert bytes carry the Confluent header (to find ``diaSourceId``).
    key
        ``"none"``: messages without a key; ``"diaSourceId"``: the id, decimal ASCII.
    markers
        Output store for the published markers; None: always publish.
    """

    def __init__(
        self,
        config: KafkaConfig,
        *,
        confluent: bool = True,
        key: str = "none",
        markers: Storage | None = None,
        producer: Any = None,
    ) -> None:
        if key not in ("none", "diaSourceId"):
            raise ValueError(f"alert key must be 'none' or 'diaSourceId', not {key!r}")
        self.config = config
        self.topic = config.topics.alerts
        self.confluent = confluent
        self.key = key
        self.markers = markers
        self._producer_obj = producer
        self._closed = False
        self.n_published = 0
        self.n_skipped = 0

    def _producer(self) -> Any:
        if self._producer_obj is None:
            self._producer_obj = make_producer(self.config)
        return self._producer_obj

    def marker_key(self, key: str) -> str:
        return published_marker_key(key)

    def publish(self, blobs: Sequence[bytes]) -> list[int]:
        """Send and flush serialized alerts; returns their ``diaSourceId``\\ s.

        Raises
        ------
        RetriableError
            If the broker did not acknowledge every alert in ``flush_timeout_s``.
        """
        producer = self._producer()
        ids = [alert_id(b, self.confluent) for b in blobs]
        headers = [("producer_timestamp", str(int(time.time() * 1000)).encode())]
        futures = [
            producer.send(
                self.topic,
                key=str(i).encode() if self.key == "diaSourceId" else None,
                value=bytes(b),
                headers=headers,
            )
            for i, b in zip(ids, blobs, strict=True)
        ]
        _confirm(producer, futures, self.config.flush_timeout_s, "alerts")
        self.n_published += len(blobs)
        return ids

    def write(self, key: str, alerts: Sequence[bytes | dict[str, Any]]) -> str:
        """Publish a detector's alerts once: skipped if its marker says they went out."""
        if self._closed:
            raise RuntimeError("KafkaAlertSink is closed")
        where = f"kafka://{self.topic}/{key}"
        marker = self.marker_key(key)
        if self.markers is not None and self.markers.exists(marker):
            self.n_skipped += len(alerts)
            log.info("alerts of %s already published; not sent again", key)
            return where
        blobs = [
            a if isinstance(a, bytes | bytearray) else serialize_alert(a, confluent=self.confluent)
            for a in alerts
        ]
        ids = self.publish(blobs)
        if self.markers is not None:
            digest = hashlib.sha256(b"".join(blobs)).hexdigest()
            self.markers.write_json(
                marker,
                {
                    "topic": self.topic,
                    "n_alerts": len(ids),
                    "diaSourceIds": ids,
                    "sha256": digest,
                    "published_at": time.time(),
                },
            )
        return where

    def close(self) -> None:
        self._closed = True
        if self._producer_obj is not None:
            self._producer_obj.flush(timeout=self.config.flush_timeout_s)
            self._producer_obj.close()
            self._producer_obj = None


def make_alert_sink(config: DeploymentConfig) -> AlertSink | None:
    """The alert sink ``config.alerts.sink`` names (``file``, ``kafka`` or ``none``)."""
    if config.alerts.sink == "kafka":
        assert config.kafka is not None  # DeploymentConfig validates this
        return KafkaAlertSink(
            config.kafka,
            confluent=config.alerts.confluent_wire_format,
            key=config.alerts.kafka_key,
            markers=Storage(config.output_root),
        )
    return local_alert_sink(config)


class JsonPublisher:
    """Publishes JSON records to one topic; the producer is made on first use."""

    def __init__(self, config: KafkaConfig, topic: str, producer: Any = None) -> None:
        self.config = config
        self.topic = topic
        self._producer_obj = producer
        self._owns = producer is None

    def _producer(self) -> Any:
        if self._producer_obj is None:
            self._producer_obj = make_producer(self.config)
        return self._producer_obj

    def send(self, records: Iterable[tuple[str, dict[str, Any]]], flush: bool = True) -> None:
        """Send ``(key, record)`` pairs; with ``flush``, wait until the broker has them."""
        producer = self._producer()
        futures = [
            producer.send(
                self.topic, key=key.encode(), value=json.dumps(rec, allow_nan=False).encode()
            )
            for key, rec in records
        ]
        if flush and futures:
            _confirm(producer, futures, self.config.flush_timeout_s, self.topic)

    def close(self) -> None:
        if self._producer_obj is not None and self._owns:
            self._producer_obj.flush(timeout=self.config.flush_timeout_s)
            self._producer_obj.close()
        self._producer_obj = None


def _finite(value: float | None) -> float | None:
    # JSON has no NaN/inf; a metric that could not be measured is null.
    if value is None or value != value or value in (float("inf"), float("-inf")):
        return None
    return float(value)


def metrics_records(
    visit: NextVisit, summary: VisitSummary, results: Sequence[DetectorResult]
) -> list[tuple[str, dict[str, Any]]]:
    """Per-detector and per-visit metrics records, keyed ``INSTRUMENT/GROUP[/DETECTOR]``.

    Fields (``ppray.metrics/1``): ``schema``, ``level`` (``detector`` or ``visit``),
    ``instrument``, ``group_id``, ``detector`` (``""`` for the visit),
    ``exposure_id``, ``status``, ``time`` (epoch s), ``timings_s`` (per step;
    the visit's are medians over detectors), ``psf_fwhm_arcsec``,
    ``zero_point_mag``, ``n_sources``, ``n_dia_sources``, ``n_alerts``, how the
    difference went (``bright_star_residual``: 1 is the noise; ``kernel_spatial_order``,
    ``n_streaks``, ``n_dia_unreliable``: below ``alerts.min_reliability``; null where not
    measured), ``latency_since_shutter_close_s`` (to the result, from ``startTime +
    duration``), ``latency_since_last_raw_s``, and for detectors ``flags``,
    for visits ``n_expected``/``n_ok``/``n_failed``/``n_timed_out``.
    """
    shutter_close = visit.startTime + visit.duration
    base = {"schema": METRICS_SCHEMA, "instrument": visit.instrument, "group_id": visit.groupId}
    out = []
    for r in sorted(results, key=lambda r: r.detector):
        out.append(
            (
                f"{visit.instrument}/{visit.groupId}/{r.detector}",
                {
                    **base,
                    "level": "detector",
                    "detector": r.detector,
                    "exposure_id": r.exposure_id,
                    "status": r.status,
                    "time": r.finished_at,
                    "timings_s": {k: _finite(v) for k, v in r.timings_s.items()},
                    "psf_fwhm_arcsec": _finite(r.metrics.get("psf_fwhm_arcsec")),
                    "zero_point_mag": _finite(r.metrics.get("zero_point_mag")),
                    "n_sources": r.n_sources,
                    "n_dia_sources": int(r.metrics.get("n_dia_sources", 0)),
                    "n_alerts": r.n_alerts,
                    **{name: _finite(r.metrics.get(name)) for name in _DIFFERENCE_QUALITY},
                    "latency_since_shutter_close_s": _finite(r.finished_at - shutter_close),
                    "latency_since_last_raw_s": (
                        None if r.last_raw_at is None else _finite(r.finished_at - r.last_raw_at)
                    ),
                    "flags": list(r.flags),
                },
            )
        )
    ok = [r for r in results if r.status == "ok"]

    def median(name: str) -> float | None:
        values = sorted(v for r in ok if (v := _finite(r.metrics.get(name))) is not None)
        return values[len(values) // 2] if values else None

    out.append(
        (
            f"{visit.instrument}/{visit.groupId}",
            {
                **base,
                "level": "visit",
                "detector": "",
                "exposure_id": summary.exposure_id,
                "status": "ok" if summary.n_ok == summary.n_expected else "degraded",
                "time": summary.done_at,
                "timings_s": {k: _finite(v) for k, v in summary.step_median_s.items()},
                "psf_fwhm_arcsec": median("psf_fwhm_arcsec"),
                "zero_point_mag": median("zero_point_mag"),
                "n_sources": summary.n_sources,
                "n_dia_sources": summary.n_dia_sources,
                "n_alerts": summary.n_alerts,
                **{name: median(name) for name in _DIFFERENCE_QUALITY},
                "latency_since_shutter_close_s": _finite(summary.done_at - shutter_close),
                "latency_since_last_raw_s": _finite(summary.latency_s),
                "n_expected": summary.n_expected,
                "n_ok": summary.n_ok,
                "n_failed": summary.n_failed,
                "n_timed_out": summary.n_timed_out,
            },
        )
    )
    return out


_DIFFERENCE_QUALITY = (
    "bright_star_residual",
    "kernel_spatial_order",
    "n_streaks",
    "n_dia_unreliable",
    "s3_retries",  # not the difference's, but read the same way: per detector, visit median
)


def event_record(event: Event) -> tuple[str, dict[str, Any]]:
    """An event as ``(INSTRUMENT/GROUP, record)``.

    Fields (``ppray.event/1``): ``schema`` and :class:`~ppray.messages.Event`'s
    ``kind`` (``visit_accepted``, ``preloaded``, ``raw_arrived``, ``processed``,
    ``timed_out``, ``failed``, ``visit_done``...), ``instrument``, ``group_id``,
    ``detector``, ``time``, ``level``, ``message``, ``data``.
    """
    record = {"schema": EVENT_SCHEMA, **event.model_dump(mode="json")}
    return f"{event.instrument}/{event.group_id}", record


def dead_letter_record(item: Inbound) -> tuple[str, dict[str, Any]]:
    """A rejected message as ``(origin, record)``.

    Fields (``ppray.dead_letter/1``): ``schema``, ``kind`` (the input it was
    read as), ``error`` (which field and why), ``origin`` (``topic[partition]@offset``),
    ``time``, ``original_b64`` (the exact original bytes) and ``original_text``
    (the same as UTF-8 when it decodes, else null).
    """
    try:
        text: str | None = item.original.decode()
    except UnicodeDecodeError:
        text = None
    return item.origin or item.kind, {
        "schema": DEAD_LETTER_SCHEMA,
        "kind": item.kind,
        "error": item.error,
        "origin": item.origin,
        "time": time.time(),
        "original_b64": base64.b64encode(item.original).decode(),
        "original_text": text,
    }
