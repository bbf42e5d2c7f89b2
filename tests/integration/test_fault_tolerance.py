"""Losing a detector worker or the coordinator mid-visit loses nothing; backpressure."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray
from ppray.actors.runtime import Deployment, play_simulation
from ppray.actors.snapshots import read_snapshot

from ppray.alerts.sinks import read_alert_file
from ppray.config import DeploymentConfig
from ppray.layout import visit_prefix
from ppray.messages import NextVisit, RawArrival, VisitSummary
from ppray.messaging import InMemoryBus
from ppray.sim.observatory import SimulatedObservatory
from ppray.storage import Storage

from .cluster_helpers import pump_visits, simulated_deployment, wait_until

pytestmark = pytest.mark.integration


def processing(worker: Any, pid: int) -> bool:
    """Whether the worker, in process ``pid``, is processing a visit now."""
    try:
        status = ray.get(worker.ready.remote(), timeout=10)
    except ray.exceptions.RayActorError:
        return False  # while Ray restarts it
    return bool(status["processing"]) and status["pid"] == pid


def block_reads(raws: list[RawArrival]) -> Callable[[], None]:
    """Put a FIFO that nobody writes in place of each raw's file; returns what puts the
    files back.

    A worker that processes the visit blocks opening its raw (``open`` of a FIFO waits
    for a writer): it stays ``processing`` until it is killed, a state that lasts. The
    process it blocks in holds the FIFO; the files put back serve the re-run.
    """
    moves = []
    for raw in raws:
        assert raw.uri.startswith("file:"), raw.uri
        path = Path(url2pathname(urlparse(raw.uri).path))
        held = path.with_name(path.name + ".held")
        os.replace(path, held)
        os.mkfifo(path)
        moves.append((held, path))

    def put_back() -> None:
        for held, path in moves:
            os.replace(held, path)

    return put_back


def waiting_for_raws(worker: Any, pid: int = -1, not_pid: int = -1) -> int:
    """The worker's pid if it holds a prepared visit (in process ``pid``, or any but
    ``not_pid``), else 0. A visit stays there until all its raws came: a lasting state."""
    try:
        status = ray.get(worker.ready.remote(), timeout=10)
    except ray.exceptions.RayActorError:
        return 0  # while Ray restarts it
    now: int = status["pid"]
    if (pid != -1 and now != pid) or now == not_pid:
        return 0
    return now if status["visits"] >= 1 else 0


def retried(dep: Deployment, detector: str) -> int:
    """How many ``retried`` events the coordinator emitted for ``detector`` (only grows)."""
    return sum(e.kind == "retried" and e.detector == detector for e in dep.events_since(0)[1])


def snapshot_routed(namespace: str) -> int:
    """Raws routed in the coordinator's last snapshot (visits in flight)."""
    snap = read_snapshot(namespace)
    if snap is None:
        return 0
    return sum(len(v["routed"]) for v in snap["state"]["in_flight"])


def alerts_of(dep: Deployment, obs: SimulatedObservatory, visit: NextVisit) -> list[Any]:
    out = Storage(dep.config.output_root)
    return [
        alert
        for det in obs.detectors
        for alert in read_alert_file(out.read_bytes(f"alerts/{visit_prefix(visit)}/{det}.avro"))
    ]


def check_complete_and_unique(
    dep: Deployment, obs: SimulatedObservatory, visit: NextVisit, summary: VisitSummary | None
) -> None:
    """Every detector ok; every DIA source in the APDB once; one alert for each that is
    reliable enough (``alerts.min_reliability``), and none for the others."""
    assert summary is not None
    assert summary.detectors == dict.fromkeys(obs.detectors, "ok"), summary.reasons
    alerts = alerts_of(dep, obs, visit)
    ids = [a["diaSource"]["diaSourceId"] for a in alerts]
    assert len(set(ids)) == len(ids) == summary.n_alerts > 0
    visit_id = alerts[0]["diaSource"]["visit"]
    rows = [
        t.filter(pc.equal(t["visit"], visit_id)).select(["diaSourceId", "reliability"])
        for t in (s.dia_sources for s in ray.get([a.snapshot.remote() for a in dep.apdb_shards]))
        if t.num_rows
    ]
    stored = pa.concat_tables(rows).to_pydict()
    assert len(stored["diaSourceId"]) == len(set(stored["diaSourceId"])) == summary.n_dia_sources
    threshold = dep.config.alerts.min_reliability
    pairs = zip(stored["diaSourceId"], stored["reliability"], strict=True)
    reliable = {i for i, r in pairs if r >= threshold}
    assert set(ids) == reliable


def test_worker_killed_mid_visit_is_retried_once_without_duplicates(
    running: tuple[Deployment, SimulatedObservatory],
) -> None:
    dep, obs = running
    visit = obs.visit(0)
    victim = obs.detectors[1]
    worker = dep.workers[victim]
    old_pid = ray.get(worker.ready.remote())["pid"]
    start, _ = dep.events_since(0)
    assert ray.get(dep.coordinator.next_visit.remote(visit)) == ["visit_accepted"]
    raws = obs.expose(visit)
    # The victim cannot get past reading its raws: it is processing when it is killed.
    put_back = block_reads([r for r in raws if r.detector == victim])
    for raw in raws:
        ray.get(dep.coordinator.raw_arrived.remote(raw))
    wait_until(
        lambda: processing(worker, old_pid),
        90,
        f"{victim}'s worker processing (blocked reading its raw)",
        poll_s=0.1,
    )
    # Killed while it processes the visit's raws (the process dies; Ray restarts it).
    ray.kill(worker, no_restart=False)
    # The raws back before the re-run reads them (after Ray restarted the worker).
    put_back()
    summary = dep.wait_visit(visit, 120.0)
    check_complete_and_unique(dep, obs, visit, summary)
    status = ray.get(worker.ready.remote())
    assert status["pid"] != old_pid and status["loaded"]
    retried = [e for e in dep.events_since(start)[1] if e.kind == "retried"]
    assert [(e.detector, e.level) for e in retried] == [(victim, "warning")]
    # The restarted worker serves the next visit as usual.
    visit2 = obs.visit(1)
    ray.get(dep.coordinator.next_visit.remote(visit2))
    for raw in obs.expose(visit2):
        ray.get(dep.coordinator.raw_arrived.remote(raw))
    check_complete_and_unique(dep, obs, visit2, dep.wait_visit(visit2, 120.0))


def test_worker_killed_twice_fails_the_detector_retriably(
    ray_session: Any, config: DeploymentConfig
) -> None:
    """One retry only: a second death is reported, and the visit still completes."""
    cfg = config.with_overrides(detectors=("R22_S00", "R22_S01"))
    with simulated_deployment(cfg) as (dep, obs):
        visit = obs.visit(0)
        worker = dep.workers["R22_S01"]
        first = ray.get(worker.ready.remote())["pid"]
        ray.get(dep.coordinator.next_visit.remote(visit))
        # R22_S01's raws are held back, so each of its incarnations is prepared and
        # waiting for them (a state that lasts) when it is killed: nothing to catch.
        for raw in obs.expose(visit):
            if raw.detector != "R22_S01":
                ray.get(dep.coordinator.raw_arrived.remote(raw))
        wait_until(
            lambda: waiting_for_raws(worker, first),
            90,
            "R22_S01's first process holding the visit, waiting for its raws",
            poll_s=0.1,
        )
        ray.kill(worker, no_restart=False)
        # The coordinator's ``retried`` event, then the restarted process's prepare.
        wait_until(
            lambda: retried(dep, "R22_S01") == 1,
            90,
            "one retried event for R22_S01 in the coordinator's log",
            poll_s=0.1,
            detail=lambda: f"retried events: {retried(dep, 'R22_S01')}",
        )
        wait_until(
            lambda: waiting_for_raws(worker, not_pid=first),
            90,
            "R22_S01 restarted in a new process, holding the visit again",
            poll_s=0.1,
        )
        ray.kill(worker, no_restart=False)
        summary = dep.wait_visit(visit, 120.0)
        assert summary is not None
        assert summary.detectors == {"R22_S00": "ok", "R22_S01": "failed"}
        assert summary.n_retriable == 1
        assert "worker died 2 times" in summary.reasons["R22_S01"]


def test_coordinator_killed_mid_visit_continues_from_its_snapshot(
    running: tuple[Deployment, SimulatedObservatory],
) -> None:
    dep, obs = running
    visit = obs.visit(2)  # 0-1: the killed worker's test's, on the same deployment
    raws = obs.expose(visit)
    half = len(raws) // 2
    ray.get(dep.coordinator.next_visit.remote(visit))
    for raw in raws[:half]:
        ray.get(dep.coordinator.raw_arrived.remote(raw))
    seq_before, events_before = dep.events_since(0)
    old_pid = dep.call("status")["pid"]
    # Killed once its snapshot holds every raw routed so far (it is written after changes).
    wait_until(
        lambda: snapshot_routed(dep.config.namespace) == half,
        90,
        f"the coordinator's snapshot holding the {half} raws routed",
        poll_s=0.05,
        detail=lambda: f"routed in the last snapshot: {snapshot_routed(dep.config.namespace)}",
    )
    ray.kill(dep.coordinator, no_restart=False)
    # The driver's calls wait out the restart (the kill itself takes a moment).
    status = wait_until(
        lambda: (s := dep.call("status"))["pid"] != old_pid and s,
        90,
        "the coordinator answering from a new process",
        poll_s=0.1,
    )
    assert status["in_flight"] == [str(visit.key)]
    # The restored log keeps its numbering: a reader's position stays valid.
    seq_after, events_after = dep.events_since(0)
    assert seq_after >= seq_before
    assert [e.kind for e in events_after[: len(events_before)]] == [e.kind for e in events_before]
    for raw in raws[half:]:
        assert dep.call("raw_arrived", raw) == ["raw_arrived"]
    check_complete_and_unique(dep, obs, visit, dep.wait_visit(visit, 120.0))
    done = [e for e in dep.events_since(seq_after)[1] if e.kind == "visit_done"]
    assert len(done) == 1


def test_visits_faster_than_processing_queue_within_the_bound(
    ray_session: Any, config: DeploymentConfig
) -> None:
    """One visit in flight, one queued: the pump holds the rest in the source."""
    cfg = config.with_overrides(
        detectors=("R22_S00", "R22_S01"), max_visits_in_flight=1, max_visit_backlog=1
    )
    with simulated_deployment(cfg) as (dep, obs):
        bus = InMemoryBus()
        visits: list[NextVisit] = []
        # All four next_visits (and their raws) are published before the first is done.
        thread = play_simulation(obs, bus, 4, on_visit=visits.append)
        thread.join(60)
        assert not thread.is_alive(), "the simulator did not publish 4 visits within 60 s"
        _, events = pump_visits(dep, bus, 4, timeout_s=240)
        kinds = [e.kind for e in events]
        assert kinds.count("visit_done") == 4
        assert "visit_queued" in kinds and "visit_rejected" not in kinds
        # Each visit_queued carries the backlog it made: the log sees every one of them.
        backlog = [e.data["backlog"] for e in events if e.kind == "visit_queued"]
        assert max(backlog) == 1
        for visit in visits:
            summary = dep.wait_visit(visit, 5.0)
            assert summary is not None and summary.n_ok == 2
