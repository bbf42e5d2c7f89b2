"""``VisitCoordinator``: a thin actor around :class:`ppray.coordinator.CoordinatorState`."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from typing import Any

import ray

from ppray.config import DeploymentConfig
from ppray.coordinator import CoordinatorState, Decision, PrepareVisit, RouteRaw
from ppray.instrument import load_instrument
from ppray.messages import Event, NextVisit, RawArrival, VisitKey, VisitSummary
from ppray.messaging import EventLog

__all__ = ["AGGREGATOR_NAME", "COORDINATOR_NAME", "VisitCoordinator", "worker_name"]

log = logging.getLogger(__name__)

COORDINATOR_NAME = "coordinator"
AGGREGATOR_NAME = "aggregator-0"


def worker_name(detector: str) -> str:
    """The Ray actor name of a detector's worker (as shown on the dashboard)."""
    return f"detector-{detector}"


class VisitCoordinator:
    """Async actor: dedups visits, broadcasts ``prepare``, routes raws, tracks visits.

    Parameters
    ----------
    config
        The deployment.
    detectors
        Detectors in play; their workers are found by name (``detector-NAME``), as is
        the aggregator (``aggregator-0``), so that a restarted coordinator finds them
        again and its constructor arguments stay small.
    """

    def __init__(self, config: DeploymentConfig, detectors: tuple[str, ...]) -> None:
        self.config = config
        ns = config.namespace
        self.workers = {d: ray.get_actor(worker_name(d), namespace=ns) for d in detectors}
        self.aggregator = ray.get_actor(AGGREGATOR_NAME, namespace=ns)
        self.state = CoordinatorState(
            load_instrument(config.instrument),
            detectors,
            raw_buffer_ttl_s=config.raw_buffer_ttl_s,
            remembered_visits=config.remembered_visits,
        )
        self.log = EventLog()
        self.summaries: dict[VisitKey, VisitSummary] = {}
        self.n_done = 0
        self._done: dict[VisitKey, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._overhead: dict[str, list[float]] = {"prepare_broadcast_s": [], "route_raw_s": []}
        self._expiry: asyncio.Task[None] | None = None

    async def ready(self) -> bool:
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().create_task(self._expire_loop())
        return True

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.config.raw_buffer_ttl_s / 4))
            for event in self.state.expire_buffered():
                self.log.emit(event)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def next_visit(self, visit: NextVisit) -> list[str]:
        """Accept (or dedup) a visit; returns the kinds of the events it caused."""
        return await self._carry_out(self.state.on_next_visit(visit))

    async def raw_arrived(self, raw: RawArrival) -> list[str]:
        """Route (or buffer, or reject) a raw; returns the kinds of the events it caused."""
        return await self._carry_out(self.state.on_raw(raw))

    async def _carry_out(self, decision: Decision) -> list[str]:
        for event in decision.events:
            self.log.emit(event)
        for action in decision.actions:
            if isinstance(action, PrepareVisit):
                self._start_visit(action)
            elif isinstance(action, RouteRaw):
                self._spawn(self._route(action.raw))
        return [e.kind for e in decision.events]

    def _start_visit(self, action: PrepareVisit) -> None:
        visit = action.visit
        self._done.setdefault(visit.key, asyncio.Event())
        start = time.perf_counter()
        prepares = {d: self.workers[d].prepare.remote(visit) for d in action.detectors}
        results = {d: self.workers[d].result.remote(visit) for d in action.detectors}
        gather: Any = self.aggregator.gather.remote(visit, list(action.detectors), results)
        self._spawn(self._await_prepared(visit, prepares, start))
        self._spawn(self._await_visit(visit.key, gather))

    async def _await_prepared(self, visit: NextVisit, refs: dict[str, Any], start: float) -> None:
        outcomes = await asyncio.gather(*refs.values(), return_exceptions=True)
        elapsed = time.perf_counter() - start
        self._overhead["prepare_broadcast_s"].append(elapsed)
        failed = {
            d: str(o) for d, o in zip(refs, outcomes, strict=True) if isinstance(o, BaseException)
        }
        preload = [o for o in outcomes if isinstance(o, float)]
        self.log.emit(
            Event(
                kind="preloaded",
                instrument=visit.instrument,
                group_id=visit.groupId,
                level="warning" if failed else "info",
                data={
                    "broadcast_s": elapsed,
                    "max_preload_s": max(preload, default=0.0),
                    "failed": failed,
                },
            )
        )

    async def _route(self, raw: RawArrival) -> None:
        start = time.perf_counter()
        try:
            await self.workers[raw.detector].raw_arrived.remote(raw)
        except ray.exceptions.RayError as exc:
            self.log.emit(
                Event(
                    kind="failed",
                    instrument=raw.instrument,
                    group_id=raw.group_id,
                    detector=raw.detector,
                    level="error",
                    message=f"could not route raw: {type(exc).__name__}",
                )
            )
            return
        self._overhead["route_raw_s"].append(time.perf_counter() - start)

    async def _await_visit(self, key: VisitKey, gather: Any) -> None:
        try:
            summary: VisitSummary = await gather
        except ray.exceptions.RayError as exc:
            log.error("visit %s: aggregator failed: %s", key, exc)
            self.log.emit(
                Event(
                    kind="failed",
                    instrument=key.instrument,
                    group_id=key.group_id,
                    level="error",
                    message=f"aggregator failed: {exc}",
                )
            )
            return
        for result_event in self._detector_events(summary):
            self.log.emit(result_event)
        self.log.emit(self.state.on_visit_done(summary))
        self.summaries[key] = summary
        self.n_done += 1
        self._done.setdefault(key, asyncio.Event()).set()
        # A service runs for months: keep only as many finished visits as it dedups.
        while len(self.summaries) > self.config.remembered_visits:
            oldest = next(iter(self.summaries))
            del self.summaries[oldest]
            self._done.pop(oldest, None)

    @staticmethod
    def _detector_events(summary: VisitSummary) -> list[Event]:
        events = []
        for det, status in summary.detectors.items():
            kind = {"ok": "processed", "failed": "failed", "timed_out": "timed_out"}[status]
            events.append(
                Event(
                    kind=kind,  # type: ignore[arg-type]
                    instrument=summary.instrument,
                    group_id=summary.group_id,
                    detector=det,
                    level="info" if status == "ok" else "error",
                    message=summary.reasons.get(det, ""),
                )
            )
        return events

    async def events_since(self, seq: int) -> tuple[int, list[Event]]:
        """Events numbered ``>= seq`` and the next sequence number."""
        return self.log.since(seq)

    async def wait_visit(
        self, instrument: str, group_id: str, timeout_s: float
    ) -> VisitSummary | None:
        """The visit's summary once done, or None after ``timeout_s``."""
        key = VisitKey(instrument=instrument, group_id=group_id)
        event = self._done.setdefault(key, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            return None
        return self.summaries.get(key)

    async def status(self) -> dict[str, Any]:
        """Visits in flight, buffered raws, finished visits and overhead medians."""
        return {
            "in_flight": [str(k) for k in self.state.in_flight],
            "buffered_raws": sum(len(v) for v in self.state.buffered.values()),
            "done": self.n_done,
            "overhead_median_s": {k: statistics.median(v) for k, v in self._overhead.items() if v},
            "overhead_samples_s": {k: list(v) for k, v in self._overhead.items()},
        }
