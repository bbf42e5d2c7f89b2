"""Visits end to end through the real actors."""

from __future__ import annotations

from typing import Any

import pytest
import ray
from ppray.actors.runtime import Deployment, play_simulation

from ppray.alerts.packet import validate_alert
from ppray.alerts.sinks import read_alert_file
from ppray.config import DeploymentConfig
from ppray.layout import visit_prefix
from ppray.messages import Event, VisitSummary
from ppray.messaging import InMemoryBus
from ppray.schema import load_alert_schema
from ppray.sim.observatory import SimulatedObservatory
from ppray.storage import Storage

from .cluster_helpers import (
    apdb_contents,
    pump_visits,
    restarted,
    simulated_deployment,
)

pytestmark = pytest.mark.integration


def collect_events(dep: Deployment) -> list[Event]:
    return dep.events_since(0)[1]


def test_three_visits_end_to_end(running: tuple[Deployment, SimulatedObservatory]) -> None:
    dep, obs = running
    bus = InMemoryBus()
    visits: list[Any] = []
    thread = play_simulation(obs, bus, 3, on_visit=visits.append)
    pump_visits(dep, bus, 3, timeout_s=180)
    thread.join(30)
    assert not thread.is_alive(), "the simulator still publishing after its 3 visits were done"
    summaries = [dep.wait_visit(v, 5.0) for v in visits]
    out = Storage(dep.config.output_root)
    assert len(summaries) == 3
    for visit, summary in zip(visits, summaries, strict=True):
        assert isinstance(summary, VisitSummary)
        assert (summary.n_ok, summary.n_expected) == (4, 4), summary.reasons
        # How long it takes is the benchmarks' business (bench_visit.py): on a loaded
        # machine a visit took 65 s here. That it is measured, and after the raw, is ours.
        assert summary.latency_s is not None and summary.latency_s > 0
        assert summary.exposure_id is not None
        assert summary.n_sources > 20
        for det in obs.detectors:
            table = out.read_parquet(f"{visit_prefix(visit)}/{det}/sources.parquet")
            assert table.num_rows > 0
            assert out.exists(f"{visit_prefix(visit)}/{det}/calexp.fits")
        assert out.read_json(f"{visit_prefix(visit)}/summary.json")["n_ok"] == 4
    kinds = [e.kind for e in collect_events(dep)]
    for kind in ("visit_accepted", "preloaded", "raw_arrived", "processed", "visit_done"):
        assert kind in kinds
    check_alerts_and_apdb(dep, obs, visits, summaries)


def check_alerts_and_apdb(
    dep: Deployment, obs: SimulatedObservatory, visits: list[Any], summaries: list[Any]
) -> None:
    """One valid alert per reliable DIA source; the shards hold what the APDB holds, also
    restarted."""
    schema = load_alert_schema()
    packet_schema = schema.packet  # the package's own Schema, read from its file
    out = Storage(dep.config.output_root)
    for visit, summary in zip(visits, summaries, strict=True):
        # Alerts only for DIA sources at or above alerts.min_reliability (the others are
        # in the APDB with their score): fewer, never more.
        assert 0 < summary.n_alerts <= summary.n_dia_sources
        alerts = [
            a
            for det in obs.detectors
            for a in read_alert_file(out.read_bytes(f"alerts/{visit_prefix(visit)}/{det}.avro"))
        ]
        assert len(alerts) == summary.n_alerts
        for alert in alerts:
            validate_alert(alert, schema)
            assert packet_schema.deserialize(packet_schema.serialize(alert)) == alert
            assert alert["cutoutDifference"] and alert["cutoutScience"]
    # Later visits see earlier ones: some sources matched objects of an earlier visit.
    last = [a for det in obs.detectors for a in read_alert_file(
        out.read_bytes(f"alerts/{visit_prefix(visits[-1])}/{det}.avro"))]  # fmt: skip
    assert any(a["prvDiaSources"] for a in last)
    before = ray.get([s.ready.remote() for s in dep.apdb_shards])
    assert sum(b["n_objects"] for b in before) > 0
    check_rubin_apdb(dep, [a for v in visits for a in alerts_of(out, obs, v)])
    for shard in dep.apdb_shards:
        ray.kill(shard, no_restart=False)
    after = [restarted(s, b["pid"]) for s, b in zip(dep.apdb_shards, before, strict=True)]
    assert [a["n_objects"] for a in after] == [b["n_objects"] for b in before]


def alerts_of(out: Storage, obs: SimulatedObservatory, visit: Any) -> list[dict[str, Any]]:
    return [
        a
        for det in obs.detectors
        for a in read_alert_file(out.read_bytes(f"alerts/{visit_prefix(visit)}/{det}.avro"))
    ]


def check_rubin_apdb(dep: Deployment, alerts: list[dict[str, Any]]) -> None:
    """The APDB, read with lsst.dax.apdb's own API, holds exactly what the shards hold."""
    from ppray.apdb.rubin import default_sqlite_url

    held = ray.get([s.snapshot.remote() for s in dep.apdb_shards])
    stored = apdb_contents(default_sqlite_url(dep.config.output_root))
    for name, key, table in (
        ("DiaObject", "diaObjectId", "dia_objects"),
        ("DiaSource", "diaSourceId", "dia_sources"),
        ("DiaForcedSource", "diaForcedSourceId", "dia_forced_sources"),
    ):
        want = sorted(i for h in held for i in getattr(h, table)[key].to_pylist())
        assert stored[name][key].tolist() == want, name
    # Every alert's source is in the APDB (the unreliable ones too, without an alert).
    assert {a["diaSource"]["diaSourceId"] for a in alerts} <= set(
        stored["DiaSource"]["diaSourceId"]
    )


def test_bad_inputs_never_crash_or_lose_a_visit(
    running: tuple[Deployment, SimulatedObservatory],
) -> None:
    dep, obs = running
    visit = obs.visit(3)  # 0-2: test_three_visits_end_to_end's, on the same deployment
    raws = obs.expose(visit)
    # A raw before its next_visit is buffered, not lost.
    assert ray.get(dep.coordinator.raw_arrived.remote(raws[0])) == ["raw_buffered"]
    # ... and released when its next_visit comes.
    accepted = ray.get(dep.coordinator.next_visit.remote(visit))
    assert accepted == ["visit_accepted", "raw_arrived"]
    assert ray.get(dep.coordinator.next_visit.remote(visit)) == ["visit_duplicate"]
    unknown = raws[1].model_copy(update={"detector": "R99_S99"})
    assert ray.get(dep.coordinator.raw_arrived.remote(unknown)) == ["raw_rejected"]
    other_group = raws[1].model_copy(update={"group_id": "no-such-group"})
    assert ray.get(dep.coordinator.raw_arrived.remote(other_group)) == ["raw_buffered"]
    # One detector's raw is corrupt: that detector fails with a reason, the visit completes.
    corrupt = Storage(dep.config.raw_root)
    bad_key = raws[1].uri.split(dep.config.raw_root.rstrip("/") + "/", 1)[1]
    corrupt.write_bytes(bad_key, b"SIMPLE  =   this is not FITS")
    for raw in raws[1:]:
        ray.get(dep.coordinator.raw_arrived.remote(raw))
    summary = dep.wait_visit(visit, 60.0)
    assert summary is not None
    assert summary.n_ok == 3 and summary.n_failed == 1
    failed = [d for d, s in summary.detectors.items() if s == "failed"]
    assert failed == [raws[1].detector]
    assert "FITS" in summary.reasons[raws[1].detector]
    # The coordinator is still alive and serves the next visit.
    visit2 = obs.visit(4)
    assert ray.get(dep.coordinator.next_visit.remote(visit2)) == ["visit_accepted"]
    for raw in obs.expose(visit2):
        ray.get(dep.coordinator.raw_arrived.remote(raw))
    summary2 = dep.wait_visit(visit2, 60.0)
    assert summary2 is not None and summary2.n_ok == 4


def test_visit_without_raws_times_out(ray_session: Any, config: DeploymentConfig) -> None:
    # The deadline (2 x duration + image_timeout_s = 10.5 s from the gather's call)
    # also bounds R22_S00's prepare and raw: 4.5 s was too little on a machine loaded
    # past its cores (a CPU hog beside the suite and another job).
    cfg = config.with_overrides(image_timeout_s=10.0, detectors=("R22_S00", "R22_S01"))
    with simulated_deployment(cfg) as (dep, obs):
        visit = obs.visit(0).model_copy(update={"duration": 0.25})
        raws = obs.expose(visit, detectors=("R22_S00",))
        ray.get(dep.coordinator.next_visit.remote(visit))
        ray.get(dep.coordinator.raw_arrived.remote(raws[0]))
        # Ended by R22_S01's deadline (its result says timed_out), not by wait_visit's.
        summary = dep.wait_visit(visit, 60.0)
        assert summary is not None
        assert summary.detectors == {"R22_S00": "ok", "R22_S01": "timed_out"}, summary.reasons
        kinds = [e.kind for e in collect_events(dep)]
        assert "timed_out" in kinds
        # The timed-out visit freed its workers: nothing of it is held, and the next
        # visit is processed in full.
        for worker in dep.workers.values():
            assert ray.get(worker.ready.remote())["visits"] == 0
        after = obs.visit(1)
        ray.get(dep.coordinator.next_visit.remote(after))
        for raw in obs.expose(after):
            ray.get(dep.coordinator.raw_arrived.remote(raw))
        summary = dep.wait_visit(after, 60.0)
        assert summary is not None and summary.n_ok == 2, summary
