"""Custom metrics on the node's Prometheus endpoint, scraped as Prometheus would.

The session's Ray reports metrics every second (``RAY_metrics_report_interval_ms``
in conftest.py); under Ray's default of 10 s these tests still pass, slower. Run
the deployed-pipeline test alone with ``pytest tests/integration/test_metrics.py -k
pipeline``.
"""

from __future__ import annotations

import re
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import ray
from ppray.actors.metrics import EXPORT_PREFIX, CoordinatorMetrics, WorkerMetrics, prometheus_urls
from ppray.actors.runtime import Deployment

from ppray.config import DeploymentConfig
from ppray.messages import DetectorResult, Event, VisitSummary
from ppray.sim.observatory import SimulatedObservatory

from .cluster_helpers import wait_until

pytestmark = pytest.mark.integration

Sample = tuple[str, dict[str, str], float]

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(url: str) -> list[Sample]:
    """The samples of one Prometheus text-format page (comments and HELP skipped)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))
    return samples


def ours(samples: list[Sample], namespace: str) -> list[Sample]:
    """ppray's samples of one deployment, with Ray's ``ray_`` prefix taken off."""
    prefix = EXPORT_PREFIX + "ppray_"
    return [
        (name.removeprefix(EXPORT_PREFIX), labels, value)
        for name, labels, value in samples
        if name.startswith(prefix) and labels.get("namespace") == namespace
    ]


def value(samples: list[Sample], name: str, **tags: str) -> float | None:
    """The sum over the series of ``name`` whose labels include ``tags``; None if none."""
    found = [v for n, labels, v in samples if n == name and tags.items() <= labels.items()]
    return sum(found) if found else None


def scrape_until(
    namespace: str,
    done: Callable[[list[Sample]], bool],
    what: str,
    timeout_s: float = 90.0,
    detail: Callable[[list[Sample]], str] | None = None,
) -> list[Sample]:
    """Scrape the local node until ``done(samples)``, and return those samples.

    Fails after ``timeout_s`` saying ``what`` was awaited and, with ``detail``, what the
    last scrape showed (by default its series).
    """
    (url,) = prometheus_urls()  # one node
    last: list[list[Sample]] = [[]]

    def scraped() -> list[Sample] | None:
        last[0] = ours(scrape(url), namespace)
        return last[0] if done(last[0]) else None

    def shown() -> str:
        if detail is not None:
            return detail(last[0])
        return f"last scrape of {namespace}: {sorted({n for n, _, _ in last[0]})}"

    samples: list[Sample] = wait_until(scraped, timeout_s, what, poll_s=0.25, detail=shown)
    return samples


@ray.remote(num_cpus=0)
class _Recorders:
    """Stands in for the coordinator and one worker: their recorders in an actor."""

    def __init__(self, namespace: str, detector: str) -> None:
        self.coordinator = CoordinatorMetrics(namespace)
        self.worker = WorkerMetrics(namespace, detector)

    def record(
        self, events: list[Event], summary: VisitSummary, results: list[DetectorResult]
    ) -> None:
        coordinator, worker = self.coordinator, self.worker
        coordinator.set_in_flight(2)
        coordinator.set_backlog(1)
        coordinator.set_buffered_raws(4)
        for event in events:
            coordinator.event(event)
        coordinator.preloaded(max_preload_s=0.3, broadcast_s=0.7)
        coordinator.visit_done(summary)
        coordinator.retried("R22_S11")
        for result in results:
            worker.result(result)
        worker.set_queue_depth(3)
        worker.preload(0.04)

    def warned(self) -> list[str]:
        return sorted(self.coordinator._warned | self.worker._warned)

    def close(self) -> None:
        """Stop re-setting the gauges (as a recorder does when its actor is done)."""
        self.coordinator.close()
        self.worker.close()


def _result(**kw: Any) -> DetectorResult:
    base: dict[str, Any] = {
        "instrument": "synthetic",
        "group_id": "g1",
        "detector": "R22_S11",
        "detector_id": 4,
    }
    return DetectorResult(**{**base, **kw})


def test_recorded_metrics_reach_the_prometheus_endpoint(ray_session: Any) -> None:
    namespace = f"test-metrics-{uuid.uuid4().hex[:8]}"
    events = [
        Event(kind="visit_accepted"),
        Event(kind="raw_arrived"),
        Event(kind="raw_arrived"),
        Event(kind="raw_rejected", level="warning"),
    ]
    summary = VisitSummary(
        instrument="synthetic",
        group_id="g1",
        exposure_id=1,
        n_expected=4,
        n_ok=2,
        n_failed=1,
        n_timed_out=1,
        n_sources=100,
        detectors={},
        done_at=0.0,
        latency_s=1.7,
    )
    results = [
        _result(
            status="ok",
            n_sources=50,
            n_alerts=6,
            metrics={"n_dia_sources": 7.0},
            timings_s={"isr": 0.07, "dia": 0.4},
        ),
        _result(status="failed", retriable=True, reason="x", timings_s={"read": 0.003}),
        _result(status="timed_out", timings_s={"prepare": 12.0}),
    ]
    recorders = _Recorders.remote(namespace, "R22_S11")
    # The same recordings in another deployment, whose gauges are left to lapse: the
    # clock for "two report intervals without a value" (see below).
    control_namespace = f"{namespace}-lapsed"
    control = _Recorders.remote(control_namespace, "R22_S11")
    try:
        ray.get(recorders.record.remote(events, summary, results))
        ray.get(control.record.remote(events, summary, results))
        expected = {
            # (name, tags): value
            ("ppray_visits_in_flight", ()): 2.0,
            ("ppray_visit_backlog", ()): 1.0,
            ("ppray_buffered_raws", ()): 4.0,
            ("ppray_events_total", (("kind", "visit_accepted"), ("level", "info"))): 1.0,
            ("ppray_events_total", (("kind", "raw_arrived"), ("level", "info"))): 2.0,
            ("ppray_events_total", (("kind", "raw_rejected"), ("level", "warning"))): 1.0,
            ("ppray_preload_seconds_count", ()): 1.0,
            ("ppray_preload_seconds_bucket", (("le", "0.25"),)): 0.0,
            ("ppray_preload_seconds_bucket", (("le", "0.5"),)): 1.0,
            ("ppray_prepare_broadcast_seconds_bucket", (("le", "0.5"),)): 0.0,
            ("ppray_prepare_broadcast_seconds_bucket", (("le", "1.0"),)): 1.0,
            ("ppray_visit_latency_seconds_count", ()): 1.0,
            ("ppray_visit_latency_seconds_bucket", (("le", "1.0"),)): 0.0,
            ("ppray_visit_latency_seconds_bucket", (("le", "2.5"),)): 1.0,
            ("ppray_detectors_total", (("status", "ok"),)): 2.0,
            ("ppray_detectors_total", (("status", "failed"),)): 1.0,
            ("ppray_detectors_total", (("status", "timed_out"),)): 1.0,
            ("ppray_detector_retries_total", (("detector", "R22_S11"),)): 1.0,
            # The worker's series all carry its detector.
            ("ppray_step_seconds_count", (("step", "isr"), ("detector", "R22_S11"))): 1.0,
            ("ppray_step_seconds_bucket", (("step", "isr"), ("le", "0.05"))): 0.0,
            ("ppray_step_seconds_bucket", (("step", "isr"), ("le", "0.1"))): 1.0,
            ("ppray_step_seconds_bucket", (("step", "dia"), ("le", "0.5"))): 1.0,
            ("ppray_step_seconds_count", (("step", "read"),)): 1.0,
            ("ppray_step_seconds_bucket", (("step", "read"), ("le", "0.0025"))): 0.0,
            ("ppray_step_seconds_bucket", (("step", "read"), ("le", "0.005"))): 1.0,
            ("ppray_step_seconds_bucket", (("step", "prepare"), ("le", "25.0"))): 1.0,
            ("ppray_step_seconds_count", ()): 4.0,
            ("ppray_sources_total", (("detector", "R22_S11"),)): 50.0,
            ("ppray_dia_sources_total", (("detector", "R22_S11"),)): 7.0,
            ("ppray_alerts_total", (("detector", "R22_S11"),)): 6.0,
            ("ppray_detector_failures_total", (("status", "failed"), ("retriable", "true"))): 1.0,
            (
                "ppray_detector_failures_total",
                (("status", "timed_out"), ("retriable", "false")),
            ): 1.0,
            ("ppray_worker_queue_depth", (("detector", "R22_S11"),)): 3.0,
            ("ppray_worker_preload_seconds_count", (("detector", "R22_S11"),)): 1.0,
            ("ppray_worker_preload_seconds_bucket", (("le", "0.025"),)): 0.0,
            ("ppray_worker_preload_seconds_bucket", (("le", "0.05"),)): 1.0,
        }

        def got(samples: list[Sample]) -> dict[tuple[str, tuple[tuple[str, str], ...]], Any]:
            return {key: value(samples, key[0], **dict(key[1])) for key in expected}

        def differing(samples: list[Sample]) -> str:
            off = {k: v for k, v in got(samples).items() if v != expected[k]}
            return f"differing from the expected values: {off}"

        samples = scrape_until(
            namespace,
            lambda s: got(s) == expected,
            "every recorded series on the endpoint with its value",
            detail=differing,
        )
        assert got(samples) == expected
        assert ray.get(recorders.warned.remote()) == []
        # Every series is labelled with the deployment; the worker's with the detector.
        for name, labels, _ in samples:
            assert labels["namespace"] == namespace
            if name.startswith(("ppray_step", "ppray_worker", "ppray_alerts", "ppray_dia")):
                assert labels["detector"] == "R22_S11", name

        def lapsed_gauges(s: list[Sample]) -> tuple[float | None, float | None]:
            return value(s, "ppray_visits_in_flight"), value(s, "ppray_worker_queue_depth")

        # Ray drops a gauge two report intervals after it was last set: the recorders
        # set theirs again while the actor lives. The control's gauges, set after ours
        # and then no more, are dropped first: once they are gone, ours were last set
        # (by a test call) longer ago than that, and must still be there.
        scrape_until(
            control_namespace,
            lambda s: lapsed_gauges(s) == (2.0, 3.0),
            "the control's gauges on the endpoint",
        )
        ray.get(control.close.remote())
        scrape_until(
            control_namespace,
            lambda s: lapsed_gauges(s) == (None, None),
            "the control's gauges dropped, two report intervals after they were last set",
        )
        later = ours(scrape(prometheus_urls()[0]), namespace)
        assert value(later, "ppray_visits_in_flight") == 2.0
        assert value(later, "ppray_worker_queue_depth") == 3.0
        assert value(later, "ppray_events_total", kind="raw_arrived") == 2.0
    finally:
        ray.kill(recorders)
        ray.kill(control)


@pytest.fixture(scope="module")
def running_config(running_config: DeploymentConfig) -> DeploymentConfig:
    """The shared ``running`` deployment on two detectors and one APDB shard: five
    actors deploy faster than eight."""
    return running_config.with_overrides(
        detectors=("R22_S00", "R22_S01"), apdb={**running_config.apdb.model_dump(), "n_shards": 1}
    )


def test_pipeline_metrics_of_a_visit(running: tuple[Deployment, SimulatedObservatory]) -> None:
    """A real visit through the deployed actors shows on the endpoint."""
    dep, obs = running
    namespace = dep.config.namespace
    visit = obs.visit(0)
    assert ray.get(dep.coordinator.next_visit.remote(visit)) == ["visit_accepted"]
    for raw in obs.expose(visit):
        ray.get(dep.coordinator.raw_arrived.remote(raw))
    summary = dep.wait_visit(visit, 120.0)
    assert summary is not None and summary.n_ok == len(obs.detectors)
    steps = set(summary.step_median_s)
    assert {"isr", "dia", "write"} <= steps

    def complete(samples: list[Sample]) -> bool:
        return (
            value(samples, "ppray_visits_in_flight") == 0.0
            and value(samples, "ppray_events_total", kind="visit_done") == 1.0
            and value(samples, "ppray_detectors_total", status="ok") == len(obs.detectors)
            # Each worker process reports on its own clock: wait for every one of them.
            and all(
                value(samples, "ppray_step_seconds_count", step=s, detector=d)
                for s in steps
                for d in obs.detectors
            )
        )

    samples = scrape_until(
        namespace, complete, "the visit's series from the coordinator and every worker"
    )
    assert value(samples, "ppray_visits_in_flight") == 0.0, "no visit in flight once done"
    assert value(samples, "ppray_events_total", kind="visit_accepted", level="info") == 1.0
    assert value(samples, "ppray_events_total", kind="visit_done") == 1.0
    assert value(samples, "ppray_detectors_total", status="ok") == len(obs.detectors)
    assert value(samples, "ppray_visit_latency_seconds_count") == 1.0
    for step in steps:
        for det in obs.detectors:
            # One observation per step and detector (a step's time adds up over the snaps).
            count = value(samples, "ppray_step_seconds_count", step=step, detector=det)
            assert count == 1.0, (step, det, count)
    assert value(samples, "ppray_dia_sources_total") == summary.n_dia_sources
    assert value(samples, "ppray_alerts_total") == summary.n_alerts
