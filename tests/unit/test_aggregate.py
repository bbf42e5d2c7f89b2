from __future__ import annotations

import itertools

from ppray.messages import DetectorResult
from ppray.visit.aggregate import summarize_visit


def result(det: str, status: str = "ok", n: int = 10, arrived: float = 100.0) -> DetectorResult:
    return DetectorResult(
        instrument="Synthetic",
        group_id="g",
        detector=det,
        detector_id=0,
        status=status,
        exposure_id=42,
        n_sources=n,  # type: ignore[arg-type]
        timings_s={"isr": 0.1, "detect": 0.2},
        metrics={"n_dia_sources": n // 2},
        last_raw_at=arrived,
    )


def test_summary_counts_and_latency() -> None:
    results = [
        result("A", n=5, arrived=100.0),
        result("B", n=7, arrived=101.5),
        result("C", "failed", n=0),
        result("D", "timed_out", n=0),
    ]
    s = summarize_visit("Synthetic", "g", ["A", "B", "C", "D", "E"], results, done_at=103.0)
    assert (s.n_expected, s.n_ok, s.n_failed, s.n_timed_out) == (5, 2, 2, 1)
    assert s.detectors["E"] == "failed" and s.reasons["E"] == "no result"
    assert s.n_sources == 12
    assert s.n_dia_sources == 5
    assert s.latency_s == 1.5
    assert s.exposure_id == 42
    assert s.step_median_s == {"detect": 0.2, "isr": 0.1}
    # C failed for good (retriable False); E has no result (its worker died): retriable.
    assert s.n_retriable == 1
    retry = result("C", "failed", n=0).model_copy(update={"retriable": True})
    again = summarize_visit("Synthetic", "g", ["A", "C"], [result("A"), retry], done_at=103.0)
    assert again.n_retriable == 1


def test_summary_does_not_depend_on_input_order() -> None:
    results = [
        result("A", n=1, arrived=3.0),
        result("B", n=2, arrived=1.0),
        result("C", "failed", n=0),
    ]
    summaries = {
        summarize_visit("Synthetic", "g", ["A", "B", "C"], perm, done_at=10.0).model_dump_json()
        for perm in itertools.permutations(results)
    }
    assert len(summaries) == 1
