"""Visit coordination as a plain state machine: it decides, the actor does the I/O.

:class:`CoordinatorState` takes ``next_visit`` messages and raw arrivals and
returns the actions to carry out (prepare a visit on its detectors, route a
raw to its detector) together with the events to emit. It dedups visits by
``(instrument, groupId)``, buffers raws that arrive before their
``next_visit``, rejects raws it cannot place, and can ``snapshot()`` and be
restored so that a restarted coordinator keeps its visits.

Calibration sequences are visits too: a ``next_visit`` whose ``survey`` is one
of ``calibration.surveys`` (bias, dark, flat) is prepared, fed its raws and
tracked exactly like a science visit; :class:`PrepareVisit` says which kind it
is so that the runtime gathers it as a calibration (:meth:`on_calib_done`
retires it with a ``calib_done`` event).

Backpressure: at most ``max_in_flight`` visits are prepared at once; later ones
wait in a FIFO of at most ``max_backlog`` (``visit_queued``) and start as earlier
ones finish (:meth:`CoordinatorState.admit`). A visit beyond that bound is
rejected with an error event, never dropped silently; the runtime stops reading
its source well before that (see :func:`actors.runtime.pump`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ppray.config import CalibSurveys
from ppray.instrument import Instrument
from ppray.messages import Event, NextVisit, RawArrival, VisitKey, VisitSummary
from ppray.visit.slots import BoundedLRU

if TYPE_CHECKING:
    from ppray.calib.results import CalibSummary

__all__ = [
    "CoordinatorState",
    "Decision",
    "PrepareVisit",
    "RetryDetector",
    "RouteRaw",
    "VisitState",
]


@dataclass(frozen=True)
class PrepareVisit:
    """Broadcast ``prepare`` for ``visit`` to these detectors.

    ``calibration`` is the kind of a calibration sequence (``bias``, ``dark``,
    ``flat``), None for a science visit.
    """

    visit: NextVisit
    detectors: tuple[str, ...]
    calibration: str | None = None


@dataclass(frozen=True)
class RouteRaw:
    """Hand ``raw`` to the worker of ``raw.detector``."""

    raw: RawArrival


@dataclass(frozen=True)
class RetryDetector:
    """Redo ``detector`` of ``visit`` on its restarted worker: ``prepare`` again, then
    every raw routed to it so far (:meth:`CoordinatorState.routed_raws`, asked once the
    worker is back), then ask for its result again."""

    visit: NextVisit
    detector: str
    attempt: int


@dataclass
class Decision:
    """What the runtime must do after one input, in order."""

    actions: list[PrepareVisit | RouteRaw | RetryDetector] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def extend(self, other: Decision) -> None:
        """Append ``other``'s actions and events (after this one's)."""
        self.actions.extend(other.actions)
        self.events.extend(other.events)


@dataclass
class VisitState:
    """Book-keeping of one visit in flight."""

    visit: NextVisit
    detectors: tuple[str, ...]
    accepted_at: float
    raws: dict[str, set[int]] = field(default_factory=dict)
    # What was routed, per detector: re-sent to a worker that restarted mid-visit.
    routed: dict[str, list[RawArrival]] = field(default_factory=dict)
    last_raw_at: float | None = None
    # Re-runs of a detector whose worker died under this visit.
    attempts: dict[str, int] = field(default_factory=dict)


class CoordinatorState:
    """The coordinator's decisions, without Ray.

    Parameters
    ----------
    instrument
        The instrument this coordinator serves.
    detectors
        Detectors in play (default: all of the instrument's).
    raw_buffer_ttl_s
        How long a raw waits for its ``next_visit`` before it is dropped with an error event.
    remembered_visits
        How many finished visits are remembered, so that a late duplicate is still caught.
    max_in_flight
        Visits prepared at once (None: no bound); later ones are queued.
    max_backlog
        Visits queued at most; one beyond is rejected with an error event.
    calib_surveys
        The surveys that announce calibration sequences (default: ``CalibSurveys()``).
    detector_retries
        How often a detector is redone when its worker dies under a visit.
    clock
        Time source (seconds), injectable for tests.
    """

    def __init__(
        self,
        instrument: Instrument,
        detectors: tuple[str, ...] | None = None,
        *,
        raw_buffer_ttl_s: float = 300.0,
        remembered_visits: int = 1000,
        max_in_flight: int | None = None,
        max_backlog: int = 100,
        calib_surveys: CalibSurveys | None = None,
        detector_retries: int = 1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.instrument = instrument
        if detectors is not None:
            unknown = [d for d in detectors if not instrument.has_detector(d)]
            if unknown:
                raise ValueError(f"{instrument.name} has no detectors {unknown}")
        self.detectors = tuple(detectors) if detectors else instrument.detector_names
        self.raw_buffer_ttl_s = raw_buffer_ttl_s
        self.remembered_visits = remembered_visits
        self.max_in_flight = max_in_flight
        self.max_backlog = max_backlog
        self.calib_surveys = calib_surveys if calib_surveys is not None else CalibSurveys()
        self.detector_retries = detector_retries
        self.clock = clock
        self.in_flight: dict[VisitKey, VisitState] = {}
        self.queued: OrderedDict[VisitKey, NextVisit] = OrderedDict()
        # Finished visits, for dedup and for ``wait_visit`` (None: restored from a snapshot).
        self.done: BoundedLRU[VisitKey, VisitSummary | CalibSummary | None] = BoundedLRU(
            remembered_visits
        )
        self.buffered: dict[VisitKey, list[RawArrival]] = {}

    def calibration_kind(self, visit: NextVisit) -> str | None:
        """``bias``, ``dark`` or ``flat`` for a calibration sequence; None for a science visit."""
        return self.calib_surveys.kind_of(visit.survey)

    def _event(self, kind: Any, key: VisitKey, **kw: Any) -> Event:
        return Event(
            kind=kind, time=self.clock(), instrument=key.instrument, group_id=key.group_id, **kw
        )

    def _rejected(
        self, raw: RawArrival, reason: str, level: Any = "error", expired: bool = False
    ) -> Event:
        # ``expired``: a buffered raw whose next_visit never came (its input may be acked).
        return self._event(
            "raw_rejected",
            raw.key,
            detector=raw.detector,
            level=level,
            message=reason,
            data={"uri": raw.uri, "expired": expired},
        )

    def on_next_visit(self, visit: NextVisit) -> Decision:
        """Accept a new visit (and release raws that were waiting for it), or dedup it."""
        key = visit.key
        decision = Decision()
        if visit.instrument != self.instrument.name:
            decision.events.append(
                self._event(
                    "visit_rejected",
                    key,
                    level="warning",
                    message=f"instrument {visit.instrument!r} is not {self.instrument.name!r}",
                )
            )
            return decision
        if key in self.in_flight or key in self.done or key in self.queued:
            decision.events.append(
                self._event(
                    "visit_duplicate", key, message="next_visit for a known groupId ignored"
                )
            )
            return decision
        if self.max_in_flight is not None and len(self.in_flight) >= self.max_in_flight:
            if len(self.queued) >= self.max_backlog:
                decision.events.append(
                    self._event(
                        "visit_rejected",
                        key,
                        level="error",
                        message=f"backlog full: {len(self.in_flight)} visits in flight and "
                        f"{len(self.queued)} queued (max_visit_backlog)",
                    )
                )
                return decision
            self.queued[key] = visit
            decision.events.append(
                self._event(
                    "visit_queued",
                    key,
                    level="warning",
                    message="visits in flight at their bound; queued",
                    data={"backlog": len(self.queued), "in_flight": len(self.in_flight)},
                )
            )
            return decision
        return self._accept(visit)

    def admit(self) -> Decision:
        """Start queued visits while there is room (call after a visit finished)."""
        decision = Decision()
        while self.queued and (
            self.max_in_flight is None or len(self.in_flight) < self.max_in_flight
        ):
            _, visit = self.queued.popitem(last=False)
            decision.extend(self._accept(visit))
        return decision

    def _accept(self, visit: NextVisit) -> Decision:
        key = visit.key
        decision = Decision()
        self.in_flight[key] = VisitState(visit, self.detectors, accepted_at=self.clock())
        calibration = self.calibration_kind(visit)
        decision.actions.append(PrepareVisit(visit, self.detectors, calibration))
        decision.events.append(
            self._event(
                "visit_accepted",
                key,
                data={
                    "detectors": len(self.detectors),
                    "nimages": visit.nimages,
                    "filters": visit.filters,
                    "survey": visit.survey,
                    "calibration": calibration,
                },
            )
        )
        for raw in self.buffered.pop(key, []):
            decision.extend(self.on_raw(raw))
        return decision

    def on_raw(self, raw: RawArrival) -> Decision:
        """Route a raw to its detector, buffer it until its visit is known, or reject it."""
        key = raw.key
        decision = Decision()
        if raw.instrument != self.instrument.name:
            reason = f"instrument {raw.instrument!r} is not {self.instrument.name!r}"
        elif not self.instrument.has_detector(raw.detector):
            reason = f"{self.instrument.name} has no detector {raw.detector!r}"
        elif raw.detector not in self.detectors:
            reason = f"detector {raw.detector} is not in play"
        elif key in self.done:
            reason = "visit already finished"
        else:
            reason = ""
        if reason:
            decision.events.append(self._rejected(raw, reason))
            return decision
        state = self.in_flight.get(key)
        if state is None:
            self.buffered.setdefault(key, []).append(raw)
            decision.events.append(
                self._event(
                    "raw_buffered",
                    key,
                    detector=raw.detector,
                    message="raw arrived before its next_visit; buffered",
                )
            )
            return decision
        snaps = state.raws.setdefault(raw.detector, set())
        if raw.snap in snaps:
            decision.events.append(
                self._rejected(raw, f"duplicate raw for snap {raw.snap}", level="warning")
            )
            return decision
        snaps.add(raw.snap)
        state.routed.setdefault(raw.detector, []).append(raw)
        state.last_raw_at = max(state.last_raw_at or 0.0, raw.arrived_at)
        decision.actions.append(RouteRaw(raw))
        decision.events.append(
            self._event(
                "raw_arrived",
                key,
                detector=raw.detector,
                data={"snap": raw.snap, "exposure_id": raw.exposure_id},
            )
        )
        return decision

    def _retire(self, summary: VisitSummary | CalibSummary) -> VisitKey:
        key = VisitKey(instrument=summary.instrument, group_id=summary.group_id)
        self.in_flight.pop(key, None)
        self.done.put(key, summary)
        return key

    def on_calib_done(self, summary: CalibSummary) -> Event:
        """Retire a calibration sequence: ``calib_done`` with its products and quality,
        or ``timed_out`` when no detector got all its raws."""
        key = self._retire(summary)
        kind = "calib_done" if summary.n_timed_out < summary.n_expected else "timed_out"
        return self._event(
            kind,
            key,
            level="info" if summary.n_ok == summary.n_expected else "warning",
            message=f"{summary.kind} sequence: {summary.n_ok} of {summary.n_expected} certified",
            data={
                "calibration": summary.kind,
                "band": summary.band,
                "n_ok": summary.n_ok,
                "n_failed": summary.n_failed,
                "n_timed_out": summary.n_timed_out,
                "n_retriable": summary.n_retriable,
                "calib_ids": summary.calib_ids,
                "valid_from": summary.valid_from,
                "valid_to": summary.valid_to,
                "quality": summary.quality,
                "focal_plane_factors": summary.focal_plane_factors,
                "combiner_peak_bytes": summary.combiner_peak_bytes,
                "latency_s": summary.latency_s,
            },
        )

    def on_visit_done(self, summary: VisitSummary) -> Event:
        """Retire a visit; remember it for dedup."""
        key = self._retire(summary)
        kind = "visit_done" if summary.n_timed_out < summary.n_expected else "timed_out"
        return self._event(
            kind,
            key,
            level="info" if summary.n_failed == 0 else "warning",
            data={
                "n_ok": summary.n_ok,
                "n_failed": summary.n_failed,
                "n_timed_out": summary.n_timed_out,
                "n_retriable": summary.n_retriable,
                "n_sources": summary.n_sources,
                "latency_s": summary.latency_s,
            },
        )

    def on_worker_died(self, key: VisitKey, detector: str, reason: str) -> Decision:
        """A detector's worker died under visit ``key``: redo it, or give up.

        Redone (a :class:`RetryDetector` and a ``retried`` event) while the
        visit is in flight and the detector has retries left
        (``detector_retries``); otherwise the decision is empty and the
        detector's result is a failure, which the gather reports.
        """
        decision = Decision()
        state = self.in_flight.get(key)
        if state is None or detector not in state.detectors:
            return decision
        attempt = state.attempts.get(detector, 0) + 1
        if attempt > self.detector_retries:
            return decision
        state.attempts[detector] = attempt
        decision.actions.append(RetryDetector(state.visit, detector, attempt))
        decision.events.append(
            self._event(
                "retried",
                key,
                detector=detector,
                level="warning",
                message=f"worker died mid-visit ({reason}); re-running, attempt {attempt}",
            )
        )
        return decision

    def routed_raws(self, key: VisitKey, detector: str) -> tuple[RawArrival, ...]:
        """Every raw routed to ``detector`` for visit ``key`` so far (none once it is over).

        A retry asks this after its worker is back, not when it decides: raws routed
        while Ray restarts the worker fail to reach it, and must be in what it re-sends.
        """
        state = self.in_flight.get(key)
        return tuple(state.routed.get(detector, [])) if state is not None else ()

    def expire_buffered(self) -> list[Event]:
        """Drop raws that waited longer than ``raw_buffer_ttl_s`` for their next_visit."""
        now = self.clock()
        events = []
        for key in list(self.buffered):
            if key in self.queued:  # its next_visit came: it waits for room, not for that
                continue
            keep = []
            for raw in self.buffered[key]:
                if now - raw.arrived_at > self.raw_buffer_ttl_s:
                    events.append(
                        self._rejected(
                            raw, f"no next_visit within {self.raw_buffer_ttl_s:g} s", expired=True
                        )
                    )
                else:
                    keep.append(raw)
            if keep:
                self.buffered[key] = keep
            else:
                del self.buffered[key]
        return events

    def snapshot(self) -> dict[str, Any]:
        """A JSON-safe snapshot of visits in flight and buffered raws."""
        return {
            "in_flight": [
                {
                    "visit": s.visit.model_dump(mode="json"),
                    "accepted_at": s.accepted_at,
                    "routed": [r.model_dump(mode="json") for rs in s.routed.values() for r in rs],
                    "last_raw_at": s.last_raw_at,
                    "attempts": dict(s.attempts),
                }
                for s in self.in_flight.values()
            ],
            "queued": [v.model_dump(mode="json") for v in self.queued.values()],
            "buffered": [r.model_dump(mode="json") for rs in self.buffered.values() for r in rs],
            "done": [[k.instrument, k.group_id] for k in self.done],
        }

    def restore(self, snap: dict[str, Any]) -> Decision:
        """Load a snapshot; returns what to do again for the visits that were in flight.

        That is ``prepare`` on their detectors and every raw routed so far: both are
        idempotent on a worker, which may or may not still hold them.
        """
        decision = Decision()
        for item in snap.get("in_flight", []):
            visit = NextVisit.model_validate(item["visit"])
            state = VisitState(
                visit,
                self.detectors,
                accepted_at=item["accepted_at"],
                last_raw_at=item["last_raw_at"],
                attempts={d: int(n) for d, n in item.get("attempts", {}).items()},
            )
            for raw in item.get("routed", []):
                r = RawArrival.model_validate(raw)
                state.raws.setdefault(r.detector, set()).add(r.snap)
                state.routed.setdefault(r.detector, []).append(r)
            self.in_flight[visit.key] = state
            decision.actions.append(
                PrepareVisit(visit, self.detectors, self.calibration_kind(visit))
            )
            decision.actions.extend(RouteRaw(r) for rs in state.routed.values() for r in rs)
        for item in snap.get("queued", []):
            visit = NextVisit.model_validate(item)
            self.queued[visit.key] = visit
        for raw in snap.get("buffered", []):
            r = RawArrival.model_validate(raw)
            self.buffered.setdefault(r.key, []).append(r)
        for inst, group in snap.get("done", []):
            self.done.put(VisitKey(instrument=inst, group_id=group), None)
        return decision
