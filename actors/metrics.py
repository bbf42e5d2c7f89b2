"""Operator metrics: Ray custom metrics that the actors record, scraped by Prometheus.

Every Ray node runs a metrics agent (part of ``ray[default]``; it runs with
``include_dashboard=False`` too) that serves all metrics of the node's processes in
the Prometheus text format at ``http://NODE_IP:METRICS_EXPORT_PORT/metrics``
(:func:`prometheus_urls`). What Ray 2.60 does to a metric on its way there, and
what the recorders here do about it:

- The exported name is ``ray_`` + the name given here: ``ppray_events_total`` is
  scraped as ``ray_ppray_events_total``; histograms add ``_bucket``, ``_count`` and
  ``_sum``.
- Ray adds the labels ``Component``, ``NodeAddress``, ``SessionName``, ``Version``
  and ``WorkerId`` (one per actor process, so a restarted actor starts new series).
  Every ppray metric adds ``namespace`` (the deployment's Ray namespace), and the
  worker's metrics ``detector``, so that a series says what it is about.
- Each process sends what it recorded to the agent once per report interval,
  ``RAY_metrics_report_interval_ms`` (default 10000, never less than 1000; read by
  every Ray process when it starts, so set it before ``ray.init`` or ``ray start``).
- A gauge is sent only in an interval in which it was set, and the agent forgets
  a series after two intervals without a value. So the recorders keep their gauges'
  last values and set them again every second, from a daemon thread, for as long as
  the actor lives; when it dies its gauges vanish with it.
- The agent rebuilds each histogram from bucket counts with each bucket's midpoint
  as the value, so ``_bucket`` and ``_count`` are exact but ``_sum`` (hence a mean)
  is approximate: use the buckets (``histogram_quantile``).

Recording never raises: a metric that cannot be recorded is logged once and the
actor carries on. The recorders can also be built and called outside Ray (in unit
tests, say): the values then go nowhere, and no refresh thread starts.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

import ray
from ray.util.metrics import Counter, Gauge, Histogram

from ppray.calib.results import CalibResult, CalibSummary
from ppray.messages import DetectorResult, Event, VisitSummary

__all__ = [
    "EXPORT_PREFIX",
    "SECONDS_BOUNDARIES",
    "CoordinatorMetrics",
    "WorkerMetrics",
    "prometheus_urls",
]

log = logging.getLogger(__name__)

EXPORT_PREFIX = "ray_"
"""What Ray puts in front of a metric's name on the Prometheus endpoint."""

SECONDS_BOUNDARIES: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0,
)  # fmt: skip
"""Histogram bucket bounds in seconds, 1 ms to 2 min in steps of 2 to 2.5.

A routed raw takes milliseconds and a full CCD's subtraction seconds; 120 s is
twice the alert-latency budget. With 16 bounds the largest metric,
``ppray_step_seconds``, has 19 series per worker and step (18 buckets, ``_count``,
``_sum``): 189 detectors x 17 steps make ~61,000 series, which one Prometheus holds
easily. Ray's ``WorkerId`` label already makes one series per actor process; the
``detector`` tag adds none, it names them.
"""

_GAUGE_REFRESH_S = 1.0  # the shortest report interval Ray allows

P = ParamSpec("P")
S = TypeVar("S", bound="_Recorder")


def _never_raises(
    method: Callable[Concatenate[S, P], None],
) -> Callable[Concatenate[S, P], None]:
    """Log (once per method) instead of raising: metrics must never fail an actor."""

    @functools.wraps(method)
    def guarded(self: S, /, *args: P.args, **kwargs: P.kwargs) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception:
            if method.__name__ not in self._warned:
                self._warned.add(method.__name__)
                log.exception("metrics: %s failed; not recorded", method.__qualname__)

    return guarded


class _Recorder:
    """Base of the recorders: default tags, and gauges kept alive by a refresh thread."""

    def __init__(self, tags: dict[str, str]) -> None:
        self._tags = tags
        self._tag_keys = tuple(tags)
        self._warned: set[str] = set()
        # (name, tags) -> the gauge, its last value and the tags it was set with.
        self._gauge_values: dict[
            tuple[str, tuple[tuple[str, str], ...]], tuple[Gauge, float, dict[str, str]]
        ] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def _keys(self, *extra: str) -> tuple[str, ...]:
        return (*self._tag_keys, *extra)

    def _counter(self, name: str, description: str, *tag_keys: str) -> Counter:
        return Counter(name, description, self._keys(*tag_keys)).set_default_tags(self._tags)

    def _gauge(self, name: str, description: str, *tag_keys: str) -> Gauge:
        return Gauge(name, description, self._keys(*tag_keys)).set_default_tags(self._tags)

    def _histogram(self, name: str, description: str, *tag_keys: str) -> Histogram:
        metric = Histogram(name, description, list(SECONDS_BOUNDARIES), self._keys(*tag_keys))
        return metric.set_default_tags(self._tags)

    def _set_gauge(self, gauge: Gauge, value: float, tags: dict[str, str] | None = None) -> None:
        # Set under the lock, so that the refresh thread never re-sets an older value.
        tags = dict(tags or {})
        with self._lock:
            gauge.set(float(value), tags=tags)
            key = (gauge.info["name"], tuple(sorted(tags.items())))
            self._gauge_values[key] = (gauge, float(value), tags)
            if self._refresher is None and ray.is_initialized():
                self._refresher = threading.Thread(
                    target=self._refresh, name="ppray-metrics-gauges", daemon=True
                )
                self._refresher.start()

    def _refresh(self) -> None:
        while not self._stop.wait(_GAUGE_REFRESH_S):
            try:
                with self._lock:
                    for gauge, value, tags in self._gauge_values.values():
                        gauge.set(value, tags=tags)
            except Exception:  # keep refreshing: one failure must not end the thread
                log.debug("metrics: gauge refresh failed", exc_info=True)

    def close(self) -> None:
        """Stop re-setting the gauges; they vanish from the endpoint two intervals later."""
        self._stop.set()


def _inc(counter: Counter, value: float, tags: dict[str, str] | None = None) -> None:
    # Ray's Counter.inc rejects 0 (and a zero need not be sent anyway).
    if value > 0:
        counter.inc(value, tags=tags or {})


class CoordinatorMetrics(_Recorder):
    """The visit coordinator's metrics, all tagged with the deployment's ``namespace``.

    Parameters
    ----------
    namespace
        The deployment's Ray namespace (``config.namespace``).
    """

    def __init__(self, namespace: str) -> None:
        super().__init__({"namespace": namespace})
        self._in_flight = self._gauge(
            "ppray_visits_in_flight",
            "Visits started (prepare broadcast) whose summary is not in yet.",
        )
        self._backlog = self._gauge(
            "ppray_visit_backlog",
            "Visits accepted and queued, not started yet.",
        )
        self._buffered = self._gauge(
            "ppray_buffered_raws",
            "Raws held by the coordinator because their next_visit has not come (yet).",
        )
        self._events = self._counter(
            "ppray_events_total",
            "Lifecycle events the coordinator emitted, by event kind and level.",
            "kind",
            "level",
        )
        self._preload = self._histogram(
            "ppray_preload_seconds",
            "Per visit: the slowest worker's preload (refcat, templates, APDB), seconds.",
        )
        self._broadcast = self._histogram(
            "ppray_prepare_broadcast_seconds",
            "Per visit: prepare broadcast until every worker has preloaded, seconds.",
        )
        self._latency = self._histogram(
            "ppray_visit_latency_seconds",
            "Per visit: last raw arrival to visit done, seconds.",
        )
        self._detectors = self._counter(
            "ppray_detectors_total",
            "Detector results of finished visits, by status (ok, failed, timed_out).",
            "status",
        )
        self._retries = self._counter(
            "ppray_detector_retries_total",
            "Detectors the coordinator ran again for a visit after a retriable failure.",
            "detector",
        )
        self._calib_sequences = self._counter(
            "ppray_calib_sequences_total",
            "Calibration sequences finished, by kind (bias, dark, flat) and outcome "
            "(ok: every detector certified; partial; failed: none).",
            "kind",
            "outcome",
        )

    @_never_raises
    def set_in_flight(self, n: int) -> None:
        """Visits started whose summary is not in yet (gauge ``ppray_visits_in_flight``)."""
        self._set_gauge(self._in_flight, n)

    @_never_raises
    def set_backlog(self, n: int) -> None:
        """Visits queued, not started yet (gauge ``ppray_visit_backlog``)."""
        self._set_gauge(self._backlog, n)

    @_never_raises
    def set_buffered_raws(self, n: int) -> None:
        """Raws waiting for their next_visit (gauge ``ppray_buffered_raws``)."""
        self._set_gauge(self._buffered, n)

    @_never_raises
    def event(self, event: Event) -> None:
        """Count one event (counter ``ppray_events_total{kind, level}``)."""
        self._events.inc(1, tags={"kind": event.kind, "level": event.level})

    @_never_raises
    def preloaded(self, max_preload_s: float, broadcast_s: float) -> None:
        """Record a visit's preload: the slowest worker's and the whole broadcast's.

        Parameters
        ----------
        max_preload_s
            The longest preload of the visit's workers (``ppray_preload_seconds``).
        broadcast_s
            From the broadcast until all had preloaded
            (``ppray_prepare_broadcast_seconds``).
        """
        self._preload.observe(max_preload_s)
        self._broadcast.observe(broadcast_s)

    @_never_raises
    def visit_done(self, summary: VisitSummary) -> None:
        """Record a finished visit: its latency and its detectors' statuses.

        Parameters
        ----------
        summary
            The aggregator's summary; ``latency_s`` goes to
            ``ppray_visit_latency_seconds`` (when known: a visit without raws has
            none) and each status count to ``ppray_detectors_total{status}``.
        """
        if summary.latency_s is not None:
            self._latency.observe(max(summary.latency_s, 0.0))
        _inc(self._detectors, summary.n_ok, {"status": "ok"})
        _inc(self._detectors, summary.n_failed, {"status": "failed"})
        _inc(self._detectors, summary.n_timed_out, {"status": "timed_out"})

    @_never_raises
    def calib_done(self, summary: CalibSummary) -> None:
        """Record a finished calibration sequence and its detectors' statuses."""
        if summary.n_ok == summary.n_expected:
            outcome = "ok"
        else:
            outcome = "partial" if summary.n_ok else "failed"
        self._calib_sequences.inc(1, tags={"kind": summary.kind, "outcome": outcome})
        _inc(self._detectors, summary.n_ok, {"status": "ok"})
        _inc(self._detectors, summary.n_failed, {"status": "failed"})
        _inc(self._detectors, summary.n_timed_out, {"status": "timed_out"})

    @_never_raises
    def retried(self, detector: str) -> None:
        """Count one retry of ``detector`` (counter ``ppray_detector_retries_total``)."""
        self._retries.inc(1, tags={"detector": detector})


class WorkerMetrics(_Recorder):
    """A detector worker's metrics, tagged with ``namespace`` and ``detector``.

    Parameters
    ----------
    namespace
        The deployment's Ray namespace (``config.namespace``).
    detector
        The worker's detector name (``R22_S11``).
    """

    def __init__(self, namespace: str, detector: str) -> None:
        super().__init__({"namespace": namespace, "detector": detector})
        self._steps = self._histogram(
            "ppray_step_seconds",
            "Wall time of one pipeline step for one visit on one detector, seconds.",
            "step",
        )
        self._sources = self._counter(
            "ppray_sources_total",
            "Sources detected on the calibrated exposures (sources.parquet rows).",
        )
        self._dia_sources = self._counter(
            "ppray_dia_sources_total",
            "DIA sources detected on the difference images (diaSources.parquet rows).",
        )
        self._alerts = self._counter(
            "ppray_alerts_total",
            "Alerts produced (one per associated DIA source).",
        )
        self._failures = self._counter(
            "ppray_detector_failures_total",
            "Detector results that were not ok, by status and whether a retry may cure it.",
            "status",
            "retriable",
        )
        self._queue = self._gauge(
            "ppray_worker_queue_depth",
            "Visits waiting on this worker (prepared or waiting for raws or its turn).",
        )
        self._preload = self._histogram(
            "ppray_worker_preload_seconds",
            "This worker's preload for one visit (refcat, templates, APDB), seconds.",
        )
        self._calib_quality = self._gauge(
            "ppray_calib_quality",
            "Quality of this detector's latest certified calibration product (ppray.calib."
            "quality), by product kind (bias, dark, flat, defects) and metric.",
            "kind",
            "metric",
        )
        self._calib_inputs = self._counter(
            "ppray_calib_inputs_total",
            "Calibration exposures of certified sequences, by kind and outcome "
            "(combined, rejected).",
            "kind",
            "outcome",
        )
        self._combiner_bytes = self._gauge(
            "ppray_calib_combiner_bytes",
            "Bytes the streaming combiners of this worker's calibration sequences hold now.",
        )

    @_never_raises
    def result(self, result: DetectorResult) -> None:
        """Record one detector result.

        Every entry of ``timings_s`` goes to ``ppray_step_seconds{step}`` (a failed
        result has the steps it got through). Source, DIA-source and alert counts are
        taken from ``ok`` results only, as in the visit summary; any other status
        counts in ``ppray_detector_failures_total{status, retriable}``.

        Parameters
        ----------
        result
            The worker's result, before it leaves the actor (``dia_sources`` is
            still attached there).
        """
        for step, seconds in result.timings_s.items():
            self._steps.observe(max(seconds, 0.0), tags={"step": step})
        if result.status != "ok":
            retriable = "true" if result.retriable else "false"
            self._failures.inc(1, tags={"status": result.status, "retriable": retriable})
            return
        n_dia = result.metrics.get("n_dia_sources")
        if n_dia is None and result.dia_sources is not None:
            n_dia = result.dia_sources.num_rows
        _inc(self._sources, result.n_sources)
        _inc(self._dia_sources, int(n_dia or 0))
        _inc(self._alerts, result.n_alerts)

    @_never_raises
    def calib_result(self, result: CalibResult) -> None:
        """Record one detector's finished part of a calibration sequence.

        Its steps go to ``ppray_step_seconds{step="calib_<step>"}``; a certified
        result sets ``ppray_calib_quality{kind, metric}`` for each product and
        counts its inputs; any other status counts as a detector failure.
        """
        for step, seconds in result.timings_s.items():
            self._steps.observe(max(seconds, 0.0), tags={"step": f"calib_{step}"})
        if result.status != "ok":
            retriable = "true" if result.retriable else "false"
            self._failures.inc(1, tags={"status": result.status, "retriable": retriable})
            return
        for product, metrics in result.quality.items():
            for metric, value in metrics.items():
                self._set_gauge(self._calib_quality, value, {"kind": product, "metric": metric})
        _inc(self._calib_inputs, result.n_inputs, {"kind": result.kind, "outcome": "combined"})
        _inc(self._calib_inputs, len(result.rejected), {"kind": result.kind, "outcome": "rejected"})

    @_never_raises
    def set_combiner_bytes(self, n: int) -> None:
        """Bytes held by streaming combiners now (gauge ``ppray_calib_combiner_bytes``)."""
        self._set_gauge(self._combiner_bytes, n)

    @_never_raises
    def set_queue_depth(self, n: int) -> None:
        """Visits waiting on this worker (gauge ``ppray_worker_queue_depth``)."""
        self._set_gauge(self._queue, n)

    @_never_raises
    def preload(self, seconds: float) -> None:
        """Record one preload (histogram ``ppray_worker_preload_seconds``)."""
        self._preload.observe(max(seconds, 0.0))


def prometheus_urls() -> list[str]:
    """The Prometheus endpoints of the cluster's live nodes, ``http://IP:PORT/metrics``.

    Needs a connected Ray (``ray.init``). Each node's metrics agent listens on its
    ``MetricsExportPort``, chosen at random unless given with
    ``ray.init(_metrics_export_port=...)`` or ``ray start --metrics-export-port``.
    """
    return [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node.get("Alive", node.get("alive")) and node.get("MetricsExportPort")
    ]
