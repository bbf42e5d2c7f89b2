"""Deploy the actors and pump events from a source into the coordinator."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import ray

from ppray.apdb.backend import create_store
from ppray.calib.results import CalibSummary
from ppray.config import DeploymentConfig
from ppray.instrument import load_instrument
from ppray.messages import Event, NextVisit, RawArrival, VisitSummary
from ppray.messaging import AckLedger, EventSource, Inbound, InMemoryBus
from ppray.sim.observatory import SimulatedObservatory

from .aggregator import VisitAggregator
from .apdb import ApdbShardActor, shard_name
from .calls import ActorDied, get
from .coordinator import AGGREGATOR_NAME, COORDINATOR_NAME, VisitCoordinator, worker_name
from .factory import make_remote
from .snapshots import clear_snapshot
from .worker import DetectorWorker

__all__ = ["Deployment", "deploy", "play_simulation", "pump"]

log = logging.getLogger(__name__)

# How long the driver waits for Ray to bring a dead coordinator back.
COORDINATOR_RESTART_WAIT_S = 60.0


@dataclass
class Deployment:
    """Handles of one running ppray deployment."""

    config: DeploymentConfig
    coordinator: Any
    aggregator: Any
    workers: dict[str, Any]
    apdb_shards: list[Any] = field(default_factory=list)

    def submit(self, item: Inbound, ack: bool = True) -> list[str]:
        """Hand one inbound message to the coordinator; returns the event kinds it caused.

        With ``ack`` the message is acknowledged at once; :func:`pump` passes False and
        lets an :class:`~ppray.messaging.AckLedger` hold the ack until the visit is over.
        """
        if item.error:
            log.error("rejected %s message %s: %s", item.kind, item.origin, item.error)
            if ack:
                item.ack()
            return ["rejected"]
        if isinstance(item.message, NextVisit):
            kinds: list[str] = self.call("next_visit", item.message)
        elif isinstance(item.message, RawArrival):
            kinds = self.call("raw_arrived", item.message)
        else:  # pragma: no cover - Inbound is built by our sources only
            raise TypeError(f"unexpected message {item.message!r}")
        if ack:
            item.ack()
        return kinds

    def call(self, method: str, *args: Any) -> Any:
        """Call the coordinator, waiting out a restart (it continues from its snapshot).

        A call lost with the old process is made again: ``next_visit`` and
        ``raw_arrived`` are deduplicated, the others only read.
        """
        deadline = time.monotonic() + COORDINATOR_RESTART_WAIT_S
        while True:
            try:
                return get(getattr(self.coordinator, method).remote(*args))
            except ActorDied as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("coordinator unavailable (%s); calling %s again", exc, method)
                time.sleep(0.5)

    def events_since(self, seq: int) -> tuple[int, list[Event]]:
        result: tuple[int, list[Event]] = self.call("events_since", seq)
        return result

    def wait_visit(self, visit: NextVisit, timeout_s: float) -> VisitSummary | None:
        """A science visit's summary once done, or None after ``timeout_s``."""
        summary = self.call("wait_visit", visit.instrument, visit.groupId, timeout_s)
        if isinstance(summary, CalibSummary):
            raise TypeError(f"{visit.groupId} is a calibration sequence: use wait_calib")
        return cast("VisitSummary | None", summary)

    def wait_calib(self, visit: NextVisit, timeout_s: float) -> CalibSummary | None:
        """A calibration sequence's summary once done, or None after ``timeout_s``."""
        summary = self.call("wait_visit", visit.instrument, visit.groupId, timeout_s)
        if isinstance(summary, VisitSummary):
            raise TypeError(f"{visit.groupId} is a science visit: use wait_visit")
        return cast("CalibSummary | None", summary)

    def backlog(self) -> int:
        """Visits queued in the coordinator behind ``max_visits_in_flight``."""
        n: int = self.call("backlog")
        return n

    def shutdown(self) -> None:
        clear_snapshot(self.config.namespace)
        for handle in [
            self.coordinator,
            self.aggregator,
            *self.workers.values(),
            *self.apdb_shards,
        ]:
            ray.kill(handle, no_restart=True)


def deploy(config: DeploymentConfig) -> Deployment:
    """Create the aggregator, the APDB shards, one worker per detector and the coordinator.

    Waits until all are ready. Actors are named (``coordinator``, ``aggregator-0``,
    ``apdb-0``, ``detector-R22_S11``) in
    ``config.namespace`` so the dashboard shows what they are.
    """
    config.s3.configure()  # the driver reads and writes the roots too
    instrument = load_instrument(config.instrument)
    detectors = config.detectors or instrument.detector_names
    ns = config.namespace
    aggregator = make_remote(VisitAggregator, config.aggregator, AGGREGATOR_NAME, ns).remote(config)
    if config.apdb.enabled:
        create_store(config.apdb, config.output_root)
    # The APDB shards first: each worker finds them by name when it starts.
    shards = [
        make_remote(ApdbShardActor, config.apdb_shard, shard_name(k), ns).remote(config, k)
        for k in range(config.apdb.n_shards if config.apdb.enabled else 0)
    ]
    ray.get([s.ready.remote() for s in shards])
    workers = {
        d: make_remote(DetectorWorker, config.worker, worker_name(d), ns).remote(config, d)
        for d in detectors
    }
    # A fresh deployment starts with no visits: a snapshot is for a *restarted* coordinator.
    clear_snapshot(ns)
    coordinator = make_remote(VisitCoordinator, config.coordinator, COORDINATOR_NAME, ns).remote(
        config, tuple(detectors)
    )
    statuses = ray.get([w.ready.remote() for w in workers.values()])
    ray.get([coordinator.ready.remote(), aggregator.ready.remote()])
    for status in statuses:
        if status["error"]:
            log.warning("detector %s: %s", status["detector"], status["error"])
    return Deployment(config, coordinator, aggregator, workers, shards)


def pump(
    deployment: Deployment,
    source: EventSource,
    stop: Callable[[], bool],
    on_event: Callable[[Event], None] | None = None,
    poll_s: float = 0.1,
    on_rejected: Callable[[Inbound], None] | None = None,
) -> AckLedger:
    """Move messages from ``source`` to the coordinator until ``stop()`` is true.

    Events from the coordinator are passed to ``on_event`` as they appear;
    messages that failed validation to ``on_rejected`` (the dead-letter topic)
    before they are acknowledged. A message that starts or feeds a visit is
    acknowledged when the visit is over (at-least-once); returns the ledger
    of acks still held when it stopped (not acknowledged: re-delivered later).

    Backpressure: while ``max_visit_backlog`` visits are queued in the
    coordinator, no further ``next_visit`` is submitted; the pump waits and the
    rest stays in the source (a Kafka consumer lags, nothing is dropped).
    """
    seq = 0
    ledger = AckLedger()
    bound = deployment.config.max_visit_backlog
    backlog = 0

    def drain_events() -> None:
        nonlocal seq
        seq, events = deployment.events_since(seq)
        for event in events:
            ledger.on_event(event)
            if on_event is not None:
                on_event(event)

    while not stop():
        for item in source.poll(poll_s):
            if item.error and on_rejected is not None:
                on_rejected(item)
            if isinstance(item.message, NextVisit):
                while backlog >= bound and not stop():
                    time.sleep(poll_s)
                    drain_events()
                    backlog = deployment.backlog()
            kinds = deployment.submit(item, ack=False)
            ledger.after_submit(item, kinds)
            if "visit_queued" in kinds:
                backlog = deployment.backlog()
        drain_events()
    return ledger


def play_simulation(
    observatory: SimulatedObservatory,
    bus: InMemoryBus,
    n_visits: int,
    on_visit: Callable[[NextVisit], None] | None = None,
) -> threading.Thread:
    """Play the simulated timeline into ``bus`` on a thread, at ``sim.time_scale`` speed."""

    def run() -> None:
        for msg in observatory.play(n_visits):
            if msg.kind == "next_visit":
                if on_visit is not None:
                    on_visit(msg.visit)
                bus.publish_next_visit(msg.visit)
            else:
                for raw in observatory.expose(msg.visit, msg.snap):
                    bus.publish_raw(raw)

    thread = threading.Thread(target=run, name="ppray-simulator", daemon=True)
    thread.start()
    return thread
