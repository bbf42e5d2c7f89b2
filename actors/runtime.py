"""Deploy the actors and pump events from a source into the coordinator."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from ppray.config import DeploymentConfig
from ppray.instrument import load_instrument
from ppray.messages import Event, NextVisit, RawArrival, VisitSummary
from ppray.messaging import AckLedger, EventSource, Inbound, InMemoryBus
from ppray.sim.observatory import SimulatedObservatory

from .aggregator import VisitAggregator
from .apdb import ApdbShardActor, shard_name
from .coordinator import AGGREGATOR_NAME, COORDINATOR_NAME, VisitCoordinator, worker_name
from .factory import make_remote
from .worker import DetectorWorker

__all__ = ["Deployment", "deploy", "play_simulation", "pump"]

log = logging.getLogger(__name__)


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
            kinds: list[str] = ray.get(self.coordinator.next_visit.remote(item.message))
        elif isinstance(item.message, RawArrival):
            kinds = ray.get(self.coordinator.raw_arrived.remote(item.message))
        else:  # pragma: no cover - Inbound is built by our sources only
            raise TypeError(f"unexpected message {item.message!r}")
        if ack:
            item.ack()
        return kinds

    def events_since(self, seq: int) -> tuple[int, list[Event]]:
        result: tuple[int, list[Event]] = ray.get(self.coordinator.events_since.remote(seq))
        return result

    def wait_visit(self, visit: NextVisit, timeout_s: float) -> VisitSummary | None:
        summary: VisitSummary | None = ray.get(
            self.coordinator.wait_visit.remote(visit.instrument, visit.groupId, timeout_s)
        )
        return summary

    def shutdown(self) -> None:
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
    instrument = load_instrument(config.instrument)
    detectors = config.detectors or instrument.detector_names
    ns = config.namespace
    aggregator = make_remote(VisitAggregator, config.aggregator, AGGREGATOR_NAME, ns).remote(config)
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
    """
    seq = 0
    ledger = AckLedger()
    while not stop():
        for item in source.poll(poll_s):
            if item.error and on_rejected is not None:
                on_rejected(item)
            ledger.after_submit(item, deployment.submit(item, ack=False))
        seq, events = deployment.events_since(seq)
        for event in events:
            ledger.on_event(event)
            if on_event is not None:
                on_event(event)
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
