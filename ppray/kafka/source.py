"""``KafkaSource``: ``next_visit`` and raw-arrival notifications from Kafka topics.

Each record becomes :class:`~ppray.messaging.Inbound` items: a parsed
:class:`~ppray.messages.NextVisit`, one :class:`~ppray.messages.RawArrival` per
``ObjectCreated`` record of an S3 bucket notification, or an error with the
record's original bytes (for the dead-letter topic). Offsets are committed by
hand, per partition, up to the first record whose ack is still outstanding:
a record is committed only once everything before it is durable too, so a
restart re-delivers exactly what was not finished (at-least-once).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from ppray.config.kafka import KafkaConfig
from ppray.errors import PprayError, RetriableError, ValidationFailure
from ppray.instrument import Instrument
from ppray.kafka.client import kafka_module, make_consumer
from ppray.messages import NextVisit, RawArrival, parse_message
from ppray.messaging import Inbound
from ppray.rawkeys import (
    parse_raw_key,
    parse_s3_records,
    raw_arrival,
    relative_raw_key,
    sidecar_key,
)
from ppray.storage import Storage, safe_key
from ppray.visit.slots import BoundedLRU

__all__ = ["KafkaSource", "OffsetTracker", "RawResolver"]

log = logging.getLogger(__name__)

Partition = tuple[str, int]


class OffsetTracker:
    """Which offsets of each partition are delivered but not acknowledged yet.

    The committable position of a partition is its lowest outstanding offset,
    or one past the highest delivered when none is outstanding.
    """

    def __init__(self) -> None:
        self._pending: dict[Partition, set[int]] = {}
        self._next: dict[Partition, int] = {}
        self._committed: dict[Partition, int] = {}

    def delivered(self, tp: Partition, offset: int) -> None:
        self._pending.setdefault(tp, set()).add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def acked(self, tp: Partition, offset: int) -> None:
        self._pending.get(tp, set()).discard(offset)

    def outstanding(self) -> int:
        return sum(len(p) for p in self._pending.values())

    def committable(self) -> dict[Partition, int]:
        """Positions that moved since the last :meth:`mark_committed`."""
        out = {}
        for tp, nxt in self._next.items():
            pending = self._pending.get(tp)
            position = min(pending) if pending else nxt
            if self._committed.get(tp) != position:
                out[tp] = position
        return out

    def mark_committed(self, positions: dict[Partition, int]) -> None:
        self._committed.update(positions)

    def forget(self, partitions: list[Partition]) -> None:
        """Drop revoked partitions: their records go to the consumer that gets them."""
        for tp in partitions:
            self._pending.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)


@dataclass
class _Countdown:
    """Acks a record once all the items made from it are acked."""

    remaining: int
    done: Callable[[], None]

    def __call__(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.done()


class RawResolver:
    """Turns a raw's storage key into a :class:`RawArrival` (key checks, sidecar, detector).

    Parameters
    ----------
    raw_root
        Storage root the notification keys are relative to.
    instrument, detectors
        When given, raws of another instrument or of a detector not in play are
        rejected here, before any storage access.
    wait_s, poll_s
        How long (and how often) to look for a ``.json`` sidecar that is not there
        yet: object stores may deliver the raw's notification before the sidecar's.
    """

    def __init__(
        self,
        raw_root: str,
        *,
        instrument: Instrument | None = None,
        detectors: tuple[str, ...] | None = None,
        wait_s: float = 2.0,
        poll_s: float = 0.1,
    ) -> None:
        self.raws = Storage(raw_root)
        self.instrument = instrument
        self.detectors = detectors
        self.wait_s = wait_s
        self.poll_s = poll_s

    def _check(self, key: str) -> None:
        try:
            safe_key(key)
        except PprayError as exc:
            raise ValidationFailure("raw_arrival", "s3.object.key", str(exc)) from exc
        parts = parse_raw_key(key)
        inst = self.instrument
        if inst is None:
            return
        if parts.instrument != inst.name:
            raise ValidationFailure(
                "raw_arrival",
                "s3.object.key",
                f"instrument {parts.instrument!r} is not {inst.name!r}",
            )
        if not inst.has_detector(parts.detector):
            raise ValidationFailure(
                "raw_arrival", "s3.object.key", f"{inst.name} has no detector {parts.detector!r}"
            )
        if self.detectors is not None and parts.detector not in self.detectors:
            raise ValidationFailure(
                "raw_arrival", "s3.object.key", f"detector {parts.detector} is not in play"
            )

    def _sidecar(self, key: str, wait_s: float) -> dict[str, Any]:
        side = sidecar_key(key)
        deadline = time.monotonic() + wait_s
        while not self.raws.exists(side):
            if time.monotonic() >= deadline:
                raise RetriableError(f"sidecar {side!r} not found after {wait_s:g} s")
            time.sleep(self.poll_s)
        try:
            data = json.loads(self.raws.read_bytes(side))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValidationFailure("raw_arrival", "sidecar", f"{side!r}: not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValidationFailure("raw_arrival", "sidecar", f"{side!r}: not a JSON object")
        return data

    def resolve(
        self, key: str, arrived_at: float | None = None, *, wait_s: float | None = None
    ) -> RawArrival:
        """The arrival of raw ``key`` (waiting ``wait_s``, default the resolver's, for its
        sidecar).

        Raises
        ------
        ValidationFailure
            Bad key (layout, ``..``), unknown detector or instrument, bad sidecar.
        RetriableError
            The sidecar did not appear within ``wait_s``.
        """
        self._check(key)
        sidecar = self._sidecar(key, self.wait_s if wait_s is None else wait_s)
        when = time.time() if arrived_at is None else arrived_at
        return raw_arrival(key, sidecar, self.raws.uri(key), arrived_at=when)


class KafkaSource:
    """An :class:`~ppray.messaging.EventSource` over the ``next_visit`` and raw topics.

    Parameters
    ----------
    config
        Broker, topics, group and timeouts.
    raw_root
        Storage root of the raws; notification keys are relative to it.
    instrument, detectors
        Validate raws against these (unknown detectors go to the dead-letter topic).
    clock
        Wall clock for the ``next_visit`` expiry (injectable for tests).
    consumer
        A ready consumer (tests); default: one made lazily from ``config``.
    """

    def __init__(
        self,
        config: KafkaConfig,
        raw_root: str,
        *,
        instrument: Instrument | None = None,
        detectors: tuple[str, ...] | None = None,
        clock: Callable[[], float] = time.time,
        consumer: Any = None,
    ) -> None:
        self.config = config
        self.topics = config.topics
        self.resolver = RawResolver(
            raw_root,
            instrument=instrument,
            detectors=detectors,
            wait_s=config.sidecar_wait_s,
            poll_s=config.sidecar_poll_s,
        )
        self.clock = clock
        self.offsets = OffsetTracker()
        self.n_expired = 0
        self.n_listed = 0
        self._consumer_obj = consumer
        self._closed = False
        # Raws already announced (by a notification or a listing), so that the other
        # way of finding them does not announce them twice; and each listed raw's group,
        # so that its sidecar is read once however many visits list the same prefix.
        self._announced: BoundedLRU[str, bool] = BoundedLRU(100_000)
        self._groups: BoundedLRU[str, str] = BoundedLRU(100_000)

    def _consumer(self) -> Any:
        if self._consumer_obj is None:
            kafka = kafka_module()
            source = self

            class _Listener(kafka.ConsumerRebalanceListener):  # type: ignore[name-defined]
                def on_partitions_revoked(self, revoked: Any) -> None:
                    source._commit()
                    source.offsets.forget([(tp.topic, tp.partition) for tp in revoked])

                def on_partitions_assigned(self, assigned: Any) -> None:
                    pass

            consumer = make_consumer(self.config)
            consumer.subscribe(
                [self.topics.next_visit, self.topics.raw_arrival], listener=_Listener()
            )
            self._consumer_obj = consumer
            log.info(
                "consuming %s and %s from %s as group %s",
                self.topics.next_visit,
                self.topics.raw_arrival,
                self.config.describe(),
                self.config.group_id,
            )
        return self._consumer_obj

    def _commit(self) -> None:
        positions = self.offsets.committable()
        if not positions or self._consumer_obj is None:
            return
        kafka = kafka_module()
        offsets = {
            kafka.TopicPartition(t, p): kafka.structs.OffsetAndMetadata(pos, "", -1)
            for (t, p), pos in positions.items()
        }
        try:
            self._consumer_obj.commit(offsets)
        except kafka.errors.KafkaError as exc:
            # Not fatal: the records are re-delivered after a restart, and outputs are idempotent.
            log.warning("offset commit failed (will retry): %s", exc)
            return
        self.offsets.mark_committed(positions)

    def poll(self, timeout_s: float) -> list[Inbound]:
        """Commit what is acked so far, then fetch and decode the next records."""
        if self._closed:
            return []
        self._commit()
        batches = self._consumer().poll(timeout_ms=int(timeout_s * 1000))
        items: list[Inbound] = []
        for tp, records in batches.items():
            for record in records:
                items.extend(self._decode((tp.topic, tp.partition), record))
        return items

    def _decode(self, tp: Partition, record: Any) -> list[Inbound]:
        self.offsets.delivered(tp, record.offset)
        done = partial(self.offsets.acked, tp, record.offset)
        origin = f"{tp[0]}[{tp[1]}]@{record.offset}"
        value: bytes = record.value if record.value is not None else b""
        if tp[0] == self.topics.next_visit:
            return self._next_visit(value, done, origin)
        return self._raw_notification(value, done, origin)

    def _next_visit(self, value: bytes, done: Callable[[], None], origin: str) -> list[Inbound]:
        try:
            visit: NextVisit = parse_message("next_visit", value)
        except ValidationFailure as exc:
            return [Inbound("next_visit", error=str(exc), original=value, ack=done, origin=origin)]
        age = self.clock() - visit.private_sndStamp
        if visit.private_sndStamp > 0 and age > self.config.next_visit_expiry_s:
            self.n_expired += 1
            log.warning(
                "next_visit %s (%s) skipped: sent %.0f s ago, expiry is %g s",
                visit.key,
                origin,
                age,
                self.config.next_visit_expiry_s,
            )
            done()
            return []
        return [Inbound("next_visit", visit, ack=done, origin=origin), *self._landed(visit)]

    def _landed(self, visit: NextVisit) -> list[Inbound]:
        """Raws of ``visit`` already in storage: Rubin's fallback for raws that landed
        before this service subscribed (their notifications went to no one), found by
        listing the visit's day prefix when its ``next_visit`` arrives."""
        prefix = f"{visit.instrument}/{visit.day_obs}"
        try:
            keys = self.resolver.raws.list(prefix, suffix=".fits")
        except PprayError as exc:
            log.warning("listing %s for raws of %s failed: %s", prefix, visit.key, exc)
            return []
        items = []
        for key in keys:
            if key in self._announced:
                continue
            group = self._groups.get(key)
            if group is None:
                try:
                    raw = self.resolver.resolve(key, time.time(), wait_s=0.0)
                except PprayError:
                    continue  # not in play, or no sidecar yet: its notification will tell
                self._groups.put(key, raw.group_id)
                if raw.group_id != visit.groupId:
                    continue
            elif group != visit.groupId:
                continue
            else:
                raw = self.resolver.resolve(key, time.time(), wait_s=0.0)
            self._announced.put(key, True)
            self.n_listed += 1
            items.append(Inbound("raw_arrival", raw, origin=f"listing of {prefix}"))
        if items:
            log.info("%s: %d raws found by listing %s", visit.key, len(items), prefix)
        return items

    def _raw_notification(
        self, value: bytes, done: Callable[[], None], origin: str
    ) -> list[Inbound]:
        try:
            records = parse_s3_records(value)
        except ValidationFailure as exc:
            return [Inbound("raw_arrival", error=str(exc), original=value, ack=done, origin=origin)]
        if not records:  # e.g. ObjectRemoved only: nothing for us
            done()
            return []
        ack = _Countdown(len(records), done)
        items = []
        arrived = time.time()
        for bucket, full_key in records:
            key = full_key
            try:
                key = relative_raw_key(self.resolver.raws.root, bucket, full_key)
                if key in self._announced:
                    ack()  # found by a listing already
                    continue
                raw: RawArrival = self.resolver.resolve(key, arrived)
            except PprayError as exc:
                items.append(
                    Inbound(
                        "raw_arrival",
                        error=f"key {key!r}: {exc}",
                        original=value,
                        ack=ack,
                        origin=origin,
                    )
                )
                continue
            self._announced.put(key, True)
            items.append(Inbound("raw_arrival", raw, ack=ack, origin=origin))
        return items

    def close(self) -> None:
        """Commit what is acked and leave the group (un-acked records are re-delivered)."""
        if self._closed:
            return
        self._closed = True
        if self._consumer_obj is not None:
            self._commit()
            self._consumer_obj.close()
