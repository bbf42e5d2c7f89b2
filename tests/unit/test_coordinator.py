from __future__ import annotations

import json

from ppray.calib.results import summarize_calibration
from ppray.config import CalibSurveys
from ppray.instrument import load_instrument
from ppray.visit.aggregate import summarize_visit
from ppray.visit.coordinator import CoordinatorState, PrepareVisit, RetryDetector, RouteRaw

from .helpers import next_visit, raw


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_state(**kw: object) -> tuple[CoordinatorState, Clock]:
    clock = Clock()
    return CoordinatorState(load_instrument("synthetic"), clock=clock, **kw), clock  # type: ignore[arg-type]


def test_next_visit_broadcasts_prepare_to_all_detectors() -> None:
    state, _ = make_state()
    d = state.on_next_visit(next_visit())
    assert len(d.actions) == 1 and isinstance(d.actions[0], PrepareVisit)
    assert d.actions[0].detectors == ("R22_S00", "R22_S01", "R22_S10", "R22_S11")
    assert [e.kind for e in d.events] == ["visit_accepted"]


def test_duplicate_next_visit_is_deduped_in_flight_and_after_done() -> None:
    state, _ = make_state()
    visit = next_visit()
    state.on_next_visit(visit)
    again = state.on_next_visit(next_visit(salIndex=3))  # same instrument+groupId
    assert again.actions == [] and [e.kind for e in again.events] == ["visit_duplicate"]
    state.on_visit_done(summarize_visit(visit.instrument, visit.groupId, state.detectors, []))
    late = state.on_next_visit(visit)
    assert late.actions == [] and late.events[0].kind == "visit_duplicate"


def test_other_instrument_is_rejected() -> None:
    state, _ = make_state()
    d = state.on_next_visit(next_visit(instrument="LSSTCam"))
    assert d.actions == [] and d.events[0].kind == "visit_rejected"


def test_raw_is_routed_to_its_detector() -> None:
    state, _ = make_state()
    state.on_next_visit(next_visit())
    d = state.on_raw(raw("R22_S10"))
    assert isinstance(d.actions[0], RouteRaw) and d.actions[0].raw.detector == "R22_S10"
    dup = state.on_raw(raw("R22_S10"))
    assert dup.actions == [] and dup.events[0].kind == "raw_rejected"


def test_raw_before_next_visit_is_buffered_then_released() -> None:
    state, _ = make_state()
    early = state.on_raw(raw("R22_S01"))
    assert early.actions == [] and early.events[0].kind == "raw_buffered"
    d = state.on_next_visit(next_visit())
    kinds = [type(a).__name__ for a in d.actions]
    assert kinds == ["PrepareVisit", "RouteRaw"]
    assert state.buffered == {}


def test_buffered_raw_expires_with_an_error_event() -> None:
    state, clock = make_state(raw_buffer_ttl_s=10.0)
    state.on_raw(raw("R22_S01", arrived_at=clock.now))
    clock.now += 5
    assert state.expire_buffered() == []
    clock.now += 6
    events = state.expire_buffered()
    assert [e.kind for e in events] == ["raw_rejected"] and events[0].level == "error"
    assert events[0].data["expired"] is True  # the runtime may now ack its input
    assert state.buffered == {}


def test_unplaceable_raws_are_rejected_not_raised() -> None:
    state, _ = make_state(detectors=("R22_S00", "R22_S01"))
    state.on_next_visit(next_visit())
    for bad in (raw("R99_S99"), raw("R22_S11"), raw(instrument="LSSTCam")):
        d = state.on_raw(bad)
        assert d.actions == [] and d.events[0].kind == "raw_rejected", bad


def test_snapshot_restore_keeps_visits_and_buffers() -> None:
    state, _ = make_state()
    visit = next_visit()
    state.on_next_visit(visit)
    state.on_raw(raw("R22_S00"))
    state.on_raw(raw("R22_S00", group="other-group"))
    restored, _ = make_state()
    again = restored.restore(json.loads(json.dumps(state.snapshot())))
    assert again.actions == [
        PrepareVisit(visit, restored.detectors),
        RouteRaw(state.in_flight[visit.key].routed["R22_S00"][0]),
    ]
    assert restored.in_flight[visit.key].raws == {"R22_S00": {0}}
    assert sum(len(v) for v in restored.buffered.values()) == 1
    assert restored.on_next_visit(visit).events[0].kind == "visit_duplicate"


def test_visits_beyond_the_bound_queue_then_start_in_order() -> None:
    state, _ = make_state(max_in_flight=1, max_backlog=2)
    first, second, third, fourth = (next_visit(groupId=f"g{i}") for i in range(4))
    assert [e.kind for e in state.on_next_visit(first).events] == ["visit_accepted"]
    queued = state.on_next_visit(second)
    assert queued.actions == [] and [e.kind for e in queued.events] == ["visit_queued"]
    assert queued.events[0].data["backlog"] == 1
    # A raw of a queued visit waits (and is not expired for waiting) until it starts.
    assert [e.kind for e in state.on_raw(raw("R22_S00", group="g1")).events] == ["raw_buffered"]
    assert state.on_next_visit(second).events[0].kind == "visit_duplicate"
    state.on_next_visit(third)
    # Beyond the backlog: rejected loudly, not dropped silently.
    rejected = state.on_next_visit(fourth).events[0]
    assert rejected.kind == "visit_rejected" and rejected.level == "error"
    assert "backlog full" in rejected.message
    assert state.admit().actions == []  # no room yet
    state.on_visit_done(summarize_visit(first.instrument, first.groupId, state.detectors, []))
    started = state.admit()
    assert [type(a).__name__ for a in started.actions] == ["PrepareVisit", "RouteRaw"]
    assert started.actions[0].visit == second  # type: ignore[union-attr]
    assert list(state.queued) == [third.key]


def test_snapshot_keeps_queued_visits() -> None:
    state, _ = make_state(max_in_flight=1)
    first, second = next_visit(groupId="a"), next_visit(groupId="b")
    state.on_next_visit(first)
    state.on_next_visit(second)
    restored, _ = make_state(max_in_flight=1)
    restored.restore(json.loads(json.dumps(state.snapshot())))
    assert list(restored.queued) == [second.key] and list(restored.in_flight) == [first.key]


def test_calibration_sequences_are_prepared_and_retired_like_visits() -> None:
    state, _ = make_state(calib_surveys=CalibSurveys(flat="DOME-FLAT"))
    flat = next_visit(survey="DOME-FLAT", nimages=3)
    d = state.on_next_visit(flat)
    assert d.actions == [PrepareVisit(flat, state.detectors, "flat")]
    assert d.events[0].data["calibration"] == "flat"
    science = next_visit(groupId="science", survey="CALIB-FLAT")  # not a survey of this deployment
    assert state.on_next_visit(science).actions[0].calibration is None  # type: ignore[union-attr]
    for snap in range(3):
        routed = state.on_raw(raw("R22_S00", snap=snap))
        assert isinstance(routed.actions[0], RouteRaw)
    # A restarted coordinator prepares it as a flat sequence again.
    restored, _ = make_state(calib_surveys=CalibSurveys(flat="DOME-FLAT"))
    again = restored.restore(json.loads(json.dumps(state.snapshot())))
    assert PrepareVisit(flat, restored.detectors, "flat") in again.actions
    summary = summarize_calibration(
        flat.instrument, flat.groupId, "flat", state.detectors, [], done_at=200.0
    )
    event = state.on_calib_done(summary)
    assert event.kind == "calib_done" and event.level == "warning"
    assert event.data["calibration"] == "flat" and event.data["n_retriable"] == 4
    assert flat.key not in state.in_flight
    assert state.on_next_visit(flat).events[0].kind == "visit_duplicate"


def test_a_dead_worker_is_redone_with_its_raws_until_retries_run_out() -> None:
    state, _ = make_state(detector_retries=2)
    visit = next_visit()
    state.on_next_visit(visit)
    state.on_raw(raw(detector="R22_S01"))
    first = state.on_worker_died(visit.key, "R22_S01", "ActorDiedError")
    assert [e.kind for e in first.events] == ["retried"]
    (retry,) = first.actions
    assert isinstance(retry, RetryDetector)
    assert (retry.detector, retry.attempt) == ("R22_S01", 1)
    assert [r.detector for r in state.routed_raws(visit.key, "R22_S01")] == ["R22_S01"]
    # A raw routed while the worker restarts is among those the retry sends, once it is back.
    state.on_raw(raw(detector="R22_S01", snap=1))
    assert [r.snap for r in state.routed_raws(visit.key, "R22_S01")] == [0, 1]
    assert state.routed_raws(visit.key, "R22_S00") == ()
    second = state.on_worker_died(visit.key, "R22_S01", "ActorDiedError")
    assert [a.attempt for a in second.actions if isinstance(a, RetryDetector)] == [2]
    # Out of retries: nothing to do, and no "retried" event; the gather reports the failure.
    third = state.on_worker_died(visit.key, "R22_S01", "ActorDiedError")
    assert third.actions == [] and third.events == []
    # Another detector of the same visit has its own count.
    other = state.on_worker_died(visit.key, "R22_S00", "ActorDiedError")
    assert [a.attempt for a in other.actions if isinstance(a, RetryDetector)] == [1]


def test_no_retry_for_a_finished_visit_or_an_unknown_detector() -> None:
    state, _ = make_state()
    visit = next_visit()
    state.on_next_visit(visit)
    assert state.on_worker_died(visit.key, "R01_S00", "x").actions == []
    state.on_visit_done(summarize_visit(visit.instrument, visit.groupId, state.detectors, []))
    assert state.on_worker_died(visit.key, "R22_S01", "x").actions == []


def test_retry_attempts_survive_a_snapshot() -> None:
    state, _ = make_state(detector_retries=1)
    visit = next_visit()
    state.on_next_visit(visit)
    state.on_worker_died(visit.key, "R22_S01", "x")
    restored, _ = make_state(detector_retries=1)
    restored.restore(json.loads(json.dumps(state.snapshot())))
    assert restored.on_worker_died(visit.key, "R22_S01", "x").actions == []
