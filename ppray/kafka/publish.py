"""The observatory's side of Kafka: ``next_visit`` records and S3 bucket notifications.

Used by ``ppray simulate --kafka``, the tests and the benchmarks to play the
summit: the scheduler's ``nextVisit`` as JSON on the ``next_visit`` topic, and
the object store's notification (AWS S3 event format) on the raw-arrival topic
once a raw and its sidecar are written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote_plus

from ppray.config.kafka import KafkaConfig
from ppray.kafka.client import make_producer
from ppray.messages import NextVisit
from ppray.rawkeys import s3_bucket_prefix

__all__ = [
    "ObservatoryPublisher",
    "PlayableObservatory",
    "TimelineMessage",
    "play_to_kafka",
    "s3_notification",
]


def s3_notification(bucket: str, keys: list[str], *, size: int = 0) -> dict[str, Any]:
    """An S3 ``ObjectCreated:Put`` bucket notification for ``keys`` (URL-encoded as S3's)."""
    now = datetime.now(tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "eventTime": now,
                "eventName": "ObjectCreated:Put",
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                    "object": {"key": quote_plus(key, safe="/"), "size": size},
                },
            }
            for key in keys
        ]
    }


class ObservatoryPublisher:
    """Publishes ``next_visit`` events and raw notifications; flushes each call.

    Parameters
    ----------
    config
        Broker and topics.
    raw_root
        Where the raws are written. On ``s3://bucket/prefix`` the notifications say
        that bucket and the whole object key, as S3 sends them; on a directory, the
        bucket ``rubin-raws`` and keys relative to it.
    """

    def __init__(self, config: KafkaConfig, raw_root: str = "") -> None:
        self.config = config
        self.bucket, self.prefix = s3_bucket_prefix(raw_root) or ("rubin-raws", "")
        self._producer: Any = None

    def _send(self, topic: str, key: str, value: bytes) -> None:
        if self._producer is None:
            self._producer = make_producer(self.config)
        self._producer.send(topic, key=key.encode(), value=value)
        self._producer.flush(timeout=self.config.flush_timeout_s)

    def next_visit(self, visit: NextVisit, *, stamp: bool = True) -> None:
        """Publish ``visit`` as the SAL record, ``private_sndStamp`` set to now."""
        record = visit.model_dump(mode="json")
        if stamp:
            record["private_sndStamp"] = time.time()
        self.send_next_visit_bytes(json.dumps(record).encode(), key=visit.groupId)

    def send_next_visit_bytes(self, data: bytes, key: str = "") -> None:
        """Publish raw bytes on the ``next_visit`` topic (tests: malformed messages)."""
        self._send(self.config.topics.next_visit, key, data)

    def raws_written(self, keys: list[str]) -> None:
        """Announce raws (each with its sidecar already written): one notification per raw."""
        for key in keys:
            full = f"{self.prefix}/{key}" if self.prefix else key
            self.send_notification_bytes(json.dumps(s3_notification(self.bucket, [full])).encode())

    def send_notification_bytes(self, data: bytes, key: str = "") -> None:
        """Publish raw bytes on the raw-arrival topic."""
        self._send(self.config.topics.raw_arrival, key, data)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(timeout=self.config.flush_timeout_s)
            self._producer.close()
            self._producer = None


class TimelineMessage(Protocol):
    """One message of an observatory's timeline: ``next_visit`` or ``expose``."""

    kind: str
    visit: NextVisit
    snap: int


class PlayableObservatory(Protocol):
    """What :func:`play_to_kafka` needs of an observatory (the simulator is one)."""

    def play(self, n_visits: int | None, time_scale: float | None) -> Iterable[Any]: ...

    def expose(self, visit: NextVisit, snap: int) -> Any: ...

    def raw_keys(self, visit: NextVisit, snap: int) -> list[str]: ...


def play_to_kafka(
    observatory: PlayableObservatory,
    publisher: ObservatoryPublisher,
    n_visits: int,
    *,
    time_scale: float | None = None,
    on_message: Callable[[str, NextVisit, int], None] | None = None,
) -> list[NextVisit]:
    """Play the simulated timeline: ``next_visit`` on time, then raws and their notifications.

    ``time_scale`` (default ``sim.time_scale``) maps simulated to wall seconds;
    ``on_message(kind, visit, n)`` is called after each message (``n``: raws announced).
    """
    visits = []
    for msg in observatory.play(n_visits, time_scale):
        if msg.kind == "next_visit":
            visits.append(msg.visit)
            publisher.next_visit(msg.visit)
            n = 0
        else:
            observatory.expose(msg.visit, msg.snap)
            keys = observatory.raw_keys(msg.visit, msg.snap)
            publisher.raws_written(keys)
            n = len(keys)
        if on_message is not None:
            on_message(msg.kind, msg.visit, n)
    return visits
