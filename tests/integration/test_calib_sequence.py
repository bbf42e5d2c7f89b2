"""Calibration sequences through the deployed actors, against the simulator's truth.

An afternoon on the synthetic camera (4 detectors of 512x512): a bias, a dark and
a flat sequence, each announced by its ``next_visit`` and fed raw by raw through
the coordinator, combined on the detector workers as the raws arrive, the flats
normalised over the focal plane on the aggregator, everything certified; then a
science visit that must use the new calibrations.

Expected noise of each master, as in ``tests/unit/test_calib_combine.py``: each
input pixel carries read noise and ADU rounding plus its row's overscan level
(``R``, e^2); darks and flats add their Poisson noise; every dark carries the
master bias's error, which averaging does not reduce.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import ray
from numpy.testing import assert_allclose
from ppray.actors.calib_cli import run_sequence
from ppray.actors.runtime import Deployment

from ppray.calib.registry import CalibRecord, CalibRegistry
from ppray.calib.results import CalibSummary
from ppray.calib.sequence import DetectorSequence
from ppray.config import DeploymentConfig, load_config
from ppray.instrument import load_instrument
from ppray.messages import Event, VisitSummary
from ppray.science.isr import OVERSCAN_SKIP_COLUMNS
from ppray.sim.calib_sequence import CalibrationSimulator
from ppray.sim.observatory import SimulatedObservatory
from ppray.storage import Storage

from .cluster_helpers import deployed, wait_until
from .test_metrics import scrape_until, value

pytestmark = pytest.mark.integration

SYN = load_instrument("synthetic")
N = {"bias": 8, "dark": 9, "flat": 10}
DARKTIME_S = 60.0
FLAT_EXPTIME_S = 10.0
FLUX_E = 20_000.0
T0 = 1_790_000_000.0  # 2026-09-21: the sequences' start, hence their validity


@dataclass
class Afternoon:
    config: DeploymentConfig
    deployment: Deployment
    simulator: CalibrationSimulator
    summaries: dict[str, CalibSummary]
    events: list[Event]
    science: VisitSummary
    worker_status: dict[str, dict[str, Any]]

    def record(self, kind: str, detector: str) -> CalibRecord:
        registry = CalibRegistry(Storage(self.config.calib_root), SYN.name)
        (record,) = [r for r in registry.records(kind, detector)]  # type: ignore[arg-type]
        return record

    def product(self, kind: str, detector: str) -> np.ndarray:
        registry = CalibRegistry(Storage(self.config.calib_root), SYN.name)
        return registry.read(self.record(kind, detector), (SYN.layout.ny, SYN.layout.nx))


@pytest.fixture(scope="module")
def afternoon(ray_session: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Afternoon]:
    root = tmp_path_factory.mktemp("calib")
    base = load_config(env={})
    cfg = base.rooted_at(str(root)).with_overrides(
        namespace=f"test-calib-{uuid.uuid4().hex[:8]}",
        sim={**base.sim.model_dump(), "time_scale": 0.005},
    )
    simulator = CalibrationSimulator(
        cfg,
        start_time=T0,
        darktime_s=DARKTIME_S,
        flat_flux_e=FLUX_E,
        flat_exptime_s=FLAT_EXPTIME_S,
        cosmic_rays=20,
    )
    with deployed(cfg) as dep:
        summaries = {kind: run_sequence(dep, simulator, kind, n, band="r") for kind, n in N.items()}
        status = {d: ray.get(w.ready.remote()) for d, w in dep.workers.items()}
        # A science visit after the sequences: its workers must take the new masters.
        observatory = SimulatedObservatory(cfg, start_time=simulator.start_time + 600.0)
        observatory.write_reference_data()  # refcat, templates (and the legacy calib.fits)
        visit = observatory.visit(0)
        ray.get(dep.coordinator.next_visit.remote(visit))
        for raw in observatory.expose(visit):
            ray.get(dep.coordinator.raw_arrived.remote(raw))
        science = dep.wait_visit(visit, 120.0)
        assert isinstance(science, VisitSummary)
        events = dep.events_since(0)[1]
        yield Afternoon(cfg, dep, simulator, summaries, events, science, status)


def _read_variance_e2() -> float:
    layout = SYN.layout
    n_os = layout.serial_overscan - OVERSCAN_SKIP_COLUMNS
    per_pixel = layout.read_noise_e**2 + layout.gain_e_per_adu**2 / 12.0
    return per_pixel * (1.0 + math.pi / (2.0 * n_os))


def _detectors() -> list[str]:
    return list(SYN.detector_names)


def test_every_detector_certified_every_product(afternoon: Afternoon) -> None:
    for kind, summary in afternoon.summaries.items():
        assert summary.kind == kind
        assert (summary.n_ok, summary.n_expected) == (4, 4), summary.reasons
        assert summary.n_inputs == dict.fromkeys(_detectors(), N[kind])
        assert summary.valid_from is not None and summary.valid_to is None  # open-ended
        products = {"flat": ["defects", "flat"]}.get(kind, [kind])
        assert sorted(summary.calib_ids) == products
        for ids in summary.calib_ids.values():
            assert len(ids) == 1  # one certification id shared by the detectors
    assert afternoon.summaries["flat"].band == "r"
    # Each sequence was corrected with the masters certified before it.
    bias_id = afternoon.summaries["bias"].calib_ids["bias"][0]
    dark_id = afternoon.summaries["dark"].calib_ids["dark"][0]
    for det in _detectors():
        assert afternoon.record("dark", det).valid_from > afternoon.record("bias", det).valid_from
        assert afternoon.record("flat", det).band == "r"
    assert bias_id.startswith("bias-") and dark_id.startswith("dark-")


def test_bias_recovers_truth_within_read_noise(afternoon: Afternoon) -> None:
    expected = math.sqrt(_read_variance_e2() / N["bias"])
    for det in _detectors():
        truth = afternoon.simulator.truth(det).calibs
        residual = (afternoon.product("bias", det) - truth.bias).astype(np.float64)
        assert_allclose(residual.std(), expected, rtol=0.1)
        assert abs(residual.mean()) < 0.05 * expected


def test_dark_recovers_truth_per_second(afternoon: Afternoon) -> None:
    for det in _detectors():
        truth = afternoon.simulator.truth(det).calibs
        good = ~truth.defects
        residual = (afternoon.product("dark", det) - truth.dark)[good].astype(np.float64)
        poisson = float(truth.dark[good].mean()) * DARKTIME_S
        own = (_read_variance_e2() + poisson) / N["dark"] / DARKTIME_S**2
        from_bias = _read_variance_e2() / N["bias"] / DARKTIME_S**2
        expected = math.sqrt(own + from_bias)
        assert_allclose(residual.std(), expected, rtol=0.1)
        assert abs(residual.mean()) < 0.05 * expected


def test_flat_recovers_truth_and_relative_gains(afternoon: Afternoon) -> None:
    sim = afternoon.simulator
    flats = {d: afternoon.product("flat", d) for d in _detectors()}
    good = {d: ~sim.truth(d).calibs.defects for d in _detectors()}
    for det, flat in flats.items():
        truth = sim.truth(det).calibs
        image = flat / flat[good[det]].mean(dtype=np.float64)
        residual = (image - truth.flat)[good[det]].astype(np.float64)
        signal = FLUX_E * sim.relative_gain(det)
        dark_e = float(truth.dark[good[det]].mean()) * FLAT_EXPTIME_S
        expected = math.sqrt((signal + dark_e + _read_variance_e2()) / N["flat"]) / signal
        assert_allclose(residual.std(), expected, rtol=0.1)
        assert abs(residual.mean()) < 0.05 * expected
    # The focal plane: median 1 over every good pixel, detectors' ratios kept.
    every = np.concatenate([flats[d][good[d]] for d in flats])
    assert_allclose(np.median(every), 1.0, atol=5e-4)
    level = {
        d: sim.relative_gain(d) * float(np.median(sim.truth(d).calibs.flat[good[d]])) for d in flats
    }
    ref = "R22_S00"
    for det, flat in flats.items():
        measured = np.median(flat[good[det]]) / np.median(flats[ref][good[ref]])
        assert_allclose(measured, level[det] / level[ref], rtol=1e-3)
    # The gains differ by percents: the test can tell a wrong normalisation.
    assert max(level.values()) / min(level.values()) > 1.02
    factors = afternoon.summaries["flat"].focal_plane_factors
    assert sorted(factors) == _detectors()
    for det in _detectors():
        assert afternoon.record("flat", det).quality["focal_plane_factor"] == factors[det]


def _recovered(found: np.ndarray, truth: pa.Table) -> np.ndarray:
    """Per truth row: whether at least 95% of its pixels are in the found mask."""
    out = []
    for row in truth.to_pylist():
        box = found[row["y0"] : row["y0"] + row["height"], row["x0"] : row["x0"] + row["width"]]
        out.append(box.mean() >= 0.95)
    return np.asarray(out, dtype=bool)


def test_defects_find_the_injected_ones(afternoon: Afternoon) -> None:
    for det in _detectors():
        truth = afternoon.simulator.truth(det)
        found = afternoon.product("defects", det)
        assert found.dtype == bool
        kinds = np.asarray(truth.defects["kind"].to_pylist())
        recovered = _recovered(found, truth.defects)
        for kind in ("hot", "cold", "dead", "bad_column"):
            assert (kinds == kind).sum() > 0
            assert recovered[kinds == kind].mean() >= 0.95, (det, kind)
        assert (found & ~truth.calibs.defects).sum() <= 20
        quality = afternoon.record("defects", det).quality
        assert quality["n_hot"] == pytest.approx((kinds == "hot").sum(), abs=3)


def test_quality_is_published_in_events_records_and_metrics(afternoon: Afternoon) -> None:
    done = [e for e in afternoon.events if e.kind == "calib_done"]
    assert [e.data["calibration"] for e in done] == ["bias", "dark", "flat"]
    for event in done:
        kind = event.data["calibration"]
        assert sorted(event.data["quality"]) == _detectors()
        for det, products in event.data["quality"].items():
            q = products[kind]
            assert q["n_inputs"] == N[kind] and q["noise"] > 0
            assert 0.7 < q["noise_ratio"] < 1.2  # the noise model is honest
            assert afternoon.record(kind, det).quality == q
    certified = [e for e in afternoon.events if e.kind == "calib_certified"]
    assert len(certified) == 3 * 4
    assert all(e.detector and e.data["quality"] for e in certified)
    namespace = afternoon.config.namespace

    def complete(samples: list[Any]) -> bool:
        return all(
            value(samples, "ppray_calib_quality", detector=d, kind=k, metric="noise") is not None
            for d in _detectors()
            for k in ("bias", "dark", "flat")
        )

    samples = scrape_until(
        namespace, complete, "the quality of every detector's bias, dark and flat"
    )
    assert complete(samples)
    for det in _detectors():
        noise = value(samples, "ppray_calib_quality", detector=det, kind="bias", metric="noise")
        assert noise == pytest.approx(afternoon.record("bias", det).quality["noise"], rel=1e-6)
        n_hot = value(samples, "ppray_calib_quality", detector=det, kind="defects", metric="n_hot")
        assert n_hot == afternoon.record("defects", det).quality["n_hot"]
    sequences = value(samples, "ppray_calib_sequences_total", outcome="ok")
    assert sequences == 3


def test_combiner_memory_does_not_grow_with_exposures(afternoon: Afternoon) -> None:
    plane = SYN.layout.ny * SYN.layout.nx * 4
    n_reference = afternoon.config.calibration.combine.n_reference
    peaks = {k: s.combiner_peak_bytes for k, s in afternoon.summaries.items()}
    for kind, per_detector in peaks.items():
        assert sorted(per_detector) == _detectors()
        # The reference inputs with their variances, whatever the number of exposures.
        assert set(per_detector.values()) == {2 * n_reference * plane}, kind
    assert N["flat"] > N["bias"]  # more exposures, the same memory
    # Nothing is held once the sequences are over.
    for status in afternoon.worker_status.values():
        assert status["calibration"]["combiner_nbytes"] == 0
        assert status["calibration"]["sequences"] == {}
        assert status["calibration"]["pending_flats"] == []


def test_the_next_science_visit_uses_the_new_calibrations(afternoon: Afternoon) -> None:
    science = afternoon.science
    assert (science.n_ok, science.n_expected) == (4, 4), science.reasons
    expected = {
        "bias": afternoon.summaries["bias"].calib_ids["bias"],
        "dark": afternoon.summaries["dark"].calib_ids["dark"],
        "flat": afternoon.summaries["flat"].calib_ids["flat"],
        "defects": afternoon.summaries["flat"].calib_ids["defects"],
    }
    assert science.calib_ids == expected


def test_a_dark_without_any_bias_fails_with_the_reason(
    ray_session: Any, config: DeploymentConfig, tmp_path: Path
) -> None:
    cfg = config.with_overrides(
        detectors=("R22_S00",), apdb={**config.apdb.model_dump(), "enabled": False}
    )
    with deployed(cfg) as dep:
        simulator = CalibrationSimulator(cfg, start_time=T0)
        summary = run_sequence(dep, simulator, "dark", 2)
        # Failed with the reason, not timed out waiting for a bias that never comes.
        assert summary.detectors == {"R22_S00": "failed"}
        assert "no master bias" in summary.reasons["R22_S00"]


def test_a_worker_killed_mid_sequence_redoes_its_detector(
    ray_session: Any, config: DeploymentConfig
) -> None:
    """The sequence is retried like a visit; the redone master is the undisturbed one."""
    cfg = config.with_overrides(
        detectors=("R22_S00", "R22_S01"), apdb={**config.apdb.model_dump(), "enabled": False}
    )
    with deployed(cfg) as dep:
        simulator = CalibrationSimulator(cfg, start_time=T0)
        visit = simulator.sequence("bias", 6)
        victim = "R22_S01"
        worker = dep.workers[victim]
        old_pid = ray.get(worker.ready.remote())["pid"]
        assert ray.get(dep.coordinator.next_visit.remote(visit)) == ["visit_accepted"]
        raws = []
        for snap in range(6):
            for raw in simulator.expose(visit, snap):
                raws.append(raw)
                ray.get(dep.coordinator.raw_arrived.remote(raw))
            if snap == 2:
                # Killed once it has combined some of the sequence.
                # (What it has combined stays until the sequence ends: a lasting state.)
                wait_until(
                    lambda: any(
                        s.get("added")
                        for s in ray.get(worker.ready.remote())["calibration"]["sequences"].values()
                    ),
                    60,
                    "some of the sequence combined",
                    poll_s=0.05,
                )
                ray.kill(worker, no_restart=False)
        summary = dep.wait_calib(visit, 90.0)
        assert isinstance(summary, CalibSummary)
        assert summary.detectors == {"R22_S00": "ok", "R22_S01": "ok"}, summary.reasons
        assert summary.n_inputs == {"R22_S00": 6, "R22_S01": 6}
        retried = [e for e in dep.events_since(0)[1] if e.kind == "retried"]
        assert [e.detector for e in retried] == [victim]
        assert ray.get(worker.ready.remote())["pid"] != old_pid
        # Same inputs, same order: the redone detector's master is what one pass gives.
        det = SYN.detector(victim)
        sequence = DetectorSequence("bias", SYN, det, expected=6)
        for raw in sorted((r for r in raws if r.detector == victim), key=lambda r: r.snap):
            sequence.add_raw(raw)
        registry = CalibRegistry(Storage(cfg.calib_root), SYN.name)
        (record,) = registry.records("bias", victim)
        certified = registry.read(record, (SYN.layout.ny, SYN.layout.nx))
        np.testing.assert_array_equal(certified, sequence.combine().combined.image)
