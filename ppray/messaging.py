"""Event sources and sinks behind small Protocols, with in-memory twins.

An :class:`EventSource` yields :class:`Inbound` items: a parsed ``next_visit``
or raw arrival, or the bytes of a message that failed validation together with
the reason (the dead-letter path). The runtime calls ``ack`` on an item once its
effects are durable: for a message that starts or feeds a visit, when the visit
is done (:class:`AckLedger` holds those acks until then).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Protocol

from ppray.errors import PprayError, ValidationFailure
from ppray.messages import Event, NextVisit, RawArrival, VisitKey, parse_message
from ppray.rawkeys import raw_arrival, sidecar_key
from ppray.storage import Storage

__all__ = [
    "AckLedger",
    "DirectorySource",
    "EventLog",
    "EventSink",
    "EventSource",
    "InMemoryBus",
    "Inbound",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inbound:
    """One message from a source: parsed, or rejected with its original bytes."""

    kind: Literal["next_visit", "raw_arrival"]
    message: NextVisit | RawArrival | None = None
    error: str = ""
    original: bytes = b""
    ack: Callable[[], None] = field(default=lambda: None, compare=False, repr=False)
    origin: str = field(default="", compare=False)  # e.g. "topic[partition]@offset"


class EventSource(Protocol):
    """Where ``next_visit`` and raw-arrival messages come from."""

    def poll(self, timeout_s: float) -> list[Inbound]: ...

    def close(self) -> None: ...


class EventSink(Protocol):
    """Where lifecycle events go."""

    def emit(self, event: Event) -> None: ...


class InMemoryBus:
    """An in-process queue that is both a source and the simulator's publisher."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Inbound] = queue.Queue()

    def publish_next_visit(self, visit: NextVisit) -> None:
        self._queue.put(Inbound("next_visit", visit))

    def publish_raw(self, raw: RawArrival) -> None:
        self._queue.put(Inbound("raw_arrival", raw))

    def publish_bytes(self, kind: Literal["next_visit", "raw_arrival"], data: bytes) -> None:
        """Publish an unparsed message, validated here as a broker consumer would."""
        try:
            self._queue.put(Inbound(kind, parse_message(kind, data)))
        except ValidationFailure as exc:
            self._queue.put(Inbound(kind, error=str(exc), original=data))

    def poll(self, timeout_s: float) -> list[Inbound]:
        items = []
        try:
            items.append(self._queue.get(timeout=timeout_s))
            while True:
                items.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return items

    def close(self) -> None:
        pass


class DirectorySource:
    """Watch local (or ``pyarrow.fs``) directories: ``next_visit`` JSON files and raws.

    ``next_visit`` messages are ``*.json`` files in ``inbox``; raws are
    ``*.fits`` files under ``raw_root`` in the LSST key layout, announced once
    their ``.json`` sidecar is present too. Each file is delivered once per
    process; a consumed ``next_visit`` file is moved to ``inbox/done/`` on ack.
    """

    def __init__(self, inbox: str, raw_root: str, poll_interval_s: float = 0.2) -> None:
        self.inbox = Storage(inbox)
        self.raws = Storage(raw_root)
        self.poll_interval_s = poll_interval_s
        self._seen: set[str] = set()
        self._closed = threading.Event()

    def _next_visits(self) -> list[Inbound]:
        items = []
        for key in self.inbox.list(suffix=".json"):
            if key in self._seen or key.startswith("done/"):
                continue
            self._seen.add(key)
            data = self.inbox.read_bytes(key)
            try:
                msg = parse_message("next_visit", data)
            except ValidationFailure as exc:
                items.append(Inbound("next_visit", error=f"{key}: {exc}", original=data))
                continue
            items.append(Inbound("next_visit", msg, ack=partial(self._done, key, data)))
        return items

    def _done(self, key: str, data: bytes) -> None:
        self.inbox.write_bytes(f"done/{key}", data)
        self.inbox.delete(key)

    def _raw_arrivals(self) -> list[Inbound]:
        items = []
        for key in self.raws.list(suffix=".fits"):
            if key in self._seen or not self.raws.exists(sidecar_key(key)):
                continue
            self._seen.add(key)
            try:
                sidecar = json.loads(self.raws.read_bytes(sidecar_key(key)))
                items.append(
                    Inbound(
                        "raw_arrival",
                        raw_arrival(key, sidecar, self.raws.uri(key), arrived_at=time.time()),
                    )
                )
            except (PprayError, json.JSONDecodeError) as exc:
                items.append(Inbound("raw_arrival", error=f"{key}: {exc}", original=key.encode()))
        return items

    def poll(self, timeout_s: float) -> list[Inbound]:
        deadline = time.monotonic() + timeout_s
        while not self._closed.is_set():
            items = self._next_visits() + self._raw_arrivals()
            if items or time.monotonic() >= deadline:
                return items
            self._closed.wait(min(self.poll_interval_s, max(deadline - time.monotonic(), 0)))
        return []

    def close(self) -> None:
        self._closed.set()


class EventLog:
    """A bounded, sequence-numbered event log that a client reads incrementally."""

    def __init__(self, maxlen: int = 10_000) -> None:
        self._events: deque[tuple[int, Event]] = deque(maxlen=maxlen)
        self._next = 0

    def emit(self, event: Event) -> None:
        level = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
        log.log(
            level[event.level],
            "%s %s/%s %s %s",
            event.kind,
            event.instrument,
            event.group_id,
            event.detector,
            event.message,
        )
        self._events.append((self._next, event))
        self._next += 1

    def since(self, seq: int) -> tuple[int, list[Event]]:
        """Events numbered ``>= seq`` still held, and the next sequence number."""
        return self._next, [e for n, e in self._events if n >= seq]

    def tail(self, n: int) -> dict[str, Any]:
        """The last ``n`` events and the next sequence number, JSON-safe (for a snapshot)."""
        events = list(self._events)[-n:] if n > 0 else []
        return {
            "next": self._next,
            "events": [[seq, e.model_dump(mode="json")] for seq, e in events],
        }

    def restore(self, tail: dict[str, Any]) -> None:
        """Continue from a :meth:`tail`: a reader's sequence numbers stay valid."""
        self._events.clear()
        for seq, event in tail.get("events", []):
            self._events.append((int(seq), Event.model_validate(event)))
        self._next = int(tail.get("next", 0))


# Events after which nothing more of a visit is in flight (visit level: no detector).
_VISIT_OVER = {"visit_done", "calib_done", "timed_out", "failed"}
# Coordinator outcomes that leave work in flight for the message's visit.
_IN_FLIGHT = {"visit_accepted", "visit_queued", "raw_arrived", "raw_buffered"}


class AckLedger:
    """Holds the acks of messages whose visit is still in flight (at-least-once).

    A ``next_visit`` or raw that started or fed a visit is acknowledged only
    once the visit is over (its outputs written); anything else (duplicates,
    rejections) at once. A restart before then re-delivers the message, and
    the outputs' deterministic ids make the replay harmless.
    """

    def __init__(self) -> None:
        self._held: dict[VisitKey, list[tuple[str, Callable[[], None]]]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._held.values())

    def after_submit(self, item: Inbound, kinds: list[str]) -> None:
        """Hold or release ``item``'s ack given the event kinds its submission caused."""
        message = item.message
        if item.error or message is None or not _IN_FLIGHT.intersection(kinds):
            item.ack()
            return
        self._held.setdefault(message.key, []).append((item.kind, item.ack))

    def on_event(self, event: Event) -> None:
        """Release the acks of a visit that is over, or of buffered raws that expired."""
        key = VisitKey(instrument=event.instrument, group_id=event.group_id)
        held = self._held.get(key)
        if not held:
            return
        if event.kind in _VISIT_OVER and not event.detector:
            release = self._held.pop(key)
            if event.data.get("n_retriable"):
                # Not durable: left unacknowledged, the inputs come back after a restart
                # (done detectors are skipped or replaced by id; the others retried).
                log.error(
                    "%s/%s: %s detectors failed retriably; its %d inputs stay unacknowledged",
                    event.instrument, event.group_id, event.data["n_retriable"], len(release),
                )  # fmt: skip
                return
        elif (
            event.kind == "raw_rejected"
            and event.data.get("expired")
            and all(kind == "raw_arrival" for kind, _ in held)
        ):
            # Buffered raws whose next_visit never came (CoordinatorState.expire_buffered).
            release = self._held.pop(key)
        else:
            return
        for _, ack in release:
            ack()
