"""Visit-level reductions over detector results (order of inputs does not matter)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable

from ppray.messages import DetectorResult, VisitSummary

__all__ = ["summarize_visit"]


def summarize_visit(
    instrument: str,
    group_id: str,
    expected: Iterable[str],
    results: Iterable[DetectorResult],
    *,
    done_at: float | None = None,
    summary_uri: str = "",
) -> VisitSummary:
    """Reduce one visit's detector results to a :class:`VisitSummary`.

    Parameters
    ----------
    instrument, group_id
        The visit.
    expected
        Detectors that were asked to process the visit; one without a result counts
        as failed.
    results
        Detector results in any order.
    done_at
        When the gather finished (default: now).

    Returns
    -------
    VisitSummary
        Counts, per-detector status, total sources, the latency from the last raw
        arrival to ``done_at``, the per-step median timings and the calibrations
        used (kind -> distinct calib ids over the detectors).
    """
    done_at = time.time() if done_at is None else done_at
    by_det = {r.detector: r for r in sorted(results, key=lambda r: r.detector)}
    expected_set = sorted(set(expected) | set(by_det))
    statuses = {d: by_det[d].status if d in by_det else "failed" for d in expected_set}
    reasons = {d: by_det[d].reason if d in by_det else "no result" for d in expected_set}
    reasons = {d: r for d, r in reasons.items() if r}
    exposure_ids = sorted({r.exposure_id for r in by_det.values() if r.exposure_id is not None})
    arrivals = [r.last_raw_at for r in by_det.values() if r.last_raw_at is not None]
    last_raw_at = max(arrivals) if arrivals else None
    steps: dict[str, list[float]] = {}
    calib_ids: dict[str, set[str]] = {}
    for r in by_det.values():
        for step, seconds in r.timings_s.items():
            steps.setdefault(step, []).append(seconds)
        for kind, calib_id in r.calib_ids.items():
            calib_ids.setdefault(kind, set()).add(calib_id)
    return VisitSummary(
        instrument=instrument,
        group_id=group_id,
        exposure_id=exposure_ids[0] if exposure_ids else None,
        n_expected=len(expected_set),
        n_ok=sum(s == "ok" for s in statuses.values()),
        n_failed=sum(s == "failed" for s in statuses.values()),
        n_timed_out=sum(s == "timed_out" for s in statuses.values()),
        n_sources=sum(r.n_sources for r in by_det.values() if r.status == "ok"),
        n_dia_sources=sum(
            int(r.metrics.get("n_dia_sources", 0)) for r in by_det.values() if r.status == "ok"
        ),
        n_alerts=sum(r.n_alerts for r in by_det.values() if r.status == "ok"),
        # A detector without a result (its worker died) is retriable too.
        n_retriable=sum(
            d not in by_det or (by_det[d].status == "failed" and by_det[d].retriable)
            for d in expected_set
        ),
        detectors=statuses,
        reasons=reasons,
        last_raw_at=last_raw_at,
        done_at=done_at,
        latency_s=None if last_raw_at is None else done_at - last_raw_at,
        step_median_s={k: statistics.median(v) for k, v in sorted(steps.items())},
        calib_ids={k: sorted(v) for k, v in sorted(calib_ids.items())},
        summary_uri=summary_uri,
    )
