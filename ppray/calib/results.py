"""What a calibration sequence sends between actors, and its gather on the aggregator.

A detector's :class:`CalibResult` travels as a Ray object ref like a science
:class:`~ppray.messages.DetectorResult`: a few kB (quality metrics, records,
a flat's :class:`~ppray.calib.flatnorm.FlatStatistics`), never an image. The
aggregator reduces them, order-independently, to the focal-plane factors of a
flat (:func:`flat_factors`) and to the sequence's :class:`CalibSummary`
(:func:`summarize_calibration`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field

from ppray.calib.flatnorm import FlatStatistics, focal_plane_scales
from ppray.calib.registry import CalibRecord, SequenceKindName
from ppray.messages import DetectorStatus

__all__ = ["CalibResult", "CalibSummary", "flat_factors", "summarize_calibration"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CalibResult(_Frozen):
    """One detector's part of a calibration sequence.

    A flat's first result is ``pending``: combined and measured, waiting for its
    focal-plane factor; the result after certification replaces it.
    """

    instrument: str
    group_id: str
    detector: str
    detector_id: int
    kind: SequenceKindName
    band: str | None = None
    status: DetectorStatus
    reason: str = ""
    retriable: bool = False
    n_expected: int = 0
    n_inputs: int = 0
    rejected: dict[int, str] = Field(
        default_factory=dict, description="Inputs left out (snap -> why): corrupt, wrong kind."
    )
    inputs: dict[str, str] = Field(
        default_factory=dict, description="Masters the inputs were corrected with: kind -> id."
    )
    quality: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Per product (bias, dark, flat, defects): metrics."
    )
    flat_statistics: FlatStatistics | None = None
    pending: bool = Field(default=False, description="A flat waiting for its focal-plane factor.")
    records: tuple[CalibRecord, ...] = ()
    combiner_peak_bytes: int = Field(
        default=0, description="Largest state the streaming combiner held, bytes."
    )
    timings_s: dict[str, float] = Field(default_factory=dict)
    last_raw_at: float | None = None
    finished_at: float = Field(default_factory=time.time)

    @property
    def calib_ids(self) -> dict[str, str]:
        """Certified products: kind -> calib_id."""
        return {r.kind: r.calib_id for r in self.records}


class CalibSummary(_Frozen):
    """The gather of one calibration sequence over its detectors."""

    instrument: str
    group_id: str
    kind: SequenceKindName
    band: str | None = None
    n_expected: int
    n_ok: int
    n_failed: int
    n_timed_out: int
    n_retriable: int = 0
    detectors: dict[str, DetectorStatus]
    reasons: dict[str, str] = Field(default_factory=dict)
    n_inputs: dict[str, int] = Field(default_factory=dict)
    calib_ids: dict[str, list[str]] = Field(
        default_factory=dict, description="Certified products: kind -> distinct calib_ids."
    )
    quality: dict[str, dict[str, dict[str, float]]] = Field(
        default_factory=dict, description="detector -> product -> metric."
    )
    focal_plane_factors: dict[str, float] = Field(
        default_factory=dict, description="Flats: detector -> factor its flat was multiplied by."
    )
    combiner_peak_bytes: dict[str, int] = Field(default_factory=dict)
    valid_from: float | None = None
    valid_to: float | None = None
    last_raw_at: float | None = None
    done_at: float
    latency_s: float | None = Field(
        default=None, description="Last raw arrival to the sequence's certification, seconds."
    )
    step_median_s: dict[str, float] = Field(default_factory=dict)
    summary_uri: str = ""


def flat_factors(results: Iterable[CalibResult]) -> dict[str, float]:
    """Focal-plane factors of the flats of ``results`` that wait for one (the reduction).

    Only statistics travel; the order of ``results`` does not change the factors.

    Raises
    ------
    ValueError
        When no result carries flat statistics.
    """
    stats = [r.flat_statistics for r in results if r.pending and r.flat_statistics is not None]
    return focal_plane_scales(sorted(stats, key=lambda s: s.detector))


def summarize_calibration(
    instrument: str,
    group_id: str,
    kind: SequenceKindName,
    expected: Iterable[str],
    results: Iterable[CalibResult],
    *,
    band: str | None = None,
    factors: Mapping[str, float] | None = None,
    done_at: float | None = None,
    summary_uri: str = "",
) -> CalibSummary:
    """Reduce a sequence's detector results (any order) to a :class:`CalibSummary`.

    A detector without a result counts as failed (and retriable); a flat still
    ``pending`` (never certified) as failed.
    """
    done_at = time.time() if done_at is None else done_at
    by_det = {r.detector: r for r in sorted(results, key=lambda r: r.detector)}
    names = sorted(set(expected) | set(by_det))
    statuses: dict[str, DetectorStatus] = {}
    reasons: dict[str, str] = {}
    for d in names:
        r = by_det.get(d)
        if r is None:
            statuses[d], reasons[d] = "failed", "no result"
        elif r.status == "ok" and r.pending:
            statuses[d], reasons[d] = "failed", "flat never certified"
        else:
            statuses[d] = r.status
            if r.reason:
                reasons[d] = r.reason
    ok = [by_det[d] for d in names if statuses[d] == "ok"]
    calib_ids: dict[str, set[str]] = {}
    steps: dict[str, list[float]] = {}
    for r in ok:
        for rec in r.records:
            calib_ids.setdefault(rec.kind, set()).add(rec.calib_id)
        for step, seconds in r.timings_s.items():
            steps.setdefault(step, []).append(seconds)
    valid = [rec for r in ok for rec in r.records]
    arrivals = [r.last_raw_at for r in by_det.values() if r.last_raw_at is not None]
    last_raw_at = max(arrivals) if arrivals else None
    return CalibSummary(
        instrument=instrument,
        group_id=group_id,
        kind=kind,
        band=band,
        n_expected=len(names),
        n_ok=len(ok),
        n_failed=sum(s == "failed" for s in statuses.values()),
        n_timed_out=sum(s == "timed_out" for s in statuses.values()),
        n_retriable=sum(
            d not in by_det or (statuses[d] == "failed" and by_det[d].retriable) for d in names
        ),
        detectors=statuses,
        reasons=reasons,
        n_inputs={r.detector: r.n_inputs for r in by_det.values()},
        calib_ids={k: sorted(v) for k, v in sorted(calib_ids.items())},
        quality={r.detector: r.quality for r in ok},
        focal_plane_factors={d: float(f) for d, f in sorted((factors or {}).items())},
        combiner_peak_bytes={r.detector: r.combiner_peak_bytes for r in by_det.values()},
        valid_from=min((rec.valid_from for rec in valid), default=None),
        valid_to=max((rec.valid_to for rec in valid if rec.valid_to is not None), default=None),
        last_raw_at=last_raw_at,
        done_at=done_at,
        latency_s=None if last_raw_at is None else done_at - last_raw_at,
        step_median_s={k: statistics.median(v) for k, v in sorted(steps.items())},
        summary_uri=summary_uri,
    )
