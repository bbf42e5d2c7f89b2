"""``VisitCoordinator``: a thin actor around :class:`ppray.visit.coordinator.CoordinatorState`.

Calibration sequences go through the same calls: prepared, routed and
tracked as visits, gathered by the aggregator's ``gather_calib`` into a
:class:`~ppray.calib.results.CalibSummary` and retired with ``calib_done``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import ray

from ppray.calib.results import CalibSummary
from ppray.config import DeploymentConfig
from ppray.instrument import load_instrument
from ppray.messages import Event, NextVisit, RawArrival, VisitKey, VisitSummary
from ppray.messaging import EventLog
from ppray.visit.coordinator import (
    CoordinatorState,
    Decision,
    PrepareVisit,
    RetryDetector,
    RouteRaw,
)

from .calls import ActorCallFailed, ActorDied, resolve, wait_restarted
from .metrics import CoordinatorMetrics
from .snapshots import read_snapshot, write_snapshot

__all__ = ["AGGREGATOR_NAME", "COORDINATOR_NAME", "VisitCoordinator", "worker_name"]

log = logging.getLogger(__name__)

COORDINATOR_NAME = "coordinator"
AGGREGATOR_NAME = "aggregator-0"
# Events kept in the snapshot, so that a reader's sequence survives a restart.
_SNAPSHOT_EVENTS = 500
_SNAPSHOT_EVERY_S = 0.2
# How long a retry waits for Ray to bring a dead worker back.
_RESTART_WAIT_S = 60.0


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

    Its state is snapshotted (at most every 0.2 s) to Ray's key-value store; when
    Ray restarts it, it continues from the snapshot: visits in flight are prepared
    and their raws routed again (both idempotent on the workers), the event
    sequence continues, and a detector whose worker died is re-run
    (:meth:`retry_detector`, called by the aggregator).
    """

    def __init__(self, config: DeploymentConfig, detectors: tuple[str, ...]) -> None:
        config.s3.configure()  # how s3:// roots are reached, in this process
        self.config = config
        ns = config.namespace
        self.workers = {d: ray.get_actor(worker_name(d), namespace=ns) for d in detectors}
        self.aggregator = ray.get_actor(AGGREGATOR_NAME, namespace=ns)
        self.state = CoordinatorState(
            load_instrument(config.instrument),
            detectors,
            raw_buffer_ttl_s=config.raw_buffer_ttl_s,
            remembered_visits=config.remembered_visits,
            max_in_flight=config.max_visits_in_flight,
            max_backlog=config.max_visit_backlog,
            calib_surveys=config.calibration.surveys,
            detector_retries=config.detector_retries,
        )
        self.log = EventLog()
        self.metrics = CoordinatorMetrics(config.namespace)
        self.n_done = 0
        self.n_retries = 0
        self._done: dict[VisitKey, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._overhead: dict[str, list[float]] = {"prepare_broadcast_s": [], "route_raw_s": []}
        self._started = False
        self._dirty = False
        self._restored = self._restore()

    def _restore(self) -> Decision:
        """Continue from the snapshot a previous incarnation left (none on a fresh deploy)."""
        snap = read_snapshot(self.config.namespace)
        if snap is None:
            return Decision()
        decision = self.state.restore(snap["state"])
        self.log.restore(snap["events"])
        self.n_done = int(snap.get("n_done", 0))
        self.n_retries = int(snap.get("n_retries", 0))
        log.warning(
            "coordinator restarted: %d visits in flight and %d queued restored",
            len(self.state.in_flight),
            len(self.state.queued),
        )
        return decision

    def _ensure_started(self) -> None:
        """Start the background loops and re-drive restored visits, once, in the event loop.

        Every entry point calls this: after a restart Ray runs only ``__init__``, and
        the first call (the pump polls events continually) brings the actor back to work.
        """
        if self._started:
            return
        self._started = True
        self._spawn(self._expire_loop())
        self._spawn(self._snapshot_loop())
        self._act(self._restored)
        self._restored = Decision()
        self._set_gauges()

    async def ready(self) -> bool:
        self._ensure_started()
        return True

    def _emit(self, event: Event) -> None:
        self.log.emit(event)
        self._dirty = True
        self.metrics.event(event)
        self._set_gauges()

    def _set_gauges(self) -> None:
        self.metrics.set_in_flight(len(self.state.in_flight))
        self.metrics.set_backlog(len(self.state.queued))
        self.metrics.set_buffered_raws(sum(len(v) for v in self.state.buffered.values()))

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.config.raw_buffer_ttl_s / 4))
            for event in self.state.expire_buffered():
                self._emit(event)

    async def _snapshot_loop(self) -> None:
        # Every state change emits an event, so "an event since the last write" is the
        # trigger; a crash loses at most this interval, which re-delivery and the
        # workers' idempotent prepare/raw_arrived/result cover.
        while True:
            await asyncio.sleep(_SNAPSHOT_EVERY_S)
            if not self._dirty:
                continue
            self._dirty = False
            snap = {
                "state": self.state.snapshot(),
                "events": self.log.tail(_SNAPSHOT_EVENTS),
                "n_done": self.n_done,
                "n_retries": self.n_retries,
            }
            try:
                await asyncio.to_thread(write_snapshot, self.config.namespace, snap)
            except Exception as exc:  # the service goes on; only a restart would lose more
                log.error("coordinator snapshot not written: %s", exc)
                self._dirty = True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def next_visit(self, visit: NextVisit) -> list[str]:
        """Accept, queue or dedup a visit; returns the kinds of the events it caused."""
        self._ensure_started()
        return self._act(self.state.on_next_visit(visit))

    async def raw_arrived(self, raw: RawArrival) -> list[str]:
        """Route (or buffer, or reject) a raw; returns the kinds of the events it caused."""
        self._ensure_started()
        return self._act(self.state.on_raw(raw))

    async def backlog(self) -> int:
        """Visits queued behind the ``max_visits_in_flight`` bound."""
        self._ensure_started()
        return len(self.state.queued)

    def _act(self, decision: Decision) -> list[str]:
        for event in decision.events:
            self._emit(event)
        for action in decision.actions:
            if isinstance(action, PrepareVisit):
                self._start_visit(action)
            elif isinstance(action, RouteRaw):
                self._spawn(self._route(action.raw))
            elif isinstance(action, RetryDetector):  # pragma: no cover - retry_detector acts
                raise TypeError("RetryDetector is carried out by retry_detector")
        return [e.kind for e in decision.events]

    def _start_visit(self, action: PrepareVisit) -> None:
        visit = action.visit
        self._done.setdefault(visit.key, asyncio.Event())
        start = time.perf_counter()
        prepares = {d: self.workers[d].prepare.remote(visit) for d in action.detectors}
        # Submitted right after the prepares: each worker sees prepare, then result.
        gather = self._gather(visit, action.detectors, action.calibration)
        self._spawn(self._await_prepared(visit, prepares, start))
        self._spawn(self._await_visit(visit, action.detectors, gather))

    def _gather(
        self, visit: NextVisit, detectors: tuple[str, ...], calibration: str | None = None
    ) -> Any:
        results = {d: self.workers[d].result.remote(visit) for d in detectors}
        if calibration is not None:
            return self.aggregator.gather_calib.remote(visit, calibration, list(detectors), results)
        return self.aggregator.gather.remote(visit, list(detectors), results)

    async def retry_detector(self, visit: NextVisit, detector: str, reason: str) -> list[Any]:
        """The aggregator reports that ``detector``'s worker died under ``visit``;
        returns ``[ref]`` of the redone detector's new ``result``, or [] if it is not
        redone.

        Whether it is redone is :meth:`CoordinatorState.on_worker_died`'s decision
        (retries left, visit still in flight). If so this waits for Ray to restart
        the worker (it reloads its calibrations in ``__init__``), sends it the
        visit's ``prepare`` and every raw routed to it so far, and asks for its
        result again (in a list, so that Ray passes the reference on unresolved).
        Raws that arrive later are routed to the new worker as usual. Outputs are
        keyed by visit and detector, so the re-run replaces, never adds.
        """
        self._ensure_started()
        decision = self.state.on_worker_died(visit.key, detector, reason)
        for event in decision.events:
            self._emit(event)
        retries = [a for a in decision.actions if isinstance(a, RetryDetector)]
        if not retries:
            return []
        retry = retries[0]
        self.n_retries += 1
        self.metrics.retried(detector)
        worker = self.workers[detector]
        if not await wait_restarted(worker, _RESTART_WAIT_S):
            log.error("%s %s: worker did not come back", visit.key, detector)
            return []
        worker.prepare.remote(retry.visit)  # its failure, if any, comes back through result
        # Asked now, not at the decision: a raw routed during the restart did not get there.
        for raw in self.state.routed_raws(visit.key, detector):
            worker.raw_arrived.remote(raw)
        return [worker.result.remote(retry.visit)]

    async def _await_prepared(self, visit: NextVisit, refs: dict[str, Any], start: float) -> None:
        outcomes = await asyncio.gather(*refs.values(), return_exceptions=True)
        elapsed = time.perf_counter() - start
        self._overhead["prepare_broadcast_s"].append(elapsed)
        failed = {
            d: str(o) for d, o in zip(refs, outcomes, strict=True) if isinstance(o, BaseException)
        }
        preload = [o for o in outcomes if isinstance(o, float)]
        self.metrics.preloaded(max(preload, default=0.0), elapsed)
        self._emit(
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
            await resolve(self.workers[raw.detector].raw_arrived.remote(raw))
        except ActorCallFailed as exc:
            # The worker died: its ``result`` fails too, and the retry re-sends this raw.
            log.warning("%s %s: raw not delivered: %s", raw.key, raw.detector, exc)
            return
        self._overhead["route_raw_s"].append(time.perf_counter() - start)

    async def _await_visit(self, visit: NextVisit, detectors: tuple[str, ...], gather: Any) -> None:
        key = visit.key
        calibration = self.state.calibration_kind(visit)
        try:
            summary: VisitSummary | CalibSummary = await resolve(gather)
        except ActorDied as exc:
            # The aggregator died mid-gather and Ray restarted it: gather again (the
            # workers hand back the results they already computed).
            log.warning("visit %s: aggregator died (%s); gathering again", key, exc)
            try:
                summary = await resolve(self._gather(visit, detectors, calibration))
            except ActorCallFailed as again:
                return self._gather_failed(key, again)
        except ActorCallFailed as exc:
            return self._gather_failed(key, exc)
        if isinstance(summary, CalibSummary):
            self.metrics.calib_done(summary)
            for result_event in self._calib_events(summary):
                self._emit(result_event)
            self._emit(self.state.on_calib_done(summary))
        else:
            self.metrics.visit_done(summary)
            for result_event in self._detector_events(summary, "processed"):
                self._emit(result_event)
            self._emit(self.state.on_visit_done(summary))
        self._act(self.state.admit())
        self._set_gauges()
        self.n_done += 1
        # Waiters hold the event; the summary itself is in state.done, bounded there.
        done = self._done.pop(key, None)
        if done is not None:
            done.set()

    def _gather_failed(self, key: VisitKey, exc: Exception) -> None:
        log.error("visit %s: aggregator failed: %s", key, exc)
        self._emit(
            Event(
                kind="failed",
                instrument=key.instrument,
                group_id=key.group_id,
                level="error",
                message=f"aggregator failed: {exc}",
            )
        )

    @staticmethod
    def _detector_events(
        summary: VisitSummary | CalibSummary,
        ok_kind: str,
        data: Callable[[str], dict[str, Any]] = lambda det: {},
    ) -> list[Event]:
        """Per detector: ``ok_kind``, or why not; each with ``data(detector)``."""
        kinds = {"ok": ok_kind, "failed": "failed", "timed_out": "timed_out"}
        return [
            Event(
                kind=kinds[status],  # type: ignore[arg-type]
                instrument=summary.instrument,
                group_id=summary.group_id,
                detector=det,
                level="info" if status == "ok" else "error",
                message=summary.reasons.get(det, ""),
                data=data(det),
            )
            for det, status in summary.detectors.items()
        ]

    @classmethod
    def _calib_events(cls, summary: CalibSummary) -> list[Event]:
        """Per detector: ``calib_certified`` with its products and quality, or why not."""
        return cls._detector_events(
            summary,
            "calib_certified",
            lambda det: {
                "calibration": summary.kind,
                "quality": summary.quality.get(det, {}),
                "n_inputs": summary.n_inputs.get(det, 0),
                "focal_plane_factor": summary.focal_plane_factors.get(det),
            },
        )

    async def events_since(self, seq: int) -> tuple[int, list[Event]]:
        """Events numbered ``>= seq`` and the next sequence number."""
        self._ensure_started()
        return self.log.since(seq)

    async def wait_visit(
        self, instrument: str, group_id: str, timeout_s: float
    ) -> VisitSummary | CalibSummary | None:
        """The visit's (or calibration sequence's) summary once done, or None after
        ``timeout_s``."""
        self._ensure_started()
        key = VisitKey(instrument=instrument, group_id=group_id)
        if key not in self.state.done:
            event = self._done.setdefault(key, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
            except TimeoutError:
                if key not in self.state.in_flight and key not in self.state.queued:
                    self._done.pop(key, None)  # nobody will set it: do not keep it
                return None
        return self.state.done.get(key)

    async def status(self) -> dict[str, Any]:
        """Visits in flight and queued, buffered raws, finished visits, overhead medians."""
        self._ensure_started()
        return {
            "in_flight": [str(k) for k in self.state.in_flight],
            "queued": [str(k) for k in self.state.queued],
            "retries": self.n_retries,
            "pid": os.getpid(),
            "buffered_raws": sum(len(v) for v in self.state.buffered.values()),
            "done": self.n_done,
            "overhead_median_s": {k: statistics.median(v) for k, v in self._overhead.items() if v},
            "overhead_samples_s": {k: list(v) for k, v in self._overhead.items()},
        }
