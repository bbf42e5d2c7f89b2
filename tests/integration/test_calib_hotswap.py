"""A newly certified flat reaches running DetectorWorkers between visits, no restart."""

from __future__ import annotations

import pytest
import ray
from ppray.actors.runtime import Deployment

from ppray.calib import LEGACY_CALIB_ID, CalibRegistry
from ppray.config import DeploymentConfig
from ppray.messages import DetectorResult, NextVisit, VisitSummary
from ppray.sim.observatory import SimulatedObservatory
from ppray.sim.render import make_calibrations
from ppray.storage import Storage

pytestmark = pytest.mark.integration

DETECTORS = ("R22_S00", "R22_S11")
FACTOR = 1.25  # the new flat is the true flat times this: images come out 1/FACTOR


@pytest.fixture(scope="module")
def running_config(running_config: DeploymentConfig) -> DeploymentConfig:
    """The shared ``running`` deployment, on two detectors."""
    return running_config.with_overrides(detectors=DETECTORS)


def run_visit(
    dep: Deployment, obs: SimulatedObservatory, visit: NextVisit
) -> tuple[VisitSummary, dict[str, DetectorResult]]:
    assert ray.get(dep.coordinator.next_visit.remote(visit)) == ["visit_accepted"]
    for raw in obs.expose(visit):
        ray.get(dep.coordinator.raw_arrived.remote(raw))
    summary = dep.wait_visit(visit, 60.0)
    assert summary is not None
    assert summary.detectors == dict.fromkeys(DETECTORS, "ok"), summary.reasons
    # The workers keep their last few results: asking again returns them.
    results = {d: ray.get(dep.workers[d].result.remote(visit)) for d in DETECTORS}
    return summary, results


def pids(dep: Deployment) -> dict[str, int]:
    workers = {d: ray.get(w.ready.remote())["pid"] for d, w in dep.workers.items()}
    return {**workers, "coordinator": dep.call("status")["pid"]}


def test_certified_flat_is_swapped_in_without_restarts(
    running: tuple[Deployment, SimulatedObservatory],
) -> None:
    dep, obs = running
    before = pids(dep)
    v0, v1 = obs.visit(0), obs.visit(1)
    s0, r0 = run_visit(dep, obs, v0)
    assert s0.calib_ids == {k: [LEGACY_CALIB_ID] for k in ("bias", "dark", "defects", "flat")}

    # Certify, for every detector, the true flat times FACTOR, valid from just before v1.
    registry = CalibRegistry(Storage(dep.config.calib_root), obs.instrument.name)
    calib_id = "flat-r-hotswap-test"
    for det in DETECTORS:
        truth = make_calibrations(obs.instrument, obs.instrument.detector(det), seed=obs.sim.seed)
        registry.certify(
            "flat",
            det,
            truth.flat * FACTOR,
            band=v1.filter_band,
            valid_from=v1.startTime - 1.0,
            calib_id=calib_id,
        )
    assert v1.filter_band == "r"

    s1, r1 = run_visit(dep, obs, v1)
    assert s1.calib_ids["flat"] == [calib_id]
    assert s1.calib_ids["bias"] == [LEGACY_CALIB_ID]
    sky = obs.sim.sky_e_per_px_per_s * obs.sim.exposure_time_s
    for det in DETECTORS:
        assert r1[det].calib_ids["flat"] == calib_id
        assert r0[det].metrics["bg_mean"] == pytest.approx(sky, rel=0.02)
        # The measurable effect: the flat-fielded sky is 1/FACTOR of the first visit's.
        ratio = r1[det].metrics["bg_mean"] / r0[det].metrics["bg_mean"]
        assert ratio == pytest.approx(1 / FACTOR, rel=0.02)
    status = {d: ray.get(w.ready.remote()) for d, w in dep.workers.items()}
    assert all(s["calib_ids"]["flat"] == calib_id for s in status.values())

    # A g-band visit does not pick up the r-band flat.
    v2 = obs.visit(2).model_copy(update={"filters": "g"})
    s2, r2 = run_visit(dep, obs, v2)
    assert s2.calib_ids["flat"] == [LEGACY_CALIB_ID]
    for det in DETECTORS:
        assert r2[det].metrics["bg_mean"] == pytest.approx(sky, rel=0.02)
    # No actor restarted to get there.
    assert pids(dep) == before
